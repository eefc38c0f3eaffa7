"""One contiguous tensor per transfer between processes, over NIXL (UCX).

Each process runs one `TransferAgent`, which registers one memory pool with NIXL once, at start.
The exporter copies a tensor into a free region of its pool and hands the importer a `TensorRef`
(inside a protocol message); the importer READs the region into its own pool, copies it out, and
notifies the exporter, which frees the region. Every `export` must end in `wait_released` or
`release`; the exporter's wait should outlast the importer's fetch timeout, since a region that is
freed while a READ is under way may be reused.

Security: a `TensorRef` carries NIXL agent metadata and *pickled* descriptors, unpickled by
`fetch`. Accept refs only from the authenticated control plane (NATS), never from HTTP clients.

Transport: UCX reads ``UCX_TLS`` when an agent starts. If it is unset, `start` sets it to
`DEFAULT_UCX_TLS` for a CPU pool; a CUDA pool keeps UCX's default (all transports), which also
brings the CUDA and RDMA ones. ``tcp`` must be among them: NIXL's UCX backend fails to start with
shared memory alone (``UCX endpoint create failed``). Pools in VRAM from PyTorch's caching
allocator with ``expandable_segments:True`` silently fall back to TCP.
"""

import asyncio
import bisect
import hashlib
import importlib
import logging
import math
import os
import secrets
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger(__name__)

DEFAULT_UCX_TLS = "tcp,cma,sm,self"
"""TCP for connection set-up and notifications, cross-memory attach for the bytes on one host."""
ALIGN = 256
"""Pool regions start on multiples of this many bytes."""
_TAG = 8
"""Bytes after each exported tensor: a digest of its key, zeroed on release, checked on fetch."""


class PoolFull(RuntimeError):
    """The pool has no free region large enough."""


class TransferError(RuntimeError):
    """A fetch failed or timed out."""


@dataclass(frozen=True)
class TensorRef:
    """Everything an importer needs to fetch one exported tensor (travels over NATS only)."""

    agent: str
    """The exporter's agent name."""
    agent_metadata: bytes
    """The exporter's agent metadata; the importer loads it once per agent name."""
    descriptors: bytes
    """The exported region as a pickled NIXL transfer descriptor list."""
    shape: tuple[int, ...]
    dtype: str
    """Torch dtype name without ``torch.``, e.g. "bfloat16"."""
    device: str
    """The exporter's pool device: "cpu", "cuda" or "cuda:N"."""
    key: str
    """Unique per export; the importer's completion notification carries it."""


class RegionAllocator:
    """First-fit allocator of aligned byte ranges in ``[0, size)``; freeing merges neighbours."""

    def __init__(self, size: int, align: int = ALIGN) -> None:
        self._align = align
        self._free: list[tuple[int, int]] = [(0, size)] if size > 0 else []
        """Free (offset, length) blocks, sorted by offset, never adjacent."""
        self._used: dict[int, int] = {}
        self.in_use = 0

    def alloc(self, nbytes: int) -> int:
        """The offset of a fresh region of at least `nbytes` (at least one) bytes."""
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
        """Return the region at `offset` to the free list."""
        length = self._used.pop(offset)
        self.in_use -= length
        i = bisect.bisect(self._free, (offset, length))
        if i < len(self._free) and self._free[i][0] == offset + length:
            length += self._free.pop(i)[1]
        if i > 0 and sum(self._free[i - 1]) == offset:
            offset, length = self._free[i - 1][0], self._free[i - 1][1] + length
            i -= 1
            del self._free[i]
        self._free.insert(i, (offset, length))


@dataclass(eq=False)
class _Export:
    offset: int | None
    """The region, until it is freed."""
    end: int
    """Where the region's tag ends."""
    done: asyncio.Event = field(default_factory=asyncio.Event)
    notified: bool = False


def _tag(key: str) -> bytes:
    return hashlib.blake2b(key.encode(), digest_size=_TAG).digest()


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise TransferError(f"unknown dtype {name!r}")
    return dtype


