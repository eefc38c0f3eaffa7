"""The chat-completions shapes of a reply: role deltas, content deltas, messages."""

from pydantic import BaseModel

from triptych.components.frontend.reply import Reply
from triptych.protocol import ChatCompletionChunk, ChatCompletionResponse, TokenChunk
from triptych.protocol.openai import AssistantMessage, Choice, ChunkChoice, Delta


class ChatReply(Reply):
    """``chat.completion`` objects and ``chat.completion.chunk`` events."""

    def _chunk(self, choices: list[ChunkChoice], **fields: object) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.request_id, created=self._created, model=self.model, choices=choices, **fields
        )

    def opening(self) -> list[BaseModel]:
        return [
            self._chunk([ChunkChoice(index=i, delta=Delta(role="assistant", content=""))])
            for i in range(len(self.outputs))
        ]

    def delta(self, index: int, text: str, chunk: TokenChunk) -> BaseModel | None:
        output = self.outputs[index]
        ids = chunk.token_ids if self.return_token_ids else None
        logprobs = self.token_text.chat(output.chunk_logprobs) if self.logprobs else None
        if not (text or output.finished or ids or (logprobs and logprobs.content)):
            return None
        choice = ChunkChoice(
            index=index,
            delta=Delta(content=text),
            finish_reason=output.finish_reason,
            logprobs=logprobs,
            token_ids=ids,
        )
        return self._chunk([choice])

    def text_event(self, index: int, text: str) -> BaseModel:
        return self._chunk([ChunkChoice(index=index, delta=Delta(content=text))])

    def final_usage(self) -> BaseModel:
        return self._chunk([], usage=self.usage())

    def whole(self) -> BaseModel:
        choices = [
            Choice(
                index=index,
                message=AssistantMessage(content="".join(output.text)),
                finish_reason=output.finish_reason,
                logprobs=self.token_text.chat(output.logprobs) if self.logprobs else None,
                token_ids=output.token_ids if self.return_token_ids else None,
            )
            for index, output in enumerate(self.outputs)
        ]
        return ChatCompletionResponse(
            id=self.request_id, model=self.model, choices=choices, usage=self.usage()
        )
