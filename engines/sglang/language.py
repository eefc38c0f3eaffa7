"""One ``sglang.Engine`` serving the language model (SGLang 0.5.23's offline engine API).

The engine's tokenizer manager lives in this process, on this worker's event loop; its
scheduler and detokenizer are child processes SGLang starts and stops. `stream` turns one
``async_generate(..., stream=True)`` into triptych's `TokenChunk`s, and aborts the SGLang
request whenever the caller stops listening before it finished (cancel, failure), so that
SGLang frees its KV blocks and the peer of a disaggregated pair learns of it at once.
"""

import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from triptych.engines.registry import EngineConfig
from triptych.engines.sglang.preflight import require_gpu_runtime
from triptych.engines.sglang.requests import image_item, sampling_params
from triptych.engines.sglang.server_args import Role, server_args
from triptych.protocol import (
    BootstrapInfo,
    ErrorCode,
    FinishReason,
    GenerateRequest,
    ServiceError,
    TokenChunk,
    TokenLogprob,
)
from triptych.transfer import ImageEmbeddings

log = logging.getLogger(__name__)


def finish_reason(meta_info: dict[str, Any]) -> FinishReason | None:
    """triptych's finish reason for SGLang's ``meta_info``; an abort is raised as an error."""
    reason = meta_info.get("finish_reason")
    if not reason:
        return None
    kind = reason.get("type")
    if kind == "length":
        return "length"
    if kind == "stop":
        return "stop"
    code = int(reason.get("status_code") or ErrorCode.INTERNAL)
    message = str(reason.get("message") or "request aborted")
    raise ServiceError(code if 400 <= code < 600 else ErrorCode.INTERNAL, f"sglang: {message}")


class LanguageEngine:
    """An ``sglang.Engine`` for one role (``prefill``, ``decode`` or ``agg``)."""

    def __init__(self, config: EngineConfig, role: Role) -> None:
        self.config = config
        self.role = role
        self.engine: Any = None
        self.server_args: Any = None

    def start(self) -> None:
        """Build the engine (blocks while SGLang loads the weights and captures graphs).

        On this thread on purpose: SGLang installs signal handlers and binds its tokenizer
        manager to the running loop, both of which only work from the main thread's loop.
        """
        if self.engine is not None:
            return
        require_gpu_runtime(self.role)
        import sglang

        self.server_args = server_args(self.config, self.role)
        started = time.perf_counter()
        self.engine = sglang.Engine(server_args=self.server_args)
        log.info("sglang.Engine (%s) ready in %.1f s", self.role, time.perf_counter() - started)

    @property
    def context_length(self) -> int | None:
        """Tokens one sequence may hold: ``--max-model-len``, else the model's (SGLang's
        tokenizer manager resolved it at start)."""
        if self.engine is None:
            return None
        return int(self.engine.tokenizer_manager.context_len)

    @property
    def bootstrap_port(self) -> int:
        """Port of SGLang's bootstrap server (a prefill engine's)."""
        return int(self.server_args.disaggregation_bootstrap_port)

    def close(self) -> None:
        """Shut SGLang's processes down. Safe to call twice."""
        if self.engine is not None:
            engine, self.engine = self.engine, None
            engine.shutdown()

    def abort(self, rid: str) -> bool:
        """Abort an SGLang request (frees its KV; a disaggregated peer sees it fail).

        Returns False when SGLang does not know `rid` (yet): its stream registers the request
        on its first step, and an abort before that would be lost.
        """
        if self.engine is None:
            return False
        manager = self.engine.tokenizer_manager
        if rid not in manager.rid_to_state:
            return False
        manager.abort_request(rid=rid)
        return True

    async def stream(
        self,
        rid: str,
        request: GenerateRequest,
        embeddings: ImageEmbeddings | None,
        bootstrap: BootstrapInfo | None = None,
    ) -> AsyncIterator[TokenChunk]:
        """Generate for `request` as SGLang request `rid`; the last chunk has finish_reason."""
        assert self.engine is not None, "start() first"
        outputs = await self.engine.async_generate(
            **generate_kwargs(rid, request, embeddings, bootstrap)
        )
        finished = False
        first = True
        try:
            async for output in outputs:
                meta = output.get("meta_info", {})
                reason = finish_reason(meta)
                finished = reason is not None
                token_ids = [int(t) for t in output.get("output_ids", [])]
                yield TokenChunk(
                    token_ids=token_ids,
                    finish_reason=reason,
                    cached_tokens=int(meta.get("cached_tokens", 0)) if first else 0,
                    logprobs=token_logprobs(meta, len(token_ids))
                    if request.sampling.logprobs is not None
                    else None,
                )
                first = False
                if finished:
                    return
            raise ServiceError(ErrorCode.INTERNAL, "sglang: the stream ended without a finish")
        finally:
            if not finished:
                self.abort(rid)


def generate_kwargs(
    rid: str,
    request: GenerateRequest,
    embeddings: ImageEmbeddings | None,
    bootstrap: BootstrapInfo | None,
) -> dict[str, Any]:
    """The keyword arguments of ``Engine.async_generate`` for one request."""
    kwargs: dict[str, Any] = {
        "input_ids": list(request.token_ids),
        "sampling_params": sampling_params(request),
        "stream": True,
        "rid": rid,
    }
    if request.sampling.logprobs is not None:
        kwargs["return_logprob"] = True
        kwargs["top_logprobs_num"] = request.sampling.logprobs
        kwargs["logprob_start_len"] = -1  # the output's, not the prompt's
    if request.images or request.videos:  # a video is refused there
        kwargs["image_data"] = [image_item(request, embeddings)]
    if bootstrap is not None:
        kwargs["bootstrap_host"] = bootstrap.bootstrap_host
        kwargs["bootstrap_port"] = bootstrap.bootstrap_port
        kwargs["bootstrap_room"] = bootstrap.bootstrap_room
    return kwargs


def token_logprobs(meta_info: dict[str, Any], count: int) -> list[TokenLogprob]:
    """The logprobs of a chunk's `count` new tokens from SGLang's ``meta_info`` (the last
    `count` entries: SGLang may send the whole list so far or only the new part).

    ``output_token_logprobs`` holds ``(logprob, token id, text)`` per token and
    ``output_top_logprobs`` a list of those per position; SGLang computes them itself.
    """
    if not count:
        return []
    chosen = (meta_info.get("output_token_logprobs") or [])[-count:]
    tops = (meta_info.get("output_top_logprobs") or [])[-count:]
    if len(tops) < len(chosen):
        tops = [None] * (len(chosen) - len(tops)) + list(tops)
    return [
        TokenLogprob(
            logprob=_floor(entry[0]),
            top=[(int(t[1]), _floor(t[0])) for t in (top or [])],
        )
        for entry, top in zip(chosen, tops, strict=True)
    ]


def _floor(logprob: float | None) -> float:
    """SGLang's -inf (or None) as a finite floor: JSON has no infinity."""
    return max(float(logprob), -9999.0) if logprob is not None else -9999.0
