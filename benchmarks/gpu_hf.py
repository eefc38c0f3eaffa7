"""GPU speed of the ``hf`` engine against plain transformers, side by side in one run.

Workload (fixed, so figures compare over time): a Qwen2.5-VL-7B-shaped checkpoint with random
bf16 weights built from a config, requests of one 448x448 image + short text, 128 output tokens
with ``ignore_eos``, greedy.

1. Baselines, in this process: ``generate()`` on 8 requests one at a time, and ``generate()`` on
   a left-padded batch of the 8. Time to first token comes from a streamer; the 8 requests all
   arrive at the start, so one-at-a-time TTFT includes the wait behind earlier requests.
2. triptych, each topology started with its launch script, all stages on the one GPU: EPD
   (``agg.sh``) and E/P/D (``multimodal_disagg.sh``), loaded at concurrency 1, 8, 32 and 64
   through the OpenAI API with streaming, then at concurrency 32 again with the sampling most
   clients use (temperature 0.8, top-p 0.9, top-k 50): level ``32-sampled``.

Writes ``gpu_hf_<shape>.json`` and ``gpu_hf_<shape>.png`` into ``--out`` and prints the ratios the
speed targets are stated in: output tokens/s at concurrency 8 against the better baseline, mean
TTFT at concurrency 8 against one at a time, decode step time at concurrency 1 against the
weight-bandwidth bound, E/P/D TTFT over EPD at concurrency 1, tokens/s at concurrency 64 against
64 sequences at the bound step, the decode step at concurrency 64 against the bound step, sampled
over greedy at concurrency 32, and transfer bandwidths. The bound step at concurrency ``c`` reads
the language model's weights once and ``c`` sequences' KV caches (at their mean length) at the
copy bandwidth measured in the run.

    python benchmarks/gpu_hf.py [--shape 7b|tiny] [--device cuda] [--out DIR]
"""

import argparse
import asyncio
import gc
import io
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chat_client import chat_body, picture, png, stream_chat
from gpu_epd import build_checkpoint, copy_bandwidth, gpu_parser, run_info, transfer_times
from launcher import launch, stop

ROOT = Path(__file__).resolve().parents[1]
TEXT = (
    "Describe this picture in detail: its colours, shapes, textures and light, and what it shows."
)
TOPOLOGIES = {"EPD": "agg.sh", "E/P/D": "multimodal_disagg.sh"}
SAMPLED = {"temperature": 0.8, "top_p": 0.9, "top_k": 50}
"""The sampled level's options."""
REQUESTS = {1: 8, 8: 32, 32: 64, 64: 128}
"""Requests per concurrency level (others: four times the level, at most 128)."""
KV_BYTES_PER_TOKEN = {"7b": 28 * 2 * 4 * 128 * 2, "tiny": 2 * 2 * 2 * 16 * 2}


def weight_bytes(checkpoint: Path) -> int:
    """Bytes of the language model's weights (everything but the vision tower)."""
    from safetensors import safe_open

    total = 0
    for path in checkpoint.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as weights:
            for key in weights.keys():  # noqa: SIM118
                if not key.startswith(("visual.", "model.visual.")):
                    piece = weights.get_slice(key)
                    numel = 1
                    for size in piece.get_shape():
                        numel *= size
                    total += numel * {"BF16": 2, "F16": 2, "F32": 4}[piece.get_dtype()]
    return total


# baselines


class FirstToken:
    """A `generate()` streamer that notes when the first new token arrives."""

    def __init__(self) -> None:
        self.calls = 0
        self.at = 0.0

    def put(self, value: torch.Tensor) -> None:
        self.calls += 1
        if self.calls == 2:  # the first call carries the prompt; tokens come on the CPU
            self.at = time.perf_counter()

    def end(self) -> None:
        pass


