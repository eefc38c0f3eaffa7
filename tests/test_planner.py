"""The stage planner: load signals, the split per workload, and scaling with hysteresis.

The end-to-end test runs E/P/D on the mock engine (simulated costs, real NATS and processes),
the planner's ``watch`` command as its own process, and a Kubernetes API stand-in on loopback:
a real HTTP server that speaks the Deployment scale subresource and, like a kubelet, starts or
stops encode worker processes to match the replicas it is told.
"""

import asyncio
import base64
import io
import itertools
import json
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from PIL import Image

from tests.stack import ROOT, Process, Stack, start_topology
from tests.test_metrics import metrics_ports, scrape, value
from triptych.components.planner.controller import Controller, Policy
from triptych.components.planner.kube import DeploymentScaler, ScaleError
from triptych.components.planner.model import (
    GpuPack,
    StageCosts,
    WorkloadProfile,
    calibrate,
    calibrate_frontend,
    calibrate_latency,
    capacity,
)
from triptych.components.planner.placement import Bounds, plan
from triptych.components.planner.signals import ImageDecodeTotals
from triptych.engines.hf.config import HfConfig
from triptych.engines.hf.core import EngineCore
from triptych.engines.hf.model import LanguageModel
from triptych.engines.hf.sequence import Prompt
from triptych.engines.load import LoadMeter
from triptych.protocol import SamplingOptions
from triptych.protocol.load import StageLoad

ONE_448 = WorkloadProfile(images_per_request=1, image_width=448, image_height=448)
THREE_1024 = WorkloadProfile(images_per_request=3, image_width=1024, image_height=1024)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- the load meter ------------------------------------------------------------------------


def test_meter_busy_fraction_rates_and_window() -> None:
    clock = Clock()
    meter = LoadMeter(window_s=10.0, clock=clock)
    queue = [3]
    meter.add_queue(lambda: queue[0])
    clock.now += 10
    for _ in range(4):  # 4 x (1 s encode + 0.5 s idle)
        with meter.busy("encode"):
            clock.now += 1.0
        meter.count("images", 2)
        clock.now += 0.5
    token = meter.begin("decode")  # still running: counts up to now
    clock.now += 2.0
    load = meter.snapshot()
    assert load.queue_depth == 3
    assert load.busy_by_work["encode"] == pytest.approx(0.4)
    assert load.busy_by_work["decode"] == pytest.approx(0.2)
    assert load.busy_fraction == pytest.approx(0.6)
    assert load.images_per_s == pytest.approx(0.8)
    meter.end(token)
    clock.now += 30  # all of it leaves the window
    later = meter.snapshot()
    assert later.busy_fraction == 0 and later.images_per_s == 0


def test_meter_reports_an_encoders_host_time_per_image_apart_from_its_model_thread() -> None:
    clock = Clock()
    meter = LoadMeter(window_s=10.0, clock=clock)
    clock.now += 10
    for _ in range(3):  # 3 batches of 4 images: 0.2 s decoding and resizing, 0.1 s forward
        clock.now += 0.2
        meter.host(0.2)
        with meter.busy("encode"):
            clock.now += 0.1
        meter.count("images", 4)
    load = meter.snapshot()
    assert load.host_s_per_image == pytest.approx(0.05)
    assert load.busy_fraction == pytest.approx(0.03)  # the model thread's only
    published = StageLoad.from_metadata(load.to_metadata())
    assert published is not None and published.host_s_per_image == pytest.approx(0.05)
    clock.now += 30
    assert meter.snapshot().host_s_per_image == 0


