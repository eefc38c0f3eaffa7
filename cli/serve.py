"""``triptych serve --topology e/p/d|e/pd|epd|p/d [flags] [-- worker flags]``: a whole stack.

Starts NATS (a private server unless ``NATS_URL`` is set), the workers of the topology and the
frontend, says where it serves once ``/ready`` answers 200, and stops everything on Ctrl-C or
SIGTERM (see `Supervisor`). It takes every flag of the frontend and of the workers and hands
each to the processes that know it; flags after ``--`` go to every worker as they are.
"""

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from triptych.cli.supervisor import Supervisor, say
from triptych.components.frontend.config import FrontendConfig
from triptych.components.topology import TOPOLOGIES, add_topology_argument
from triptych.components.worker import worker_parser
from triptych.runtime.entry import port_in_use, port_taken
from triptych.runtime.env import flag_variable
from triptych.runtime.flags import FlagParser, is_secret, is_switch, primary_flag, settable

_NOT_FORWARDED = {"port_file", "metrics_port", "topology"}
"""Flags serve sets itself per process (or that would clash between processes)."""


@dataclass(frozen=True)
class Flags:
    """serve's parser, and which flags each kind of process takes."""

    parser: FlagParser
    frontend: frozenset[str]
    worker: frozenset[str]


def _adopt(parser: FlagParser, title: str, source: argparse.ArgumentParser) -> frozenset[str]:
    """Add `source`'s flags to `parser` (those it lacks) in a group; return their names."""
    group = parser.add_argument_group(title)
    taken = parser._option_string_actions
    names = set()
    for action in settable(source):
        if action.dest in _NOT_FORWARDED:
            continue
        names.add(action.dest)
        if not any(option in taken for option in action.option_strings):
            group._add_action(action)
    return frozenset(names)


def flags() -> Flags:
    """Every flag of ``triptych serve``."""
    parser = FlagParser(
        prog="triptych serve",
        description="Start a whole stack: NATS (a private one unless NATS_URL is set), the "
        "workers of a topology and the frontend; Ctrl-C stops it all. Flags after '--' go to "
        "every worker as they are.",
    )
    add_topology_argument(
        parser,
        "which stages run as separate processes: encode, prefill, decode (e/p/d); "
        "encode, then prefill+decode (e/pd); all in one worker (epd); prefill, decode (p/d, "
        "text models, or a VLM that encodes in prefill)",
    )
    gpus = parser.add_argument_group("GPUs")
    for stage in ("encode", "prefill", "decode"):
        gpus.add_argument(
            f"--{stage}-gpu",
            default="",
            help=f"pin the {stage} worker to this GPU (it sees only that one; --device becomes "
            "cuda)"
            + (" (also the e/pd and epd worker)" if stage == "decode" else "")
            + "; a list starts one worker per entry (0,0,1: two on GPU 0, one on GPU 1)",
        )
        gpus.add_argument(
            f"--{stage}-mem-fraction-static",
            type=float,
            default=None,
            help=f"the {stage} workers' --mem-fraction-static: their share of a GPU they share "
            "(python -m triptych.components.planner plan prints a split)",
        )
    gpus.add_argument(
        "--gpus",
        default="",
        help="epd: one independent worker per listed GPU (e.g. 0,1), behind one frontend",
    )
    parser.add_argument(
        "--stop-grace-s",
        type=float,
        default=35.0,
        help="on Ctrl-C or SIGTERM, how long components may drain before they are killed",
    )
    frontend = _adopt(parser, "frontend", FrontendConfig.parser())
    worker = _adopt(parser, "workers", worker_parser("triptych worker", ""))
    return Flags(parser, frontend, worker)


def _forwarded(
    parser: FlagParser, args: argparse.Namespace, names: frozenset[str]
) -> tuple[list[str], dict[str, str]]:
    """The command-line flags (and, for secrets, environment) that pass `args`' values of
    `names` on to a process: those that differ from the built-in defaults."""
    argv: list[str] = []
    env: dict[str, str] = {}
    for action in settable(parser):
        if action.dest not in names:
            continue
        value = getattr(args, action.dest)
        if value == parser.builtin_defaults.get(action.dest):
            continue
        flag = primary_flag(action)
        if is_secret(action):
            env[flag_variable(flag)] = str(value)
        elif is_switch(action):
            argv.append(flag)  # set, where the default is not
        elif value is not None:
            argv += [flag, str(value)]
    return argv, env


def _check_port(host: str, port: int) -> None:
    """Refuse at once, in one line, an HTTP port another process holds."""
    if port and port_taken(host, port):
        sys.exit(f"triptych serve: {port_in_use(host, port, '--http-port')}")


def main(argv: Sequence[str] | None = None) -> None:
    """Start the stack and supervise it until a signal or a component's exit."""
    given = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in given:
        at = given.index("--")
        given, extra = given[:at], given[at + 1 :]
    spec = flags()
    args = spec.parser.parse_args(given)
    if args.tp_size != 1:
        sys.exit(
            f"triptych serve: --tp {args.tp_size}: tensor parallelism is not supported yet; "
            "run one model instance per GPU (--gpus 0,1 with --topology epd, or --*-gpu pins)"
        )
    if args.gpus and args.topology != "EPD":
        sys.exit("triptych serve: --gpus starts one EPD worker per GPU: use --topology epd")
    _check_port(args.http_host, args.http_port)
    if not args.model_path:
        from triptych.models.tiny import default_model_path

        args.model_path = str(default_model_path())
    supervisor = Supervisor(sys.executable, args.stop_grace_s)
    supervisor.catch_signals()
    try:
        status = _run(supervisor, spec, args, extra)
    finally:
        supervisor.stop()
    sys.exit(status)


def _run(supervisor: Supervisor, spec: Flags, args: argparse.Namespace, extra: list[str]) -> int:
    supervisor.start_watchdog()
    supervisor.start_nats()
    worker_args, worker_env = _forwarded(spec.parser, args, spec.worker)
    for role in TOPOLOGIES[args.topology].workers:
        if supervisor.stopping:
            return 0
        pins = args.gpus.split(",") if role.name == "worker" and args.gpus else []
        pins = pins or getattr(args, role.gpu).split(",")
        budget = getattr(args, role.gpu.removesuffix("_gpu") + "_mem_fraction_static")
        share = ["--mem-fraction-static", str(budget)] if budget is not None else []
        for index, pin in enumerate(pins):
            pinned = ["--device", "cuda"] if pin else []
            env = {**worker_env, **({"CUDA_VISIBLE_DEVICES": pin} if pin else {})}
            name = role.name if len(pins) == 1 else f"{role.name}-{index}-gpu{pin}"
            flags = [*worker_args, *role.args, *share, *extra, *pinned]
            supervisor.start(name, role.module, flags, env)
    port_file = supervisor.run_dir / "frontend.port"
    frontend_args, frontend_env = _forwarded(spec.parser, args, spec.frontend)
    supervisor.start(
        "frontend",
        "frontend",
        [*frontend_args, "--topology", args.topology, "--port-file", str(port_file)],
        frontend_env,
    )
    port = supervisor.wait_ready(port_file, args.http_host)
    if port is not None:
        say(f"triptych is serving on http://{args.http_host}:{port} (Ctrl-C to stop)")
    return supervisor.wait()
