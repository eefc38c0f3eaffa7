"""NIXL transfers between two real processes: this test process and a spawned peer.

TensorHandles cross a multiprocessing pipe, standing in for NATS. Tensors are built from a seed on
both sides and compared by digest, so bytes never ride the pipe.
"""

import asyncio
import hashlib
import multiprocessing
import time
from collections.abc import AsyncIterator
from multiprocessing.connection import Connection
from typing import Any

import pytest
import torch

from triptych.transfer.nixl import (
    PoolFull,
    RegionAllocator,
    TransferAgent,
    TransferError,
)

MiB = 1 << 20
POOL = 96 * MiB


def make(seed: int, numel: int, dtype: str) -> torch.Tensor:
    """The same tensor in any process: random values, plus NaN, infinities and -0.0."""
    gen = torch.Generator().manual_seed(seed)
    tensor = torch.randn(numel, generator=gen, dtype=torch.float32)
    tensor[: min(numel, 4)] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0])[
        : min(numel, 4)
    ]
    return tensor.to(getattr(torch, dtype))


def digest(tensor: torch.Tensor) -> str:
    data = tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(data).hexdigest()


# the peer process


def peer_main(conn: Connection) -> None:
    """Serve commands from the pipe on one TransferAgent until told to exit."""
    asyncio.run(_serve(conn))


async def _serve(conn: Connection) -> None:
    agent = TransferAgent("peer", pool_bytes=POOL)
    await agent.start()
    conn.send("ready")
    while True:
        command, *args = await asyncio.to_thread(conn.recv)
        try:
            if command == "fetch":
                ref, timeout = args
                began = time.perf_counter()
                tensor = await agent.fetch(ref, timeout)
                elapsed = time.perf_counter() - began
                conn.send((digest(tensor), tuple(tensor.shape), str(tensor.dtype), elapsed))
            elif command == "export":
                seed, shape, dtype, key = args
                tensor = make(seed, int(torch.Size(shape).numel()), dtype).view(shape)
                conn.send(agent.export(tensor, key))
            elif command == "in_use":
                conn.send(agent.pool_in_use)
            elif command == "exit":
                await agent.close()
                conn.send("bye")
                return
        except Exception as e:
            conn.send(e)