async def test_the_hf_engine_meters_its_model_thread(tiny_model: Path) -> None:
    """The hf core's own clock and counters feed the meter: prefill and decode time, prompt
    positions prefilled and tokens emitted (not the extra one a stopped sequence computed)."""
    meter = LoadMeter(window_s=600.0)
    model = await asyncio.to_thread(LanguageModel, str(tiny_model), "cpu")
    settings = HfConfig(max_len=256, max_running=8, kv_tokens=8 * 256, page_size=4)
    core = EngineCore(model, settings, True, "metered", meter=meter)
    core.start()
    sampling = SamplingOptions(max_tokens=8, temperature=0, ignore_eos=True)

    async def run(prompt: list[int]) -> int:
        count = 0
        async with core.admission("r", len(prompt)) as sequence:
            async for chunk in core.generate(sequence, sampling, set(), Prompt(prompt)):
                count += len(chunk.token_ids)
        return count

    try:
        prompts = [list(range(10, 30)), list(range(40, 55)), [7] * 25]
        counts = await asyncio.gather(*(run(p) for p in prompts))
    finally:
        await asyncio.to_thread(core.close)
    load = meter.snapshot()
    assert counts == [8, 8, 8]
    assert load.output_tokens_per_s * load.window_s == pytest.approx(24)
    assert load.prompt_tokens_per_s * load.window_s == pytest.approx(60)
    assert load.busy_by_work["prefill"] > 0 and load.busy_by_work["decode"] > 0
    assert load.busy_by_work["encode"] == 0
    assert load.queue_depth == 0


def test_load_round_trips_through_metadata() -> None:
    load = StageLoad(
        queue_depth=4,
        busy_fraction=0.75,
        busy_by_work={"encode": 0.5, "prefill": 0.25, "decode": 0.0},
        images_per_s=12.5,
        prompt_tokens_per_s=3000.0,
        output_tokens_per_s=800.0,
        requests_per_s=4.0,
        host_s_per_image=0.0125,
        window_s=10.0,
    )
    metadata = {"model": "m", "host": "h", **load.to_metadata()}
    assert all(isinstance(v, str) for v in metadata.values())
    assert StageLoad.from_metadata(metadata) == load
    assert StageLoad.from_metadata({"model": "m"}) is None
    assert StageLoad.from_metadata({"load_busy_fraction": "lots"}) is None


# -- the split for a workload --------------------------------------------------------------


def test_plan_gives_the_image_heavy_mix_more_encoders() -> None:
    costs = StageCosts()
    light = plan(ONE_448, costs, gpus=2)
    heavy = plan(THREE_1024, costs, gpus=2)
    assert light.counts["encode"] < heavy.counts["encode"]
    for chosen, profile in ((light, ONE_448), (heavy, THREE_1024)):
        # it beats (or equals) two EPD workers under its own model, and meets the targets
        epd = capacity([GpuPack(aggregated=1)] * 2, profile, costs)
        assert chosen.capacity.requests_per_s >= epd.requests_per_s
        assert chosen.capacity.requests_per_s > 0
        assert chosen.capacity.unloaded_ttft_s <= profile.ttft_target_s
        assert chosen.capacity.itl_s <= profile.itl_target_s
        for gpu in chosen.placement():
            budgets = gpu["mem_fraction_static"]
            assert isinstance(budgets, dict)
            per_role = {"encode": chosen.packs[int(str(gpu["gpu"]))].encoders}
            used = sum(f * per_role.get(role, 1) for role, f in budgets.items())
            assert used <= 0.9 + 1e-9
    # an EPD worker's streams wait while its model thread encodes and prefills
    epd = capacity([GpuPack(aggregated=1)] * 2, THREE_1024, costs)
    assert epd.itl_s > costs.step_s(epd.decode_batch, THREE_1024)
    command = heavy.launch_command()
    assert command[0] == "launch/multimodal_disagg.sh"
    assert "--encode-gpu" in command and "--encode-mem-fraction-static" in command


def test_plan_keeps_to_bounds_and_refuses_the_impossible() -> None:
    bounded = plan(THREE_1024, StageCosts(), gpus=2, bounds={"encode": Bounds(0, 1)})
    assert bounded.counts["encode"] <= 1
    assert (
        bounded.capacity.requests_per_s
        < plan(THREE_1024, StageCosts(), gpus=2).capacity.requests_per_s
    )
    with pytest.raises(ValueError, match="bounds"):
        plan(ONE_448, StageCosts(), gpus=1, bounds={"encode": Bounds(2, 2), "decode": Bounds(2, 2)})
    slow = WorkloadProfile(
        images_per_request=3, image_width=1024, image_height=1024, ttft_target_s=0.01
    )
    assert plan(slow, StageCosts(), gpus=2).capacity.requests_per_s == 0


