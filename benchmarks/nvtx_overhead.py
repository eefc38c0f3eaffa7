"""What an NVTX range costs when ``DYN_NVTX`` is unset: one function call, no nvtx import.

python benchmarks/nvtx_overhead.py [--out benchmarks/results/nvtx_overhead.json]
"""

import argparse
import json
import os
import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import machine_info

os.environ.pop("DYN_NVTX", None)
from triptych.observability import nvtx

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/nvtx_overhead.json")
    parser.add_argument("--number", type=int, default=1_000_000)
    args = parser.parse_args()
    assert not nvtx.ENABLED and "nvtx" not in sys.modules

    def bare() -> None:
        pass

    def with_span() -> None:
        with nvtx.span("mm:pd:generate"):
            pass

    def with_mark() -> None:
        with nvtx.start("mm:pd:ttft") as mark:
            mark.end()

    timings = {}
    for name, fn in (("bare_call", bare), ("span", with_span), ("start_end", with_mark)):
        best = min(timeit.repeat(fn, number=args.number, repeat=5))
        timings[name] = best / args.number * 1e9
    report = {
        "benchmark": "NVTX ranges with DYN_NVTX unset (nvtx not imported)",
        "ns_per_call": timings,
        "span_minus_bare_ns": timings["span"] - timings["bare_call"],
        "nvtx_imported": "nvtx" in sys.modules,
        "machine": machine_info(),
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "machine"}, indent=1))


if __name__ == "__main__":
    main()