class TransferAgent:
    """One NIXL agent per process, with one memory pool registered once at start.

    All methods run on the event loop's thread. Copies into and out of the pool, and NIXL's
    own calls, are synchronous (a 64 MiB copy holds the loop for milliseconds).
    """

    def __init__(self, name: str, device: str = "cpu", pool_bytes: int = 256 << 20) -> None:
        self.name = f"{name}-{os.getpid()}-{secrets.token_hex(3)}"
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._pool = RegionAllocator(pool_bytes)
        self._pool_bytes = pool_bytes
        self._agent: Any = None
        self._buf = torch.empty(0, dtype=torch.uint8)
        self._reg: Any = None
        self._metadata = b""
        self._remotes: set[str] = set()
        self._exports: dict[str, _Export] = {}
        self._wake = asyncio.Event()
        self._poller: asyncio.Task[None] | None = None

    @property
    def pool_in_use(self) -> int:
        """Bytes of the pool now held by exports and fetches."""
        return self._pool.in_use

    @property
    def _mem(self) -> tuple[str, int]:
        cuda = self.device.type == "cuda"
        return ("VRAM", self.device.index or 0) if cuda else ("DRAM", 0)

    async def start(self) -> None:
        """Create the agent (UCX backend), allocate the pool and register it."""
        if self.device.type == "cpu":
            os.environ.setdefault("UCX_TLS", DEFAULT_UCX_TLS)
        api = importlib.import_module("nixl_cu12._api")
        config = api.nixl_agent_config(backends=["UCX"])
        self._agent = api.nixl_agent(self.name, config)
        self._buf = torch.empty(self._pool_bytes, dtype=torch.uint8, device=self.device)
        self._reg = self._agent.register_memory(self._buf)
        self._metadata = self._agent.get_agent_metadata()
        self._poller = asyncio.get_running_loop().create_task(
            self._poll_notifs(), name=f"nixl-notifs-{self.name}"
        )

    async def close(self) -> None:
        """Stop the poller, drop every export and deregister the pool. Safe to call twice."""
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
            self._poller = None
        for key in list(self._exports):
            self.release(key)
        if self._reg is not None:
            self._agent.deregister_memory(self._reg)
            self._reg = None
        self._agent = None

    # exporter side

    def export(self, tensor: torch.Tensor, key: str) -> TensorRef:
        """Copy `tensor` into a free pool region and describe it for an importer."""
        if key in self._exports:
            raise ValueError(f"key {key!r} is already exported")
        data = tensor.detach().contiguous().view(-1).view(torch.uint8)
        nbytes = data.numel()
        offset = self._pool.alloc(nbytes + _TAG)
        end = offset + nbytes + _TAG
        self._buf[offset : offset + nbytes].copy_(data)
        self._buf[end - _TAG : end].copy_(torch.tensor(list(_tag(key)), dtype=torch.uint8))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        mem, dev = self._mem
        descs = self._agent.get_xfer_descs(
            [(self._buf.data_ptr() + offset, end - offset, dev)], mem
        )
        self._exports[key] = _Export(offset, end)
        self._wake.set()
        return TensorRef(
            agent=self.name,
            agent_metadata=self._metadata,
            descriptors=self._agent.get_serialized_descs(descs),
            shape=tuple(tensor.shape),
            dtype=str(tensor.dtype).removeprefix("torch."),
            device=str(self.device),
            key=key,
        )

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
            self._buf[export.end - _TAG : export.end].zero_()  # a late fetch now fails
            self._pool.free(export.offset)
            export.offset = None

    async def _poll_notifs(self) -> None:
        """Poll NIXL notifications every millisecond while exports are outstanding."""
        while True:
            if not self._exports:
                self._wake.clear()
                await self._wake.wait()
                continue
            for messages in self._agent.get_new_notifs().values():
                for message in messages:
                    key = bytes(message).decode(errors="replace")
                    export = self._exports.get(key)
                    if export is None:
                        log.debug("%s: notification for unknown export %r", self.name, key)
                    elif not export.notified:
                        export.notified = True
                        self._free_export(export)
                        export.done.set()
            await asyncio.sleep(0.001)

    # importer side

    async def fetch(self, ref: TensorRef, timeout: float) -> torch.Tensor:
        """READ the tensor behind `ref` into a fresh tensor on this agent's device.

        Raises TransferError if the exporter is gone, released the region, or the READ does not
        finish within `timeout` seconds; PoolFull if this pool has no room for it.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        dtype = _dtype(ref.dtype)
        nbytes = math.prod(ref.shape) * dtype.itemsize
        offset = self._pool.alloc(nbytes + _TAG)
        end = offset + nbytes + _TAG
        stuck = False
        try:
            try:
                self._add_remote(ref)
                mem, dev = self._mem
                local = self._agent.get_xfer_descs(
                    [(self._buf.data_ptr() + offset, end - offset, dev)], mem
                )
                remote = self._agent.deserialize_descs(ref.descriptors)
                handle = self._agent.initialize_xfer("READ", local, remote, ref.agent)
            except Exception as e:
                raise TransferError(f"cannot read {ref.key!r} from {ref.agent}: {e!r}") from e
            try:
                await self._complete(handle, ref, deadline)
            finally:
                try:
                    handle.release()
                except Exception:
                    # NIXL could not abort the READ: the region may still be written into.
                    log.exception("%s: cannot release the READ of %r", self.name, ref.key)
                    stuck = True
            region = self._buf[offset:end]
            if bytes(region[nbytes:].cpu().tolist()) != _tag(ref.key):
                raise TransferError(f"export {ref.key!r} was released before it was read")
            try:
                self._agent.send_notif(ref.agent, ref.key.encode())
            except Exception:
                log.warning("%s: cannot notify %s of %r", self.name, ref.agent, ref.key)
            out = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            out.copy_(region[:nbytes])
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            return out.view(dtype).view(ref.shape)
        finally:
            if not stuck:
                self._pool.free(offset)

    def _add_remote(self, ref: TensorRef) -> None:
        if ref.agent in self._remotes:
            return
        name = self._agent.add_remote_agent(ref.agent_metadata)
        name = name.decode() if isinstance(name, bytes) else str(name)  # NIXL returns bytes
        if name != ref.agent:
            raise TransferError(f"metadata of agent {name} does not match {ref.agent}")
        self._remotes.add(name)

    async def _complete(self, handle: Any, ref: TensorRef, deadline: float) -> None:
        """Post the transfer and poll it until done: spin briefly, then back off to 1 ms."""
        loop = asyncio.get_running_loop()
        try:
            state = self._agent.transfer(handle)
        except Exception as e:
            raise TransferError(f"cannot read {ref.key!r} from {ref.agent}: {e!r}") from e
        spin_until = loop.time() + 200e-6
        delay = 50e-6
        while state == "PROC":
            now = loop.time()
            if now >= deadline:
                raise TransferError(f"timed out reading {ref.key!r} from {ref.agent}")
            if now < spin_until:
                await asyncio.sleep(0)
            else:
                await asyncio.sleep(min(delay, deadline - now))
                delay = min(delay * 2, 1e-3)
            try:
                state = self._agent.check_xfer_state(handle)
            except Exception as e:
                raise TransferError(f"reading {ref.key!r} from {ref.agent} failed: {e!r}") from e
        if state != "DONE":
            raise TransferError(f"reading {ref.key!r} from {ref.agent} failed ({state})")