def test_calibration_takes_the_measured_costs() -> None:
    costs = StageCosts()
    measured = calibrate(
        costs,
        ONE_448,
        {
            "encode": [StageLoad(busy_fraction=0.5, busy_by_work={"encode": 0.5}, images_per_s=10)],
            "prefill": [
                StageLoad(
                    busy_fraction=0.3, busy_by_work={"prefill": 0.3}, prompt_tokens_per_s=3000
                )
            ],
        },
    )
    assert measured.encode_gpu_s(ONE_448) == pytest.approx(0.05)
    assert measured.prefill_s_per_token == pytest.approx(1e-4)
    assert measured.decode_step_s == costs.decode_step_s  # no decode traffic: unchanged
    # an aggregated worker's prefills (one at a time between decode steps) say nothing of a
    # prefill worker's batches; its encoding counts
    aggregated = StageLoad(
        busy_fraction=0.9,
        busy_by_work={"encode": 0.2, "prefill": 0.4, "decode": 0.3},
        images_per_s=10,
        prompt_tokens_per_s=4000,
    )
    from_epd = calibrate(costs, ONE_448, {"decode": [aggregated]})
    assert from_epd.encode_gpu_s(ONE_448) == pytest.approx(0.02)
    assert from_epd.prefill_s_per_token == costs.prefill_s_per_token
    # the encoders' host time per image, weighted by the images each encoded
    host = calibrate(
        costs,
        THREE_1024,
        {
            "encode": [
                StageLoad(images_per_s=3, host_s_per_image=0.04),
                StageLoad(images_per_s=1, host_s_per_image=0.08),
            ]
        },
    )
    assert host.preprocess_s(THREE_1024) == pytest.approx(3 * 0.05)
    assert host.encode_gpu_s(THREE_1024) == costs.encode_gpu_s(THREE_1024)  # no busy time


def test_the_frontends_host_time_per_image_is_calibrated_from_its_totals() -> None:
    costs = StageCosts()
    earlier, later = ImageDecodeTotals(seconds=0.5, images=10), ImageDecodeTotals(2.5, 30)
    assert later.per_image_since() == pytest.approx(2.5 / 30)
    assert later.per_image_since(earlier) == pytest.approx(0.1)  # 2 s over 20 images
    assert later.per_image_since(later) is None  # nothing decoded in between
    measured = calibrate_frontend(costs, THREE_1024, 0.1)
    assert measured.frontend_s(THREE_1024) == pytest.approx(3 * 0.1)
    assert calibrate_frontend(costs, THREE_1024, None) == costs
    # a dearer frontend is a longer path to the first token, whatever the split
    pack = [GpuPack(aggregated=1)] * 2
    assert (
        capacity(pack, THREE_1024, measured).unloaded_ttft_s
        > capacity(pack, THREE_1024, costs).unloaded_ttft_s
    )


def test_an_encoder_beside_a_decoder_gets_a_time_slice_not_the_idle_rest() -> None:
    base = StageCosts()  # a tower three times dearer: the encoder, not the GPU's sum, binds
    costs = replace(
        base,
        encode_s_per_patch=3 * base.encode_s_per_patch,
        encode_s_per_patch_sq=3 * base.encode_s_per_patch_sq,
    )
    beside_decode = [GpuPack(prefill=1), GpuPack(encoders=1, decode=1)]
    alone = [GpuPack(encoders=1, prefill=1), GpuPack(decode=1)]
    shared = capacity(beside_decode, ONE_448, costs)
    # at the same rate, the encoder beside the loaded decoder is busier than its forwards
    # alone, and the decoder's steps stretch while it encodes
    rate = shared.requests_per_s
    fair = capacity(beside_decode, ONE_448, replace(costs, slice_share=1.0))
    assert fair.requests_per_s > rate
    work = rate * (costs.encode_gpu_s(ONE_448) + costs.preprocess_s(ONE_448))
    assert shared.utilisation["gpu1:E"] > 1.3 * work
    assert shared.itl_s > costs.step_s(shared.decode_batch, ONE_448) * 1.2
    # so with a decoder that never idles, the encoder does better beside prefill
    assert capacity(alone, ONE_448, costs).requests_per_s > rate
    assert capacity(alone, ONE_448, costs).ttft_s <= ONE_448.ttft_target_s


