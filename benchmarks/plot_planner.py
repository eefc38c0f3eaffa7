"""Chart of benchmarks/planner.py: TTFT p99 against completed requests/s, per mix, for two EPD
workers and the planner's split, with the 1 s target and each side's goodput; `--also` adds the
splits measured in other reports (dotted), e.g. earlier runs of the same day.

python benchmarks/plot_planner.py [--report benchmarks/results/planner_h200x2.json] [--also R...]
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
    parser.add_argument("--also", type=Path, nargs="*", default=[])
    args = parser.parse_args()
    report = json.loads(args.report.read_text())
    others = [(path.stem, json.loads(path.read_text())) for path in args.also]
    mixes = report["mixes"]
    figure, axes = plt.subplots(1, len(mixes), figsize=(6 * len(mixes), 4.5), squeeze=False)
    target_ms = report["ttft_p99_target_s"] * 1e3
    for axis, (name, mix) in zip(axes[0], mixes.items(), strict=True):
        same = (mix.get("planner") or {}).get("same_as_baseline")
        sides = [
            ("2xEPD", "2x EPD (one per GPU)", "o-", mix),
            ("planner", f"planner: {mix['plan']['split']}", "s-", mix),
        ]
        if same:  # the planner chose two EPD workers: one curve
            sides = [("2xEPD", f"2x EPD = planner's choice ({mix['plan']['split']})", "o-", mix)]
        for stem, other in others:
            earlier = other["mixes"].get(name, {})
            if earlier.get("planner") and not earlier["planner"].get("same_as_baseline"):
                split = earlier["plan"]["split"]
                sides.append(("planner", f"{split} ({stem})", "^:", earlier))
        for side, label, style, source in sides:
            result = source.get(side) or {}
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
