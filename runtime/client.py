"""Calling a component: round-robin over live instances, or one instance by id."""

import itertools
import logging
import time
from typing import TYPE_CHECKING

import nats.errors
from pydantic import BaseModel

from triptych.runtime import wire
from triptych.runtime.discovery import InstanceTracker
from triptych.runtime.errors import ServiceError, unavailable
from triptych.runtime.stream import ResponseStream, StreamSink

if TYPE_CHECKING:
    from triptych.runtime.runtime import Runtime

log = logging.getLogger(__name__)


class Client:
    """Calls one endpoint of one component.

    `call` returns the response stream; `forward` hands a stream this worker holds to the next
    stage, which then answers the original caller directly.
    """

    def __init__(self, runtime: "Runtime", component: str, endpoint: str) -> None:
        self._runtime = runtime
        self.component = component
        self.endpoint = endpoint
        cfg = runtime.config
        self.instances = InstanceTracker(
            runtime.nc, cfg.namespace, component, cfg.discovery_interval_s, cfg.instance_ttl_s
        )
        self._round_robin = itertools.count()

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
    ) -> ResponseStream:
        """Send `request` to an instance (round-robin unless `instance` is given).

        Returns once an instance accepted the call; its frames then arrive on the stream.
        """
        stream = self._runtime.open_stream(request_id, deadline)
        try:
            stream.instance = await self._dispatch(request, stream.subject, request_id, deadline,
                                                   instance)
        except BaseException:
            stream.close()
            raise
        return stream

    async def forward(self, request: BaseModel, sink: StreamSink, deadline: float) -> str:
        """Hand the stream behind `sink` to an instance of this component; returns its id."""
        instance = await self._dispatch(request, sink.subject, sink.request_id, deadline, None)
        sink.hand_off()
        return instance

    async def _dispatch(
        self,
        request: BaseModel,
        stream_to: str,
        request_id: str,
        deadline: float,
        instance: str | None,
    ) -> str:
        data = request.__pydantic_serializer__.to_json(request)
        headers = {
            wire.REQUEST_ID: request_id,
            wire.STREAM_TO: stream_to,
            wire.DEADLINE: repr(deadline),
        }
        for candidate in await self._candidates(instance, deadline):
            subject = wire.endpoint_subject(
                self._runtime.config.namespace, self.component, self.endpoint, candidate
            )
            timeout = max(0.001, min(self._runtime.config.ack_timeout_s, deadline - time.time()))
            try:
                ack = await self._runtime.nc.request(subject, data, timeout=timeout,
                                                     headers=headers)
            except nats.errors.NoRespondersError:
                self.instances.drop(candidate)
                continue
            except nats.errors.TimeoutError:
                raise unavailable(
                    f"{self.component} instance {candidate} did not accept the request in time",
                    request_id,
                ) from None
            ack_headers = ack.headers or {}
            if wire.ERROR_CODE in ack_headers:
                code = int(ack_headers[wire.ERROR_CODE])
                if code == 503 and instance is None:  # draining: try the next instance
                    continue
                raise ServiceError(code, ack_headers.get(wire.ERROR, "rejected"), request_id)
            return candidate
        raise unavailable(f"no live {self.component} instance", request_id)

    async def _candidates(self, instance: str | None, deadline: float) -> list[str]:
        if instance is not None:
            return [instance]
        live = self.instances.live
        if not live:
            wait = min(self._runtime.config.ack_timeout_s, max(0.0, deadline - time.time()))
            await self.instances.wait_for_any(wait)
            live = self.instances.live
        if not live:
            return []
        start = next(self._round_robin) % len(live)
        return live[start:] + live[:start]