def test_host_work_per_image_and_transit_count_in_the_plan() -> None:
    costs = StageCosts()
    # encoders bound by their host work: more of them, even if the GPU's share is small
    host_bound = replace(costs, preprocess_s_per_patch=costs.preprocess_s_per_patch * 3)
    assert (
        plan(THREE_1024, host_bound, gpus=2).counts["encode"]
        >= plan(THREE_1024, costs, gpus=2).counts["encode"]
    )
    assert (
        plan(THREE_1024, host_bound, gpus=2).capacity.requests_per_s
        < plan(THREE_1024, costs, gpus=2).capacity.requests_per_s
    )
    # what the queues do not explain is found by elimination, and it counts in TTFT
    epd = [GpuPack(aggregated=1)] * 2
    modelled = capacity(epd, ONE_448, costs).unloaded_ttft_s
    measured = calibrate_latency(costs, ONE_448, epd, modelled + 0.3)
    assert measured.transit_s == pytest.approx(0.3)
    assert capacity(epd, ONE_448, measured).unloaded_ttft_s == pytest.approx(modelled + 0.3)
    assert calibrate_latency(costs, ONE_448, epd, modelled / 2).transit_s == 0
    slow = calibrate_latency(costs, ONE_448, epd, 2.0)
    assert plan(ONE_448, slow, gpus=2).capacity.requests_per_s == 0


# -- scaling with hysteresis ---------------------------------------------------------------


def busy(*fractions: float, queued: int = 0) -> list[StageLoad]:
    return [StageLoad(busy_fraction=f, queue_depth=queued) for f in fractions]


def test_controller_follows_a_shifted_mix_within_bounds_with_hysteresis() -> None:
    clock = Clock()
    policy = Policy(up_rounds=2, down_rounds=3, cooldown_s=30)
    controller = Controller({"encode": Bounds(1, 3), "decode": Bounds(1, 2)}, policy, clock)
    # the one-image mix: one encoder at 40 %, nothing changes
    for _ in range(5):
        clock.now += 10
        assert controller.decide("encode", busy(0.4), 1).target == 1
    # one busy round alone (a spike) does not scale
    clock.now += 10
    spike = controller.decide("encode", busy(1.0, queued=9), 1)
    assert spike.desired == 2 and spike.target == 1
    clock.now += 10
    assert controller.decide("encode", busy(0.3), 1).target == 1
    # the three-image mix: saturated round after round, up on the second round
    clock.now += 10
    assert controller.decide("encode", busy(1.0, queued=9), 1).target == 1
    clock.now += 10
    up = controller.decide("encode", busy(1.0, queued=9), 1)
    assert up.target == 2 and "up after 2 rounds" in up.reason
    # still saturated, but cooling down: the new instance gets time to take traffic
    clock.now += 10
    assert controller.decide("encode", busy(1.0, 1.0, queued=20), 2).target == 2
    clock.now += 10
    cooling = controller.decide("encode", busy(1.0, 1.0, queued=20), 2)
    assert cooling.target == 2 and "cooling" in cooling.reason
    clock.now += 20
    assert controller.decide("encode", busy(1.0, 1.0, queued=20), 2).target == 3
    # never above the bound, however loaded
    for _ in range(6):
        clock.now += 40
        assert controller.decide("encode", busy(1.0, 1.0, 1.0, queued=90), 3).target == 3
    # back to the light mix: down one at a time, each after 3 rounds below the lower band
    targets = []
    current = 3
    for _ in range(12):
        clock.now += 15
        current = controller.decide("encode", busy(*[0.4 / current] * current), current).target
        targets.append(current)
    assert targets[:2] == [3, 3] and 2 in targets and targets[-1] == 1
    assert all(a - b in (0, 1) for a, b in itertools.pairwise(targets))
    # a load in the middle band (between 40 % and 70 % per instance) holds the count
    for _ in range(10):
        clock.now += 40
        assert controller.decide("decode", busy(0.55, 0.55), 2).target == 2
    # a count outside the bounds is brought back at once
    assert controller.decide("decode", busy(0.1), 5).target == 2


# -- the scale subresource, against a real HTTP server -------------------------------------