def baselines(checkpoint: Path, device: str, requests: int, max_tokens: int) -> dict[str, Any]:
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.bfloat16)
    loaded = [model.to(device).eval()]
    del model
    single = inputs(checkpoint, device)
    batch = {name: tensor.repeat(requests, 1) for name, tensor in single.items()}
    options = {"do_sample": False, "max_new_tokens": max_tokens, "min_new_tokens": max_tokens}

    def generate(given: Any, streamer: FirstToken | None = None, **extra: Any) -> torch.Tensor:
        with torch.inference_mode():
            return loaded[0].generate(**given, **{**options, **extra}, streamer=streamer)

    generate(single, max_new_tokens=4, min_new_tokens=4)  # warm-up
    _sync(device)
    began = time.perf_counter()
    ttfts: list[float] = []
    produced = 0
    for _ in range(requests):
        streamer = FirstToken()
        out = generate(single, streamer)
        ttfts.append(streamer.at - began)
        produced += out.shape[1] - single["input_ids"].shape[1]
    _sync(device)
    serial_s = time.perf_counter() - began
    streamer = FirstToken()
    began = time.perf_counter()
    out = generate(batch, streamer)
    _sync(device)
    batch_s = time.perf_counter() - began
    batch_tokens = (out.shape[1] - batch["input_ids"].shape[1]) * requests
    result = {
        "prompt_tokens": int(single["input_ids"].shape[1]),
        "one_at_a_time": {
            "requests": requests,
            "output_tokens_per_s": produced / serial_s,
            "ttft_ms_mean": 1e3 * statistics.mean(ttfts),
            "first_request_ttft_ms": 1e3 * ttfts[0],
            "seconds": serial_s,
        },
        "padded_batch": {
            "requests": requests,
            "output_tokens_per_s": batch_tokens / batch_s,
            "ttft_ms_mean": 1e3 * (streamer.at - began),
            "seconds": batch_s,
        },
    }
    loaded.clear()
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return result


def inputs(checkpoint: Path, device: str) -> dict[str, torch.Tensor]:
    """What the model's processor makes of one request (the image processor, and the chat
    template with one placeholder per image token)."""
    from transformers import AutoImageProcessor, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    image = Image.open(io.BytesIO(png(448))).convert("RGB")
    pixels = AutoImageProcessor.from_pretrained(checkpoint)(images=[image], return_tensors="pt")
    placeholders = int(pixels["image_grid_thw"].prod()) // 4
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": TEXT}]}]
    text = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    text = text.replace("<|image_pad|>", "<|image_pad|>" * placeholders)
    ids = tokenizer([text], return_tensors="pt")
    return {
        "input_ids": ids["input_ids"].to(device),
        "attention_mask": ids["attention_mask"].to(device),
        "pixel_values": pixels["pixel_values"].to(device),
        "image_grid_thw": pixels["image_grid_thw"].to(device),
    }


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# triptych


async def timed(client: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, float]:
    streamed = await stream_chat(client, body)
    return {
        "start": streamed.start,
        "end": streamed.end,
        "ttft_ms": 1e3 * streamed.ttft_s,
        "tokens": streamed.tokens,
        "prompt_tokens": streamed.prompt_tokens,
        "step_ms": 1e3 * streamed.step_s,
    }


async def gated(gate: asyncio.Semaphore, work: Any) -> Any:
    async with gate:
        return await work


def requests_at(level: int) -> int:
    return REQUESTS.get(level, min(4 * level, 128))


async def sweep(url: str, model: str, levels: list[str], max_tokens: int) -> dict[str, Any]:
    """Each level (``"8"``, or ``"32-sampled"`` for the sampled options) in turn."""
    greedy = chat_body(model, [picture(448)], TEXT, max_tokens)
    sampled = {**greedy, **SAMPLED}
    out: dict[str, Any] = {}
    widest = max(int(level.split("-")[0]) for level in levels)
    limits = httpx.Limits(max_connections=widest + 4)
    async with httpx.AsyncClient(base_url=url, timeout=900, limits=limits) as client:
        await asyncio.gather(*(timed(client, greedy) for _ in range(widest)))  # warm-up
        for level in levels:
            concurrency = int(level.split("-")[0])
            body = sampled if level.endswith("-sampled") else greedy
            gate = asyncio.Semaphore(concurrency)
            records = await asyncio.gather(
                *(gated(gate, timed(client, body)) for _ in range(requests_at(concurrency)))
            )
            span = max(r["end"] for r in records) - min(r["start"] for r in records)
            out[level] = {
                "requests": len(records),
                "output_tokens_per_s": sum(r["tokens"] for r in records) / span,
                "ttft_ms_mean": statistics.mean(r["ttft_ms"] for r in records),
                "ttft_ms_p50": statistics.median(r["ttft_ms"] for r in records),
                "ttft_ms_max": max(r["ttft_ms"] for r in records),
                "step_ms_median": statistics.median(r["step_ms"] for r in records),
                "prompt_tokens": records[0]["prompt_tokens"],
                "tokens_per_request": statistics.mean(r["tokens"] for r in records),
            }
            print(f"  c={level}: {json.dumps(out[level])}", flush=True)
    return out


