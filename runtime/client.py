"""Calling a component: round-robin over live instances, by affinity of content keys
(rendezvous hashing), or one instance by id."""

import asyncio
import enum
import itertools
import logging
import time
from collections.abc import Sequence
from typing import Any, Protocol

import nats.errors
from nats.aio.client import Client as NatsConnection
from pydantic import BaseModel

from triptych.protocol import ErrorCode, ErrorInfo
from triptych.protocol.load import PREFIX as LOAD_PREFIX
from triptych.runtime import wire
from triptych.runtime.config import RuntimeConfig
from triptych.runtime.discovery import InstanceTracker
from triptych.runtime.errors import ServiceError, busy, deadline_exceeded, unavailable
from triptych.runtime.links import LinkDialer, LinkLost
from triptych.runtime.rendezvous import rendezvous_order
from triptych.runtime.stream import ResponseStream, StreamSink

log = logging.getLogger(__name__)

NO_RESPONDERS_RETRY_S = 0.02
AFFINITY_MAX_LOAD = 0.5
"""Default share of an instance's announced ``max_in_flight`` that this caller may hold open
on it before calls with affinity for it go to the next instance in hash order."""


class _Offer(enum.Enum):
    """How one instance answered a call."""

    ACCEPTED = "accepted"
    GONE = "gone"
    """Dead, draining, or too slow to accept: the call moves on."""
    BUSY = "busy"
    """Its queue is full: the call moves on, and the caller learns to come back later."""
    SLOW = "slow"
    """It did not accept in time (frozen, or swamped): the call moves on; it stays in routing
    until discovery stops seeing it, since under load every instance is slow."""


def _refused_for_load(data: bytes) -> bool:
    try:
        return ErrorInfo.model_validate_json(data).retry_after_s is not None
    except ValueError:
        return False


def _queued(metadata: dict[str, str]) -> int:
    """Requests an instance announces waiting for its model, every caller's (a second old at
    most): affinity weighs it too, as a caller's own open calls can say little (a prefill
    call's stream ends as soon as its room is known, long before the prompt has run)."""
    depth = metadata.get(LOAD_PREFIX + "queue_depth", "")
    return int(depth) if depth.isdigit() else 0


class Caller(Protocol):
    """What a client uses of the `Runtime` that owns it (the runtime imports this module, not
    the other way round)."""

    config: RuntimeConfig
    nc: NatsConnection
    links: LinkDialer | None

    def open_stream(self, request_id: str, deadline: float) -> ResponseStream:
        """A new response stream whose frames arrive on a subject of this process."""
        ...


