"""One contiguous tensor per transfer between processes, over NIXL (UCX).

Each process runs one `TransferAgent`, which registers one memory pool with NIXL once, at start.
The exporter copies a tensor into a free region of its pool and hands the importer a `TensorHandle`
inside a protocol message; the importer READs the region into its own pool, notifies the exporter
(which frees the region) and copies the tensor out. Every `export` must end in `wait_released` or
`release`, and the exporter should wait longer than the importer's fetch timeout: a region freed
while a READ is under way may be reused. Each export ends in a digest of its key, zeroed when the
region is freed, so a fetch that comes too late fails instead of returning stale bytes.

Security: a `TensorHandle` carries NIXL agent metadata and *pickled* descriptors, which `fetch`
unpickles. Accept refs only from the authenticated control plane (NATS), never from HTTP clients.

Transport: UCX reads ``UCX_TLS`` when the first agent starts. For a CPU pool, `start` sets it to
`DEFAULT_UCX_TLS` (plus ``cuda_copy`` where GPUs are visible, which NIXL requires there) unless
it is set already; a CUDA pool keeps UCX's default ("all"), which also
brings the CUDA and RDMA transports. The list must contain ``tcp``: without it NIXL's UCX backend
fails to start (``UCX endpoint create failed: failed to create ep``). A VRAM pool allocated by
PyTorch with ``expandable_segments:True`` silently falls back to TCP.

Same GPU: between two processes on one GPU, UCX's READ was measured at ~0.4 GB/s on an H100
(its CUDA IPC transport was not taken; `benchmarks/transfer_gpu.py`), against ~0.7-1 TB/s for
a copy out of the exporter's pool mapped through CUDA IPC. So a VRAM pool also travels as CUDA
IPC arguments with its GPU's identity (host boot id, GPU UUID): an importer on the same GPU
maps the pool once and copies the export out on the device, then notifies over NIXL as usual.
Everywhere else (other GPUs, other hosts, DRAM) the bytes move by NIXL READ.
"""

import asyncio
import bisect
import hashlib
import importlib
import logging
import math
import os
import pickle
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch.multiprocessing import reductions

from triptych.observability import nvtx
from triptych.protocol import TensorHandle

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_UCX_TLS = "tcp,cma,sm,self"
"""TCP for connections and notifications; cross-memory attach moves the bytes within a host."""
ALIGN = 256
"""Pool regions start on multiples of this many bytes."""
_TAG = 8
"""Bytes after each exported tensor: a digest of its key."""
_SPIN_S = 200e-6
"""How long a fetch yields in a busy loop before sleeping (asyncio rounds sleeps up to 1 ms)."""
FLUSH_S = 1.0
"""How long the poller keeps progressing UCX after this agent sent a notification."""


class PoolFull(RuntimeError):
    """The pool has no free region large enough."""


class TransferError(RuntimeError):
    """A fetch failed or timed out."""


