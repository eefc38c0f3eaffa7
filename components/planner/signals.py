"""The stages' live load, read the way discovery reads instances: a NATS micro ``PING``.

Every worker answers ``$SRV.PING.<namespace>-<component>`` with its metadata, whose ``load_*``
entries it refreshes every second (`StageLoad`). One round asks each stage once and gathers
the answers that arrive within `wait_s`.

The frontend is no NATS service; its host time per image comes from its ``/metrics``
(`image_decode_seconds`).
"""

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from triptych.protocol.load import StageLoad
from triptych.runtime import Runtime, wire

IMAGE_DECODE_METRIC = "triptych_frontend_image_decode_seconds"
"""The frontend's histogram of CPU seconds per image decoded (`observability.metrics`)."""


@dataclass
class StageSignals:
    """What one stage's live instances announce."""

    stage: str
    loads: list[StageLoad] = field(default_factory=list)
    """One per instance that announces load figures."""
    instances: list[str] = field(default_factory=list)


async def read_signals(
    runtime: Runtime, stages: Sequence[str], wait_s: float = 0.5
) -> dict[str, StageSignals]:
    """Ping every stage once; the signals of the instances that answered within `wait_s`."""
    nc = runtime.nc
    namespace = runtime.config.namespace
    result = {stage: StageSignals(stage) for stage in stages}
    answers: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    subscriptions = []
    for stage in stages:
        inbox = nc.new_inbox()

        async def on_answer(msg: Any, stage: str = stage) -> None:
            await answers.put((stage, msg))

        subscriptions.append(await nc.subscribe(inbox, cb=on_answer))
        await nc.publish(wire.ping_subject(namespace, stage), b"", reply=inbox)
    await nc.flush()
    await asyncio.sleep(wait_s)
    for subscription in subscriptions:
        await subscription.unsubscribe()
    seen: set[str] = set()
    while not answers.empty():
        stage, msg = answers.get_nowait()
        try:
            info = json.loads(msg.data)
            instance = str(info["id"])
            metadata = info.get("metadata") or {}
        except (ValueError, KeyError, TypeError):
            continue
        if instance in seen or not isinstance(metadata, dict):
            continue
        seen.add(instance)
        result[stage].instances.append(instance)
        load = StageLoad.from_metadata({str(k): str(v) for k, v in metadata.items()})
        if load is not None:
            result[stage].loads.append(load)
    return result


@dataclass(frozen=True)
class ImageDecodeTotals:
    """What a frontend's ``/metrics`` says of its image decoding since it started (summed over
    its processes)."""

    seconds: float
    images: int

    def per_image_since(self, earlier: "ImageDecodeTotals | None" = None) -> float | None:
        """CPU seconds per image decoded since `earlier` (since start without it); None when
        no image was decoded in between."""
        seconds = self.seconds - (earlier.seconds if earlier else 0.0)
        images = self.images - (earlier.images if earlier else 0)
        return seconds / images if images > 0 else None


async def image_decode_seconds(metrics_url: str, timeout_s: float = 5.0) -> ImageDecodeTotals:
    """The frontend's image decoding totals from its ``/metrics`` at `metrics_url`; raises
    `OSError` when it cannot be read, `ValueError` when it holds no such histogram."""
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session,
            session.get(metrics_url) as response,
        ):
            response.raise_for_status()
            text = await response.text()
    except (aiohttp.ClientError, TimeoutError) as error:
        raise OSError(f"{metrics_url}: {error or type(error).__name__}") from None
    name = IMAGE_DECODE_METRIC
    try:
        families = list(text_string_to_metric_families(text))
    except ValueError as error:
        raise ValueError(f"{metrics_url} is not Prometheus text ({error})") from None
    for family in families:
        if family.name == name:
            values = {sample.name: sample.value for sample in family.samples}
            return ImageDecodeTotals(
                values.get(f"{name}_sum", 0.0), int(values.get(f"{name}_count", 0))
            )
    raise ValueError(f"{metrics_url} has no {name} (not a triptych frontend?)")
