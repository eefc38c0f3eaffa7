"""The stages' live load, read the way discovery reads instances: a NATS micro ``PING``.

Every worker answers ``$SRV.PING.<namespace>-<component>`` with its metadata, whose ``load_*``
entries it refreshes every second (`StageLoad`). One round asks each stage once and gathers
the answers that arrive within `wait_s`.
"""

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from triptych.protocol.load import StageLoad
from triptych.runtime import Runtime, wire


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
