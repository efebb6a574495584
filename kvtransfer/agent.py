"""Block-level KV transfer between rank processes: the interface both backends implement (`nixl`
over UCX, and the portable socket fallback in `local_backend`), and `make_agent` which picks one.

This sits below `kvtransfer.base` (which moves one request's gathered KV): here each rank process
moves byte ranges of its own cache tensor straight into a peer rank's cache tensor, as planned by
`kvtransfer.remap`.

Lifecycle, per rank process:
1. `agent = make_agent("auto", name, cache)` registers the whole cache tensor once.
2. `agent.metadata()` -> bytes to publish through any channel (a Redis key, a gRPC field, a pipe);
   each peer calls `agent.add_peer(those_bytes)`.
3. Sending side: `t = agent.send(peer, descs, transfer_id, timeout_s)` returns at once; the data
   is written into the peer's cache (one-sided WRITE) and the peer is told when it has landed.
   Receiving side: `r = agent.receive(transfer_id, timeout_s)`.
4. Both sides call `poll()` (it never blocks for long; the step loop also calls
   `agent.progress()` once per step): BOOTSTRAPPING (the peer's metadata is not loaded yet)
   -> TRANSFERRING -> DONE | FAILED. A transfer that fails, times out or is cancelled releases its
   handles; the caller then frees the blocks it had pinned for it.
5. `agent.close()` cancels what is in flight, forgets peers and deregisters the cache.
"""

from __future__ import annotations

import base64
import enum
import json
import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import torch

log = logging.getLogger(__name__)

BackendKind = Literal["auto", "nixl", "local"]


class BlockTransferState(enum.Enum):
    BOOTSTRAPPING = "bootstrapping"
    TRANSFERRING = "transferring"
    DONE = "done"
    FAILED = "failed"

    @property
    def finished(self) -> bool:
        return self in (BlockTransferState.DONE, BlockTransferState.FAILED)


@dataclass(frozen=True)
class AgentInfo:
    """What a rank publishes so that peers can write into its cache."""

    name: str
    backend: str  # "nixl" | "local"
    base_addr: int  # address of the cache tensor in the owning process
    nbytes: int
    endpoint: bytes  # NIXL agent metadata, or b"host:port" for the socket fallback

    def to_bytes(self) -> bytes:
        doc = {"name": self.name, "backend": self.backend, "base_addr": self.base_addr,
               "nbytes": self.nbytes, "endpoint": base64.b64encode(self.endpoint).decode()}
        return json.dumps(doc).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> AgentInfo:
        doc = json.loads(data)
        return cls(str(doc["name"]), str(doc["backend"]), int(doc["base_addr"]), int(doc["nbytes"]),
                   base64.b64decode(doc["endpoint"]))


def check_descriptors(descs: np.ndarray, src_nbytes: int, dst_nbytes: int) -> np.ndarray:
    """Validate an (N, 3) array of (src_offset, dst_offset, length) against both regions."""
    d = np.asarray(descs, dtype=np.int64).reshape(-1, 3)
    if len(d) and (d.min() < 0 or (d[:, 0] + d[:, 2]).max() > src_nbytes
                   or (d[:, 1] + d[:, 2]).max() > dst_nbytes):
        raise ValueError(f"descriptors fall outside the regions ({src_nbytes} / {dst_nbytes} bytes)")
    return d