class ScaleApi:
    """A loopback HTTP server speaking the Deployment scale subresource (GET, PATCH, PUT).

    `on_scale(name, replicas)` plays the kubelet: it makes the pods match.
    """

    def __init__(self, namespace: str, replicas: dict[str, int], on_scale: Any = None) -> None:
        self.namespace = namespace
        self.replicas = dict(replicas)
        self.patches: list[tuple[str, int]] = []
        self.on_scale = on_scale
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def _scale(self, name: str) -> dict[str, Any]:
        return {
            "kind": "Scale",
            "apiVersion": "autoscaling/v1",
            "metadata": {"name": name, "namespace": self.namespace},
            "spec": {"replicas": self.replicas[name]},
            "status": {"replicas": self.replicas[name]},
        }

    async def handle(self, request: web.Request) -> web.Response:
        name, namespace = request.match_info["name"], request.match_info["ns"]
        if namespace != self.namespace or name not in self.replicas:
            return web.json_response(
                {
                    "kind": "Status",
                    "status": "Failure",
                    "message": f'deployments.apps "{name}" not found',
                    "code": 404,
                },
                status=404,
            )
        if request.method in ("PATCH", "PUT"):
            if request.method == "PATCH" and request.content_type != "application/merge-patch+json":
                return web.json_response(
                    {"message": "unsupported media type", "code": 415}, status=415
                )
            body = await request.json()
            replicas = body.get("spec", {}).get("replicas")
            if not isinstance(replicas, int) or replicas < 0:
                return web.json_response(
                    {"message": "spec.replicas: invalid", "code": 422}, status=422
                )
            self.replicas[name] = replicas
            self.patches.append((name, replicas))
            if self.on_scale is not None:
                self.on_scale(name, replicas)
        return web.json_response(self._scale(name))

    def start(self) -> "ScaleApi":
        app = web.Application()
        route = "/apis/apps/v1/namespaces/{ns}/deployments/{name}/scale"
        app.router.add_route("GET", route, self.handle)
        app.router.add_route("PATCH", route, self.handle)
        app.router.add_route("PUT", route, self.handle)
        self._thread.start()

        async def serve() -> int:
            self._runner = web.AppRunner(app)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            return int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]

        self.port = asyncio.run_coroutine_threadsafe(serve(), self._loop).result(10)
        return self

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


async def test_scaler_reads_and_sets_replicas_through_the_scale_subresource() -> None:
    api = ScaleApi("triptych", {"triptych-encode": 1}).start()
    try:
        async with DeploymentScaler(api.url, "triptych") as scaler:
            assert await scaler.replicas("triptych-encode") == 1
            assert await scaler.scale("triptych-encode", 3) == 3
            assert await scaler.replicas("triptych-encode") == 3
            with pytest.raises(ScaleError, match="404"):
                await scaler.replicas("triptych-nothing")
        async with DeploymentScaler(api.url, "elsewhere") as scaler:
            with pytest.raises(ScaleError, match="not found"):
                await scaler.scale("triptych-encode", 2)
        assert api.patches == [("triptych-encode", 3)]
    finally:
        api.stop()


# -- end to end: mock E/P/D, the planner process, the scale API ----------------------------


