"""``python -m triptych.components.planner plan|watch``

``plan``: the split and placement for a workload profile on N GPUs, optionally with costs
calibrated from the stages' live signals (``--calibrate``) and the frontend's host time per
image from its ``/metrics`` (``--frontend-metrics``); prints the plan as JSON, with the launch
command that starts it.

``watch``: every ``--interval-s``, reads every stage's live signals from NATS, decides replica
counts within ``--STAGE-replicas MIN:MAX`` with hysteresis, and (with ``--kube-api`` or
``--in-cluster``) sets them through the scale subresource of the stage Deployments. Prints one
JSON line per round.
"""

import argparse
import asyncio
import contextlib
import json
import sys
from collections.abc import Sequence
from dataclasses import fields, replace
from pathlib import Path

from triptych.components.planner.controller import Controller, Policy
from triptych.components.planner.kube import DeploymentScaler, ScaleError
from triptych.components.planner.model import (
    StageCosts,
    WorkloadProfile,
    calibrate,
    calibrate_frontend,
)
from triptych.components.planner.placement import Bounds, plan
from triptych.components.planner.signals import StageSignals, image_decode_seconds, read_signals
from triptych.protocol.settings import add_settings, settings_from
from triptych.runtime import Runtime, RuntimeConfig
from triptych.runtime.entry import configure_logging, serve

STAGES = ("encode", "prefill", "decode")


def _size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    return int(width), int(height or width)


def _bounds(text: str) -> Bounds:
    low, _, high = text.partition(":")
    bounds = Bounds(int(low), int(high or low))
    if bounds.min < 0 or bounds.max < bounds.min:
        raise argparse.ArgumentTypeError(f"bounds {text!r}: want MIN:MAX with 0 <= MIN <= MAX")
    return bounds


def add_profile_arguments(parser: argparse.ArgumentParser) -> None:
    """The workload profile's flags."""
    group = parser.add_argument_group("workload profile")
    add_settings(group, WorkloadProfile)
    group.add_argument("--image-size", type=_size, default=(448, 448), help="WxH (or W)")
    group.add_argument(
        "--costs",
        type=Path,
        default=None,
        help="JSON of StageCosts fields (seconds per kind of work on one GPU) over the defaults",
    )
    group.add_argument("--max-running-requests", type=int, default=None)
    add_settings(group, Policy, "target_utilisation")


def profile_from_args(args: argparse.Namespace) -> WorkloadProfile:
    """The profile the flags describe."""
    width, height = args.image_size
    return WorkloadProfile(
        **settings_from(args, WorkloadProfile), image_width=width, image_height=height
    )


def costs_from_args(args: argparse.Namespace) -> StageCosts:
    """The default costs with the ``--costs`` file's fields over them."""
    costs = StageCosts()
    if args.costs is not None:
        given = json.loads(args.costs.read_text())
        known = {f.name for f in fields(StageCosts)}
        unknown = sorted(set(given) - known)
        if unknown:
            sys.exit(f"--costs: unknown fields {unknown}; known: {sorted(known)}")
        costs = replace(costs, **given)
    if args.max_running_requests is not None:
        costs = replace(costs, max_running=args.max_running_requests)
    return costs


def policy_from_args(args: argparse.Namespace) -> Policy:
    """The controller's policy, from the ``watch`` flags."""
    return Policy(**settings_from(args, Policy))


def parser() -> argparse.ArgumentParser:
    """Flags of both subcommands."""
    root = argparse.ArgumentParser(
        prog="python -m triptych.components.planner", description=__doc__
    )
    commands = root.add_subparsers(dest="command", required=True)

    planning = commands.add_parser("plan", help="the split and placement for a workload profile")
    add_profile_arguments(planning)
    planning.add_argument("--gpus", type=int, default=1)
    planning.add_argument("--max-encoders-per-gpu", type=int, default=3)
    planning.add_argument(
        "--no-aggregated", action="store_true", help="consider disaggregated splits only"
    )
    planning.add_argument(
        "--calibrate",
        action="store_true",
        help="replace the cost defaults with what the live stages measure (NATS)",
    )
    planning.add_argument(
        "--frontend-metrics",
        metavar="URL",
        default=None,
        help="a frontend's /metrics URL: its host time per image (the mean since it started) "
        "replaces the default",
    )
    RuntimeConfig.add_arguments(planning)

    watching = commands.add_parser("watch", help="scale the stages from their live signals")
    for stage in STAGES:
        watching.add_argument(
            f"--{stage}-replicas", type=_bounds, default=Bounds(1, 8), metavar="MIN:MAX"
        )
        watching.add_argument(
            f"--{stage}-deployment",
            default=f"triptych-{stage}",
            help=f"the Deployment of the {stage} stage",
        )
    watching.add_argument("--interval-s", type=float, default=10.0)
    watching.add_argument("--rounds", type=int, default=0, help="stop after N rounds (0: never)")
    add_settings(watching, Policy)
    watching.add_argument(
        "--kube-api", default=None, help="API server URL (e.g. kubectl proxy's); none: dry run"
    )
    watching.add_argument("--in-cluster", action="store_true", help="the pod's own API server")
    watching.add_argument("--kube-namespace", default="triptych")
    RuntimeConfig.add_arguments(watching)
    for sub in (planning, watching):
        sub.add_argument("--log-level", default="WARNING")
    return root


