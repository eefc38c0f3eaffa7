"""The cost of structured outputs in the hf engine's decode step: 0, half and all of a batch's
rows constrained by a JSON schema.

One in-process decoding engine (`EngineCore`, the path every hf worker serves through) runs
``--concurrency`` sequences of ``--tokens`` tokens at once. Constrained rows follow a schema
they cannot finish within the budget (an array of at least 1000 digits), so every row decodes
every step. Reported per case: the median time between one row's consecutive tokens (the decode
step as a request sees it, masks and the matchers' bookkeeping included) and tokens per second.
With a constrained row in the batch the engine reads each step's tokens before launching the
next (a mask needs the token before it), so part of the cost is the lost overlap, which on a
GPU is larger than on a CPU.

    python benchmarks/structured.py [--model PATH] [--device cpu] [--out FILE]
"""

import argparse
import asyncio
import itertools
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from triptych.engines.hf.config import HfConfig
from triptych.engines.hf.core import EngineCore, load_core
from triptych.engines.hf.sequence import Prompt
from triptych.protocol import ResponseFormat, SamplingOptions

SCHEMA = {
    "type": "object",
    "properties": {
        "values": {
            "type": "array",
            "items": {"type": "integer", "minimum": 0, "maximum": 9},
            "minItems": 1000,
        }
    },
    "required": ["values"],
    "additionalProperties": False,
}
FORMAT = ResponseFormat(type="json_schema", schema_text=json.dumps(SCHEMA), strict=True)


async def one(core: EngineCore, index: int, tokens: int, constrained: bool) -> list[float]:
    """Run one sequence; the arrival time of each of its tokens."""
    prompt = [(index * 7 + k) % 500 + 10 for k in range(24)]
    options = SamplingOptions(
        max_tokens=tokens,
        temperature=0.0,
        ignore_eos=True,
        response_format=FORMAT if constrained else None,
    )
    arrivals: list[float] = []
    async with core.admission(f"bench-{index}", len(prompt)) as sequence:
        async for chunk in core.generate(sequence, options, set(), Prompt(prompt)):
            now = time.perf_counter()
            arrivals.extend([now] * len(chunk.token_ids))
    return arrivals


async def case(core: EngineCore, concurrency: int, constrained: int, tokens: int) -> dict[str, Any]:
    start = time.perf_counter()
    runs = await asyncio.gather(
        *(one(core, i, tokens, i < constrained) for i in range(concurrency))
    )
    wall = time.perf_counter() - start
    gaps = [b - a for arrivals in runs for a, b in itertools.pairwise(arrivals[1:])]
    return {
        "constrained_rows": constrained,
        "step_ms_median": statistics.median(gaps) * 1e3,
        "step_ms_mean": statistics.fmean(gaps) * 1e3,
        "tokens_per_s": sum(len(r) for r in runs) / wall,
        "wall_s": wall,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    model = args.model
    if not model:
        from triptych.models.tiny import default_model_path

        model = str(default_model_path())
    config = HfConfig(max_running=args.concurrency, kv_tokens=args.concurrency * 256)
    core = await load_core(model, args.device, config, True, "decode")
    try:
        await case(core, args.concurrency, args.concurrency, 8)  # warm up, compile the schema
        results = []
        for _ in range(args.repeats):
            for constrained in (0, args.concurrency // 2, args.concurrency):
                row = await case(core, args.concurrency, constrained, args.tokens)
                print(json.dumps(row), flush=True)
                results.append(row)
    finally:
        core.close()
    report = {
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "cpus_visible": len(os.sched_getaffinity(0)),
            "torch_threads": torch.get_num_threads(),
            "device": args.device,
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "model": Path(model).name,
        "concurrency": args.concurrency,
        "tokens_per_sequence": args.tokens,
        "schema": SCHEMA,
        "results": results,
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
