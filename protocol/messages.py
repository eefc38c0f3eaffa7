"""Internal messages between triptych processes.

Tensors never ride here: an image embedding travels as an `EmbeddingHandle` that names where the
bytes lie, and the bytes move on the transfer layer (NIXL).
"""

from typing import Annotated, Literal

import msgspec
from pydantic import BaseModel, ConfigDict, Field

from triptych.protocol.sampling import FinishReason, SamplingOptions


class TensorHandle(BaseModel):
    """Where a tensor waits in another process's registered memory, for a NIXL READ.

    Image embeddings and KV caches travel as handles; the bytes move on NIXL. The descriptors
    are accepted only from the control plane (NATS), never from an HTTP client.
    """

    model_config = ConfigDict(frozen=True, ser_json_bytes="base64", val_json_bytes="base64")

    agent: str
    """Name of the exporter's transfer agent ("simulated" when no bytes exist)."""
    agent_metadata: bytes = b""
    """The agent's connection metadata."""
    descriptors: bytes = b""
    """Serialized memory descriptors of the exported region."""
    shape: tuple[int, ...]
    dtype: str
    """Torch dtype name without the "torch." prefix, e.g. "bfloat16"."""
    device: str = "cpu"
    """"cpu" for DRAM, "cuda" for VRAM."""
    key: str = ""
    """The reader's completion notification carries this key; the exporter then frees it."""
    offset: int = 0
    """Where the tensor starts in the exporter's registered pool."""
    ipc: bytes = b""
    """The exporter's VRAM pool as CUDA IPC arguments, for a reader on the same GPU."""
    gpu: str = ""
    """Which physical GPU that pool is on (host boot id and GPU UUID)."""


EmbeddingHandle = TensorHandle
"""A request's image and video embeddings, rows in prompt order: shape (num_tokens,
hidden_size)."""


class _Placed(BaseModel):
    """What an image and a video share as they travel down the pipeline: their size, where
    their placeholder tokens stand in the prompt, and their encoded bytes."""

    model_config = ConfigDict(frozen=True, ser_json_bytes="base64", val_json_bytes="base64")

    width: int = Field(ge=1)
    """Original width in pixels (of a video: of its frames)."""
    height: int = Field(ge=1)
    """Original height in pixels."""
    grid_thw: tuple[int, int, int]
    """Patch grid (temporal, height, width) after resizing, as the vision tower sees it."""
    num_tokens: int = Field(ge=1)
    """Number of placeholder tokens it occupies in `token_ids`."""
    offset: int = Field(ge=0)
    """Index in `token_ids` of its first placeholder token."""
    data: bytes | None = None
    """The validated encoded file (PNG, JPEG, MP4, WebM, ...) until an encoder has consumed
    it, when small enough to ride inside the message."""
    data_handle: TensorHandle | None = None
    """Where the frontend keeps the encoded file (a uint8 tensor) for a NIXL READ, when it is
    too large to ride inside a control-plane message; None once the bytes are in `data` or
    consumed."""


class ImageItem(_Placed):
    """One image of a request, as it travels down the pipeline."""

    content_key: str = ""
    """What the image is, whatever its URL or file format: a BLAKE2b digest (hex) of its
    decoded RGB pixels and of what shapes them for the vision tower (the model's processor
    settings, the resized geometry). Equal keys mean equal embeddings; encoders cache by it
    and callers route by it. Empty: not cacheable."""


class VideoItem(_Placed):
    """One video of a request, as it travels down the pipeline.

    The encoder decodes the same bytes the frontend checked and keeps the same frames.
    """

    frame_indices: list[int] = Field(min_length=1)
    """Which decoded frames (0-based, ascending) the vision tower sees, as the checkpoint's
    processor samples them (fps, min/max frames, a multiple of the temporal patch size)."""
    second_per_grid_t: float = Field(gt=0)
    """Seconds of video one temporal patch spans (Qwen2.5-VL's M-RoPE time axis)."""


MediaItem = ImageItem | VideoItem
"""An image or a video: what an encoder embeds."""


class GenerateRequest(BaseModel):
    """A tokenized request: frontend → encode → decode (→ prefill).

    The same message goes to prefill when decode asks it for a bootstrap room, so both sides see
    identical inputs (as SGLang's disaggregation requires).
    """

    model_config = ConfigDict(frozen=True, ser_json_bytes="base64", val_json_bytes="base64")

    model: str
    """Served model name."""
    token_ids: list[int] = Field(min_length=1)
    """Prompt token ids, image and video placeholders already expanded to each item's
    `num_tokens`."""
    images: list[ImageItem] = []
    """Images in prompt order."""
    videos: list[VideoItem] = []
    """Videos in prompt order."""
    embeddings: EmbeddingHandle | None = None
    """Where the encoder left the embeddings of all images and videos (rows in prompt order),
    once encoded; None while they still carry their bytes, and for text-only requests."""
    sampling: SamplingOptions
    eos_token_ids: list[int] = []
    """The model's end-of-sequence ids (honoured unless `sampling.ignore_eos`)."""
    bootstrap_room: int | None = Field(default=None, ge=0, lt=2**63)
    """Decode → prefill: the room decode chose (and already waits in) at the bootstrap address
    prefill announces in its discovery metadata; None: prefill picks one and answers it."""

    @property
    def media(self) -> list[MediaItem]:
        """Images and videos together, in prompt order."""
        items: list[MediaItem] = [*self.images, *self.videos]
        return sorted(items, key=lambda item: item.offset)

    @property
    def media_tokens(self) -> int:
        """Placeholder tokens of every image and video (= embedding rows)."""
        return sum(item.num_tokens for item in self.media)


