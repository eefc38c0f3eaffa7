"""Serving endpoints: registration, acknowledgement, owned request tasks, cancel, deadline, drain.

A handler is ``async def handler(request: SomeModel, ctx: Context) -> None``. The runtime parses
the request at the edge (a malformed one is refused with 400), acknowledges it at once, and runs
the handler as a task it owns. The handler streams with ``ctx.stream.send(...)`` or hands the
stream to the next stage with ``client.forward(...)``. When it returns, the stream is ended;
when it raises, the caller receives the error as data; when the call is cancelled (client gone,
``Runtime.cancel``) or its deadline passes, the task is cancelled and the engine must free
what it held. A call sent with no response stream (`Client.send`) runs the same way; what its
handler sends goes nowhere.
"""

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from nats.micro import add_service
from nats.micro.service import Service as MicroService
from prometheus_client import Counter, Histogram
from pydantic import BaseModel, ValidationError

from triptych.observability import metrics
from triptych.observability.logs import request_id
from triptych.protocol import ErrorCode, ErrorInfo
from triptych.runtime import wire
from triptych.runtime.errors import ServiceError, busy
from triptych.runtime.links import CALLS_METADATA, KEY_METADATA
from triptych.runtime.runtime import Runtime
from triptych.runtime.stream import Publish, StreamSink
from triptych.runtime.tasks import TaskOwner

log = logging.getLogger(__name__)

R = TypeVar("R", bound=BaseModel)

METADATA_REFRESH_S = 1.0
"""How often the live metadata entries are refreshed (discovery pings every second)."""

CANCEL_MEMORY_S = 60.0
"""How long a cancel is remembered, for requests it overtook on their way to this worker."""


class RecentIds:
    """A set of ids that forgets each one after `ttl` seconds (insertion order = age order)."""

    def __init__(self, ttl: float) -> None:
        self._ttl = ttl
        self._added: dict[str, float] = {}

    def add(self, item: str) -> None:
        now = time.monotonic()
        self._added.pop(item, None)
        self._added[item] = now
        for oldest, added in list(self._added.items()):
            if now - added < self._ttl:
                break
            del self._added[oldest]

    def __contains__(self, item: object) -> bool:
        added = self._added.get(item) if isinstance(item, str) else None
        return added is not None and time.monotonic() - added < self._ttl


@dataclass(eq=False)
class Context:
    """What a handler knows about the call it serves."""

    request_id: str
    deadline: float
    """Absolute deadline (Unix time, seconds)."""
    stream: StreamSink
    """Where responses go (possibly a process further up the pipeline)."""
    task: "asyncio.Task[None] | None" = None
    running: bool = False
    """The task has taken its first step (before that, cancelling it would skip its cleanup)."""
    cancelled_by_caller: bool = False
    started: float = field(default_factory=time.monotonic)


Handler = Callable[[R, Context], Awaitable[None]]


_Metric = TypeVar("_Metric", Counter, Histogram)


class _Labelled(Generic[_Metric]):
    """One stage's children of a metric labelled (stage, value), each looked up once: the
    metric's `labels` checks its arguments and takes a lock on every call."""

    def __init__(self, metric: _Metric, stage: str) -> None:
        self._metric: _Metric = metric
        self._stage = stage
        self._children: dict[str, _Metric] = {}

    def __getitem__(self, value: str) -> _Metric:
        child = self._children.get(value)
        if child is None:
            child = self._children[value] = self._metric.labels(self._stage, value)
        return child


class Incoming(Protocol):
    """A call as it arrives: a NATS micro request, or a call on a direct link."""

    @property
    def headers(self) -> dict[str, str] | None: ...

    @property
    def data(self) -> bytes: ...

    async def respond(self, data: bytes = b"", headers: dict[str, str] | None = None) -> None:
        """Accept the call."""

    async def respond_error(
        self, code: str, description: str, data: bytes = b"", headers: dict[str, str] | None = None
    ) -> None:
        """Refuse the call."""


@dataclass(frozen=True)
class _Endpoint(Generic[R]):
    name: str
    request_type: type[R]
    handler: Handler[R]


