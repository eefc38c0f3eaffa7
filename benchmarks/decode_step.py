"""The hf engine's decode step in one process, against the memory bound, at several batch sizes.

1. Attention alone, at the benchmark's shape (28 query heads, 4 KV heads, head 128, 16-token
   blocks scattered over the cache): the Triton kernel at each split count against PyTorch
   (gather every row's positions, then one masked SDPA call), per batch size.
2. The whole step, as the engine runs it: a decoding `ModelRunner` with ``B`` sequences of
   ``--length`` positions (random keys and values), each step launched before the previous
   one's tokens are read; greedy, and with the batched sampler (temperature 0.8, top-p 0.9,
   top-k 50).

The bound step reads the language model's weights and the batch's KV caches once at the device
copy bandwidth measured here. Writes ``decode_step_<shape>.json`` into ``--out``.

    python benchmarks/decode_step.py [--checkpoint /tmp/triptych-7b-random] [--out DIR]
"""

import functools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_epd import build_checkpoint, copy_bandwidth, gpu_parser, run_info
from gpu_hf import weight_bytes

ROOT = Path(__file__).resolve().parents[1]


def timed(work: Any, repeats: int = 50) -> float:
    """Median milliseconds of `work()` on the device (CUDA events)."""
    for _ in range(3):
        work()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        work()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def attention(batches: list[int], length: int) -> dict[str, Any]:
    from triptych.engines.hf.kv_cache import KVLayer
    from triptych.engines.hf.paged_attention import PageTable, splits_for
    from triptych.engines.hf.paged_attention import reference_paged_attention as reference
    from triptych.engines.hf.triton_kernels import triton_paged_attention

    heads, kv_heads, dim, page = 28, 4, 128, 16
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    out: dict[str, Any] = {}
    for batch in batches:
        per_row = -(-length // page)
        blocks = batch * per_row + 1
        keys = torch.randn(blocks, page, kv_heads, dim, device="cuda", dtype=torch.bfloat16)
        values = torch.randn_like(keys)
        tables = (torch.randperm(blocks - 1, device="cuda")[: batch * per_row] + 1).view(
            batch, per_row
        )
        tables = tables.int()
        lens = torch.full((batch,), length, device="cuda", dtype=torch.int32)
        query = torch.randn(batch, heads, dim, device="cuda", dtype=torch.bfloat16)
        scale = dim**-0.5
        pages = PageTable(tables, lens)
        inputs = (query, KVLayer(keys, values), pages)
        want = reference(query.float(), KVLayer(keys.float(), values.float()), pages, scale=scale)
        row: dict[str, Any] = {
            "kv_bytes": batch * length * kv_heads * dim * 2 * 2,
            "auto_splits": splits_for(batch, kv_heads, sms),
            "reference_ms": timed(functools.partial(reference, *inputs, scale=scale)),
        }
        for splits in (1, 2, 4, 8, 16, 32):
            kernel = functools.partial(triton_paged_attention, *inputs, scale=scale, splits=splits)
            row[f"triton_{splits}_max_error"] = float((kernel().float() - want).abs().max())
            row[f"triton_{splits}_ms"] = timed(kernel)
        out[str(batch)] = row
        print(f"attention B={batch}: {json.dumps(row)}", flush=True)
    return out


def steps(checkpoint: Path, batches: list[int], length: int, count: int) -> dict[str, Any]:
    from triptych.engines.hf.config import HfConfig
    from triptych.engines.hf.model import LanguageModel
    from triptych.engines.hf.runner import ModelRunner
    from triptych.engines.hf.sequence import Prompt, Sequence, Status
    from triptych.protocol import SamplingOptions

    model = LanguageModel(str(checkpoint), "cuda")
    widest = max(batches)
    config = HfConfig(
        max_len=length + 2 * count + 16,
        max_running=widest,
        kv_tokens=widest * (length + 2 * count + 16),
    )
    runner = ModelRunner(model, config, decoding=True)
    started = time.perf_counter()
    runner.capture()
    capture_s = time.perf_counter() - started
    assert runner.cache is not None and runner.blocks is not None
    runner.cache.data.normal_()
    out: dict[str, Any] = {"capture_s": capture_s}
    greedy = SamplingOptions(max_tokens=10_000, temperature=0)
    sampled = SamplingOptions(max_tokens=10_000, temperature=0.8, top_p=0.9, top_k=50)
    for batch in batches:
        for name, options in (("greedy", greedy), ("sampled", sampled)):
            sequences = []
            for row in range(batch):
                sequence = Sequence(row, f"s{row}", length, status=Status.RUNNING, options=options)
                sequence.launched = 1
                runner.blocks.allocate(sequence.block_table, length + 2 * count + 2)
                sequences.append(sequence)
            previous = None
            for _ in range(5):
                runner.decode(sequences)
            torch.cuda.synchronize()
            began = time.perf_counter()
            for _ in range(count):
                launch = runner.decode(sequences)
                if previous is not None:
                    previous.values()
                previous = launch
            assert previous is not None
            previous.values()
            step_ms = 1e3 * (time.perf_counter() - began) / count
            for sequence in sequences:
                runner.blocks.release(sequence.block_table)
            out[f"{batch}-{name}"] = {"step_ms": step_ms, "mean_length": length + 5 + count / 2}
            print(f"step B={batch} {name}: {step_ms:.2f} ms", flush=True)
    for prompts in (1, 6):  # what one prefill step costs, for the benchmark's 320-token prompts

        def prefill(n: int = prompts) -> None:
            model.prefill_together([model.prepare(Prompt(list(range(320)))) for _ in range(n)])

        ms = timed(prefill, repeats=10)
        out[f"prefill-{prompts}x320"] = {"ms": ms}
        print(f"prefill {prompts} x 320 tokens: {ms:.1f} ms", flush=True)
    return out


def main() -> None:
    parser = gpu_parser(__doc__, device=False)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--length", type=int, default=384, help="positions each sequence holds")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    built = (args.checkpoint / "config.json").exists()  # by an earlier benchmark of this run
    checkpoint = args.checkpoint if built else build_checkpoint(args.checkpoint, args.shape, "cuda")
    copy = copy_bandwidth("cuda")
    assert copy is not None
    weights = weight_bytes(checkpoint)
    kv_per_token = 28 * 2 * 4 * 128 * 2 if args.shape == "7b" else 2 * 2 * 2 * 16 * 2
    summary: dict[str, Any] = {
        "benchmark": "hf decode step in one process: attention variants and whole steps",
        **run_info("cuda"),
        "device_copy_bytes_per_s": copy,
        "language_model_weight_bytes": weights,
        "attention": attention(args.batches, args.length),
        "steps": steps(checkpoint, args.batches, args.length, args.steps),
    }
    ratios = {}
    for key, step in summary["steps"].items():
        if key == "capture_s" or key.startswith("prefill"):
            continue
        batch = int(key.split("-")[0])
        bound_ms = 1e3 * (weights + batch * step["mean_length"] * kv_per_token) / copy
        step["bound_ms"] = bound_ms
        ratios[f"{key} step / bound"] = step["step_ms"] / bound_ms
    summary["ratios"] = ratios
    path = args.out / f"decode_step_{args.shape}{args.tag}.json"
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(ratios, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