class BootstrapInfo(BaseModel):
    """Prefill's answer to decode: the room in which the KV cache will be handed over."""

    model_config = ConfigDict(frozen=True)

    bootstrap_host: str
    bootstrap_port: int = Field(ge=1, le=65535)
    bootstrap_room: int = Field(ge=0, lt=2**63)
    outcome_port: int | None = Field(default=None, ge=1, le=65535)
    """When the KV cache moves through the engine's own bootstrap server (SGLang's, at
    ``bootstrap_host:bootstrap_port``): the port on ``bootstrap_host`` of triptych's room
    endpoint, where prefill reports the room's outcome (a failure at once). None when
    ``bootstrap_port`` is triptych's room endpoint itself."""


class TokenLogprob(msgspec.Struct, frozen=True, kw_only=True):
    """How likely one generated token was, and which tokens were most likely in its place.

    Engines take both from the distribution the token was drawn from (see
    `SamplingOptions.logprobs` for which one that is). A msgspec struct, as it travels inside
    `TokenChunk`.
    """

    logprob: float
    """Natural log of the token's probability."""
    top: list[tuple[int, float]] = []
    """``(token id, logprob)`` of the most likely tokens at this position, most likely first
    (`SamplingOptions.logprobs` of them)."""


class TokenChunk(msgspec.Struct, frozen=True, kw_only=True):
    """Generated tokens, streamed from decode straight to the frontend.

    A msgspec struct rather than a pydantic model: one travels per token, and msgspec encodes
    and validates it several times faster (`encode_chunk`, `decode_chunk`).
    """

    token_ids: list[int]
    """New token ids since the previous chunk (may be empty on the final chunk)."""
    finish_reason: FinishReason | None = None
    """Set on the last chunk of the stream."""
    cached_tokens: int = 0
    """Prompt tokens whose KV cache came from a prefix cache instead of being computed (set
    on the first chunk)."""
    logprobs: list[TokenLogprob] | None = None
    """One entry per token of `token_ids`, when the request asked for logprobs."""


_chunk_decoder = msgspec.json.Decoder(TokenChunk)
encode_chunk = msgspec.json.Encoder().encode
"""A `TokenChunk` as JSON bytes."""


def decode_chunk(data: bytes) -> TokenChunk:
    """A `TokenChunk` from JSON bytes; raises `ValueError` when they are not one."""
    try:
        return _chunk_decoder.decode(data)
    except msgspec.DecodeError as error:
        raise ValueError(f"invalid token chunk: {error}") from None


class KVHandle(BaseModel):
    """Where prefill left a request's KV cache, for decode to read (NIXL READ)."""

    model_config = ConfigDict(frozen=True)

    tensor: TensorHandle
    """The cache (and whatever else the engine packs with it) as one flat tensor."""
    num_tokens: int = Field(ge=0)
    """Tokens whose keys and values the cache holds."""
    layout: str = ""
    """Engine-specific layout tag (layers, heads, head size, dtype); decode refuses a layout it
    cannot read."""


class RoomJoin(BaseModel):
    """Decode → prefill's bootstrap endpoint: "I am the decode side of this room"."""

    type: Literal["join"] = "join"

    room: int


class RoomReady(BaseModel):
    """Prefill → decode: the KV cache of the room's request is ready."""

    type: Literal["ready"] = "ready"

    model_config = ConfigDict(ser_json_bytes="base64", val_json_bytes="base64")

    room: int
    kv: KVHandle | None = None
    """None for engines that only simulate the hand-off."""
    rope_delta: int = 0
    """M-RoPE position offset decode continues from (Qwen-VL)."""
    cached_tokens: int = 0
    """Prompt tokens prefill took from its prefix cache (reported in the usage)."""


class RoomFailed(BaseModel):
    """Prefill → decode: the room's request failed; decode must not wait for it."""

    type: Literal["failed"] = "failed"

    room: int
    message: str
    code: int = 500


class RoomDone(BaseModel):
    """Decode → prefill: the KV cache was received; prefill may free it."""

    type: Literal["done"] = "done"

    room: int


RoomMessage = Annotated[RoomJoin | RoomReady | RoomFailed | RoomDone, Field(discriminator="type")]
"""Any message on a bootstrap connection."""
