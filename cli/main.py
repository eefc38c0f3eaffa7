"""``triptych <command> [flags]``: one entry point for every process triptych runs."""

import sys
from collections.abc import Callable, Sequence

from triptych import __version__

COMMANDS: dict[str, str] = {
    "serve": "start a whole stack: NATS (unless NATS_URL is set), the workers of a topology "
    "and the frontend",
    "frontend": "run the OpenAI-compatible HTTP frontend",
    "encode": "run an encode worker (vision tower)",
    "prefill": "run a prefill worker",
    "decode": "run a decode worker (or, with --disaggregation-mode agg, a prefill+decode one)",
    "plan": "say how many encode, prefill and decode workers a workload needs, and where",
    "watch": "set the stage Deployments' replicas from the live load signals (Kubernetes)",
}


def _usage() -> str:
    lines = [
        "usage: triptych <command> [flags]   (triptych <command> --help for its flags)",
        "",
        "Disaggregated Encode/Prefill/Decode serving of vision-language models behind an",
        "OpenAI-compatible API. Every flag also reads TRIPTYCH_<FLAG> from the environment,",
        "and --config FILE.yaml may set any of them.",
        "",
        "commands:",
        *(f"  {name:<10} {text}" for name, text in COMMANDS.items()),
    ]
    return "\n".join(lines) + "\n"


def _command(name: str) -> Callable[[Sequence[str]], None]:
    if name == "serve":
        from triptych.cli.serve import main as serve

        return serve
    if name == "frontend":
        from triptych.components.frontend.__main__ import main as frontend

        return frontend
    if name == "encode":
        from triptych.components.encode_worker.__main__ import main as encode

        return encode
    if name in ("plan", "watch"):
        from triptych.components.planner.__main__ import main as planner

        return lambda argv: planner([name, *argv])
    if name == "prefill":
        from triptych.components.prefill_worker.__main__ import main as prefill

        return prefill
    from triptych.components.decode_worker.__main__ import main as decode

    return decode


def main(argv: Sequence[str] | None = None) -> None:
    """Dispatch to the command's own flags and main."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        sys.stdout.write(_usage())
        return
    if args[0] in ("-V", "--version"):
        sys.stdout.write(f"triptych {__version__}\n")
        return
    if args[0] not in COMMANDS:
        sys.stderr.write(_usage())
        sys.exit(f"triptych: unknown command '{args[0]}'")
    _command(args[0])(args[1:])