def chunk_descriptors(descs: np.ndarray, chunk_bytes: int) -> list[np.ndarray]:
    """Split descriptors, in order, into groups of about `chunk_bytes` (never over twice that)."""
    d = np.asarray(descs, dtype=np.int64).reshape(-1, 3)
    pieces = np.maximum(1, -(-d[:, 2] // chunk_bytes))
    if (pieces > 1).any():
        rows = np.repeat(d, pieces, axis=0)
        first = np.repeat(np.cumsum(pieces) - pieces, pieces)
        skip = (np.arange(len(rows)) - first) * chunk_bytes
        rows[:, 0] += skip
        rows[:, 1] += skip
        rows[:, 2] = np.minimum(chunk_bytes, rows[:, 2] - skip)
        d = rows
    group = (np.cumsum(d[:, 2]) - 1) // chunk_bytes
    return [d[group == g] for g in np.unique(group)] if len(d) else []


class BlockTransfer(ABC):
    """One side of one transfer."""

    transfer_id: str
    error: str | None = None

    @abstractmethod
    def poll(self) -> BlockTransferState:
        """Where the transfer stands, without waiting on the peer (NIXL on host memory may spend
        one chunk's copy here). Past its timeout it is FAILED."""

    @abstractmethod
    def cancel(self) -> None:
        """Give up; releases the transfer's handles. A no-op once finished."""

    def wait(self, interval_s: float = 0.0005) -> BlockTransferState:
        """Poll until finished (tests, benchmarks; the engine polls from its step instead)."""
        while not (state := self.poll()).finished:
            time.sleep(interval_s)
        return state


class Arrivals(Protocol):
    def arrived(self, transfer_id: str) -> bool | None:
        """True once the sender said the data landed, False if it said it failed, else None."""


class AwaitedReceive(BlockTransfer):
    """The receiving side of a one-sided transfer: it only waits for the sender's word."""

    def __init__(self, agent: Arrivals, transfer_id: str, timeout_s: float, broken: str) -> None:
        self.agent, self.transfer_id = agent, transfer_id
        self.deadline = time.monotonic() + timeout_s
        self.timeout_s = timeout_s
        self.broken = broken  # what a failure reported by the sender means on this backend
        self.state = BlockTransferState.TRANSFERRING

    def poll(self) -> BlockTransferState:
        if self.state.finished:
            return self.state
        landed = self.agent.arrived(self.transfer_id)
        if landed is True:
            self.state = BlockTransferState.DONE
        elif landed is False:
            self._fail(self.broken)
        elif time.monotonic() > self.deadline:
            self._fail(f"timed out after {self.timeout_s:g}s")
        return self.state

    def _fail(self, reason: str) -> None:
        self.error = reason
        self.state = BlockTransferState.FAILED

    def cancel(self) -> None:
        if not self.state.finished:
            self._fail("cancelled")


class TransferGroup:
    """Several transfers seen as one (e.g. one source rank feeding several destination ranks)."""

    def __init__(self, transfers: list[BlockTransfer]) -> None:
        self.transfers = transfers

    def poll(self) -> BlockTransferState:
        states = [t.poll() for t in self.transfers]
        if BlockTransferState.FAILED in states:
            self.cancel()
            return BlockTransferState.FAILED
        if all(s is BlockTransferState.DONE for s in states):
            return BlockTransferState.DONE
        if BlockTransferState.BOOTSTRAPPING in states:
            return BlockTransferState.BOOTSTRAPPING
        return BlockTransferState.TRANSFERRING

    def cancel(self) -> None:
        for t in self.transfers:
            t.cancel()


class BlockTransferAgent(ABC):
    """One per rank process; owns the registration of that rank's cache tensor."""

    backend_name: str

    def __init__(self, name: str, cache: torch.Tensor) -> None:
        if not cache.is_contiguous():
            raise ValueError("the KV cache tensor must be contiguous (it is registered as one region)")
        self.name = name
        self.cache = cache
        self.nbytes = cache.numel() * cache.element_size()
        self.peers: dict[str, AgentInfo] = {}

    @property
    @abstractmethod
    def info(self) -> AgentInfo: ...

    def metadata(self) -> bytes:
        return self.info.to_bytes()

    def add_peer(self, metadata: bytes) -> str:
        """Load a peer's published metadata; returns its name."""
        peer = AgentInfo.from_bytes(metadata)
        if peer.backend != self.backend_name:
            raise ValueError(f"peer {peer.name} uses backend {peer.backend!r}, this agent {self.backend_name!r}")
        self._connect(peer)
        self.peers[peer.name] = peer
        return peer.name

    @abstractmethod
    def _connect(self, peer: AgentInfo) -> None:
        """Backend hook run when a peer is added."""

    @abstractmethod
    def progress(self) -> None:
        """Let the backend make progress while nothing is polled; call it from the step loop."""

    @abstractmethod
    def remove_peer(self, name: str) -> None: ...

    @abstractmethod
    def send(self, peer: str, descs: np.ndarray, transfer_id: str, timeout_s: float) -> BlockTransfer:
        """Write local ranges into `peer`'s cache: descs rows are (src_offset, dst_offset, length)."""

    @abstractmethod
    def receive(self, transfer_id: str, timeout_s: float) -> BlockTransfer:
        """Await a transfer `transfer_id` written into this agent's cache."""

    @property
    @abstractmethod
    def open_transfers(self) -> int:
        """Transfers whose handles are not released yet (0 once everything finished)."""

    @abstractmethod
    def close(self) -> None: ...


_agent_host = "127.0.0.1"


def set_agent_host(host: str) -> None:
    """The address this process's socket agents listen on and publish: the slot's own (`--host`).
    Process-wide because a group's follower ranks open their agents from a broadcast message,
    which cannot carry each rank's address."""
    global _agent_host
    _agent_host = host


def make_agent(kind: BackendKind, name: str, cache: torch.Tensor) -> BlockTransferAgent:
    """The agent for `kind`; `auto` is NIXL where it imports and passes a self-test, else local."""
    from .local_backend import LocalAgent

    if kind == "local":
        return LocalAgent(name, cache, _agent_host)
    from . import nixl_backend

    if kind == "nixl" or nixl_backend.nixl_works():
        log.info("kvtransfer: agent %s uses the nixl backend", name)
        return nixl_backend.NixlAgent(name, cache)
    log.info("kvtransfer: agent %s uses the local (socket) backend: NIXL unavailable", name)
    return LocalAgent(name, cache, _agent_host)
