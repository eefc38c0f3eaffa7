"""Prefix reuse in the `hf` engine: time to first token with the prefix cache off and on.

One aggregated engine core (the model thread of an EPD worker, no cluster around it) serves
`--requests` prompts one at a time: a shared beginning of `--prefix` tokens (a long system
prompt, a few-shot preamble, a document asked about) and a distinct question of `--suffix`
tokens, each generating `--max-tokens` tokens. Reported per setting: TTFT p50/p99 (admission
to the first token), the prefix cache's hit ratio (hit / queried prompt tokens) and prompt
positions computed.

    .venv/bin/python -m benchmarks.prefix_cache [--model-path DIR] [--requests 40]
"""

import argparse
import asyncio
import json
import random
import time
from pathlib import Path
from typing import Any

import torch
from prometheus_client import REGISTRY

from benchmarks.load import _summary_ms, machine_info
from triptych.engines.hf.config import HfConfig
from triptych.engines.hf.core import EngineCore
from triptych.engines.hf.model import LanguageModel
from triptych.engines.hf.sequence import Prompt
from triptych.models.prefix import block_keys
from triptych.models.tiny import default_model_path
from triptych.protocol import SamplingOptions

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def prompts(count: int, prefix: int, suffix: int, vocab: int, seed: int) -> list[list[int]]:
    """`count` prompts sharing their first `prefix` tokens, each with its own `suffix`."""
    rng = random.Random(seed)
    shared = [rng.randrange(vocab) for _ in range(prefix)]
    return [shared + [rng.randrange(vocab) for _ in range(suffix)] for _ in range(count)]


def counter(name: str, stage: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, {"stage": stage, **labels}) or 0.0


async def run_setting(
    model: LanguageModel, stage: str, on: bool, work: list[list[int]], args: argparse.Namespace
) -> dict[str, Any]:
    config = HfConfig(
        max_len=args.prefix + args.suffix + args.max_tokens + 16,
        max_running=4,
        kv_tokens=4 * (args.prefix + args.suffix + args.max_tokens + 16),
        page_size=args.page_size,
        prefix_cache=on,
    )
    core = EngineCore(model, config, True, stage)
    core.start()
    sampling = SamplingOptions(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    ttfts: list[float] = []
    try:
        for prompt in work:
            keys = block_keys(prompt, [], args.page_size) if on else None
            started = time.perf_counter()
            first = None
            async with core.admission("bench", len(prompt), keys) as sequence:
                async for _ in core.generate(sequence, sampling, set(), Prompt(prompt)):
                    first = first or time.perf_counter()
            assert first is not None
            ttfts.append(first - started)
    finally:
        core.close()
    queried = counter("triptych_prefix_cache_queried_tokens_total", stage)
    hits = counter("triptych_prefix_cache_hit_tokens_total", stage)
    return {
        "prefix_cache": on,
        "ttft_ms": _summary_ms(ttfts),
        "hit_ratio": round(hits / queried, 4) if queried else 0.0,
        "prompt_tokens": sum(len(p) for p in work),
        "prompt_positions_computed": int(
            counter("triptych_engine_tokens_total", stage, phase="prefill")
        ),
    }


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    model = LanguageModel(str(args.model_path), args.device)
    work = prompts(args.requests, args.prefix, args.suffix, min(model.vocab_size, 1500), 0)
    runs = []
    for round_ in range(args.rounds):  # alternate, so drift on a shared machine hits both
        for on in (False, True):
            stage = f"bench-{'on' if on else 'off'}-{round_}"
            result = await run_setting(model, stage, on, work, args)
            result["round"] = round_
            print(json.dumps(result), flush=True)
            runs.append(result)
    return {
        "benchmark": "prefix_cache",
        "machine": machine_info(),
        "model": str(args.model_path),
        "device": args.device,
        "workload": {
            "requests": args.requests,
            "prefix_tokens": args.prefix,
            "suffix_tokens": args.suffix,
            "max_tokens": args.max_tokens,
            "page_size": args.page_size,
            "concurrency": 1,
            "threads": args.threads,
        },
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", type=Path, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--prefix", type=int, default=2000)
    parser.add_argument("--suffix", type=int, default=24)
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "prefix_cache_cpu.json")
    args = parser.parse_args()
    args.model_path = args.model_path or default_model_path()
    result = asyncio.run(bench(args))
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