class Service:
    """One instance of a component on the control plane.

    Lifecycle: `add_endpoint` (any number), `start` (registers with NATS micro and becomes
    discoverable), then `drain` (stop accepting, finish in-flight work within a grace period)
    and `close`. `start`, `drain` and `close` are safe to call twice.
    """

    def __init__(
        self,
        runtime: Runtime,
        component: str,
        version: str = "0.1.0",
        *,
        metadata: dict[str, str] | None = None,
        max_in_flight: int | None = None,
        link_host: str | None = None,
        live_metadata: Callable[[], dict[str, str]] | None = None,
        on_done: Callable[[], None] | None = None,
    ) -> None:
        self._runtime = runtime
        self.component = component
        self.max_in_flight = max_in_flight
        """Requests this instance holds at most; more are refused at once as busy (the caller
        tries another instance, and answers 503 with Retry-After when all are full)."""
        self._link_host = link_host
        """Interface of this instance's direct stream links (None: none; frames go by NATS).
        Callers dial the ``host`` of the metadata, which must reach it."""
        self._version = version
        self._metadata = dict(metadata or {})
        if max_in_flight is not None:
            self._metadata["max_in_flight"] = str(max_in_flight)  # callers bound their admission
        self._live_metadata = live_metadata
        """Entries refreshed every second (load figures): NATS micro answers PING, INFO and
        STATS from the very dict this service updates, so discovery pings carry them."""
        self._on_done = on_done
        self._endpoints: list[_Endpoint[Any]] = []
        self._subjects: list[str] = []
        """The endpoint subjects this instance serves (on NATS, and on its direct links)."""
        self._micro: MicroService | None = None
        self._cancel_sub: Any = None
        self._inflight: dict[str, set[Context]] = {}
        self._held = 0
        """Contexts in `_inflight`, all request ids together."""
        self._tasks = TaskOwner(f"service:{component}")
        self._background = TaskOwner(f"service:{component}:background")
        self._draining = False
        self._cancelled = RecentIds(CANCEL_MEMORY_S)
        self.requests = 0
        """Calls received (by NATS or on a direct link), refused ones included."""
        self._gauges: dict[str, Callable[[], float]] = {
            "in_flight": lambda: self.in_flight,
            "requests": lambda: self.requests,
        }
        metrics.STAGE_IN_FLIGHT.labels(component).set_function(lambda: self.in_flight)
        self._streams_by_path = _Labelled(metrics.RESPONSE_STREAMS, component)
        self._durations = _Labelled(metrics.STAGE_DURATION, component)
        self.instance_id = ""

    def announce(self, metadata: dict[str, str]) -> None:
        """Add to this instance's discovery metadata (before `start`)."""
        if self._micro is not None:
            raise RuntimeError("metadata is announced at start")
        self._metadata.update(metadata)

    def add_gauge(self, name: str, read: Callable[[], float]) -> None:
        """Report `read()` under `name` in this instance's NATS micro STATS data."""
        self._gauges[name] = read

    def gauges(self) -> dict[str, float]:
        """Current gauge values (``in_flight`` and any added ones)."""
        return {name: read() for name, read in self._gauges.items()}

    def add_endpoint(self, name: str, request_type: type[R], handler: Handler[R]) -> None:
        """Serve `handler` on `name`; requests are parsed as `request_type`."""
        self._endpoints.append(_Endpoint(name, request_type, handler))

    @property
    def in_flight(self) -> int:
        """Requests this instance is handling right now."""
        return self._held

    async def start(self) -> None:
        """Register with NATS micro and start serving."""
        if self._micro is not None:
            return
        nc = self._runtime.nc
        ns = self._runtime.config.namespace
        if self._link_host is not None:
            advertised = self._metadata.get("host")
            port = await self._runtime.serve_links(self._link_host, advertised)
            if port is not None:
                self._metadata["stream_port"] = str(port)
                self._metadata[CALLS_METADATA] = "1"
                self._metadata[KEY_METADATA] = self._runtime.link_key
        self.refresh_metadata()
        self._micro = await add_service(
            nc,
            name=wire.service_name(ns, self.component),
            version=self._version,
            description=f"triptych {self.component}",
            metadata=self._metadata,
            stats_handler=lambda _endpoint: self.gauges(),
        )
        self.instance_id = self._micro.id
        for endpoint in self._endpoints:
            subject = wire.endpoint_subject(ns, self.component, endpoint.name, self.instance_id)
            receiver = self._make_receiver(endpoint)
            await self._micro.add_endpoint(name=endpoint.name, subject=subject, handler=receiver)
            self._runtime.serve_calls(subject, receiver)
            self._subjects.append(subject)
        self._cancel_sub = await nc.subscribe(wire.cancel_subject(ns), cb=self._on_cancel)
        self._background.spawn(self._keepalive_loop(), name="keepalive")
        if self._live_metadata is not None:
            self._background.spawn(self._metadata_loop(), name="live-metadata")
        await nc.flush()
        log.info(
            "%s instance %s serving %s",
            self.component,
            self.instance_id,
            ", ".join(e.name for e in self._endpoints),
        )

    async def drain(self, grace_s: float) -> None:
        """Stop accepting calls, give in-flight ones `grace_s` seconds, then cancel the rest."""
        if self._draining:
            return
        self._draining = True
        for subject in self._subjects:
            self._runtime.stop_serving_calls(subject)
        if self._micro is not None:
            try:
                await self._micro.stop()
            except Exception as error:  # NATS already gone: nothing left to unregister from
                log.warning("%s: could not unregister cleanly: %s", self.component, error)
        if len(self._tasks):
            log.info("%s draining %d in-flight request(s)", self.component, self.in_flight)
            await self._tasks.wait(grace_s)
        await self._tasks.close()

    async def close(self) -> None:
        """Drain without grace and release everything."""
        await self.drain(0.0)
        await self._background.close()
        if self._cancel_sub is not None:
            sub, self._cancel_sub = self._cancel_sub, None
            try:
                await sub.unsubscribe()
            except Exception:
                log.debug("unsubscribe failed", exc_info=True)

    def _make_receiver(self, endpoint: _Endpoint[R]) -> Callable[[Any], Coroutine[Any, Any, None]]:
        async def receive(request: Incoming) -> None:
            await self._receive(endpoint, request)

        return receive

    async def _receive(self, endpoint: _Endpoint[R], request: Incoming) -> None:
        self.requests += 1
        headers = request.headers or {}
        request_id = headers.get(wire.REQUEST_ID, "")
        if request_id in self._cancelled:  # the cancel overtook the request on its way here
            await request.respond_error(str(ErrorCode.CLIENT_CLOSED.value), "request cancelled")
            return
        if self._draining:
            await request.respond_error(str(ErrorCode.UNAVAILABLE.value), "instance is draining")
            return
        if not self._runtime.nc.is_connected:  # a call on a direct link: cancels could not
            # reach this instance, and discovery is about to drop it; the caller moves on
            await request.respond_error(str(ErrorCode.UNAVAILABLE.value), "instance lost NATS")
            return
        try:
            payload = endpoint.request_type.model_validate_json(request.data)
            deadline = float(headers.get(wire.DEADLINE, "inf"))
            if math.isnan(deadline):
                raise ValueError("deadline is not a number")
        except (ValidationError, ValueError) as error:
            await request.respond_error(str(ErrorCode.BAD_REQUEST.value), _describe(error))
            return
        if self.max_in_flight is not None and self.in_flight >= self.max_in_flight:
            refusal = busy(
                f"{self.component} instance is busy ({self.in_flight} requests in flight)",
                request_id,
            ).info
            await request.respond_error(
                str(refusal.code), refusal.message, data=refusal.model_dump_json().encode()
            )
            return
        stream_to = headers.get(wire.STREAM_TO, "")
        publish: Publish = self._runtime.publish
        if stream_to:  # none when the caller takes the outcome another way (`Client.send`)
            publish = self._runtime.publisher(stream_to)
            self._streams_by_path["nats" if publish == self._runtime.publish else "direct"].inc()
        sink = StreamSink(publish, stream_to, request_id)
        ctx = Context(request_id=request_id, deadline=deadline, stream=sink)
        self._inflight.setdefault(request_id, set()).add(ctx)  # counted before the ack's await
        self._held += 1
        try:
            await request.respond(b"", headers={wire.INSTANCE: self.instance_id})
        except BaseException:
            self._forget(ctx)
            raise
        if request_id in self._cancelled:  # the cancel came while the ack was on its way
            self._forget(ctx)
            cancelled = ErrorInfo(
                code=ErrorCode.CLIENT_CLOSED, message="request cancelled", request_id=request_id
            )
            await sink.fail(cancelled)
            return
        ctx.task = self._tasks.spawn(self._run(endpoint, payload, ctx), name=request_id)

    def _forget(self, ctx: Context) -> None:
        contexts = self._inflight.get(ctx.request_id)
        if contexts is not None and ctx in contexts:
            contexts.remove(ctx)
            self._held -= 1
            if not contexts:
                del self._inflight[ctx.request_id]

    async def _run(self, endpoint: _Endpoint[R], payload: R, ctx: Context) -> None:
        request_id.set(ctx.request_id)  # this task's (and its children's) log lines
        log.debug("%s started", endpoint.name)
        loop = asyncio.get_running_loop()
        when = loop.time() + (ctx.deadline - time.time()) if math.isfinite(ctx.deadline) else None
        error: ErrorInfo | None = None
        ctx.running = True
        try:
            if ctx.cancelled_by_caller:  # the cancel came before this task's first step
                raise asyncio.CancelledError
            async with asyncio.timeout_at(when):
                await endpoint.handler(payload, ctx)
        except TimeoutError:
            error = ErrorInfo(
                code=ErrorCode.DEADLINE_EXCEEDED,
                message="deadline exceeded",
                request_id=ctx.request_id,
            )
        except asyncio.CancelledError:
            if not ctx.cancelled_by_caller:
                error = ErrorInfo(
                    code=ErrorCode.UNAVAILABLE,
                    message=f"{self.component} stopped",
                    request_id=ctx.request_id,
                )
        except ServiceError as failure:
            error = failure.info.model_copy(update={"request_id": ctx.request_id})
        except Exception as failure:
            log.exception("request %s failed in %s", ctx.request_id, endpoint.name)
            error = ErrorInfo(
                code=ErrorCode.INTERNAL,
                message=f"{self.component} failed: {type(failure).__name__}",
                request_id=ctx.request_id,
            )
        finally:
            self._forget(ctx)
            if self._on_done is not None:
                self._on_done()
        self._durations["ok" if error is None else "error"].observe(time.monotonic() - ctx.started)
        log.debug(
            "%s finished in %.1f ms%s",
            endpoint.name,
            (time.monotonic() - ctx.started) * 1e3,
            f" with {error.code} {error.message}" if error else "",
        )
        try:
            if error is not None:
                await ctx.stream.fail(error)
            else:
                await ctx.stream.end()
        except Exception:
            log.warning("could not close the stream of %s", ctx.request_id, exc_info=True)

    async def _on_cancel(self, msg: Any) -> None:
        request_id = msg.data.decode(errors="replace")
        self._cancelled.add(request_id)
        for ctx in list(self._inflight.get(request_id, ())):
            ctx.cancelled_by_caller = True
            # A task cancelled before its first step never runs its body, so it would stay
            # in flight for good: one that has not started sees the flag when it does.
            if ctx.task is not None and ctx.running:
                ctx.task.cancel()

    def refresh_metadata(self) -> None:
        """Update the live entries in place (the dict NATS micro announces)."""
        if self._live_metadata is not None:
            self._metadata.update(self._live_metadata())

    @property
    def metadata(self) -> dict[str, str]:
        """What this instance announces now."""
        return dict(self._metadata)

    async def _metadata_loop(self) -> None:
        while True:
            await asyncio.sleep(METADATA_REFRESH_S)
            try:
                self.refresh_metadata()
            except Exception:  # a reading that failed once: the next second tries again
                log.warning("could not refresh %s's metadata", self.component, exc_info=True)

    async def _keepalive_loop(self) -> None:
        interval = self._runtime.config.keepalive_interval_s
        while True:
            await asyncio.sleep(interval)
            horizon = time.monotonic() - interval
            for contexts in list(self._inflight.values()):
                for ctx in list(contexts):
                    if not ctx.stream.closed and ctx.stream.last_sent < horizon:
                        try:
                            await ctx.stream.keepalive()
                        except Exception:
                            log.debug("keepalive failed", exc_info=True)


def _describe(error: Exception) -> str:
    if isinstance(error, ValidationError):
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        return f"invalid request: {where}: {first['msg']}"
    return f"invalid request: {error}"
