"""Server-sent events of one streamed chat completion, framed without a model per token.

Every chunk of a stream shares its id, creation time and model, so the bytes around the delta
are built once per request and each token only encodes its text (and ids). The result is the
JSON `ChatCompletionChunk` serializes to, field for field.
"""

import msgspec

from triptych.protocol import ChatCompletionChunk
from triptych.protocol.openai import ChunkChoice, Delta

_encode = msgspec.json.encode


class ChunkFrames:
    """``data: {...}\\n\\n`` events of one streamed completion's content deltas."""

    def __init__(self, request_id: str, created: int, model: str) -> None:
        head = ChatCompletionChunk(
            id=request_id,
            created=created,
            model=model,
            choices=[ChunkChoice(delta=Delta(content=""))],
        ).model_dump_json()
        # Split the serialized chunk around the delta's content: everything else is fixed.
        marker = '"content":""'
        at = head.index(marker) + len(marker) - 2
        self._prefix = b"data: " + head[:at].encode()
        tail = head[at + 2 :]
        finish_at = tail.index('"finish_reason":null') + len('"finish_reason":')
        ids_at = tail.index('"token_ids":null') + len('"token_ids":')
        self._middle = tail[:finish_at].encode()
        self._between = tail[finish_at + 4 : ids_at].encode()
        self._suffix = tail[ids_at + 4 :].encode() + b"\n\n"

    def delta(
        self, text: str, finish_reason: str | None = None, token_ids: list[int] | None = None
    ) -> bytes:
        """The event of one content delta."""
        return b"".join(
            (
                self._prefix,
                _encode(text),
                self._middle,
                _encode(finish_reason),
                self._between,
                _encode(token_ids),
                self._suffix,
            )
        )