def picture(side: int, seed: int) -> dict[str, Any]:
    """A flat picture of its own colour for each seed below 65536 (no encoder cache hits)."""
    buffer = io.BytesIO()
    colour = (seed % 256, seed // 256 % 256, 9)
    Image.new("RGB", (side, side), colour).save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    return {"type": "image_url", "image_url": {"url": url}}


def request(images: int, seed: int) -> dict[str, Any]:
    content = [picture(56, seed * images + i) for i in range(images)]
    return {
        "model": "tiny-qwen2.5-vl",
        "max_tokens": 4,
        "messages": [{"role": "user", "content": [*content, {"type": "text", "text": "what?"}]}],
    }


async def offer(url: str, images: int, rate: float, seconds: float) -> list[int]:
    """Open-loop load: `rate` requests per second of `images` images each."""
    statuses: list[int] = []
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:

        async def one(seed: int) -> None:
            try:
                response = await client.post("/v1/chat/completions", json=request(images, seed))
                statuses.append(response.status_code)
            except httpx.HTTPError:
                statuses.append(0)

        tasks = []
        started = time.monotonic()
        seed = 0
        while time.monotonic() - started < seconds:
            tasks.append(asyncio.create_task(one(seed)))
            seed += 1
            await asyncio.sleep(1 / rate)
        await asyncio.gather(*tasks)
    return statuses


def planner_rounds(process: subprocess.Popen[str], lines: list[dict[str, Any]]) -> threading.Thread:
    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            if line.startswith("{"):
                lines.append(json.loads(line))

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


ENCODE_S = "0.1"  # per image: one encoder sustains 10 images/s


def test_planner_scales_encoders_when_the_mix_shifts(stack: Stack, tmp_path: Path) -> None:
    costs = ("--mock-encode-s-per-image", ENCODE_S, "--mock-decode-s-per-step", "0.002")
    start_topology(stack, "E/P/D", *costs)
    encoders: list[Process] = [p for p in stack.processes if p.name == "encode"]

    def kubelet(name: str, replicas: int) -> None:
        if name != "triptych-encode":
            return
        while len(encoders) < replicas:
            encoders.append(stack.start("encode", "encode_worker", "--engine", "mock", *costs))
        while len(encoders) > replicas:
            encoders.pop().popen.terminate()  # SIGTERM: it drains and exits

    api = ScaleApi(
        "triptych",
        {"triptych-encode": 1, "triptych-prefill": 1, "triptych-decode": 1},
        on_scale=kubelet,
    ).start()
    planner = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "triptych.components.planner",
            "watch",
            "--kube-api",
            api.url,
            "--kube-namespace",
            "triptych",
            "--interval-s",
            "1",
            "--up-rounds",
            "2",
            "--down-rounds",
            "3",
            "--cooldown-s",
            "4",
            "--encode-replicas",
            "1:2",
            "--prefill-replicas",
            "1:2",
            "--decode-replicas",
            "1:2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=stack.env(),
        cwd=ROOT,
    )
    lines: list[dict[str, Any]] = []
    reader = planner_rounds(planner, lines)
    try:
        # the one-image mix at 4 requests/s: one encoder at ~40 %
        statuses = asyncio.run(offer(stack.url, images=1, rate=4, seconds=8))
        assert statuses.count(200) == len(statuses)
        assert api.patches == []
        light = [line["encode"] for line in lines[-3:]]
        assert all(entry["target"] == 1 for entry in light), light
        assert all(0.1 < entry["busy"] < 0.7 for entry in light), light

        # the signals are in the workers' NATS metadata and /metrics
        port = asyncio.run(metrics_ports(stack, "encode"))[0]
        samples = scrape(f"http://127.0.0.1:{port}/metrics")
        assert value(samples, "triptych_stage_busy_fraction", stage="encode", work="encode") > 0.2
        assert value(samples, "triptych_stage_images_per_second", stage="encode") > 2

        # the three-image mix at the same rate needs 12 images/s: more than one encoder
        statuses = asyncio.run(offer(stack.url, images=3, rate=4, seconds=10))
        assert statuses.count(200) == len(statuses)
        assert api.patches and api.patches[0] == ("triptych-encode", 2), lines[-12:]
        assert all(replicas <= 2 for _, replicas in api.patches)  # the bound
        ups = [
            line
            for line in lines
            if line.get("encode", {}).get("target", 1) > line.get("encode", {}).get("replicas", 1)
        ]
        first_up = lines.index(ups[0])
        # hysteresis: the round before the change already wanted it
        assert lines[first_up - 1]["encode"]["desired"] >= 2
        assert (
            len([p for p in stack.processes if p.name == "encode" and p.popen.poll() is None]) == 2
        )

        # back to no load: one encoder again, after the down rounds and the cooldown
        deadline = time.monotonic() + 30
        while api.replicas["triptych-encode"] != 1 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert api.replicas["triptych-encode"] == 1
        assert [r for n, r in api.patches if n == "triptych-encode"] == [2, 1]
        assert all(n == "triptych-encode" for n, _ in api.patches)  # prefill, decode unchanged
    finally:
        planner.terminate()
        planner.wait(15)
        reader.join(5)
        api.stop()