def run_topology(
    name: str, checkpoint: Path, device: str, args: argparse.Namespace
) -> tuple[dict[str, Any], str]:
    log_path = (
        args.out / f"gpu_hf_{args.shape}{args.tag}_{TOPOLOGIES[name].removesuffix('.sh')}.log"
    )
    began = time.perf_counter()
    flags = ["--engine", "hf", "--device", device, "--model-path", str(checkpoint)]
    flags += ["--", *args.worker_args.split()] if args.worker_args else []
    launcher, url = launch(TOPOLOGIES[name], flags, log_path, timeout=600)
    ready_s = time.perf_counter() - began
    print(f"{name} ready in {ready_s:.0f} s", flush=True)
    levels = [str(c) for c in args.concurrency] + [f"{c}-sampled" for c in args.sampled]
    try:
        found = asyncio.run(sweep(url, checkpoint.name, levels, args.max_tokens))
    finally:
        stop(launcher)
    log = log_path.read_text()
    return {"ready_s": ready_s, "levels": found}, log


def bandwidth(items: list[dict[str, float]]) -> dict[str, float] | None:
    if not items:
        return None
    ms = statistics.median(item["ms"] for item in items)
    size = statistics.median(item["bytes"] for item in items)
    return {"bytes": size, "ms_median": ms, "bytes_per_s": size / (ms / 1e3)}


