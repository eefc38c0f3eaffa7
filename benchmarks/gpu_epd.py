"""GPU check: E/P/D on one GPU with a Qwen2.5-VL-7B-shaped checkpoint of random bf16 weights.

Builds the checkpoint from a config (no download; the tiny checkpoint's tokenizer supplies the
special tokens), starts E/P/D with all stages on the one GPU, sends a 448x448 image with short
text, and records time to first token, decode tokens/s, and the embedding and KV transfer
times the workers log. Figures, not a test: speed is the GPU speed work's.

    python benchmarks/gpu_epd.py --out DIR [--shape 7b|tiny] [--device cuda]
"""

import argparse
import asyncio
import json
import re
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chat_client import chat_body, picture, stream_chat
from launcher import launch, stop
from load import machine_info, utc_now

ROOT = Path(__file__).resolve().parents[1]
SHAPES: dict[str, dict[str, Any]] = {
    "7b": {
        "text": {
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "vocab_size": 152064,
            "rope_parameters": {
                "rope_type": "default",
                "mrope_section": [16, 24, 24],
                "rope_theta": 1e6,
            },
            "max_position_embeddings": 32768,
        },
        "vision": {
            "depth": 32,
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "out_hidden_size": 3584,
            "window_size": 112,
            "fullatt_block_indexes": [7, 15, 23, 31],
            "tokens_per_second": 2,
        },
    },
    "tiny": {
        "text": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 1608,
            "rope_parameters": {
                "rope_type": "default",
                "mrope_section": [2, 3, 3],
                "rope_theta": 1e6,
            },
            "max_position_embeddings": 4096,
        },
        "vision": {
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 64,
            "window_size": 112,
            "fullatt_block_indexes": [1],
            "tokens_per_second": 2,
        },
    },
}


def gpu_parser(
    doc: str | None, *, device: bool = True, checkpoint: bool = True
) -> argparse.ArgumentParser:
    """The flags the GPU benchmarks share: where results go (``--out``), the model's shape, and
    (where the benchmark takes them) the device and the random checkpoint's directory."""
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results")
    parser.add_argument("--shape", choices=tuple(SHAPES), default="7b")
    if device:
        parser.add_argument("--device", default="cuda")
    if checkpoint:
        parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/triptych-7b-random"))
    return parser


def build_checkpoint(out: Path, shape: str, device: str) -> Path:
    """Random bf16 weights in the given shape, with the tiny checkpoint's tokenizer."""
    from tokenizers import Tokenizer
    from transformers import Qwen2_5_VLForConditionalGeneration

    from triptych.models.tiny import default_model_path, special_ids, vl_config

    tiny = default_model_path()
    ids = special_ids(Tokenizer.from_file(str(tiny / "tokenizer.json")))
    dims = SHAPES[shape]
    config = vl_config(ids, dims["text"], dims["vision"], "bfloat16")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "preprocessor_config.json",
        "generation_config.json",
    ):
        shutil.copy(tiny / name, out / name)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out


TEXT = "Describe the picture in detail, noting colours, shapes and textures, " * 4


async def one_request(
    client: httpx.AsyncClient, model: str, image: str, max_tokens: int
) -> dict[str, float]:
    streamed = await stream_chat(client, chat_body(model, [image], TEXT.strip(), max_tokens))
    return {
        "ttft_ms": streamed.ttft_s * 1e3,
        "tokens": streamed.tokens,
        "decode_tokens_per_s": 1 / streamed.step_s if streamed.step_s else 0.0,
    }


def copy_bandwidth(device: str) -> float | None:
    """Device-to-device copy, bytes read plus written per second."""
    if not device.startswith("cuda"):
        return None
    a = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    torch.cuda.synchronize()
    return 2 * 10 * a.numel() / (time.perf_counter() - started)


def run_info(device: str) -> dict[str, Any]:
    """Where and when a GPU benchmark ran: its GPU, machine, torch version and time (UTC)."""
    return {
        "gpu": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
        "machine": machine_info(),
        "torch": torch.__version__,
        "timestamp": utc_now(),
    }


def transfer_times(log: str) -> dict[str, list[dict[str, float]]]:
    found: dict[str, list[dict[str, float]]] = {"embeddings": [], "kv": []}
    for size, ms in re.findall(r"embeddings \S+: (\d+) bytes read in ([\d.]+) ms", log):
        found["embeddings"].append({"bytes": int(size), "ms": float(ms)})
    for size, ms in re.findall(
        r"KV cache \S+: (\d+) bytes \(\d+ tokens\) read in ([\d.]+) ms", log
    ):
        found["kv"].append({"bytes": int(size), "ms": float(ms)})
    return found


def main() -> None:
    parser = gpu_parser(__doc__)
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    timings: dict[str, float] = {}
    begun = time.perf_counter()
    checkpoint = build_checkpoint(args.checkpoint, args.shape, args.device)
    timings["build_checkpoint_s"] = time.perf_counter() - begun
    bandwidth = copy_bandwidth(args.device)
    log_path = args.out / f"gpu_epd_{args.shape}.log"
    results: list[dict[str, float]] = []
    begun = time.perf_counter()
    launcher, url = launch(
        "multimodal_disagg.sh",
        [
            "--engine",
            "hf",
            "--device",
            args.device,
            "--model-path",
            str(checkpoint),
            "--",
            "--transfer-pool-mb",
            "1024",
        ],
        log_path,
        timeout=480,
    )
    try:
        timings["stack_ready_s"] = time.perf_counter() - begun
        image = picture(448)

        async def run() -> None:
            async with httpx.AsyncClient(base_url=url, timeout=600) as client:
                await one_request(client, checkpoint.name, image, 8)  # warm-up
                for _ in range(args.requests):
                    results.append(
                        await one_request(client, checkpoint.name, image, args.max_tokens)
                    )

        asyncio.run(run())
    finally:
        stop(launcher)
    transfers = transfer_times(log_path.read_text())
    summary = {
        "benchmark": "E/P/D on one device, hf engine, one 448x448 image + short text",
        "shape": args.shape,
        "device": args.device,
        **run_info(args.device),
        "setup": timings,
        "device_copy_bytes_per_s": bandwidth,
        "requests": results,
        "ttft_ms_median": statistics.median(r["ttft_ms"] for r in results),
        "decode_tokens_per_s_median": statistics.median(r["decode_tokens_per_s"] for r in results),
        "transfers": {kind: items[1:] for kind, items in transfers.items()},  # skip warm-up
    }
    out = args.out / f"gpu_epd_{args.shape}.json"
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "requests"}, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
