"""The service runtime on a real nats-server: routing, streaming, deadlines, cancellation."""

import asyncio
import functools
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

import pytest
from pydantic import BaseModel

from triptych.protocol import ErrorCode, ServiceError
from triptych.runtime import Client, Context, Runtime, RuntimeConfig, Service, wire
from triptych.runtime.nats_server import NatsServer
from triptych.runtime.stream import ResponseStream


class Ask(BaseModel):
    count: int = 1
    delay: float = 0.0
    fail: str = ""


class Answer(BaseModel):
    index: int
    instance: str


class Worker:
    """A service whose handler streams `count` answers and records what happened. It offers
    direct links, which its callers use unless their runtime has them off."""

    def __init__(self, runtime: Runtime, component: str) -> None:
        self.service = Service(
            runtime, component, metadata={"host": "127.0.0.1"}, link_host="127.0.0.1"
        )
        self.service.add_endpoint("generate", Ask, self.generate)
        self.cancelled: list[str] = []

    async def generate(self, ask: Ask, ctx: Context) -> None:
        try:
            for index in range(ask.count):
                if ask.delay:
                    await asyncio.sleep(ask.delay)
                if ask.fail:
                    raise ServiceError(ErrorCode.BAD_REQUEST, ask.fail)
                await ctx.stream.send(Answer(index=index, instance=self.service.instance_id))
        except asyncio.CancelledError:
            self.cancelled.append(ctx.request_id)
            raise


@pytest.fixture(params=["link", "nats"])
async def runtimes(
    request: pytest.FixtureRequest, nats_server: NatsServer
) -> AsyncIterator[tuple[Runtime, Runtime, Runtime]]:
    """A caller and two worker runtimes; calls and streams on direct links, or all by NATS."""
    config = RuntimeConfig(
        nats_url=nats_server.url,
        namespace=f"rt{time.monotonic_ns()}",
        discovery_interval_s=0.2,
        instance_ttl_s=0.6,
        direct_streams=request.param == "link",
    )
    caller, first, second = (Runtime(config, name) for name in ("caller", "w1", "w2"))
    for runtime in (caller, first, second):
        await runtime.start()
    yield caller, first, second
    for runtime in (caller, first, second):
        await runtime.close()


async def started(runtime: Runtime, component: str = "echo") -> Worker:
    worker = Worker(runtime, component)
    await worker.service.start()
    return worker


async def linked(caller: Runtime, wanted: bool = True, count: int = 1) -> None:
    """Wait until `caller` holds `count` direct links (when `wanted`)."""
    for _ in range(100):
        if not wanted or (caller.links is not None and caller.links.linked >= count):
            return
        await asyncio.sleep(0.02)
    raise AssertionError("no direct link came up")


async def collect(stream: AsyncIterator[bytes]) -> list[Answer]:
    return [Answer.model_validate_json(data) async for data in stream]


async def echo(caller: Runtime, worker_runtime: Runtime) -> tuple[Worker, Client]:
    """An echo worker started on `worker_runtime`, and `caller`'s client of it."""
    worker = await started(worker_runtime)
    return worker, await caller.client("echo")


async def error_code(outcome: Awaitable[object]) -> int:
    """The code of the `ServiceError` that `outcome` ends with."""
    with pytest.raises(ServiceError) as caught:
        await outcome
    return caught.value.code


def soon(seconds: float = 5.0) -> float:
    return time.time() + seconds


async def test_streams_many_chunks_then_ends(runtimes: tuple[Runtime, Runtime, Runtime]) -> None:
    caller, w1, _ = runtimes
    worker, client = await echo(caller, w1)
    stream = await client.call(Ask(count=50), request_id="r1", deadline=soon())
    answers = await collect(stream)
    assert [a.index for a in answers] == list(range(50))
    assert stream.finished and stream.instance == worker.service.instance_id


async def test_errors_arrive_as_data(runtimes: tuple[Runtime, Runtime, Runtime]) -> None:
    caller, w1, _ = runtimes
    _, client = await echo(caller, w1)
    stream = await client.call(Ask(fail="no good"), request_id="r2", deadline=soon())
    with pytest.raises(ServiceError) as caught:
        await collect(stream)
    assert caught.value.code == 400
    assert caught.value.info.message == "no good"
    assert caught.value.info.request_id == "r2"


