"""Chart of benchmarks/planner.py: TTFT p99 against completed requests/s, per mix, for two EPD
workers and the planner's split, with the 1 s target and each side's goodput.

python benchmarks/plot_planner.py [--report benchmarks/results/planner_h200x2.json]
"""

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--report", type=Path, default=RESULTS / "planner_h200x2.json")
    args = parser.parse_args()
    report = json.loads(args.report.read_text())
    mixes = report["mixes"]
    figure, axes = plt.subplots(1, len(mixes), figsize=(6 * len(mixes), 4.5), squeeze=False)
    target_ms = report["ttft_p99_target_s"] * 1e3
    for axis, (name, mix) in zip(axes[0], mixes.items(), strict=True):
        for side, label, style in (
            ("2xEPD", "2x EPD (one per GPU)", "o-"),
            ("planner", f"planner: {mix['plan']['split']}", "s-"),
        ):
            result = mix.get(side) or {}
            rows = [r for r in result.get("rows", []) if r["ttft_ms_p99"] is not None]
            goodput = result.get("goodput_req_per_s", 0.0)
            axis.plot(
                [r["throughput_req_per_s"] for r in rows],
                [r["ttft_ms_p99"] for r in rows],
                style,
                label=f"{label} (goodput {goodput:.1f} req/s)",
            )
        axis.axhline(target_ms, color="grey", linestyle="--", linewidth=1)
        ratio = report["ratios"].get(f"goodput planner / 2xEPD {name}")
        axis.set_title(f"{name.replace('_', ' ')}: planner / 2x EPD = {ratio}")
        axis.set_xlabel("completed requests/s")
        axis.set_ylabel("TTFT p99 (ms)")
        axis.set_yscale("log")
        axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
    gpus = ", ".join(report["gpus"])
    figure.suptitle(f"Planner's split vs two EPD workers, Qwen2.5-VL-7B shape, {gpus}", fontsize=10)
    figure.tight_layout()
    out = args.report.with_suffix(".png")
    figure.savefig(out, dpi=120)
    print(out)


if __name__ == "__main__":
    main()
