"""The text-completions shapes of a reply: ``text_completion`` objects and events."""

from pydantic import BaseModel

from triptych.components.frontend.reply import Reply
from triptych.protocol import CompletionChoice, CompletionResponse, TokenChunk


class CompletionReply(Reply):
    """``text_completion`` objects, whole or as events."""

    def opening(self) -> list[BaseModel]:
        self._offsets = [0] * len(self.outputs)
        return []

    def delta(self, index: int, text: str, chunk: TokenChunk) -> BaseModel | None:
        output = self.outputs[index]
        ids = chunk.token_ids if self.return_token_ids else None
        logprobs = None
        if self.logprobs and output.chunk_logprobs:
            logprobs = self.token_text.completion(output.chunk_logprobs, self._offsets[index])
        self._offsets[index] += len(text)
        if not (text or output.finished or ids or logprobs):
            return None
        choice = CompletionChoice(
            index=index,
            text=text,
            logprobs=logprobs,
            finish_reason=output.finish_reason,
            token_ids=ids,
        )
        return CompletionResponse(
            id=self.request_id, created=self._created, model=self.model, choices=[choice]
        )

    def text_event(self, index: int, text: str) -> BaseModel:
        choice = CompletionChoice(index=index, text=text)
        return CompletionResponse(
            id=self.request_id, created=self._created, model=self.model, choices=[choice]
        )

    def final_usage(self) -> BaseModel:
        return CompletionResponse(
            id=self.request_id,
            created=self._created,
            model=self.model,
            choices=[],
            usage=self.usage(),
        )

    def whole(self) -> BaseModel:
        choices = [
            CompletionChoice(
                index=index,
                text="".join(output.text),
                logprobs=self.token_text.completion(output.logprobs) if self.logprobs else None,
                finish_reason=output.finish_reason,
                token_ids=output.token_ids if self.return_token_ids else None,
            )
            for index, output in enumerate(self.outputs)
        ]
        return CompletionResponse(
            id=self.request_id, model=self.model, choices=choices, usage=self.usage()
        )
