"""One request's token stream, kept alive across the loss of the instance that held it.

Until the first token arrives nothing has reached the client, so a request whose decode or
prefill instance died (or went silent, or could not be reached) is sent again to the entry
stage under a new attempt id, up to `--migration-limit` times; the failed attempt is cancelled
so that every stage frees what it held for it. After the first token a failure ends the
stream. A refusal for load (busy) is never retried: it goes back to the client as 503 with
Retry-After.
"""

import logging
import time
from collections.abc import AsyncGenerator, Sequence

from triptych.observability import metrics
from triptych.protocol import ErrorCode, GenerateRequest, ServiceError, TokenChunk, decode_chunk
from triptych.runtime import Client, ResponseStream, Runtime

log = logging.getLogger(__name__)


class Generation:
    """Token chunks of one request, from whichever attempt is serving it."""

    def __init__(
        self,
        runtime: Runtime,
        entry: Client,
        request: GenerateRequest,
        request_id: str,
        *,
        deadline: float,
        migration_limit: int,
        affinity: Sequence[str] = (),
    ) -> None:
        self._runtime = runtime
        self._entry = entry
        self._request = request
        self.request_id = request_id
        self._deadline = deadline
        self._limit = migration_limit
        self._affinity = affinity
        """Content keys of the request's images: the entry instance is picked by them."""
        self._attempt = 0
        self._stream: ResponseStream | None = None
        self._produced = False

    @property
    def attempt_id(self) -> str:
        """The id the current attempt travels under (the request id for the first)."""
        return self.request_id if not self._attempt else f"{self.request_id}.retry{self._attempt}"

    @property
    def instance(self) -> str:
        """The entry instance that accepted the current attempt."""
        return self._stream.instance if self._stream is not None else ""

    async def start(self) -> None:
        """Hand the request to an entry instance (raises `ServiceError` if none takes it)."""
        self._stream = await self._entry.call(
            self._request,
            request_id=self.attempt_id,
            deadline=self._deadline,
            affinity=self._affinity,
        )

    @property
    def pending(self) -> bool:
        """Whether a chunk has already arrived that `chunks` has not yielded yet."""
        return self._stream is not None and self._stream.pending

    async def chunks(self) -> AsyncGenerator[TokenChunk]:
        """Chunks as decode sends them, whichever attempt they come from."""
        while True:
            assert self._stream is not None, "start() first"
            try:
                async for data in self._stream:
                    chunk = decode_chunk(data)
                    self._produced = self._produced or bool(chunk.token_ids)
                    yield chunk
                return
            except ServiceError as error:
                if not self._may_retry(error):
                    raise
                await self._retry(error)

    async def close(self) -> None:
        """Cancel the current attempt if it has not finished. Safe to call twice."""
        stream = self._stream
        if stream is not None and not stream.finished:
            stream.close()
            await self._runtime.cancel(self.attempt_id)

    def _may_retry(self, error: ServiceError) -> bool:
        return (
            error.code == ErrorCode.UNAVAILABLE
            and error.info.retry_after_s is None
            and not self._produced
            and self._attempt < self._limit
            and time.time() < self._deadline
        )

    async def _retry(self, error: ServiceError) -> None:
        failed = self.attempt_id
        await self._runtime.cancel(failed)  # stages still holding the attempt free it
        self._attempt += 1
        metrics.MIGRATIONS.inc()
        log.warning(
            "attempt %s failed before its first token (%s); sending the request again "
            "(migration %d of %d)",
            failed,
            error.info.message,
            self._attempt,
            self._limit,
        )
        await self.start()