def test_serve_starts_a_worker_per_listed_gpu_with_its_stage_budget(tmp_path: Path) -> None:
    """The planner's launch command: --encode-gpu 0,0,1 starts three encoders (two share GPU
    0), each with the encode stage's --mem-fraction-static; decode keeps its own."""
    from triptych.cli import serve

    started: list[tuple[str, list[str], dict[str, str]]] = []

    class Recorder:
        stopping = False
        run_dir = tmp_path

        def start_watchdog(self) -> None: ...

        def start_nats(self) -> None: ...

        def start(self, name: str, module: str, args: list[str], env: dict[str, str]) -> None:
            started.append((name, args, env))

        def wait_ready(self, port_file: Path, host: str) -> int | None:
            return None

        def wait(self) -> int:
            return 0

    spec = serve.flags()
    argv = ["--encode-gpu", "0,0,1", "--encode-mem-fraction-static", "0.11"]
    argv += ["--prefill-gpu", "0", "--decode-gpu", "1", "--decode-mem-fraction-static", "0.6"]
    args = spec.parser.parse_args(argv)
    assert serve._run(Recorder(), spec, args, []) == 0  # type: ignore[arg-type]
    workers = {name: (flags, env) for name, flags, env in started if name != "frontend"}
    assert sorted(workers) == [
        "decode",
        "encode-0-gpu0",
        "encode-1-gpu0",
        "encode-2-gpu1",
        "prefill",
    ]

    def budget(flags: list[str]) -> str | None:
        at = [i for i, flag in enumerate(flags) if flag == "--mem-fraction-static"]
        return flags[at[-1] + 1] if at else None

    for name, (flags, env) in workers.items():
        assert flags[flags.index("--device") + 1] == "cuda"
        if name.startswith("encode"):
            assert budget(flags) == "0.11" and env["CUDA_VISIBLE_DEVICES"] == name[-1]
    assert budget(workers["decode"][0]) == "0.6" and budget(workers["prefill"][0]) is None


def test_plan_reads_the_frontends_host_time_per_image_from_its_metrics(stack: Stack) -> None:
    start_topology(stack, "EPD", frontend_args=("--frontend-processes", "2"))
    for seed in range(4):  # two images each, over however many of its processes
        reply = httpx.post(f"{stack.url}/v1/chat/completions", json=request(2, seed), timeout=60)
        assert reply.status_code == 200, reply.text

    def planner(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "triptych.components.planner", "plan", *args]
        return subprocess.run(
            command,
            check=False,
            capture_output=True,
            text=True,
            timeout=120,
            env=stack.env(),
            cwd=ROOT,
        )

    metrics_url = f"{stack.url}/metrics"
    done = planner("--gpus", "2", "--image-size", "56", "--frontend-metrics", metrics_url)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    frontend = report["frontend"]
    assert frontend["images_decoded"] == 8  # summed over the group
    per_image = frontend["seconds_per_image"]
    assert 0 < per_image < 1
    profile = WorkloadProfile(images_per_request=1, image_width=56, image_height=56)
    assert report["costs"]["frontend_s_per_patch"] == pytest.approx(
        per_image / profile.patches_per_image
    )
    # metrics of a process that decoded no image: the default stays, and it says so
    port = asyncio.run(metrics_ports(stack, "decode"))[0]
    idle = planner("--frontend-metrics", f"http://127.0.0.1:{port}/metrics")
    assert idle.returncode == 0, idle.stderr
    assert json.loads(idle.stdout)["frontend"] == {"images_decoded": 0, "seconds_per_image": None}
    default = StageCosts().frontend_s_per_patch
    assert json.loads(idle.stdout)["costs"]["frontend_s_per_patch"] == default
    assert "no image decoded there yet" in idle.stderr
    # a page that is no metrics: one line, and no plan
    models = planner("--frontend-metrics", f"{stack.url}/v1/models")
    assert (models.returncode, models.stdout) == (2, "")
    assert "/v1/models is not Prometheus text" in models.stderr
    # metrics that cannot be read: one line, and no plan
    with socket.socket() as closed:  # bound, never listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}/metrics"
        unread = planner("--frontend-metrics", url)
    assert unread.returncode == 2
    assert unread.stdout == ""
    assert unread.stderr.startswith(f"--frontend-metrics: {url}:")
    assert unread.stderr.count("\n") == 1