def chart(summary: dict[str, Any], path: Path, before: dict[str, Any] | None = None) -> None:
    """Tokens/s and TTFT per concurrency level; `before` (an earlier run's summary) dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (speed, first) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"EPD": "tab:orange", "E/P/D": "tab:red"}
    runs = [(summary, "-", "", "o")] + ([(before, "--", " before", "s")] if before else [])
    for run, style, suffix, marker in runs:
        for name, result in run["triptych"].items():
            color = colors.get(name)
            levels = sorted(int(c) for c in result["levels"] if c.isdigit())
            label = f"triptych {name}{suffix}"
            for axis, key in ((speed, "output_tokens_per_s"), (first, "ttft_ms_mean")):
                values = [result["levels"][str(c)][key] for c in levels]
                axis.plot(levels, values, marker + style, color=color, label=label)
            sampled = [c for c in result["levels"] if c.endswith("-sampled")]
            speed.plot(
                [int(c.split("-")[0]) for c in sampled],
                [result["levels"][c]["output_tokens_per_s"] for c in sampled],
                "x",
                color=color,
                markersize=10,
                label=f"{label}, sampled (T 0.8, top-p 0.9, top-k 50)",
            )
    base = summary.get("baselines")
    if base:
        n = base["one_at_a_time"]["requests"]
        for key, label, marker, color in (
            ("one_at_a_time", "generate(), one at a time", "s", "tab:blue"),
            ("padded_batch", f"generate(), padded batch of {n}", "^", "tab:green"),
        ):
            for axis, metric in ((speed, "output_tokens_per_s"), (first, "ttft_ms_mean")):
                axis.plot([n], [base[key][metric]], marker, color=color, markersize=9, label=label)
    for axis, title in ((speed, "output tokens/s"), (first, "mean time to first token (ms)")):
        axis.set_xscale("log", base=2)
        axis.set_xticks([1, 8, 32, 64], ["1", "8", "32", "64"])
        axis.set_xlabel("concurrent requests")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    first.set_yscale("log")
    speed.legend(fontsize=8)
    figure.suptitle(
        f"hf engine vs transformers generate(), {summary['model']}, {summary['gpu']}", fontsize=10
    )
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def bound_step_ms(summary: dict[str, Any], level: dict[str, Any], concurrency: int) -> float:
    """The memory-bound decode step at `concurrency`: the weights, and every sequence's KV cache
    at its mean length, read once at the measured copy bandwidth."""
    mean_length = level["prompt_tokens"] + level["tokens_per_request"] / 2
    kv = concurrency * mean_length * summary["kv_bytes_per_token"]
    weights = summary["weight_bound_step_ms"] / 1e3 * summary["device_copy_bytes_per_s"]
    return 1e3 * (weights + kv) / summary["device_copy_bytes_per_s"]


def main() -> None:
    parser = gpu_parser(__doc__)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument(
        "--sampled",
        type=int,
        nargs="*",
        default=[32],
        help="concurrency levels run again with temperature 0.8, top-p 0.9, top-k 50",
    )
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--baseline-requests", type=int, default=8)
    parser.add_argument("--skip-baselines", action="store_true")
    parser.add_argument("--worker-args", default="", help="extra flags for every worker")
    parser.add_argument("--tag", default="", help="suffix of the result files' names")
    parser.add_argument(
        "--topologies", nargs="+", choices=tuple(TOPOLOGIES), default=list(TOPOLOGIES)
    )
    parser.add_argument(
        "--replot", type=Path, help="only redraw the chart of this result file (no GPU needed)"
    )
    parser.add_argument("--before", type=Path, help="an earlier result file, drawn dashed")
    args = parser.parse_args()
    before = json.loads(args.before.read_text()) if args.before else None
    if args.replot:
        chart(json.loads(args.replot.read_text()), args.replot.with_suffix(".png"), before)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    built = (args.checkpoint / "config.json").exists()  # by an earlier benchmark of this run
    checkpoint = (
        args.checkpoint if built else build_checkpoint(args.checkpoint, args.shape, args.device)
    )
    print(f"checkpoint built in {time.perf_counter() - began:.0f} s", flush=True)
    copy = copy_bandwidth(args.device)
    weights = weight_bytes(checkpoint)
    summary: dict[str, Any] = {
        "benchmark": "hf engine vs transformers generate(): one 448x448 image + text, "
        f"{args.max_tokens} tokens, ignore_eos, greedy",
        "worker_args": args.worker_args,
        "model": f"Qwen2.5-VL-{args.shape} shape, random bf16",
        **run_info(args.device),
        "device_copy_bytes_per_s": copy,
        "language_model_weight_bytes": weights,
        "kv_bytes_per_token": KV_BYTES_PER_TOKEN[args.shape],
        "weight_bound_step_ms": 1e3 * weights / copy if copy else None,
    }
    if not args.skip_baselines:
        summary["baselines"] = baselines(
            checkpoint, args.device, args.baseline_requests, args.max_tokens
        )
        print("baselines:", json.dumps(summary["baselines"]), flush=True)
    summary["triptych"] = {}
    summary["transfers"] = {}
    result = args.out / f"gpu_hf_{args.shape}{args.tag}.json"
    for name in args.topologies:
        result.write_text(json.dumps(summary, indent=2) + "\n")  # what is done so far
        summary["triptych"][name], log = run_topology(name, checkpoint, args.device, args)
        if name == "E/P/D":
            found = transfer_times(log)
            summary["transfers"] = {kind: bandwidth(items) for kind, items in found.items()}
    summary["ratios"] = ratios(summary)
    result.write_text(json.dumps(summary, indent=2) + "\n")
    chart(summary, result.with_suffix(".png"), before)
    print(json.dumps(summary["ratios"], indent=1))
    print(json.dumps(summary["transfers"], indent=1))


def ratios(summary: dict[str, Any]) -> dict[str, float | None]:
    """The figures the speed targets are stated in."""
    out: dict[str, float | None] = {}
    base = summary.get("baselines")
    runs = summary["triptych"]
    for name, result in runs.items():
        levels = result["levels"]
        if base and "8" in levels:
            best = max(
                base["one_at_a_time"]["output_tokens_per_s"],
                base["padded_batch"]["output_tokens_per_s"],
            )
            out[f"{name} c8 throughput / best baseline"] = levels["8"]["output_tokens_per_s"] / best
            out[f"one-at-a-time TTFT / {name} c8 TTFT"] = (
                base["one_at_a_time"]["ttft_ms_mean"] / levels["8"]["ttft_ms_mean"]
            )
        if summary.get("weight_bound_step_ms") and "1" in levels:
            out[f"{name} c1 decode: bound / step"] = (
                bound_step_ms(summary, levels["1"], 1) / levels["1"]["step_ms_median"]
            )
        if summary.get("weight_bound_step_ms") and "64" in levels:
            bound = bound_step_ms(summary, levels["64"], 64)
            out[f"{name} c64 tokens/s / (64 / bound step)"] = levels["64"][
                "output_tokens_per_s"
            ] / (64 / (bound / 1e3))
            out[f"{name} c64 decode step / bound step"] = levels["64"]["step_ms_median"] / bound
        for level in [c for c in levels if c.endswith("-sampled")]:
            greedy = level.split("-")[0]
            if greedy in levels:
                out[f"{name} c{greedy} sampled / greedy tokens/s"] = (
                    levels[level]["output_tokens_per_s"] / levels[greedy]["output_tokens_per_s"]
                )
    if "EPD" in runs and "E/P/D" in runs and "1" in runs["EPD"]["levels"]:
        epd = runs["EPD"]["levels"]["1"]["ttft_ms_mean"]
        out["E/P/D c1 TTFT / EPD c1 TTFT"] = runs["E/P/D"]["levels"]["1"]["ttft_ms_mean"] / epd
    return out


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
