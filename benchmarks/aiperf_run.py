"""aiperf (NVIDIA's benchmark client) against ``triptych serve``, as the README shows it.

Starts a topology with its launch script, runs ``aiperf profile`` (text, then one image per
request), and records the figures, aiperf's own warnings and the server's WARNING/ERROR log
lines, with the machine they ran on. aiperf is not a dependency of triptych (it brings ~1 GB):
install it in a venv of its own and pass its executable.

    python benchmarks/aiperf_run.py --aiperf /path/to/venv/bin/aiperf \
        [--script multimodal_disagg.sh] [--out benchmarks/results/aiperf_mock_e_p_d_cpu.json]
"""

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from launcher import launch, stop
from load import machine_info, utc_now

ROOT = Path(__file__).resolve().parents[1]
MODEL = "tiny-qwen2.5-vl"
TEXT = [
    "--concurrency",
    "8",
    "--request-count",
    "200",
    "--synthetic-input-tokens-mean",
    "128",
    "--output-tokens-mean",
    "64",
]
IMAGES = [
    "--concurrency",
    "4",
    "--request-count",
    "40",
    "--synthetic-input-tokens-mean",
    "64",
    "--output-tokens-mean",
    "32",
    "--image-width-mean",
    "448",
    "--image-height-mean",
    "448",
    "--image-batch-size",
    "1",
]
METRICS = ("time_to_first_token", "inter_token_latency", "request_latency")


def profile(aiperf: str, url: str, load: list[str], out: Path) -> dict[str, Any]:
    """One ``aiperf profile`` run: its command, exit status, figures and warnings."""
    command = [
        aiperf,
        "profile",
        "--model",
        MODEL,
        "--tokenizer",
        str(ROOT / ".cache" / MODEL),
        "--url",
        url,
        "--endpoint-type",
        "chat",
        "--streaming",
        *load,
        "--extra-inputs",
        "ignore_eos:true",
        "--use-server-token-count",
        "--ui",
        "simple",
        "--output-artifact-dir",
        str(out),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=out)
    output = done.stdout + done.stderr
    exports = list(out.rglob("profile_export_aiperf.json"))
    figures = json.loads(exports[0].read_text()) if exports else {}
    warnings = sorted(
        {re.sub(r"[0-9.]+ms", "Nms", m) for m in re.findall(r"WARNING +([^(\n]*)", output)}
    )
    return {
        "command": " ".join(command[1:]),
        "exit_status": done.returncode,
        "requests": figures.get("request_count", {}).get("avg"),
        "errors": figures.get("error_summary"),
        "request_throughput_per_s": figures.get("request_throughput", {}).get("avg"),
        "output_token_throughput_per_s": figures.get("output_token_throughput", {}).get("avg"),
        **{
            f"{name}_ms": {k: figures[name][k] for k in ("avg", "p50", "p99")}
            for name in METRICS
            if name in figures
        },
        "aiperf_warnings": warnings,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--aiperf", default="aiperf", help="the aiperf executable")
    parser.add_argument("--script", default="multimodal_disagg.sh", help="launch script")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks/results/aiperf_mock_e_p_d_cpu.json"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="aiperf-") as scratch:
        work = Path(scratch)
        log = work / "serve.log"
        launcher, url = launch(args.script, ["--engine", "mock"], log)
        try:
            runs = {}
            for name, load in (("text", TEXT), ("one_image", IMAGES)):
                (work / name).mkdir()
                runs[name] = profile(args.aiperf, url, load, work / name)
        finally:
            stop(launcher)
        server = [
            line
            for line in log.read_text(errors="replace").splitlines()
            if " WARNING " in line or " ERROR " in line or "Traceback" in line
        ]
    result = {
        "benchmark": "aiperf 0.13 against triptych serve, mock engine at its default costs "
        "(20 ms an image, 0.1 ms a prompt token, 15 ms a decode step)",
        "launch": f"launch/{args.script} --engine mock",
        "when": utc_now(),
        "machine": machine_info(),
        "runs": runs,
        "server_warnings_and_errors": server,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