class RegionAllocator:
    """First-fit allocator of aligned byte ranges in ``[0, size)``; freeing merges neighbours."""

    def __init__(self, size: int, align: int = ALIGN) -> None:
        self._align = align
        self._free: list[tuple[int, int]] = [(0, size)] if size > 0 else []
        """Free (offset, length) blocks, sorted by offset, never adjacent."""
        self._used: dict[int, int] = {}
        self.in_use = 0

    def alloc(self, nbytes: int) -> int:
        """The offset of a new region of at least `nbytes` bytes; PoolFull if none fits."""
        need = -(-max(nbytes, 1) // self._align) * self._align
        for i, (offset, length) in enumerate(self._free):
            if length >= need:
                if length == need:
                    del self._free[i]
                else:
                    self._free[i] = (offset + need, length - need)
                self._used[offset] = need
                self.in_use += need
                return offset
        raise PoolFull(f"no free region of {need} bytes ({self.in_use} bytes in use)")

    def free(self, offset: int) -> None:
        """Give back the region at `offset`."""
        length = self._used.pop(offset)
        self.in_use -= length
        i = bisect.bisect(self._free, (offset, length))
        if i < len(self._free) and self._free[i][0] == offset + length:
            length += self._free.pop(i)[1]
        if i > 0 and sum(self._free[i - 1]) == offset:
            i -= 1
            offset, length = self._free[i][0], self._free[i][1] + length
            del self._free[i]
        self._free.insert(i, (offset, length))


@dataclass(eq=False)
class _Export:
    offset: int | None
    """Start of the region, until it is freed."""
    end: int
    """End of the region's digest."""
    done: asyncio.Event = field(default_factory=asyncio.Event)
    notified: bool = False
    keep: bool = False
    """Held until `release` even after a reader's notification (it may be read again)."""


def _digest(key: str) -> bytes:
    return hashlib.blake2b(key.encode(), digest_size=_TAG).digest()


_IPC_DEVICE = 6
"""The device index among `rebuild_cuda_tensor`'s arguments (replaced by the importer's own
index of the same GPU, which may differ under CUDA_VISIBLE_DEVICES)."""


def _shareable(pool: torch.Tensor) -> tuple[bytes, str]:
    """A VRAM pool as CUDA IPC arguments, and the identity of its GPU; empty if unsupported."""
    try:
        _, args = reductions.reduce_tensor(pool)  # type: ignore[no-untyped-call]
        uuid = torch.cuda.get_device_properties(pool.device).uuid
        try:
            host = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        except OSError:
            host = socket.gethostname()
        return pickle.dumps(args), f"{host}/{uuid}"
    except Exception as e:
        log.warning("CUDA IPC unavailable (%r): same-GPU transfers go over NIXL", e)
        return b"", ""


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise TransferError(f"unknown dtype {name!r}")
    return dtype


NIXL_MODULES = ("nixl_cu12._api", "nixl_cu13._api", "nixl._api")
"""The NIXL builds triptych can use, in order of preference (CPU machines get cu12 from
`make setup`; a CUDA 13 GPU machine may carry cu13)."""


def _nixl_api() -> Any:
    for name in NIXL_MODULES:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise ImportError(f"no NIXL build found (tried {', '.join(NIXL_MODULES)})")


class TransferAgent:
    """One NIXL agent per process, with one memory pool registered once at start.

    Use it from one event loop thread only. NIXL's calls and the copies into and out of the pool
    run on that thread: over cross-memory attach a READ completes inside the call that posts it
    (25-35 ms for 64 MiB on a 2-core VM), so a large transfer holds the loop like a memcpy.
    """

    def __init__(self, name: str, device: str = "cpu", pool_bytes: int = 256 << 20) -> None:
        self.name = f"{name}-{os.getpid()}-{secrets.token_hex(3)}"
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._pool_bytes = pool_bytes
        self._pool = RegionAllocator(pool_bytes)
        self._agent: Any = None
        self._buf = torch.empty(0, dtype=torch.uint8)
        self._reg: Any = None
        self._metadata = b""
        self._remotes: set[str] = set()
        self._ipc = b""
        self._gpu = ""
        self._mapped: dict[str, torch.Tensor] = {}
        """Pools of exporters on this GPU, mapped through CUDA IPC, by agent name."""
        self._copies: torch.cuda.Stream | None = None
        """The stream that copies out of mapped pools."""
        self._exports: dict[str, _Export] = {}
        self._wake = asyncio.Event()
        self._flush_until = 0.0
        """Until when (event loop time) the poller progresses UCX for notifications sent."""
        self._space = asyncio.Event()
        """Set whenever a region is freed (fetches wait on it while the pool is full)."""
        self._poller: asyncio.Task[None] | None = None

    @property
    def pool_in_use(self) -> int:
        """Bytes of the pool now held by exports and fetches."""
        return self._pool.in_use

    async def start(self) -> None:
        """Create the agent (UCX backend), allocate the pool and register it."""
        if self.device.type == "cpu":
            # NIXL refuses a list without a CUDA transport on a host with GPUs (a frontend's
            # CPU pool on a GPU machine): cuda_copy is the basic one
            gpus = torch.cuda.is_available()
            os.environ.setdefault("UCX_TLS", DEFAULT_UCX_TLS + (",cuda_copy" if gpus else ""))
        elif "expandable_segments:True" in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""):
            log.warning("%s: expandable segments make NIXL fall back to TCP", self.name)
        api = _nixl_api()
        # No progress thread: it spins a core per process, and NIXL progresses UCX inside the
        # calls this agent makes anyway (posting and checking READs, polling notifications).
        config = api.nixl_agent_config(enable_prog_thread=False, backends=["UCX"])
        self._agent = api.nixl_agent(self.name, config)
        self._buf = torch.empty(self._pool_bytes, dtype=torch.uint8, device=self.device)
        self._reg = self._agent.register_memory(self._buf)
        self._metadata = self._agent.get_agent_metadata()
        if self.device.type == "cuda":
            self._ipc, self._gpu = _shareable(self._buf)
        self._poller = asyncio.get_running_loop().create_task(
            self._poll_notifs(), name=f"nixl-notifs-{self.name}"
        )

    async def close(self) -> None:
        """Stop the poller, settle every export and deregister the pool. Safe to call twice."""
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
            self._poller = None
        for key in list(self._exports):
            self.release(key)
        self._mapped.clear()
        if self._reg is not None:
            self._agent.deregister_memory(self._reg)
            self._reg = None
        self._agent = None
        self._buf = torch.empty(0, dtype=torch.uint8)

    def _check_running(self) -> None:
        if self._agent is None:
            raise RuntimeError(f"transfer agent {self.name} is not running")

    def _descs(self, offset: int, end: int) -> Any:
        cuda = self.device.type == "cuda"
        mem, dev = ("VRAM", self.device.index or 0) if cuda else ("DRAM", 0)
        return self._agent.get_xfer_descs([(self._buf.data_ptr() + offset, end - offset, dev)], mem)

    # exporter side

    def export(self, tensor: torch.Tensor, key: str, *, keep: bool = False) -> TensorHandle:
        """Copy `tensor` (any device) into a free pool region and describe it for an importer.

        The region is freed by the importer's notification, or with `keep` only by `release`
        (for bytes a retried request may read again)."""
        self._check_running()
        if key in self._exports:
            raise ValueError(f"key {key!r} is already exported")
        data = tensor.detach().contiguous().view(-1).view(torch.uint8)
        offset = self._pool.alloc(data.numel() + _TAG)
        end = offset + data.numel() + _TAG
        try:
            self._buf[offset : end - _TAG].copy_(data)
            digest = torch.frombuffer(bytearray(_digest(key)), dtype=torch.uint8)
            self._buf[end - _TAG : end].copy_(digest)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # NIXL does not order after the stream
            descriptors = self._agent.get_serialized_descs(self._descs(offset, end))
        except BaseException:
            self._free(offset)
            raise
        self._exports[key] = _Export(offset, end, keep=keep)
        self._wake.set()
        return TensorHandle(
            agent=self.name,
            agent_metadata=self._metadata,
            descriptors=descriptors,
            shape=tuple(tensor.shape),
            dtype=str(tensor.dtype).removeprefix("torch."),
            device=str(self.device),
            key=key,
            offset=offset,
            ipc=self._ipc,
            gpu=self._gpu,
        )

    async def export_when_space(
        self, tensor: torch.Tensor, key: str, timeout: float, *, keep: bool = False
    ) -> TensorHandle:
        """`export`, waiting up to `timeout` seconds while the pool is full."""
        deadline = asyncio.get_running_loop().time() + timeout
        nbytes = tensor.numel() * tensor.element_size() + _TAG
        return await self._when_space(lambda: self.export(tensor, key, keep=keep), nbytes, deadline)

    async def wait_released(self, key: str, timeout: float) -> bool:
        """Whether the importer notified completion of `key` within `timeout` seconds.

        The export is settled and its region freed either way; an unknown key gives False.
        """
        export = self._exports.get(key)
        if export is None:
            return False
        try:
            async with asyncio.timeout(timeout):
                await export.done.wait()
        except TimeoutError:
            pass
        finally:
            self.release(key)
        return export.notified

    def release(self, key: str) -> None:
        """Settle the export of `key` now and free its region (idempotent)."""
        export = self._exports.pop(key, None)
        if export is not None:
            self._free_export(export)
            export.done.set()

    def _free_export(self, export: _Export) -> None:
        if export.offset is not None:
            self._buf[export.end - _TAG : export.end].zero_()  # a late fetch fails
            self._free(export.offset)
            export.offset = None

    def _free(self, offset: int) -> None:
        self._pool.free(offset)
        self._space.set()

    async def _when_space(self, attempt: Callable[[], T], nbytes: int, deadline: float) -> T:
        """`attempt()`, retried each time a region is freed while it meets a full pool, until
        `deadline` (PoolFull when `nbytes` never fits, or the wait runs out)."""
        while True:
            try:
                return attempt()
            except PoolFull:
                if nbytes > self._pool_bytes:
                    raise
                self._space.clear()
                try:
                    async with asyncio.timeout_at(deadline):
                        await self._space.wait()
                except TimeoutError:
                    raise PoolFull(f"no space for {nbytes} bytes before the deadline") from None

    async def _poll_notifs(self) -> None:
        """Poll NIXL's notifications (which progresses UCX) every millisecond while exports
        are outstanding or a notification this agent sent may still be on its way."""
        loop = asyncio.get_running_loop()
        while True:
            if not self._exports and loop.time() >= self._flush_until:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                notifs = self._agent.get_new_notifs()  # {str agent name: [bytes message]}
            except Exception:
                log.exception("%s: cannot poll notifications", self.name)
                await asyncio.sleep(1.0)
                continue
            for message in (m for messages in notifs.values() for m in messages):
                export = self._exports.get(bytes(message).decode(errors="replace"))
                if export is not None and not export.notified:
                    export.notified = True
                    if not export.keep:
                        self._free_export(export)
                    export.done.set()
            await asyncio.sleep(0.001)

    # importer side

    async def fetch(self, ref: TensorHandle, timeout: float) -> torch.Tensor:
        """READ the tensor behind `ref` into a new tensor on this agent's device.

        Waits while this pool is full. Raises TransferError when the exporter is gone or
        released the export, or the READ fails or is not done within `timeout` seconds;
        PoolFull when the tensor is larger than the pool or no space came in time.
        The timeout bounds the wait for the READ, not NIXL's own synchronous calls: connecting
        to a new exporter that has died fails within ~0.1 s on one host, a known one at once.
        """
        self._check_running()
        deadline = asyncio.get_running_loop().time() + timeout
        dtype = _dtype(ref.dtype)
        nbytes = math.prod(ref.shape) * dtype.itemsize
        if ref.ipc and self._gpu and ref.gpu == self._gpu:
            mapped = self._map(ref)
            if mapped is not None:
                return self._copy_mapped(ref, mapped, nbytes, dtype)
        offset = await self._when_space(
            lambda: self._pool.alloc(nbytes + _TAG), nbytes + _TAG, deadline
        )
        end = offset + nbytes + _TAG
        keep = False  # when NIXL cannot abort a READ, its region is never reused
        try:
            handle = None
            try:
                with nvtx.span("mm:nixl:begin_read"):
                    local = self._descs(offset, end)
                    self._add_remote(ref)
                    remote = self._agent.deserialize_descs(ref.descriptors)
                    handle = self._agent.initialize_xfer("READ", local, remote, ref.agent)
                with nvtx.span("mm:nixl:wait_completion"):
                    await self._complete(handle, ref, deadline)
            except TransferError:
                raise
            except Exception as e:
                if type(e).__name__ == "nixlRemoteDisconnectError":
                    self._forget(ref.agent)
                raise TransferError(f"reading {ref.key!r} from {ref.agent} failed: {e!r}") from e
            finally:
                if handle is not None:
                    keep = not self._release_xfer(handle, ref)
            region = self._buf[offset:end]
            if region[nbytes:].cpu().numpy().tobytes() != _digest(ref.key):
                raise TransferError(f"{ref.agent} released {ref.key!r} before it was read")
            self._notify(ref)
            out = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            out.copy_(region[:nbytes])
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # before the region can be read into again
            return out.view(dtype).view(ref.shape)
        finally:
            if not keep:
                self._free(offset)

    def _map(self, ref: TensorHandle) -> torch.Tensor | None:
        """The exporter's pool mapped into this process (None if CUDA IPC fails here)."""
        pool = self._mapped.get(ref.agent)
        if pool is None:
            try:
                args = list(pickle.loads(ref.ipc))  # from the trusted control plane only
                args[_IPC_DEVICE] = self.device.index
                pool = reductions.rebuild_cuda_tensor(*args)  # type: ignore[no-untyped-call]
            except Exception as e:
                log.warning(
                    "%s: cannot map %s's pool (%r); reading over NIXL", self.name, ref.agent, e
                )
                return None
            self._mapped[ref.agent] = pool
        return pool

    def _copy_mapped(
        self, ref: TensorHandle, pool: torch.Tensor, nbytes: int, dtype: torch.dtype
    ) -> torch.Tensor:
        """The same-GPU path: copy the export straight out of the exporter's mapped pool."""
        region = pool[ref.offset : ref.offset + nbytes + _TAG]
        if region.numel() != nbytes + _TAG:
            raise TransferError(f"{ref.key!r} lies outside {ref.agent}'s pool")
        if self._copies is None:
            self._copies = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
        with nvtx.span("mm:nixl:wait_completion"), torch.cuda.stream(self._copies):
            # a stream of its own: the copy does not queue behind this process's decode steps
            out = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            out.copy_(region[:nbytes])
            tag = region[nbytes:].cpu().numpy().tobytes()  # after the copy, on its stream
        out.record_stream(torch.cuda.default_stream(self.device))  # where it will be read
        if tag != _digest(ref.key):
            raise TransferError(f"{ref.agent} released {ref.key!r} before it was read")
        self._notify(ref)
        return out.view(dtype).view(ref.shape)

    def _notify(self, ref: TensorHandle) -> None:
        """Tell the exporter its export was read (so it frees the region).

        NIXL does not track a notification that UCX could not send at once (the first one to
        a peer waits for the connection): without a progress thread, only this agent's own
        calls move it on, so the poller keeps progressing UCX for `FLUSH_S` after each one.
        """
        try:
            self._add_remote(ref)
            self._agent.send_notif(ref.agent, ref.key.encode())
        except Exception as e:
            log.warning("%s: cannot notify %s of %r: %r", self.name, ref.agent, ref.key, e)
        self._flush_until = asyncio.get_running_loop().time() + FLUSH_S
        self._wake.set()

    def _add_remote(self, ref: TensorHandle) -> None:
        if ref.agent not in self._remotes:
            name = self._agent.add_remote_agent(ref.agent_metadata)
            name = name.decode() if isinstance(name, bytes) else str(name)  # bytes, in fact
            if name != ref.agent:
                raise TransferError(f"metadata of agent {name} came as {ref.agent}'s")
            self._remotes.add(name)

    def _forget(self, agent: str) -> None:
        """Drop a remote agent that disconnected (agent names are never reused)."""
        self._remotes.discard(agent)
        self._mapped.pop(agent, None)
        try:
            self._agent.remove_remote_agent(agent)
        except Exception as e:
            log.debug("%s: cannot remove remote agent %s: %r", self.name, agent, e)

    def _release_xfer(self, handle: Any, ref: TensorHandle) -> bool:
        try:
            handle.release()  # aborts a READ still under way
        except Exception:
            log.exception("%s: cannot abort the READ of %r; its region leaks", self.name, ref.key)
            return False
        return True

    async def _complete(self, handle: Any, ref: TensorHandle, deadline: float) -> None:
        """Post the READ and wait until it is done: yield briefly, then sleep 50 µs to 1 ms."""
        loop = asyncio.get_running_loop()
        state = self._agent.transfer(handle)
        spin_until, delay = loop.time() + _SPIN_S, 50e-6
        while state == "PROC":
            now = loop.time()
            if now >= deadline:
                raise TransferError(f"reading {ref.key!r} from {ref.agent} timed out")
            if now < spin_until:
                await asyncio.sleep(0)
            else:
                await asyncio.sleep(min(delay, deadline - now))
                delay = min(delay * 2, 1e-3)
            state = self._agent.check_xfer_state(handle)
        if state != "DONE":
            raise TransferError(f"reading {ref.key!r} from {ref.agent} failed ({state})")
