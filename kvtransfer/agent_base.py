"""The block-level KV transfer interface both backends implement (`nixl_backend` over UCX, and
the portable socket fallback `local_backend`): a rank process moves byte ranges of its own cache
tensor straight into a peer rank's cache tensor, as planned by `kvtransfer.remap`.
`kvtransfer.agent.make_agent` picks the backend; the lifecycle is in its module docstring.
"""

from __future__ import annotations

import base64
import json
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from .state import TransferState


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
    def poll(self) -> TransferState:
        """Where the transfer stands, without waiting on the peer (NIXL on host memory may spend
        one chunk's copy here). Past its timeout it is FAILED."""

    @abstractmethod
    def cancel(self) -> None:
        """Give up; releases the transfer's handles. A no-op once finished."""

    def wait(self, interval_s: float = 0.0005) -> TransferState:
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
        self.state = TransferState.TRANSFERRING

    def poll(self) -> TransferState:
        if self.state.finished:
            return self.state
        landed = self.agent.arrived(self.transfer_id)
        if landed is True:
            self.state = TransferState.DONE
        elif landed is False:
            self._fail(self.broken)
        elif time.monotonic() > self.deadline:
            self._fail(f"timed out after {self.timeout_s:g}s")
        return self.state

    def _fail(self, reason: str) -> None:
        self.error = reason
        self.state = TransferState.FAILED

    def cancel(self) -> None:
        if not self.state.finished:
            self._fail("cancelled")


class TransferGroup:
    """Several transfers seen as one (e.g. one source rank feeding several destination ranks)."""

    def __init__(self, transfers: list[BlockTransfer]) -> None:
        self.transfers = transfers

    def poll(self) -> TransferState:
        states = [t.poll() for t in self.transfers]
        if TransferState.FAILED in states:
            self.cancel()
            return TransferState.FAILED
        if all(s is TransferState.DONE for s in states):
            return TransferState.DONE
        if TransferState.BOOTSTRAPPING in states:
            return TransferState.BOOTSTRAPPING
        return TransferState.TRANSFERRING

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