async def run_plan(args: argparse.Namespace) -> int:
    """Print the plan for the profile (calibrated from NATS with --calibrate)."""
    profile = profile_from_args(args)
    costs = costs_from_args(args)
    signals: dict[str, StageSignals] = {}
    if args.calibrate:
        async with Runtime(RuntimeConfig.from_args(args), name="planner") as runtime:
            signals = await read_signals(runtime, STAGES)
        costs = calibrate(costs, profile, {s: sig.loads for s, sig in signals.items()})
    frontend: dict[str, object] = {}
    if args.frontend_metrics:
        try:
            totals = await image_decode_seconds(args.frontend_metrics)
        except (OSError, ValueError) as error:
            print(f"--frontend-metrics: {error}", file=sys.stderr)
            return 2
        per_image = totals.per_image_since()
        if per_image is None:
            message = "--frontend-metrics: no image decoded there yet; the default stays"
            print(message, file=sys.stderr)
        costs = calibrate_frontend(costs, profile, per_image)
        frontend = {"images_decoded": totals.images, "seconds_per_image": per_image}
    chosen = plan(
        profile,
        costs,
        args.gpus,
        max_encoders_per_gpu=args.max_encoders_per_gpu,
        allow_aggregated=not args.no_aggregated,
        target_utilisation=args.target_utilisation,
    )
    report = {"profile": profile.__dict__, "costs": costs.__dict__, "plan": chosen.describe()}
    if signals:
        report["signals"] = {s: [x.model_dump() for x in sig.loads] for s, sig in signals.items()}
    if frontend:
        report["frontend"] = frontend
    print(json.dumps(report, indent=2))
    return 0


async def run_watch(args: argparse.Namespace, stop: asyncio.Event) -> int:
    """Round after round: signals → decisions → replicas (when a cluster is given)."""
    bounds = {stage: getattr(args, f"{stage}_replicas") for stage in STAGES}
    controller = Controller(bounds, policy_from_args(args))
    deployments = {stage: getattr(args, f"{stage}_deployment") for stage in STAGES}
    scaler: DeploymentScaler | None = None
    if args.in_cluster:
        scaler = DeploymentScaler.in_cluster(args.kube_namespace)
    elif args.kube_api:
        scaler = DeploymentScaler(args.kube_api, args.kube_namespace)
    async with Runtime(RuntimeConfig.from_args(args), name="planner") as runtime:
        if scaler is not None:
            await scaler.__aenter__()
        try:
            rounds = 0
            while not stop.is_set():
                signals = await read_signals(runtime, STAGES)
                line: dict[str, object] = {}
                for stage in STAGES:
                    current = len(signals[stage].loads)
                    if scaler is not None:
                        try:
                            current = await scaler.replicas(deployments[stage])
                        except ScaleError as error:
                            line[stage] = {"error": str(error)}
                            continue
                    decision = controller.decide(stage, signals[stage].loads, current)
                    loads = signals[stage].loads
                    entry: dict[str, object] = {
                        "live": len(loads),
                        "replicas": current,
                        "busy": round(sum(x.busy_fraction for x in loads), 3),
                        "queued": sum(x.queue_depth for x in loads),
                        "desired": decision.desired,
                        "target": decision.target,
                        "reason": decision.reason,
                    }
                    if scaler is not None and decision.target != current:
                        try:
                            entry["set"] = await scaler.scale(deployments[stage], decision.target)
                        except ScaleError as error:
                            entry["error"] = str(error)
                    line[stage] = entry
                print(json.dumps(line), flush=True)
                rounds += 1
                if args.rounds and rounds >= args.rounds:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), args.interval_s)
        finally:
            if scaler is not None:
                await scaler.__aexit__()
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    """Parse flags and run the subcommand."""
    args = parser().parse_args(argv)
    configure_logging(args.log_level)
    if args.command == "plan":

        async def planning(_stop: asyncio.Event) -> int:
            return await run_plan(args)

        serve(planning)
    else:

        async def watching(stop: asyncio.Event) -> int:
            return await run_watch(args, stop)

        serve(watching)


if __name__ == "__main__":
    main()
