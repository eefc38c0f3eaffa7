"""From OpenAI messages to token ids: chat template, tokenizer, image placeholder expansion."""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from triptych.components.frontend.images import ImageLoader
from triptych.components.frontend.template import ChatTemplate
from triptych.models import ModelAdapter, load_adapter
from triptych.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    ErrorCode,
    ImageItem,
    SamplingDefaults,
    ServiceError,
    TextPart,
)

_SAMPLING_KEYS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}
"""``generation_config.json`` keys that become sampling defaults (as vLLM and SGLang read them)."""


@dataclass(frozen=True)
class Prompt:
    """A request's prompt, ready for the pipeline."""

    token_ids: list[int]
    images: list[ImageItem]


def _template_message(message: ChatMessage) -> dict[str, Any]:
    if message.content is None:
        return {"role": message.role, "content": ""}
    if isinstance(message.content, str):
        return {"role": message.role, "content": message.content}
    parts = [
        {"type": "text", "text": part.text} if isinstance(part, TextPart) else {"type": "image"}
        for part in message.content
    ]
    return {"role": message.role, "content": parts}


class Preprocessor:
    """The model's tokenizer, chat template, sampling defaults and image geometry."""

    def __init__(
        self,
        model_path: str,
        loader: ImageLoader,
        chat_template: str | None = None,
        model_sampling_defaults: bool = True,
    ) -> None:
        root = Path(model_path)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.template = ChatTemplate(self.tokenizer, chat_template)
        self._encoder = self.tokenizer.backend_tokenizer
        self.adapter: ModelAdapter | None = load_adapter(model_path)
        self.loader = loader
        config = json.loads((root / "config.json").read_text())
        text_config = config.get("text_config") or config
        self.context_length = int(
            text_config.get("max_position_embeddings")
            or config.get("max_position_embeddings")
            or 4096
        )
        generation_file = root / "generation_config.json"
        generation = json.loads(generation_file.read_text()) if generation_file.exists() else {}
        self.eos_token_ids = self._eos_ids(generation, config)
        self.sampling_defaults = SamplingDefaults.model_validate(
            {
                ours: generation[theirs]
                for theirs, ours in _SAMPLING_KEYS.items()
                if model_sampling_defaults and generation.get(theirs) is not None
            }
        )
        """What requests get for the sampling fields they leave out (the checkpoint's
        ``generation_config.json``, unless ``--sampling-defaults openai``)."""

    def _eos_ids(self, generation: dict[str, Any], config: dict[str, Any]) -> list[int]:
        eos: Any = generation.get("eos_token_id")
        if eos is None:
            eos = config.get("eos_token_id", self.tokenizer.eos_token_id)
        ids = eos if isinstance(eos, list) else [eos]
        return [int(i) for i in ids if i is not None]

    async def prompt(self, request: ChatCompletionRequest) -> Prompt:
        """Render, tokenize and expand; bad input raises a 400 `ServiceError`."""
        urls = [part.image_url.url for message in request.messages for part in message.images]
        if urls and self.adapter is None:
            raise ServiceError(
                ErrorCode.BAD_REQUEST, "this model does not accept images", param="messages"
            )
        if request.continue_final_message and request.messages[-1].role != "assistant":
            raise ServiceError(
                ErrorCode.BAD_REQUEST,
                "'continue_final_message' needs the last message to be the assistant's",
                param="continue_final_message",
            )
        try:
            text = self.template.render(
                [_template_message(message) for message in request.messages],
                add_generation_prompt=request.add_generation_prompt is not False,
                continue_final_message=bool(request.continue_final_message),
                variables=request.chat_template_kwargs,
            )
        except Exception as error:  # the template's own checks (e.g. roles out of order)
            raise ServiceError(
                ErrorCode.BAD_REQUEST,
                f"the chat template refused the messages: {error}",
                param="messages",
            ) from None
        token_ids: list[int] = self._encoder.encode(text, add_special_tokens=False).ids
        if not urls:
            return Prompt(token_ids=token_ids, images=[])
        assert self.adapter is not None
        loaded = await self.loader.load_all(urls)
        layouts = [self.adapter.image_layout(image.height, image.width) for image in loaded]
        try:
            expanded, offsets = self.adapter.expand_placeholders(token_ids, layouts)
        except ValueError as error:
            raise ServiceError(ErrorCode.BAD_REQUEST, str(error), param="messages") from None
        images = [
            ImageItem(
                width=image.width,
                height=image.height,
                grid_thw=layout.grid_thw,
                num_tokens=layout.num_tokens,
                offset=offset,
                data=image.data,
            )
            for image, layout, offset in zip(loaded, layouts, offsets, strict=True)
        ]
        return Prompt(token_ids=expanded, images=images)

    def encode_text(self, text: str) -> list[int]:
        """A completions prompt's token ids (the tokenizer's own special tokens added, no chat
        template)."""
        return list(self._encoder.encode(text, add_special_tokens=True).ids)
