"""What a request costs each stage, and what a set of instances sustains.

A `WorkloadProfile` says what the traffic looks like (images per request and their size, prompt
and output lengths, the TTFT and ITL targets). `StageCosts` says what one GPU takes for each
kind of work: the vision tower's forward per image (linear and quadratic in its patches: the
full-attention layers), its preprocessing on the encoder's CPU, prefill per prompt token, and a
decode step (a fixed part, the weights' read, plus a part per token of context in the batch).
The defaults are a Qwen2.5-VL-7B-shaped model on one H200 with the ``hf`` engine; `calibrate`
replaces them with what the stages measured (their ``load_*`` signals).

`capacity` answers: with these instances on these GPUs, how many requests per second before a
model thread or a GPU passes the target utilisation, or decode's batch passes the ITL target.
"""

import math
from dataclasses import dataclass, field, replace

from triptych.protocol.load import StageLoad
from triptych.protocol.settings import setting

PATCH = 14
"""Pixels per side of a vision patch (Qwen2-VL family)."""
MERGE = 2
"""Patches per side merged into one image token."""


def image_patches(width: int, height: int) -> int:
    """Vision patches of one image after the processor's resize to multiples of 28."""
    side = PATCH * MERGE
    w = max(side, round(width / side) * side)
    h = max(side, round(height / side) * side)
    return (w // PATCH) * (h // PATCH)


@dataclass(frozen=True)
class WorkloadProfile:
    """The traffic a split is planned for."""

    images_per_request: float = setting(1.0, "images a request carries, on average")
    image_width: int = 448
    image_height: int = 448
    text_tokens: int = setting(40, "prompt tokens besides the image tokens")
    output_tokens: int = setting(64, "tokens generated per request")
    ttft_target_s: float = setting(1.0, "time to first token the split must keep")
    itl_target_s: float = setting(0.05, "time between tokens the split must keep")

    @property
    def patches_per_image(self) -> int:
        return image_patches(self.image_width, self.image_height)

    @property
    def prompt_tokens(self) -> float:
        """Prompt tokens per request, image tokens included."""
        image_tokens = self.patches_per_image // (MERGE * MERGE)
        return self.text_tokens + self.images_per_request * image_tokens


@dataclass(frozen=True)
class StageCosts:
    """Seconds each kind of work takes on one GPU (see the module docstring)."""

    encode_s_per_patch: float = 7.3e-6
    encode_s_per_patch_sq: float = 1.9e-9
    """Per image: the full-attention layers grow with the square of its patches."""
    preprocess_s_per_patch: float = 3.0e-6
    """Host time of an encoder per image (decoding, resizing, patching, the forward's layouts):
    off its model thread, but serial with its forwards in one encoder process."""
    frontend_s_per_patch: float = 1.5e-6
    """Host time of the frontend per image (decoding it and digesting its pixels)."""
    transit_s: float = 0.0
    """A request's latency outside every modelled queue: its upload and parsing, the hops and
    transfers between stages. `calibrate_latency` finds it by elimination."""
    prefill_s_per_token: float = 30e-6
    decode_step_s: float = 8.0e-3
    """A decode step's fixed part (reading the weights)."""
    decode_step_s_per_context_token: float = 1.5e-8
    """Per token of KV cache in the batch (reading it)."""
    max_running: int = 32
    """Sequences one decode instance runs at once (--max-running-requests)."""
    slice_share: float = 0.5
    """A process's share of its GPU while another process on it has work too: processes'
    kernels take turns in time slices, they do not overlap. A decoder steps whenever it holds
    a sequence, so an encoder beside a loaded decoder gets about this share, not the idle
    rest, and the decoder's steps stretch while the encoder works."""
    shared_gpu_loss: float = 0.05
    """Share of a GPU lost per extra process on it (context switches between time slices)."""
    aggregated_stall_steps: float = 2.0
    """Decode steps an aggregated worker's batch waits per request: its encode and its prefill
    each take a turn of the one model thread between two steps."""
    gpu_memory_gib: float = 141.0
    encode_memory_gib: float = 16.0
    """An encode worker's budget: the vision tower and its activations."""
    prefill_memory_gib: float = 40.0
    """A prefill worker's: the language model and a batch's activations."""
    decode_memory_gib: float = 60.0
    """A decode worker's: the language model and its KV cache."""

    def encode_gpu_s(self, profile: WorkloadProfile) -> float:
        """GPU seconds to encode one request's images."""
        p = profile.patches_per_image
        per_image = self.encode_s_per_patch * p + self.encode_s_per_patch_sq * p * p
        return profile.images_per_request * per_image

    def preprocess_s(self, profile: WorkloadProfile) -> float:
        """An encoder's host seconds for one request's images."""
        return profile.images_per_request * profile.patches_per_image * self.preprocess_s_per_patch

    def frontend_s(self, profile: WorkloadProfile) -> float:
        """The frontend's host seconds for one request's images."""
        return profile.images_per_request * profile.patches_per_image * self.frontend_s_per_patch

    def prefill_s(self, profile: WorkloadProfile) -> float:
        """GPU seconds to prefill one request."""
        return profile.prompt_tokens * self.prefill_s_per_token

    def step_s(self, batch: float, profile: WorkloadProfile) -> float:
        """One decode step of `batch` sequences of this profile's length."""
        context = profile.prompt_tokens + profile.output_tokens / 2
        return self.decode_step_s + batch * context * self.decode_step_s_per_context_token


def calibrate(
    costs: StageCosts,
    profile: WorkloadProfile,
    loads: dict[str, list[StageLoad]],
) -> StageCosts:
    """`costs` scaled to what the instances measured for this profile's traffic.

    `loads` maps a stage (encode, prefill, decode, or an aggregated worker's "decode") to its
    instances' signals. Encoding's and prefill's busy seconds per second, over the images and
    prompt tokens per second they processed, are their costs now (kinds without traffic in the
    window keep theirs); so is the encoders' host time per image (``host_s_per_image``).
    Prefill is taken from prefill workers only: an aggregated worker runs its prefills one at a
    time between decode steps (80 us per token measured on an H200 with the one-image mix), a
    cost a prefill worker's batches do not pay. Decode keeps its step
    model: its busy time per token depends on the batch it ran at, which the signals do not
    carry.
    """
    busy = {"encode": 0.0, "prefill": 0.0, "decode": 0.0}
    images = prompt = host = 0.0
    for stage_loads in loads.values():
        for load in stage_loads:
            busy["encode"] += load.busy_by_work.get("encode", 0.0)
            images += load.images_per_s
            host += load.host_s_per_image * load.images_per_s
            if load.busy_by_work.get("decode", 0.0) > 0:
                continue  # aggregated: its prefills run one at a time between decode steps
            busy["prefill"] += load.busy_by_work.get("prefill", 0.0)
            prompt += load.prompt_tokens_per_s
    updated = costs
    if images > 0 and busy["encode"] > 0:
        measured = busy["encode"] / images * profile.images_per_request
        scale = measured / max(costs.encode_gpu_s(profile), 1e-12)
        updated = replace(
            updated,
            encode_s_per_patch=costs.encode_s_per_patch * scale,
            encode_s_per_patch_sq=costs.encode_s_per_patch_sq * scale,
        )
    if images > 0 and host > 0:
        per_image = host / images
        updated = replace(updated, preprocess_s_per_patch=per_image / profile.patches_per_image)
    if prompt > 0 and busy["prefill"] > 0:
        updated = replace(updated, prefill_s_per_token=busy["prefill"] / prompt)
    return updated


def calibrate_frontend(
    costs: StageCosts, profile: WorkloadProfile, seconds_per_image: float | None
) -> StageCosts:
    """`costs` with the frontend's host time per image as its processes measured it (decoding
    an image and digesting its pixels, ``triptych_frontend_image_decode_seconds``), spread
    over the profile's patches like the encoders' host time; unchanged without a figure."""
    if seconds_per_image is None or seconds_per_image <= 0:
        return costs
    return replace(costs, frontend_s_per_patch=seconds_per_image / profile.patches_per_image)


@dataclass(frozen=True)
class GpuPack:
    """The workers one GPU runs: dedicated encoders, prefill, decode, or one aggregated EPD."""

    encoders: int = 0
    prefill: int = 0
    decode: int = 0
    aggregated: int = 0

    @property
    def workers(self) -> int:
        return self.encoders + self.prefill + self.decode + self.aggregated

    def label(self) -> str:
        if self.aggregated:
            return "EPD"
        parts = ["E"] * self.encoders + ["P"] * self.prefill + ["D"] * self.decode
        return "+".join(parts) or "-"

    def memory_fractions(self, costs: StageCosts) -> dict[str, float] | None:
        """--mem-fraction-static per role on this GPU (None: the budgets do not fit).

        Encoders and prefill get their budget; decode (or the aggregated worker) gets what is
        left of 90 % of the GPU, which its KV cache fills.
        """
        total = costs.gpu_memory_gib
        fixed = self.encoders * costs.encode_memory_gib + self.prefill * costs.prefill_memory_gib
        fractions: dict[str, float] = {}
        if self.encoders:
            fractions["encode"] = round(costs.encode_memory_gib / total, 3)
        if self.prefill:
            fractions["prefill"] = round(costs.prefill_memory_gib / total, 3)
        left = 0.9 * total - fixed
        if self.decode or self.aggregated:
            if left < costs.decode_memory_gib:
                return None
            fractions["decode" if self.decode else "aggregated"] = round(left / total, 3)
        elif left < 0:
            return None
        return fractions


@dataclass(frozen=True)
class Capacity:
    """What a placement sustains for a profile."""

    requests_per_s: float
    """Requests per second within the utilisation, TTFT p99 and ITL targets (0: cannot meet
    them)."""
    bottleneck: str
    unloaded_ttft_s: float
    decode_batch: float
    itl_s: float
    utilisation: dict[str, float] = field(default_factory=dict)
    """At that rate: each GPU's and each worker kind's busy fraction (the frontend's too)."""
    ttft_s: float = 0.0
    """Mean TTFT predicted at that rate (each stage's service time stretched by its queue)."""
    ttft_p99_s: float = 0.0
    """TTFT p99 predicted at that rate: the services plus the worst stage's p99 wait."""


@dataclass(frozen=True)
class _State:
    """A placement at one request rate."""

    shares: dict[str, float]
    batch: float
    itl_s: float
    ttft_s: float
    ttft_p99_s: float


@dataclass(frozen=True)
class _Traffic:
    """What one instance of each kind gets at a request rate, and each request's costs."""

    per_encoder: float
    per_prefill: float
    per_decoder: float
    per_aggregated: float
    enc: float
    pre: float
    fill: float
    decode_share: float
    """A decoder's GPU time at full-batch efficiency: what it must get, whatever else runs."""


def _queued(service: float, busy: float) -> float:
    """Mean time in a single-server queue (M/M/1): the service stretched by the load."""
    return math.inf if busy >= 1 else service / (1 - busy)


def _wait_p99(service: float, busy: float) -> float:
    """The p99 wait before service in an M/M/1 queue: Poisson arrivals come in bursts, so a
    stage that is mostly idle still makes one request in a hundred wait behind several."""
    if busy >= 1:
        return math.inf
    return service * max(0.0, math.log(100 * busy)) / (1 - busy) if busy > 0 else 0.0


def _at_rate(
    packs: list[GpuPack], profile: WorkloadProfile, costs: StageCosts, rate: float
) -> _State:
    """At `rate`: each worker's, GPU's and the frontend's busy fraction, decode's batch, the
    worst ITL and the mean TTFT.

    Processes on one GPU take turns in time slices: while the others on its GPU have work, a
    process gets `StageCosts.slice_share` of it. A decoder has work whenever it holds a
    sequence (with Poisson arrivals, 1 - exp(-batch) of the time), so an encoder beside a
    loaded decoder runs its forwards at about half speed, and the decoder's steps stretch for
    as long as the encoder is busy. The frontend and each encoder's host work run in their
    processes, serial with what follows them there.
    """
    n_e = sum(p.encoders for p in packs)
    n_p = sum(p.prefill for p in packs)
    n_a = sum(p.aggregated for p in packs)
    per_decoder = rate / (sum(p.decode for p in packs) + n_a)
    full = float(costs.max_running)
    traffic = _Traffic(
        per_encoder=rate / n_e if n_e else 0.0,
        per_prefill=rate / n_p if n_p else 0.0,
        per_decoder=per_decoder,
        per_aggregated=rate / n_a if n_a else 0.0,
        enc=costs.encode_gpu_s(profile),
        pre=costs.preprocess_s(profile),
        fill=costs.prefill_s(profile),
        decode_share=per_decoder * profile.output_tokens * costs.step_s(full, profile) / full,
    )
    shares: dict[str, float] = {"frontend": rate * costs.frontend_s(profile)}
    # each stage kind's slowest instance (service, busy): a request's worst path
    stages: dict[str, tuple[float, float]] = {}
    worst_itl, batch = 0.0, 1.0
    for g, pack in enumerate(packs):
        place = _aggregated_gpu if pack.aggregated else _shared_gpu
        b, itl, times = place(g, pack, traffic, profile, costs, shares=shares)
        batch, worst_itl = max(batch, b), max(worst_itl, itl)
        for kind, (service, busy) in times.items():
            stages[kind] = max(stages.get(kind, (0.0, 0.0)), (service, busy), key=_mean)
    stages["frontend"] = (costs.frontend_s(profile), shares["frontend"])
    ttft = costs.transit_s + sum(_mean(stage) for stage in stages.values())
    p99 = costs.transit_s + sum(service for service, _ in stages.values())
    p99 += max(_wait_p99(service, busy) for service, busy in stages.values())
    return _State(shares, batch, worst_itl, ttft, p99)


def _mean(stage: tuple[float, float]) -> float:
    return _queued(*stage)


def _aggregated_gpu(
    g: int,
    pack: GpuPack,
    t: _Traffic,
    profile: WorkloadProfile,
    costs: StageCosts,
    *,
    shares: dict[str, float],
) -> tuple[float, float, dict[str, tuple[float, float]]]:
    """One EPD worker's GPU: its batch, ITL and time to a first token; `shares` filled in.

    One model thread: each request's encode and prefill also stall the running batch for a
    decode step each (one job, one prefill, one step per loop). Prefill runs in chunks, so a
    step waits for one job or chunk at most: on average, steps stretch by the share of the
    thread that encoding and prefill take.
    """
    full = float(costs.max_running)
    stall = costs.aggregated_stall_steps * costs.step_s(full, profile)
    worker = t.per_aggregated * (t.enc + t.fill + stall) + t.decode_share
    shares[f"gpu{g}:EPD"] = worker
    shares[f"gpu{g}:EPD encode loop"] = t.per_aggregated * (t.pre + t.enc)  # host, forward
    shares[f"gpu{g}"] = worker
    b = 1.0
    for _ in range(50):
        step = costs.step_s(b, profile) / max(1e-3, 1 - worker)
        b = min(1e6, max(1.0, t.per_decoder * profile.output_tokens * step))
    if b > full:
        shares[f"gpu{g}:D slots"] = b / full  # more sequences than it can hold
    jobs = min(0.999, t.per_aggregated * (t.enc + t.fill + stall))
    itl = costs.step_s(min(b, full), profile) / (1 - jobs)
    # its encode loop (host work, then a forward) feeds the model thread, where a prompt waits
    # for the jobs ahead of it; decode steps between them are short
    loop = shares[f"gpu{g}:EPD encode loop"]
    return b, itl, {"E": (t.pre + t.enc, loop), "P": (t.fill + costs.step_s(b, profile), jobs)}


def _shared_gpu(
    g: int,
    pack: GpuPack,
    t: _Traffic,
    profile: WorkloadProfile,
    costs: StageCosts,
    *,
    shares: dict[str, float],
) -> tuple[float, float, dict[str, tuple[float, float]]]:
    """A GPU of encoders, prefill and decode processes taking turns: the decoder's batch and
    ITL, each stage's time on a request; `shares` filled in."""
    full = float(costs.max_running)
    slow = 1 / costs.slice_share - 1  # how much longer work takes while it shares its GPU
    work = {"E": t.per_encoder * t.enc, "P": t.per_prefill * t.fill}  # GPU seconds per second
    counts = {"E": pack.encoders, "P": pack.prefill, "D": pack.decode}
    # each process's busy fraction from the others' (a fixed point)
    busy = dict.fromkeys(counts, 0.0)
    others = dict.fromkeys(counts, 0.0)
    b, itl = 1.0, costs.step_s(1.0, profile)
    for _ in range(50):
        total = sum(busy[k] * n for k, n in counts.items())
        others = {k: min(1.0, total - busy[k]) for k in busy}
        for kind in ("E", "P"):
            if counts[kind]:
                busy[kind] = min(1.0, work[kind] * (1 + others[kind] * slow))
        if pack.decode:
            itl = costs.step_s(min(b, full), profile) * (1 + others["D"] * slow)
            b = max(1.0, t.per_decoder * profile.output_tokens * itl)
            busy["D"] = 1 - math.exp(-t.per_decoder * profile.output_tokens * itl)
    times: dict[str, tuple[float, float]] = {}  # per stage: (service, busy)
    if pack.encoders:
        forward = t.enc * (1 + others["E"] * slow)
        shares[f"gpu{g}:E"] = t.per_encoder * (t.pre + forward)  # one process: serial
        times["E"] = (t.pre + forward, shares[f"gpu{g}:E"])
    if pack.prefill:
        forward = t.fill * (1 + others["P"] * slow)
        shares[f"gpu{g}:P"] = t.per_prefill * forward
        times["P"] = (forward, shares[f"gpu{g}:P"])
    gpu = pack.encoders * work["E"] + pack.prefill * work["P"]
    if pack.decode:
        gpu += t.decode_share
        shares[f"gpu{g}:D"] = t.decode_share
        times["D"] = (itl, 0.0)
        if b > full:
            shares[f"gpu{g}:D slots"] = b / full  # more sequences than it can hold
    shares[f"gpu{g}"] = gpu / (1 - costs.shared_gpu_loss * (pack.workers - 1))
    return (b if pack.decode else 1.0), (itl if pack.decode else 0.0), times


def capacity(
    packs: list[GpuPack],
    profile: WorkloadProfile,
    costs: StageCosts,
    target_utilisation: float = 0.7,
) -> Capacity:
    """The highest request rate `packs` sustain for `profile` (see the module docstring)."""
    n_e = sum(p.encoders for p in packs)
    n_p = sum(p.prefill for p in packs)
    n_d = sum(p.decode for p in packs)
    n_a = sum(p.aggregated for p in packs)
    needs_encoder = profile.images_per_request > 0
    if n_a == 0 and (n_p == 0 or n_d == 0 or (needs_encoder and n_e == 0)):
        return Capacity(0.0, "a stage has no instance", math.inf, 0.0, 0.0)

    def at(rate: float) -> _State:
        return _at_rate(packs, profile, costs, rate)

    def feasible(state: _State) -> bool:
        return (
            max(state.shares.values()) <= target_utilisation
            and state.itl_s <= profile.itl_target_s
            and state.ttft_p99_s <= profile.ttft_target_s
        )

    idle = at(1e-6)
    if not feasible(idle):
        return Capacity(
            0.0, "the targets are out of reach even unloaded", idle.ttft_s, idle.batch, idle.itl_s
        )
    low, high = 1e-6, 1.0
    while feasible(at(high)) and high < 1e6:
        low, high = high, high * 2
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if feasible(at(mid)) else (low, mid)
    state, over = at(low), at(high)
    if max(over.shares.values()) > target_utilisation:
        bottleneck = max(over.shares, key=lambda k: over.shares[k])
    elif over.itl_s > profile.itl_target_s:
        bottleneck = "decode ITL"
    else:
        bottleneck = "TTFT p99"
    return Capacity(
        low,
        bottleneck,
        idle.ttft_s,
        state.batch,
        state.itl_s,
        {k: round(v, 3) for k, v in state.shares.items()},
        state.ttft_s,
        state.ttft_p99_s,
    )


def calibrate_latency(
    costs: StageCosts, profile: WorkloadProfile, packs: list[GpuPack], unloaded_ttft_s: float
) -> StageCosts:
    """`costs` with `StageCosts.transit_s` set so that the model's unloaded TTFT of `packs`
    is the one measured there (at a low rate): what the model's queues do not account for."""
    modelled = capacity(packs, profile, replace(costs, transit_s=0.0)).unloaded_ttft_s
    if not math.isfinite(modelled):
        return costs
    return replace(costs, transit_s=max(0.0, unloaded_ttft_s - modelled))
