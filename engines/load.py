"""How loaded this process's model is: queue depth, busy fraction of its model thread, rates.

One meter per process, like the Prometheus registry: the engines record into `METER` (the model
thread's busy intervals by kind of work, the images and tokens they processed, where their
queues are), and the worker publishes `METER.snapshot()` in its NATS metadata and its
``/metrics``. Figures are over the last `window_s` seconds, so a planner sees the load of now,
not the average since start.
"""

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from triptych.observability import metrics
from triptych.protocol.load import UNITS, WORK_KINDS, StageLoad

WINDOW_S = 10.0
"""Seconds the published figures cover."""


@dataclass(slots=True)
class _Items:
    """Items of one unit counted from `when` on, within a hundredth of the window."""

    when: float
    unit: str
    n: int


class LoadMeter:
    """Busy intervals and processed items over a sliding window; safe from any thread.

    Items counted within a hundredth of the window of each other are kept together (a token
    at a time adds to a number), so the rates are exact to 1 % of the window.
    """

    def __init__(self, window_s: float = WINDOW_S, clock: Callable[[], float] = time.monotonic):
        self.window_s = window_s
        self._clock = clock
        self._lock = threading.Lock()
        self._busy: deque[tuple[float, float, str]] = deque()  # (start, end, kind)
        self._open: dict[int, tuple[float, str]] = {}  # a busy interval not ended yet
        self._items: deque[_Items] = deque()
        self._newest: dict[str, _Items] = {}  # per unit, the entry counts still join
        self._totals: dict[str, int] = {}  # per unit, the counts `_items` holds
        self._host: deque[tuple[float, float]] = deque()  # (when, seconds)
        self._queues: list[Callable[[], int]] = []
        self._next = 0
        self._started = clock()

    def add_queue(self, depth: Callable[[], int]) -> None:
        """Count `depth()` (requests waiting for the model) in the published queue depth."""
        with self._lock:
            self._queues.append(depth)

    def reset(self) -> None:
        """Forget everything recorded and every queue (tests that start engines in-process)."""
        with self._lock:
            self._busy.clear()
            self._open.clear()
            self._items.clear()
            self._newest.clear()
            self._totals.clear()
            self._host.clear()
            self._queues.clear()
            self._started = self._clock()

    @contextmanager
    def busy(self, kind: str) -> Iterator[None]:
        """Mark the model thread busy with `kind` of work (encode, prefill, decode) meanwhile."""
        token = self.begin(kind)
        try:
            yield
        finally:
            self.end(token)

    def begin(self, kind: str) -> int:
        """Open a busy interval of `kind`; `end` closes it (for work that spans callbacks)."""
        started = self._clock()
        with self._lock:
            self._next += 1
            self._open[self._next] = (started, kind)
            return self._next

    def end(self, token: int) -> None:
        """Close the busy interval `begin` opened."""
        ended = self._clock()
        with self._lock:
            opened = self._open.pop(token, None)
            if opened is not None:
                self._busy.append((opened[0], ended, opened[1]))
                self._trim(ended)

    def record(self, kind: str, seconds: float) -> None:
        """Add `seconds` of `kind` work that ended just now, timed elsewhere (a device's events
        read back after the work finished)."""
        if seconds <= 0:
            return
        ended = self._clock()
        with self._lock:
            self._busy.append((ended - seconds, ended, kind))
            self._trim(ended)

    def host(self, seconds: float) -> None:
        """Add `seconds` of host work for images an encoder is about to count (decoding,
        resizing, patching): published per image, apart from the model thread's busy time."""
        if seconds <= 0:
            return
        now = self._clock()
        with self._lock:
            self._host.append((now, seconds))
            self._trim(now)

    def count(self, unit: str, n: int = 1) -> None:
        """Record `n` items of `unit` processed (images, prompt_tokens, output_tokens,
        requests)."""
        if n <= 0:
            return
        now = self._clock()
        with self._lock:
            self._totals[unit] = self._totals.get(unit, 0) + n
            newest = self._newest.get(unit)
            if newest is not None and now - newest.when < self.window_s / 100:
                newest.n += n
                return
            self._newest[unit] = items = _Items(now, unit, n)
            self._items.append(items)
            self._trim(now)

    def snapshot(self) -> StageLoad:
        """The figures of the last window."""
        now = self._clock()
        with self._lock:
            self._trim(now)
            horizon = now - self.window_s
            span = max(1e-9, min(self.window_s, now - self._started))
            by_kind = dict.fromkeys(WORK_KINDS, 0.0)
            intervals = [*self._busy, *((s, now, k) for s, k in self._open.values())]
            for start, end, kind in intervals:
                overlap = end - max(start, horizon)
                if overlap > 0:
                    by_kind[kind] = by_kind.get(kind, 0.0) + overlap
            rates = {**dict.fromkeys(UNITS, 0.0), **self._totals}
            host = sum(seconds for _, seconds in self._host)
            queues = list(self._queues)
        busy = {kind: min(1.0, seconds / span) for kind, seconds in by_kind.items()}
        return StageLoad(
            queue_depth=sum(max(0, depth()) for depth in queues),
            busy_fraction=min(1.0, sum(busy.values())),
            busy_by_work=busy,
            images_per_s=rates["images"] / span,
            prompt_tokens_per_s=rates["prompt_tokens"] / span,
            output_tokens_per_s=rates["output_tokens"] / span,
            requests_per_s=rates["requests"] / span,
            host_s_per_image=host / rates["images"] if rates["images"] else 0.0,
            window_s=span,
        )

    def _trim(self, now: float) -> None:
        horizon = now - self.window_s
        while self._busy and self._busy[0][1] < horizon:
            self._busy.popleft()
        while self._items and self._items[0].when < horizon:
            items = self._items.popleft()
            self._totals[items.unit] -= items.n
            if self._newest.get(items.unit) is items:
                del self._newest[items.unit]
        while self._host and self._host[0][0] < horizon:
            self._host.popleft()


METER = LoadMeter()
"""This process's meter."""


def export_gauges(stage: str, meter: LoadMeter = METER) -> None:
    """Serve `meter`'s figures as Prometheus gauges labelled with `stage` (read at scrape)."""
    metrics.STAGE_QUEUE_DEPTH.labels(stage).set_function(lambda: meter.snapshot().queue_depth)
    metrics.STAGE_BUSY_FRACTION.labels(stage, "all").set_function(
        lambda: meter.snapshot().busy_fraction
    )
    for kind in WORK_KINDS:
        metrics.STAGE_BUSY_FRACTION.labels(stage, kind).set_function(
            lambda kind=kind: meter.snapshot().busy_by_work.get(kind, 0.0)  # type: ignore[misc]
        )
    metrics.STAGE_IMAGES_PER_S.labels(stage).set_function(lambda: meter.snapshot().images_per_s)
    metrics.STAGE_TOKENS_PER_S.labels(stage, "prefill").set_function(
        lambda: meter.snapshot().prompt_tokens_per_s
    )
    metrics.STAGE_TOKENS_PER_S.labels(stage, "decode").set_function(
        lambda: meter.snapshot().output_tokens_per_s
    )
