"""Choose the split: how many encode, prefill and decode instances, and on which GPU each runs.

Every way to fill `gpus` GPUs with packs of workers (up to `max_encoders_per_gpu` dedicated
encoders, at most one prefill and one decode per GPU, or one aggregated EPD worker per GPU) is
scored by `capacity`; the one that sustains the most requests per second within the targets
wins; among those within `tolerance` of it (the cost model is not that exact), the one with
the fewest processes, which is simpler to run and loses less to GPU sharing. Small enough to
enumerate: 2 GPUs give a few hundred candidates, 8 GPUs some tens of thousands.
"""

import itertools
import shlex
from dataclasses import dataclass

from triptych.components.planner.model import (
    Capacity,
    GpuPack,
    StageCosts,
    WorkloadProfile,
    capacity,
)


@dataclass(frozen=True)
class Bounds:
    """Instances a stage may have."""

    min: int = 0
    max: int = 64

    def allows(self, count: int) -> bool:
        return self.min <= count <= self.max


@dataclass(frozen=True)
class Plan:
    """A split, its placement, and what it is predicted to sustain."""

    packs: tuple[GpuPack, ...]
    capacity: Capacity
    costs: StageCosts

    @property
    def counts(self) -> dict[str, int]:
        """Instances per stage (``aggregated`` for EPD workers)."""
        return {
            "encode": sum(p.encoders for p in self.packs),
            "prefill": sum(p.prefill for p in self.packs),
            "decode": sum(p.decode for p in self.packs),
            "aggregated": sum(p.aggregated for p in self.packs),
        }

    @property
    def label(self) -> str:
        """E.g. ``E+E+P | D``: each GPU's workers, GPU 0 first."""
        return " | ".join(p.label() for p in self.packs)

    def placement(self) -> list[dict[str, object]]:
        """Per GPU: its workers and their --mem-fraction-static budgets."""
        placed: list[dict[str, object]] = []
        for gpu, pack in enumerate(self.packs):
            placed.append(
                {
                    "gpu": gpu,
                    "workers": pack.label(),
                    "mem_fraction_static": pack.memory_fractions(self.costs),
                }
            )
        return placed

    def launch_command(self) -> list[str]:
        """The ``launch/`` command that starts this split on one host."""
        if self.counts["aggregated"]:
            listed = ",".join(str(g) for g, p in enumerate(self.packs) if p.aggregated)
            return ["launch/agg.sh", "--gpus", listed]
        command = ["launch/multimodal_disagg.sh"]
        fractions: dict[str, float] = {}
        for flag, attr in (("encode", "encoders"), ("prefill", "prefill"), ("decode", "decode")):
            gpus = [str(g) for g, p in enumerate(self.packs) for _ in range(getattr(p, attr))]
            if gpus:
                command += [f"--{flag}-gpu", ",".join(gpus)]
            for pack in self.packs:
                budget = (pack.memory_fractions(self.costs) or {}).get(flag)
                if budget is not None:
                    fractions[flag] = min(fractions.get(flag, 1.0), budget)
        for flag, budget in fractions.items():
            command += [f"--{flag}-mem-fraction-static", f"{budget:g}"]
        return command

    def describe(self) -> dict[str, object]:
        """The plan as JSON-ready data."""
        c = self.capacity
        return {
            "split": self.label,
            "counts": self.counts,
            "placement": self.placement(),
            "predicted_requests_per_s": round(c.requests_per_s, 3),
            "bottleneck": c.bottleneck,
            "unloaded_ttft_s": round(c.unloaded_ttft_s, 4),
            "decode_batch": round(c.decode_batch, 1),
            "itl_s": round(c.itl_s, 4),
            "ttft_s": round(c.ttft_s, 4),
            "ttft_p99_s": round(c.ttft_p99_s, 4),
            "utilisation": c.utilisation,
            "launch": shlex.join(self.launch_command()),
        }


def candidate_packs(max_encoders_per_gpu: int, allow_aggregated: bool) -> list[GpuPack]:
    """Every pack one GPU may run."""
    packs = [
        GpuPack(encoders=e, prefill=p, decode=d)
        for e in range(max_encoders_per_gpu + 1)
        for p in (0, 1)
        for d in (0, 1)
        if e + p + d > 0
    ]
    if allow_aggregated:
        packs.append(GpuPack(aggregated=1))
    return packs


def plan(
    profile: WorkloadProfile,
    costs: StageCosts,
    gpus: int,
    *,
    bounds: dict[str, Bounds] | None = None,
    max_encoders_per_gpu: int = 3,
    allow_aggregated: bool = True,
    target_utilisation: float = 0.7,
    tolerance: float = 0.05,
) -> Plan:
    """The best split of `gpus` GPUs for `profile` (ValueError when none fits the bounds)."""
    bounds = bounds or {}
    candidates: list[Plan] = []
    for combo in itertools.combinations_with_replacement(
        candidate_packs(max_encoders_per_gpu, allow_aggregated), gpus
    ):
        packs = tuple(combo)
        aggregated = sum(p.aggregated for p in packs)
        if aggregated and aggregated != len(packs):
            continue  # EPD workers and a disaggregated pipeline are not mixed
        if any(p.memory_fractions(costs) is None for p in packs):
            continue
        ordered = _ordered(packs)
        candidate = Plan(
            ordered, capacity(list(ordered), profile, costs, target_utilisation), costs
        )
        if not all(b.allows(candidate.counts.get(s, 0)) for s, b in bounds.items()):
            continue
        candidates.append(candidate)
    if not candidates:
        raise ValueError("no split of these GPUs fits the bounds")
    top = max(c.capacity.requests_per_s for c in candidates)
    close = [c for c in candidates if c.capacity.requests_per_s >= top * (1 - tolerance)]
    return min(close, key=lambda c: (sum(p.workers for p in c.packs), -c.capacity.requests_per_s))


def _ordered(packs: tuple[GpuPack, ...]) -> tuple[GpuPack, ...]:
    """GPU 0 first: the GPU with prefill, then encoders, then the rest."""
    return tuple(sorted(packs, key=lambda p: (-p.aggregated, -p.prefill, -p.encoders, -p.decode)))
