"""Chart of the multi-GPU comparison: throughput and TTFT against request rate, per mix.

python benchmarks/plot_multi_gpu.py  (reads and writes benchmarks/results/)
"""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

RESULTS = Path(__file__).resolve().parent / "results"
SOURCES = {
    "one 448x448 image": ("multi_gpu_h200x2.json", "one_448_image"),
    "three 1024x1024 images": ("multi_gpu_vision_h200x2.json", "three_1024_images"),
}


def main() -> None:
    figure, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for column, (title, (name, mix)) in enumerate(SOURCES.items()):
        report = json.loads((RESULTS / name).read_text())
        for topology, result in report["results"].items():
            rows = result.get(mix) or []
            rates = [r["rate_req_per_s"] for r in rows]
            axes[0][column].plot(
                rates, [r["output_tokens_per_s"] for r in rows], "o-", label=topology
            )
            axes[1][column].plot(
                rates, [r["ttft_ms_p50"] for r in rows], "o-", label=f"{topology} p50"
            )
            axes[1][column].plot(
                rates, [r["ttft_ms_p99"] for r in rows], "x--", label=f"{topology} p99"
            )
        axes[0][column].set_title(f"{title}: output tokens/s")
        axes[1][column].set_title(f"{title}: time to first token (ms)")
        for row in (0, 1):
            axes[row][column].set_xlabel("offered load (requests/s)")
            axes[row][column].grid(alpha=0.3)
            axes[row][column].legend(fontsize=7)
    figure.suptitle(
        "2x H200, Qwen2.5-VL-7B-shaped random bf16, 64 output tokens "
        "(E/P/D: E+P on GPU0, D on GPU1)"
    )
    figure.tight_layout()
    figure.savefig(RESULTS / "multi_gpu.png", dpi=110)


if __name__ == "__main__":
    main()