async def test_malformed_request_is_refused_at_the_edge(
    runtimes: tuple[Runtime, Runtime, Runtime],
) -> None:
    caller, w1, _ = runtimes
    await started(w1)

    class Wrong(BaseModel):
        count: str = "many"

    client = await caller.client("echo")
    with pytest.raises(ServiceError, match="count") as caught:
        await client.call(Wrong(), request_id="r3", deadline=soon())
    assert caught.value.code == 400


async def test_round_robin_spreads_calls_over_live_instances(
    runtimes: tuple[Runtime, Runtime, Runtime],
) -> None:
    caller, w1, w2 = runtimes
    first, second = await started(w1), await started(w2)
    client = await caller.client("echo")
    assert await client.instances.wait_for_any(5)
    await asyncio.sleep(0.5)  # both have answered a ping
    seen = [
        (await client.call(Ask(), request_id=f"rr{i}", deadline=soon())).instance for i in range(10)
    ]
    ids = {first.service.instance_id, second.service.instance_id}
    assert set(seen) == ids
    assert seen.count(first.service.instance_id) == 5


async def test_one_instance_can_be_addressed_directly(
    runtimes: tuple[Runtime, Runtime, Runtime],
) -> None:
    caller, w1, w2 = runtimes
    await started(w1)
    target, client = await echo(caller, w2)
    for i in range(4):
        stream = await client.call(
            Ask(), request_id=f"d{i}", deadline=soon(), instance=target.service.instance_id
        )
        assert [a.instance for a in await collect(stream)] == [target.service.instance_id]


async def test_deadline_ends_the_call_with_an_error(
    runtimes: tuple[Runtime, Runtime, Runtime],
) -> None:
    caller, w1, _ = runtimes
    worker, client = await echo(caller, w1)
    begun = time.monotonic()
    stream = await client.call(Ask(count=100, delay=0.05), request_id="late", deadline=soon(0.3))
    assert await error_code(collect(stream)) == 504
    assert time.monotonic() - begun < 2
    await asyncio.sleep(0.2)
    assert worker.service.in_flight == 0  # the worker gave up too


async def test_cancel_reaches_the_worker(runtimes: tuple[Runtime, Runtime, Runtime]) -> None:
    caller, w1, _ = runtimes
    worker, client = await echo(caller, w1)
    stream = await client.call(Ask(count=100, delay=0.05), request_id="bye", deadline=soon())
    await stream.__anext__()
    await caller.cancel("bye")
    for _ in range(50):
        if worker.cancelled:
            break
        await asyncio.sleep(0.02)
    assert worker.cancelled == ["bye"]
    assert worker.service.in_flight == 0


async def test_dead_instance_leaves_routing(runtimes: tuple[Runtime, Runtime, Runtime]) -> None:
    caller, w1, w2 = runtimes
    await started(w1)
    survivor, client = await echo(caller, w2)
    await asyncio.sleep(0.5)
    assert len(client.instances.live) == 2
    await w1.nc.close()  # the instance vanishes without a goodbye
    for i in range(6):  # no call fails: "no responders" moves it to the survivor at once
        stream = await client.call(Ask(), request_id=f"after{i}", deadline=soon())
        assert stream.instance == survivor.service.instance_id
    await asyncio.sleep(1.0)
    assert client.instances.live == [survivor.service.instance_id]


async def test_no_instance_is_a_clear_error(runtimes: tuple[Runtime, Runtime, Runtime]) -> None:
    caller, _, _ = runtimes
    client = await caller.client("nobody")
    with pytest.raises(ServiceError, match="no live nobody instance") as caught:
        await client.call(Ask(), request_id="x", deadline=soon(0.5))
    assert caught.value.code == 503


async def test_silent_worker_fails_the_stream(nats_server: NatsServer) -> None:
    config = RuntimeConfig(
        nats_url=nats_server.url,
        namespace=f"idle{time.monotonic_ns()}",
        keepalive_interval_s=0.1,
        stream_idle_timeout_s=0.5,
    )
    async with Runtime(config, "caller") as caller, Runtime(config, "w") as worker_rt:
        worker, client = await echo(caller, worker_rt)
        slow = await client.call(Ask(count=3, delay=0.8), request_id="slow", deadline=soon())
        assert len(await collect(slow)) == 3  # keepalives cover the silent gaps
        stream = await client.call(Ask(count=10, delay=0.3), request_id="dies", deadline=soon())
        await stream.__anext__()
        await worker.service.close()  # stops without ending its streams' holders cleanly
        await worker_rt.nc.close()
        assert await error_code(collect(stream)) == 503


