"""Discovery of live instances through NATS micro's ``$SRV.PING``.

Every instance of a component registers a NATS micro service (name ``<namespace>-<component>``),
so standard tooling (``nats micro ls``) sees it too. A tracker pings that name periodically; an
instance that answered within `ttl` seconds is live. A call that meets "no responders" drops the
instance at once, so a dead instance rarely costs more than one retry.
"""

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from triptych.runtime import wire
from triptych.runtime.tasks import TaskOwner

log = logging.getLogger(__name__)


class InstanceTracker:
    """The live instances of one component, kept fresh by a ping loop."""

    def __init__(
        self,
        nc: Any,
        namespace: str,
        component: str,
        interval: float,
        ttl: float,
        *,
        on_seen: Callable[[dict[str, str]], None] | None = None,
    ):
        self._nc = nc
        self._component = component
        self._subject = wire.ping_subject(namespace, component)
        self._interval = interval
        self._ttl = ttl
        self._last_seen: dict[str, float] = {}
        self._live: list[str] = []
        self._live_until = 0.0
        """`_live` holds until then (the earliest expiry among it), or until a pong or a drop
        changes who is live: every request asks, pongs come a few times a second."""
        self._metadata: dict[str, dict[str, str]] = {}
        self._changed = asyncio.Event()
        self._on_seen = on_seen
        """Called with an instance's metadata each time it answers a ping."""
        self._tasks = TaskOwner(f"discovery:{component}")
        self._inbox = ""
        self._sub: Any = None

    async def start(self) -> None:
        """Subscribe for answers and start pinging. Safe to call twice."""
        if self._sub is not None:
            return
        self._inbox = self._nc.new_inbox()
        self._sub = await self._nc.subscribe(self._inbox, cb=self._on_pong)
        self._tasks.spawn(self._ping_loop(), name=f"ping:{self._component}")

    async def close(self) -> None:
        """Stop pinging. Safe to call twice."""
        await self._tasks.close()
        if self._sub is not None:
            sub, self._sub = self._sub, None
            try:
                await sub.unsubscribe()
            except Exception:  # the connection may already be closed
                log.debug("unsubscribe failed", exc_info=True)

    @property
    def live(self) -> list[str]:
        """Instance ids that answered recently, sorted (stable round-robin order); the list is
        shared: read it, do not change it."""
        now = time.monotonic()
        if now >= self._live_until:
            horizon = now - self._ttl
            seen = {i: at for i, at in self._last_seen.items() if at >= horizon}
            self._live = sorted(seen)
            self._live_until = min(seen.values(), default=now) + self._ttl
        return self._live

    def metadata(self, instance: str) -> dict[str, str]:
        """What the instance announces about itself (NATS micro metadata)."""
        return self._metadata.get(instance, {})

    def drop(self, instance: str) -> None:
        """Forget an instance now (it met "no responders")."""
        self._metadata.pop(instance, None)
        self._live_until = 0.0
        if self._last_seen.pop(instance, None) is not None:
            log.info("%s instance %s left routing", self._component, instance)

    async def wait_for_any(self, timeout: float) -> bool:
        """Wait until at least one instance is live; pings at once instead of waiting a round."""
        if self.live:
            return True
        await self.ping()
        deadline = time.monotonic() + timeout
        while not self.live:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._changed.clear()
            try:
                async with asyncio.timeout(min(remaining, 0.05)):
                    await self._changed.wait()
            except TimeoutError:
                await self.ping()
        return True

    async def ping(self) -> None:
        """Ask every instance to announce itself."""
        await self._nc.publish(self._subject, b"", reply=self._inbox)

    async def _ping_loop(self) -> None:
        while True:
            try:
                await self.ping()
            except Exception:  # reconnecting: try again next round
                log.debug("ping failed", exc_info=True)
            await asyncio.sleep(self._interval)

    async def _on_pong(self, msg: Any) -> None:
        try:
            info = json.loads(msg.data)
            instance = str(info["id"])
        except (ValueError, KeyError, TypeError):
            return
        if instance not in self._last_seen:
            log.info("%s instance %s joined routing", self._component, instance)
        self._last_seen[instance] = time.monotonic()
        self._live_until = 0.0
        metadata = info.get("metadata")
        self._metadata[instance] = metadata if isinstance(metadata, dict) else {}
        if self._on_seen is not None:
            self._on_seen(self._metadata[instance])
        self._changed.set()
