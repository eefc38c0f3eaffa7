"""From OpenAI messages to token ids: chat template, tokenizer, image and video placeholder
expansion."""

import asyncio
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from triptych.components.frontend.images import ImageLoader, LoadedImage
from triptych.components.frontend.template import ChatTemplate
from triptych.components.frontend.videos import LoadedVideo, VideoLoader
from triptych.models import ImageLayout, ModelAdapter, VideoLayout, load_adapter
from triptych.models.video_decoder import VideoProbe
from triptych.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    ErrorCode,
    ImageItem,
    ImagePart,
    SamplingDefaults,
    ServiceError,
    TextPart,
    VideoItem,
    VideoPart,
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
    videos: list[VideoItem] = field(default_factory=list)


def _template_message(message: ChatMessage) -> dict[str, Any]:
    if message.content is None:
        return {"role": message.role, "content": ""}
    if isinstance(message.content, str):
        return {"role": message.role, "content": message.content}
    parts = [
        {"type": "text", "text": part.text}
        if isinstance(part, TextPart)
        else {"type": "video"}
        if isinstance(part, VideoPart)
        else {"type": "image"}
        for part in message.content
    ]
    return {"role": message.role, "content": parts}


class Preprocessor:
    """The model's tokenizer, chat template, sampling defaults and image geometry."""

    def __init__(
        self,
        model_path: str,
        loader: ImageLoader,
        videos: VideoLoader | None = None,
        chat_template: str | None = None,
        model_sampling_defaults: bool = True,
    ) -> None:
        root = Path(model_path)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.template = ChatTemplate(self.tokenizer, chat_template)
        self._encoder = self.tokenizer.backend_tokenizer
        self.adapter: ModelAdapter | None = load_adapter(model_path)
        self.loader = loader
        self.videos = videos
        """None: this frontend refuses videos."""
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
        self.preprocessing = _preprocessing_digest(root)
        """What the checkpoint's processor and vision tower make of pixels: part of every
        image's content key."""

    def _eos_ids(self, generation: dict[str, Any], config: dict[str, Any]) -> list[int]:
        eos: Any = generation.get("eos_token_id")
        if eos is None:
            eos = config.get("eos_token_id", self.tokenizer.eos_token_id)
        ids = eos if isinstance(eos, list) else [eos]
        return [int(i) for i in ids if i is not None]

    async def prompt(self, request: ChatCompletionRequest) -> Prompt:
        """Render, tokenize and expand; bad input raises a 400 `ServiceError`."""
        urls = [part.image_url.url for message in request.messages for part in message.images]
        video_urls = [part.video_url.url for message in request.messages for part in message.videos]
        if urls and self.adapter is None:
            raise ServiceError(
                ErrorCode.BAD_REQUEST, "this model does not accept images", param="messages"
            )
        if video_urls and (
            self.adapter is None or self.adapter.video_token_id is None or self.videos is None
        ):
            raise ServiceError(
                ErrorCode.BAD_REQUEST, "this model does not accept videos", param="messages"
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
        token_ids = self._ids(text, add_special_tokens=False)
        if not urls and not video_urls:
            return Prompt(token_ids=token_ids, images=[])
        adapter = self.adapter
        assert adapter is not None
        images, videos = await self._load(urls, video_urls, adapter)
        layouts: dict[int, ImageLayout | VideoLayout] = {
            id(image): adapter.image_layout(image.height, image.width) for image in images
        }
        layouts.update({id(video): video.layout for video in videos})
        in_order = _media_in_prompt_order(request, images, videos)
        try:
            expanded, offsets = adapter.expand_placeholders(
                token_ids, [layouts[id(item)] for item in in_order]
            )
        except ValueError as error:
            raise ServiceError(ErrorCode.BAD_REQUEST, str(error), param="messages") from None
        offset_of = {id(item): offset for item, offset in zip(in_order, offsets, strict=True)}
        image_items = [
            _image_item(i, layouts[id(i)], offset_of[id(i)], self.preprocessing) for i in images
        ]
        video_items = [_video_item(v, offset_of[id(v)]) for v in videos]
        return Prompt(token_ids=expanded, images=image_items, videos=video_items)

    def encode_text(self, text: str) -> list[int]:
        """A completions prompt's token ids (the tokenizer's own special tokens added, no chat
        template)."""
        return self._ids(text, add_special_tokens=True)

    def _ids(self, text: str, add_special_tokens: bool) -> list[int]:
        """`text`'s token ids, without the character offsets `encode` also computes (a fifth of
        its time on a chat prompt)."""
        [encoding] = self._encoder.encode_batch_fast([text], add_special_tokens=add_special_tokens)
        return list(encoding.ids)

    async def _load(
        self, urls: list[str], video_urls: list[str], adapter: ModelAdapter
    ) -> tuple[list[LoadedImage], list[LoadedVideo]]:
        def plan(probe: VideoProbe) -> VideoLayout:
            return adapter.video_layout(probe.frames, probe.fps, probe.height, probe.width)

        images = self.loader.load_all(urls)
        if not video_urls:
            return await images, []
        assert self.videos is not None
        videos = self.videos.load_all(video_urls, plan)
        loaded_images, loaded_videos = await asyncio.gather(images, videos)
        return loaded_images, loaded_videos


def _media_in_prompt_order(
    request: ChatCompletionRequest, images: list[LoadedImage], videos: list[LoadedVideo]
) -> list[LoadedImage | LoadedVideo]:
    """The loaded images and videos in the order their parts appear in the messages."""
    next_image, next_video = iter(images), iter(videos)
    ordered: list[LoadedImage | LoadedVideo] = []
    for message in request.messages:
        for part in message.content if isinstance(message.content, list) else []:
            if isinstance(part, ImagePart):
                ordered.append(next(next_image))
            elif isinstance(part, VideoPart):
                ordered.append(next(next_video))
    return ordered


def _preprocessing_digest(root: Path) -> bytes:
    """BLAKE2b of the checkpoint's config and processor settings (equal checkpoints under
    different paths agree)."""
    digest = hashlib.blake2b(digest_size=32)
    for name in ("config.json", "preprocessor_config.json"):
        path = root / name
        digest.update(name.encode() + b"\0")
        digest.update(path.read_bytes() if path.exists() else b"")
    return digest.digest()


def content_key(pixels: bytes, preprocessing: bytes, layout: ImageLayout | VideoLayout) -> str:
    """An image's content key: its pixels, the model's processing and the resized geometry."""
    digest = hashlib.blake2b(digest_size=32)
    digest.update(preprocessing)
    digest.update(pixels)
    resized = layout.resized if isinstance(layout, ImageLayout) else (0, 0)
    digest.update(repr((layout.grid_thw, resized)).encode())
    return digest.hexdigest()


def _image_item(
    image: LoadedImage, layout: ImageLayout | VideoLayout, offset: int, preprocessing: bytes
) -> ImageItem:
    return ImageItem(
        width=image.width,
        height=image.height,
        grid_thw=layout.grid_thw,
        num_tokens=layout.num_tokens,
        offset=offset,
        data=image.data,
        content_key=content_key(image.pixels_digest, preprocessing, layout)
        if image.pixels_digest
        else "",
    )


def _video_item(video: LoadedVideo, offset: int) -> VideoItem:
    layout = video.layout
    return VideoItem(
        width=video.probe.width,
        height=video.probe.height,
        frame_indices=list(layout.frame_indices),
        second_per_grid_t=layout.second_per_grid_t,
        grid_thw=layout.grid_thw,
        num_tokens=layout.num_tokens,
        offset=offset,
        data=video.data,
    )