async def test_drain_finishes_in_flight_and_refuses_new(
    runtimes: tuple[Runtime, Runtime, Runtime],
) -> None:
    caller, w1, _ = runtimes
    worker, client = await echo(caller, w1)
    stream = await client.call(Ask(count=4, delay=0.1), request_id="inflight", deadline=soon())
    drained = asyncio.create_task(worker.service.drain(5))
    await asyncio.sleep(0.05)
    assert len(await collect(stream)) == 4
    await drained
    assert await error_code(client.call(Ask(), request_id="new", deadline=soon(0.5))) == 503


@pytest.mark.parametrize("path", ["link", "nats"])
async def test_message_over_the_control_plane_limit_is_a_413(path: str) -> None:
    """The same limit on both paths, so a call does not pass or fail by whether its link was
    up yet."""
    with NatsServer(max_payload=64 * 1024) as small:
        config = RuntimeConfig(nats_url=small.url, namespace="big", direct_streams=path == "link")
        async with Runtime(config, "caller") as caller, Runtime(config, "w") as worker_rt:
            _, client = await echo(caller, worker_rt)
            await linked(caller, path == "link")

            class Bulky(BaseModel):
                blob: str = "x" * 100_000

            with pytest.raises(ServiceError, match="over the control plane's message limit") as e:
                await client.call(Bulky(), request_id="big", deadline=soon())
            assert e.value.code == 413


async def test_credentials_are_required_and_used() -> None:
    with NatsServer(user="triptych", password="s3cret-pw") as guarded:
        good = RuntimeConfig(
            nats_url=guarded.url, namespace="auth", nats_user="triptych", nats_password="s3cret-pw"
        )
        async with Runtime(good, "caller") as caller, Runtime(good, "w") as worker_rt:
            await started(worker_rt)
            stream = await (await caller.client("echo")).call(
                Ask(), request_id="a", deadline=soon()
            )
            assert len(await collect(stream)) == 1
        bad = RuntimeConfig(nats_url=guarded.url, namespace="auth")
        with pytest.raises(Exception, match=r"(?i)authoriz"):
            await asyncio.wait_for(Runtime(bad, "intruder").start(), 10)


async def test_a_cancel_that_overtakes_its_request_still_wins(
    runtimes: tuple[Runtime, Runtime, Runtime],
) -> None:
    caller, w1, _ = runtimes
    worker, client = await echo(caller, w1)
    for _ in range(100):  # the cancel reaches the worker before the request does
        await caller.cancel("early")
        await asyncio.sleep(0.02)
        if "early" in worker.service._cancelled:
            break
    late = client.call(Ask(count=100, delay=0.05), request_id="early", deadline=soon())
    assert await error_code(late) == 499
    assert worker.service.in_flight == 0


class _HeldRequest:
    """A NATS micro request as `Service` sees it, answered in place (no network round trip),
    so that a cancel can be delivered in the one step between the ack and the task's start."""

    def __init__(self, request_id: str) -> None:
        self.headers = {wire.REQUEST_ID: request_id, wire.STREAM_TO: "_INBOX.nobody"}
        self.data = Ask(count=100, delay=0.05).model_dump_json().encode()
        self.acked = False

    async def respond(self, data: bytes, headers: dict[str, str] | None = None) -> None:
        self.acked = True

    async def respond_error(self, code: str, description: str) -> None:
        raise AssertionError(f"refused: {code} {description}")


async def test_a_cancel_before_the_handler_starts_leaves_nothing_in_flight(
    runtimes: tuple[Runtime, Runtime, Runtime],
) -> None:
    _, w1, _ = runtimes
    worker = await started(w1)
    service = worker.service
    request = _HeldRequest("racy")
    await service._receive(service._endpoints[0], request)  # type: ignore[arg-type]
    assert request.acked and service.in_flight == 1
    cancel = type("Msg", (), {"data": b"racy"})()
    await service._on_cancel(cancel)  # no await yielded: the handler's task has not started
    for _ in range(50):
        if service.in_flight == 0:
            break
        await asyncio.sleep(0.02)
    assert service.in_flight == 0


