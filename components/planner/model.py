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

    images_per_request: float = 1.0
    image_width: int = 448
    image_height: int = 448
    text_tokens: int = 40
    """Prompt tokens besides the image tokens."""
    output_tokens: int = 64
    ttft_target_s: float = 1.0
    itl_target_s: float = 0.05

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
    """CPU time of resizing and patching, serial with the forwards in one encoder process."""
    prefill_s_per_token: float = 30e-6
    decode_step_s: float = 8.0e-3
    """A decode step's fixed part (reading the weights)."""
    decode_step_s_per_context_token: float = 1.5e-8
    """Per token of KV cache in the batch (reading it)."""
    max_running: int = 32
    """Sequences one decode instance runs at once (--max-running-requests)."""
    shared_gpu_loss: float = 0.05
    """Share of a GPU lost per extra process on it: processes' kernels take turns (time
    slices, context switches), they do not overlap."""
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
        """CPU seconds to preprocess one request's images."""
        return profile.images_per_request * profile.patches_per_image * self.preprocess_s_per_patch

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
    window keep theirs). Prefill is taken from prefill workers only: an aggregated worker runs
    its prefills one at a time between decode steps (80 us per token measured on an H200 with
    the one-image mix), a cost a prefill worker's batches do not pay. Decode keeps its step
    model: its busy time per token depends on the batch it ran at, which the signals do not
    carry.
    """
    busy = {"encode": 0.0, "prefill": 0.0, "decode": 0.0}
    images = prompt = 0.0
    for stage_loads in loads.values():
        for load in stage_loads:
            busy["encode"] += load.busy_by_work.get("encode", 0.0)
            images += load.images_per_s
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
    if prompt > 0 and busy["prefill"] > 0:
        updated = replace(updated, prefill_s_per_token=busy["prefill"] / prompt)
    return updated


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
    """Requests per second within the utilisation and ITL targets (0: cannot meet TTFT)."""
    bottleneck: str
    unloaded_ttft_s: float
    decode_batch: float
    itl_s: float
    utilisation: dict[str, float] = field(default_factory=dict)
    """At that rate: each GPU's and each worker kind's busy fraction."""


def _loads(
    packs: list[GpuPack], profile: WorkloadProfile, costs: StageCosts, rate: float
) -> tuple[dict[str, float], float, float]:
    """At `rate`: each worker's and GPU's busy fraction, decode's batch, and the worst ITL."""
    n_e = sum(p.encoders for p in packs)
    n_p = sum(p.prefill for p in packs)
    n_d = sum(p.decode for p in packs)
    n_a = sum(p.aggregated for p in packs)
    enc, pre, fill = (
        costs.encode_gpu_s(profile),
        costs.preprocess_s(profile),
        costs.prefill_s(profile),
    )
    out = profile.output_tokens
    shares: dict[str, float] = {}
    decoders = n_d + n_a
    per_decoder = rate / decoders
    full = float(costs.max_running)
    # a decoder's GPU time at full-batch efficiency: what it must get, whatever else runs
    decode_share = per_decoder * out * costs.step_s(full, profile) / full
    for g, pack in enumerate(packs):
        gpu = 0.0
        if pack.aggregated:
            # one model thread: each request's encode and prefill also stall the running
            # batch for a decode step each (one job, one prefill, one step per loop)
            stall = costs.aggregated_stall_steps * costs.step_s(full, profile)
            worker = rate / n_a * (enc + fill + stall) + decode_share
            shares[f"gpu{g}:EPD"] = worker
            gpu += worker
        if pack.encoders:
            per_encoder = rate / n_e
            shares[f"gpu{g}:E"] = per_encoder * (enc + pre)  # one process: serial
            gpu += pack.encoders * per_encoder * enc
        if pack.prefill:
            shares[f"gpu{g}:P"] = rate / n_p * fill
            gpu += pack.prefill * rate / n_p * fill
        if pack.decode:
            shares[f"gpu{g}:D"] = decode_share
            gpu += decode_share
        shares[f"gpu{g}"] = gpu / (1 - costs.shared_gpu_loss * (pack.workers - 1))
    # the batch a decoder holds (Little's law), its steps slowed by what else holds the GPU
    worst_itl, batch = 0.0, 1.0
    for g, pack in enumerate(packs):
        if pack.decode or pack.aggregated:
            others = min(0.999, max(0.0, shares[f"gpu{g}"] - decode_share))
            b = 1.0
            for _ in range(50):
                b = max(1.0, per_decoder * out * costs.step_s(b, profile) / (1 - others))
            batch = max(batch, b)
            itl = costs.step_s(min(b, full), profile) / (1 - others)
            if pack.aggregated:  # no time slices on one thread: a whole job stalls a step
                itl += max(enc, fill)
            worst_itl = max(worst_itl, itl)
            if b > full:
                shares[f"gpu{g}:D slots"] = b / full  # more sequences than it can hold
    return shares, batch, worst_itl


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
    enc, pre, fill = (
        costs.encode_gpu_s(profile),
        costs.preprocess_s(profile),
        costs.prefill_s(profile),
    )
    needs_encoder = profile.images_per_request > 0
    if n_a == 0 and (n_p == 0 or n_d == 0 or (needs_encoder and n_e == 0)):
        return Capacity(0.0, "a stage has no instance", math.inf, 0.0, 0.0)
    unloaded_ttft = pre + enc + fill + costs.step_s(1, profile)

    def loads(rate: float) -> tuple[dict[str, float], float, float]:
        return _loads(packs, profile, costs, rate)

    def feasible(rate: float) -> bool:
        shares, _, itl = loads(rate)
        return max(shares.values()) <= target_utilisation and itl <= profile.itl_target_s

    if unloaded_ttft > profile.ttft_target_s or not feasible(1e-6):
        shares, batch, itl = loads(1e-6)
        return Capacity(
            0.0, "the targets are out of reach even unloaded", unloaded_ttft, batch, itl
        )
    low, high = 1e-6, 1.0
    while feasible(high) and high < 1e6:
        low, high = high, high * 2
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if feasible(mid) else (low, mid)
    shares, batch, itl = loads(low)
    over, _, over_itl = loads(high)
    if over_itl > profile.itl_target_s and max(over.values()) <= target_utilisation:
        bottleneck = "decode ITL"
    else:
        bottleneck = max(over, key=lambda k: over[k])
    return Capacity(
        low, bottleneck, unloaded_ttft, batch, itl, {k: round(v, 3) for k, v in shares.items()}
    )