class Client:
    """Calls one endpoint of one component.

    `call` returns the response stream; `forward` hands a stream this worker holds to the next
    stage, which then answers the original caller directly. `call` takes `affinity` keys: the
    instances are then tried in rendezvous-hash order of the keys (so repeated content meets
    the instance that cached it), an instance loaded past `max_load` of its announced bound
    (by this caller's open calls, or the queue it announces) moving to the back; without keys,
    round-robin.
    """

    def __init__(
        self,
        runtime: Caller,
        component: str,
        endpoint: str,
        max_load: float = AFFINITY_MAX_LOAD,
    ) -> None:
        self._runtime = runtime
        self.component = component
        self.endpoint = endpoint
        cfg = runtime.config
        links = runtime.links
        self.instances = InstanceTracker(
            runtime.nc,
            cfg.namespace,
            component,
            cfg.discovery_interval_s,
            cfg.instance_ttl_s,
            on_seen=links.ensure if links is not None else None,
        )
        self._round_robin = itertools.count()
        self.max_load = max_load
        self._open: dict[str, list[ResponseStream]] = {}
        """Calls this caller made that are still streaming, by instance (affinity's load)."""

    @property
    def has_choice(self) -> bool:
        """Whether affinity keys can matter: more than one live instance, or none yet (the
        call will wait for some). With exactly one there is nothing to choose, and a caller
        need not compute keys."""
        return len(self.instances.live) != 1

    @property
    def capacity(self) -> int | None:
        """Requests the live instances hold at most, together (None: unbounded, or none live).

        Each instance announces its bound as ``max_in_flight`` in its metadata.
        """
        bounds = [self.instances.metadata(i).get("max_in_flight") for i in self.instances.live]
        if not bounds or not all(b and b.isdigit() for b in bounds):
            return None
        return sum(int(b) for b in bounds if b)

    @property
    def context_length(self) -> int | None:
        """The shortest context the live instances announce (``max_model_len``, tokens with the
        prompt): a longer request fits none of them for sure. None when none announces one."""
        metadata = [self.instances.metadata(i) for i in self.instances.live]
        announced = [m.get(wire.MAX_MODEL_LEN, "") for m in metadata]
        limits = [int(limit) for limit in announced if limit.isdigit()]
        return min(limits, default=None)

    async def start(self) -> None:
        """Begin discovering instances. Safe to call twice."""
        await self.instances.start()

    async def close(self) -> None:
        """Stop discovering. Safe to call twice."""
        await self.instances.close()

    async def call(
        self,
        request: BaseModel,
        *,
        request_id: str,
        deadline: float,
        instance: str | None = None,
        affinity: Sequence[str] = (),
    ) -> ResponseStream:
        """Send `request` to an instance (round-robin unless `instance` is given).

        Returns once an instance accepted the call; its frames then arrive on the stream. An
        instance that is gone ("no responders") or does not accept in time is dropped and the
        next one is tried, each attempt on a fresh stream subject so that a late answer from an
        earlier attempt can never mix into the stream.
        """
        data = request.__pydantic_serializer__.to_json(request)
        refusals: list[_Offer] = []
        for candidate in await self._candidates(instance, deadline, affinity):
            stream = self._runtime.open_stream(request_id, deadline)
            try:
                offer = await self._offer(
                    candidate, data, stream.subject, request_id, deadline=deadline
                )
            except BaseException:
                stream.close()
                raise
            if offer is _Offer.ACCEPTED:
                stream.instance = candidate
                if affinity:
                    self._open.setdefault(candidate, []).append(stream)
                return stream
            stream.close()
            refusals.append(offer)
        raise self._nobody_took_it(refusals, request_id)

    async def send(
        self, request: BaseModel, *, request_id: str, deadline: float, instance: str
    ) -> None:
        """Send `request` to `instance` with no response stream: its acceptance is the only
        answer, for a call whose outcome travels another way (prefill's, through the
        bootstrap room). Raises `ServiceError` when the instance refuses it or is gone."""
        data = request.__pydantic_serializer__.to_json(request)
        offer = await self._offer(instance, data, "", request_id, deadline=deadline)
        if offer is not _Offer.ACCEPTED:
            raise self._nobody_took_it([offer], request_id)

    async def forward(self, request: BaseModel, sink: StreamSink, deadline: float) -> str:
        """Hand the stream behind `sink` to an instance of this component; returns its id.

        Only an instance that is certainly gone is skipped: one that does not accept in time
        fails the request, since it might still answer on the caller's stream later.
        """
        data = request.__pydantic_serializer__.to_json(request)
        refusals: list[_Offer] = []
        for candidate in await self._candidates(None, deadline):
            offer = await self._offer(
                candidate,
                data,
                sink.subject,
                sink.request_id,
                deadline=deadline,
                retry_on_timeout=False,
            )
            if offer is _Offer.ACCEPTED:
                sink.hand_off()
                return candidate
            refusals.append(offer)
        raise self._nobody_took_it(refusals, sink.request_id)

    def _nobody_took_it(self, refusals: list["_Offer"], request_id: str) -> ServiceError:
        if refusals and all(offer in (_Offer.BUSY, _Offer.SLOW) for offer in refusals):
            return busy(f"every {self.component} instance is busy", request_id)
        return unavailable(f"no live {self.component} instance", request_id)

    async def _offer(
        self,
        candidate: str,
        data: bytes,
        stream_to: str,
        request_id: str,
        *,
        deadline: float,
        retry_on_timeout: bool = True,
    ) -> "_Offer":
        """Offer the call to one instance: accepted, or refused (try the next one)."""
        config = self._runtime.config
        subject = wire.endpoint_subject(config.namespace, self.component, self.endpoint, candidate)
        headers = {
            wire.REQUEST_ID: request_id,
            wire.STREAM_TO: stream_to,
            wire.DEADLINE: repr(deadline),
        }
        try:
            ack = await self._ask(candidate, subject, data, headers, deadline)
        except (nats.errors.NoRespondersError, LinkLost) as gone:
            reason = "no responders" if isinstance(gone, nats.errors.NoRespondersError) else gone
            log.info("%s instance %s is gone (%s)", self.component, candidate, reason)
            self.instances.drop(candidate)
            return _Offer.GONE
        except TimeoutError:  # NATS's, or the wait for an acknowledgement on a link
            if time.time() >= deadline:
                raise deadline_exceeded(request_id) from None
            if retry_on_timeout:
                log.warning(
                    "%s instance %s did not accept %s in time; trying another",
                    self.component,
                    candidate,
                    request_id,
                )
                return _Offer.SLOW
            raise unavailable(
                f"{self.component} instance {candidate} did not accept the request in time",
                request_id,
            ) from None
        ack_headers = ack.headers or {}
        if wire.ERROR_CODE not in ack_headers:
            return _Offer.ACCEPTED
        code = int(ack_headers[wire.ERROR_CODE])
        if code == ErrorCode.UNAVAILABLE:  # draining or busy: the next instance may take it
            busy_now = _refused_for_load(ack.data)
            log.info(
                "%s instance %s is %s",
                self.component,
                candidate,
                "busy" if busy_now else "draining",
            )
            return _Offer.BUSY if busy_now else _Offer.GONE
        raise ServiceError(code, ack_headers.get(wire.ERROR, "rejected"), request_id)

    async def _ask(
        self, candidate: str, subject: str, data: bytes, headers: dict[str, str], deadline: float
    ) -> Any:
        """The instance's acknowledgement (its ``headers`` and ``data``): on the direct link
        to it when it takes calls there, else by a NATS request."""
        links = self._runtime.links
        link = links.for_calls(self.instances.metadata(candidate)) if links else None
        if link is None:
            return await self._request(subject, data, headers, deadline)
        if len(data) > self._runtime.nc.max_payload:  # the same limit on either path
            raise self._too_large(data, headers)
        timeout = max(0.001, min(self._runtime.config.ack_timeout_s, deadline - time.time()))
        return await link.call(
            subject,
            headers[wire.REQUEST_ID],
            headers[wire.STREAM_TO],
            deadline,
            data,
            timeout=timeout,
        )

    async def _request(
        self, subject: str, data: bytes, headers: dict[str, str], deadline: float
    ) -> Any:
        # A subscription that was just flushed can rarely still meet "no responders" (seen
        # about once in 300 fresh nats.micro endpoints): ask a live instance twice before
        # giving up on it.
        for attempt in range(2):
            timeout = max(0.001, min(self._runtime.config.ack_timeout_s, deadline - time.time()))
            try:
                return await self._runtime.nc.request(
                    subject, data, timeout=timeout, headers=headers
                )
            except nats.errors.MaxPayloadError:
                raise self._too_large(data, headers) from None
            except nats.errors.NoRespondersError:
                if attempt or time.time() + NO_RESPONDERS_RETRY_S >= deadline:
                    raise
                await asyncio.sleep(NO_RESPONDERS_RETRY_S)
        raise AssertionError("unreachable")

    def _too_large(self, data: bytes, headers: dict[str, str]) -> ServiceError:
        return ServiceError(
            ErrorCode.PAYLOAD_TOO_LARGE,
            f"request is {len(data)} bytes, over the control plane's message limit "
            f"of {self._runtime.nc.max_payload} bytes (smaller or fewer images fit)",
            headers.get(wire.REQUEST_ID, ""),
        )

    async def candidates(self, deadline: float, affinity: Sequence[str] = ()) -> list[str]:
        """Live instances in the order a call would try them, by `affinity` keys when given
        (waits a little for one)."""
        return await self._candidates(None, deadline, affinity)

    def open_calls(self, instance: str) -> int:
        """Calls with affinity this caller holds open on `instance`."""
        streams = [s for s in self._open.get(instance, []) if not s.finished]
        if streams:
            self._open[instance] = streams
        else:
            self._open.pop(instance, None)
        return len(streams)

    def _loaded(self, instance: str) -> bool:
        metadata = self.instances.metadata(instance)
        bound = metadata.get("max_in_flight", "")
        if not bound.isdigit():
            return False
        held = max(self.open_calls(instance), _queued(metadata))
        return held >= max(1.0, self.max_load * int(bound))

    def _by_affinity(self, keys: Sequence[str], live: list[str]) -> list[str]:
        order = rendezvous_order(keys, live)
        loaded = [instance for instance in order if self._loaded(instance)]
        return [i for i in order if i not in loaded] + loaded

    async def _candidates(
        self, instance: str | None, deadline: float, affinity: Sequence[str] = ()
    ) -> list[str]:
        if instance is not None:
            return [instance]
        live = self.instances.live
        if not live:
            wait = min(self._runtime.config.ack_timeout_s, max(0.0, deadline - time.time()))
            await self.instances.wait_for_any(wait)
            live = self.instances.live
        if not live:
            return []
        if affinity:
            return self._by_affinity(affinity, live)
        start = next(self._round_robin) % len(live)
        return live[start:] + live[:start]