async def test_a_stream_says_whether_a_frame_waits_unread() -> None:
    """Keepalives do not count; a frame taken does; a closed stream holds nothing for anyone
    (a reader batching its writes must not wait on a choice that was closed early)."""
    stream = ResponseStream("s", "r", time.time() + 30, 5.0, on_close=lambda _s: None)
    assert not stream.pending
    stream.feed(b"", {wire.KEEPALIVE: "1"})
    assert not stream.pending
    stream.feed(b"one", None)
    stream.feed(b"two", None)
    assert stream.pending
    assert await anext(aiter(stream)) == b"one"
    assert stream.pending
    stream.close()
    assert not stream.pending


async def test_calls_travel_on_the_direct_link_when_the_worker_offers_one(
    runtimes: tuple[Runtime, Runtime, Runtime], nats_server: NatsServer
) -> None:
    """With direct links on, the call, its acknowledgement and its frames skip nats-server:
    the worker counts the call, and its NATS endpoint never sees it."""
    caller, w1, _ = runtimes
    worker, client = await echo(caller, w1)
    on_link = caller.config.direct_streams
    await linked(caller, on_link)
    assert [
        a.index
        for a in await collect(await client.call(Ask(count=3), request_id="l", deadline=soon()))
    ] == [0, 1, 2]
    assert worker.service.requests == 1
    served = worker.service._micro.stats().endpoints[0].num_requests  # type: ignore[union-attr]
    assert served == (0 if on_link else 1)


async def _drop_link(offered: list[str], call: Any) -> None:
    offered.append(call.headers[wire.REQUEST_ID])
    call.link.close()


async def _hold(offered: list[str], call: Any) -> None:
    offered.append(call.headers[wire.REQUEST_ID])
    await asyncio.Event().wait()  # never answers


@pytest.mark.parametrize(
    ("misbehave", "ack_timeout_s"), [(_drop_link, 60.0), (_hold, 0.3)], ids=["drops", "holds"]
)
async def test_a_call_its_link_does_not_accept_moves_on(
    nats_server: NatsServer,
    misbehave: Callable[[list[str], Any], Coroutine[Any, Any, None]],
    ack_timeout_s: float,
) -> None:
    """A worker whose link closes while a call waits for its acknowledgement is gone: the
    call goes to the next instance at once, not after the acknowledgement's time-out (longer
    here than the calls' deadlines). One that holds calls on its link without acknowledging
    them is slow: each such call waits out the time-out, then goes to the next instance."""
    config = RuntimeConfig(
        nats_url=nats_server.url,
        namespace=f"misbehave{time.monotonic_ns()}",
        discovery_interval_s=0.2,
        ack_timeout_s=ack_timeout_s,
    )
    async with (
        Runtime(config, "caller") as caller,
        Runtime(config, "w1") as w1,
        Runtime(config, "w2") as w2,
    ):
        faulty, survivor = await started(w1), await started(w2)
        client = await caller.client("echo")
        await linked(caller, count=2)
        offered: list[str] = []
        subject = wire.endpoint_subject(
            config.namespace, "echo", "generate", faulty.service.instance_id
        )
        w1.serve_calls(subject, functools.partial(misbehave, offered))
        for i in range(4):
            stream = await client.call(Ask(), request_id=f"c{i}", deadline=soon())
            assert stream.instance == survivor.service.instance_id
            assert len(await collect(stream)) == 1
        assert offered  # round-robin offered it at least one call


async def test_a_link_without_the_instance_key_is_closed(nats_server: NatsServer) -> None:
    """Only a caller that read the instance's discovery metadata (so passed NATS's own
    credentials) may send calls or receive frames on its link."""
    config = RuntimeConfig(nats_url=nats_server.url, namespace=f"key{time.monotonic_ns()}")
    async with Runtime(config, "w") as worker_rt:
        worker = await started(worker_rt)
        port = int(worker.service.metadata["stream_port"])
        assert worker.service.metadata["link_key"] == worker_rt.link_key != ""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        prefix, key = b"key.stream.intruder", b"0" * 32
        writer.write(struct.pack("!HH", len(prefix), len(key)) + prefix + key)
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, nothing sent
        writer.close()
        assert worker.service.requests == 0
