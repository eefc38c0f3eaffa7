"""Bridging the model thread and the event loop: a running sequence as an async iterator."""

import asyncio
from collections.abc import AsyncIterator

import torch

from triptych.engines.hf.executor import ModelExecutor, Running
from triptych.engines.hf.model import SequenceKV
from triptych.engines.hf.sampler import Sampler
from triptych.protocol import GenerateRequest, TokenChunk, TokenLogprob


def sampler_for(request: GenerateRequest, executor: ModelExecutor) -> Sampler:
    """The request's sampler: EOS (unless ignored) and stop token ids end it."""
    stops = set(request.sampling.stop_token_ids)
    if not request.sampling.ignore_eos:
        stops.update(request.eos_token_ids)
    model = executor.model
    return Sampler(request.sampling, request.token_ids, stops, model.vocab_size, model.device)


async def decode_stream(
    executor: ModelExecutor,
    request_id: str,
    request: GenerateRequest,
    kv: SequenceKV,
    hidden: torch.Tensor,
) -> AsyncIterator[TokenChunk]:
    """Join the decode batch and yield chunks as they come (merging any that queued up).

    The caller holds a slot `reservation`. Leaving the iteration early (cancel, client gone)
    takes the sequence out of the batch.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[TokenChunk | BaseException] = asyncio.Queue()

    def emit(item: TokenChunk | BaseException) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, item)

    running = Running(
        request_id=request_id,
        sampler=sampler_for(request, executor),
        emit=emit,
        prefilled=kv,
        hidden=hidden,
        prompt_tokens=len(request.token_ids),
    )
    executor.add(running)
    try:
        while True:
            item = await queue.get()
            tokens: list[int] = []
            logprobs: list[TokenLogprob] | None = None
            prompt_tokens = 0
            while True:
                if isinstance(item, BaseException):
                    raise item
                tokens.extend(item.token_ids)
                if item.logprobs is not None:
                    logprobs = [*(logprobs or []), *item.logprobs]
                prompt_tokens = prompt_tokens or item.prompt_tokens
                if item.finish_reason is not None or queue.empty():
                    break
                item = queue.get_nowait()
            yield TokenChunk(
                token_ids=tokens,
                finish_reason=item.finish_reason,
                prompt_tokens=prompt_tokens,
                logprobs=logprobs,
            )
            if item.finish_reason is not None:
                return
    finally:
        running.cancelled = True