class Peer:
    """The parent's end of a peer process."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=peer_main, args=(child,), daemon=True)
        self.process.start()
        child.close()
        if not self.conn.poll(60) or self.conn.recv() != "ready":
            raise RuntimeError("the peer did not start")

    async def call(self, *command: Any, timeout: float = 30) -> Any:
        self.conn.send(command)
        if not await asyncio.to_thread(self.conn.poll, timeout):
            raise TimeoutError(f"the peer did not answer {command[0]}")
        answer = self.conn.recv()
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def close(self) -> None:
        if self.process.is_alive():
            await self.call("exit")
        self.process.join(10)

    def kill(self) -> None:
        self.process.kill()
        self.process.join(10)


@pytest.fixture(scope="module")
async def agent() -> AsyncIterator[TransferAgent]:
    agent = TransferAgent("test", pool_bytes=POOL)
    await agent.start()
    yield agent
    await agent.close()
    await agent.close()


@pytest.fixture(scope="module")
async def peer() -> AsyncIterator[Peer]:
    peer = Peer()
    yield peer
    await peer.close()


# the tests


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
async def test_tensor_arrives_bit_exact(agent: TransferAgent, peer: Peer, dtype: str) -> None:
    tensor = make(1, 3 * 1000, dtype).view(3, 1000)
    ref = agent.export(tensor, f"exact-{dtype}")
    assert (ref.shape, ref.dtype, ref.device) == ((3, 1000), dtype, "cpu")
    got = await peer.call("fetch", ref, 10.0)
    assert got[:3] == (digest(tensor), (3, 1000), f"torch.{dtype}")
    assert await agent.wait_released(ref.key, 10)


async def test_a_kept_export_can_be_read_again_until_released(
    agent: TransferAgent, peer: Peer
) -> None:
    """What a retried request needs: its image bytes stay readable after the first read."""
    tensor = make(7, 5000, "float32")
    ref = agent.export(tensor, "kept", keep=True)
    first = await peer.call("fetch", ref, 10.0)
    assert await agent.wait_released(ref.key, 10) is True  # notified, and now released
    ref = agent.export(tensor, "kept-again", keep=True)
    for _ in range(2):
        assert (await peer.call("fetch", ref, 10.0))[0] == first[0] == digest(tensor)
    before = agent.pool_in_use
    agent.release(ref.key)
    assert agent.pool_in_use < before
    with pytest.raises(TransferError):
        await peer.call("fetch", ref, 5.0)


async def test_large_tensor_both_ways(agent: TransferAgent, peer: Peer) -> None:
    tensor = make(2, 16 * MiB, "float32")  # 64 MiB
    ref = agent.export(tensor, "large")
    assert (await peer.call("fetch", ref, 30.0))[0] == digest(tensor)
    assert await agent.wait_released("large", 10)
    ref = await peer.call("export", 3, (4, 1024), "bfloat16", "from-peer")
    got = await agent.fetch(ref, 10)
    assert digest(got) == digest(make(3, 4096, "bfloat16")) and got.shape == (4, 1024)
    assert agent.pool_in_use == 0


async def test_release_follows_the_importers_notification(agent: TransferAgent, peer: Peer) -> None:
    ref = agent.export(make(4, MiB, "float32"), "released")
    assert agent.pool_in_use > 4 * MiB
    waiting = asyncio.create_task(agent.wait_released("released", 10))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    await peer.call("fetch", ref, 10.0)
    assert await waiting
    assert agent.pool_in_use == 0
    assert await peer.call("in_use") == 0
    assert not await agent.wait_released("released", 1)  # settled already


async def test_unfetched_export_times_out_and_is_freed(agent: TransferAgent) -> None:
    agent.export(make(5, 1000, "float32"), "nobody")
    began = time.monotonic()
    assert not await agent.wait_released("nobody", 0.2)
    assert 0.2 <= time.monotonic() - began < 1
    assert agent.pool_in_use == 0


async def test_pool_full(agent: TransferAgent) -> None:
    with pytest.raises(PoolFull):
        agent.export(torch.empty(POOL, dtype=torch.uint8), "too-big")
    agent.export(torch.zeros(60 * MiB, dtype=torch.uint8), "a")
    with pytest.raises(PoolFull):
        agent.export(torch.zeros(40 * MiB, dtype=torch.uint8), "b")
    agent.release("a")
    agent.release("a")
    agent.export(torch.zeros(40 * MiB, dtype=torch.uint8), "b")
    agent.release("b")
    assert agent.pool_in_use == 0


async def test_a_full_pool_makes_an_export_wait_for_the_importer(
    agent: TransferAgent, peer: Peer
) -> None:
    first = make(6, 15 * MiB, "float32")  # 60 MiB of the 96
    ref = agent.export(first, "first")
    waiting = asyncio.create_task(
        agent.export_when_space(make(7, 10 * MiB, "float32"), "second", 10)
    )
    await asyncio.sleep(0.1)
    assert not waiting.done()  # 40 MiB more does not fit yet
    assert (await peer.call("fetch", ref, 10.0))[0] == digest(first)
    second = await asyncio.wait_for(waiting, 10)  # the importer's notice freed the region
    assert (await peer.call("fetch", second, 10.0))[0] == digest(make(7, 10 * MiB, "float32"))
    assert await agent.wait_released("second", 10)
    agent.export(torch.zeros(60 * MiB, dtype=torch.uint8), "stuck")
    with pytest.raises(PoolFull, match="deadline"):
        await agent.export_when_space(torch.zeros(40 * MiB, dtype=torch.uint8), "late", 0.2)
    agent.release("stuck")
    assert agent.pool_in_use == 0


async def test_fetch_of_a_released_export_fails(agent: TransferAgent, peer: Peer) -> None:
    ref = agent.export(make(6, 1000, "float32"), "gone")
    agent.release("gone")
    with pytest.raises(TransferError, match="released"):
        await peer.call("fetch", ref, 5.0)
    assert await peer.call("in_use") == 0


@pytest.mark.parametrize("connected", [False, True])
async def test_fetch_from_a_dead_exporter_fails(agent: TransferAgent, connected: bool) -> None:
    exporter = Peer()
    if connected:
        ref = await exporter.call("export", 7, (10,), "float32", "first")
        assert digest(await agent.fetch(ref, 5)) == digest(make(7, 10, "float32"))
    ref = await exporter.call("export", 8, (1000,), "float32", "orphan")
    exporter.kill()
    began = time.monotonic()
    with pytest.raises(TransferError):
        await agent.fetch(ref, 5)
    assert time.monotonic() - began < 5
    assert agent.pool_in_use == 0


async def test_bad_refs_fail_cleanly(agent: TransferAgent, peer: Peer) -> None:
    ref = agent.export(make(9, 100, "float32"), "bad")
    wrong_name = ref.model_copy(update={"agent": "someone-else"})
    with pytest.raises(TransferError, match="metadata"):
        await peer.call("fetch", wrong_name, 5.0)
    with pytest.raises(TransferError, match="dtype"):
        await peer.call("fetch", ref.model_copy(update={"dtype": "Tensor"}), 5.0)
    agent.release("bad")


def test_allocator_first_fit_and_merge() -> None:
    pool = RegionAllocator(4096, align=256)
    a, b, c = pool.alloc(1), pool.alloc(300), pool.alloc(256)
    assert (a, b, c, pool.in_use) == (0, 256, 768, 1024)
    pool.free(b)
    assert pool.alloc(200) == 256  # first fit reuses the hole
    pool.free(256)
    pool.free(a)
    pool.free(c)
    assert pool.in_use == 0
    assert pool.alloc(4096) == 0  # everything merged back into one block
    with pytest.raises(PoolFull):
        pool.alloc(1)


def _gpu_exporter(conn: Connection) -> None:
    async def serve() -> None:
        agent = TransferAgent("gpu-peer", "cuda", 64 * MiB)
        await agent.start()
        tensor = make(9, MiB, "bfloat16").to("cuda")
        conn.send(agent.export(tensor, "on-gpu"))
        conn.send(await agent.wait_released("on-gpu", 30))
        await agent.close()

    asyncio.run(serve())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
async def test_same_gpu_reads_map_the_exporters_pool() -> None:
    context = multiprocessing.get_context("spawn")
    here, there = context.Pipe()
    peer = context.Process(target=_gpu_exporter, args=(there,), daemon=True)
    peer.start()
    agent = TransferAgent("gpu-test", "cuda", 64 * MiB)
    await agent.start()
    try:
        ref = await asyncio.to_thread(here.recv)
        assert ref.ipc and ref.gpu
        got = await agent.fetch(ref, 10)
        assert got.device.type == "cuda" and agent._mapped  # copied out of the mapped pool
        assert digest(got.cpu()) == digest(make(9, MiB, "bfloat16"))
        assert await asyncio.to_thread(here.recv)  # the exporter was notified and freed it
    finally:
        await agent.close()
        peer.join(10)


async def test_a_notification_alone_reaches_a_new_peer() -> None:
    """The same-GPU path notifies without a READ first, so its first notification to a peer
    waits for the connection; the reader then makes no NIXL call the test could lean on."""
    peer = Peer()
    reader = TransferAgent("reader", pool_bytes=MiB)
    await reader.start()
    try:
        ref = await peer.call("export", 9, (1000,), "float32", "notified")
        assert await peer.call("in_use") > 0
        reader._notify(ref)
        for _ in range(100):
            if await peer.call("in_use") == 0:
                break
            await asyncio.sleep(0.05)
        assert await peer.call("in_use") == 0
    finally:
        await reader.close()
        await peer.close()
