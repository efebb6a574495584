"""Moving one request's KV from a prefill group to a decode group: the interface every backend
implements (the gRPC byte-stream backend here; NIXL/UCX later).

Lifecycle on the prefill side: `sender = backend.sender(decode_address)`, `sender.send(handoff)`
returns at once; `poll()` says PENDING -> TRANSFERRING -> DONE | FAILED without blocking
(`wait()` awaits the end). On the decode side the receiver hands each complete handoff to the
node (`on_arrival`), whose answer (None, or an error) goes back to the sender; `poll(request_id)`
says where a given request's KV stands (`kvtransfer.state.TransferState`, the one state of both
KV paths; importable from here too).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from services.engine import KVExport
from services.rpc import pb

from .state import TransferState

__all__ = ["ArrivalHandler", "KVBackend", "KVHandoff", "KVReceiver", "KVSender", "TransferState"]


@dataclass(frozen=True)
class KVHandoff:
    """Everything the decode group needs to continue a prefilled request."""

    request: pb.QueuedRequest
    output_ids: tuple[int, ...]  # tokens generated so far (at least the first)
    kv: KVExport
    epoch: int = 0


# The decode node's answer to an arrived handoff: None = admitted, else why not.
ArrivalHandler = Callable[[KVHandoff], Awaitable[pb.Error | None]]


class KVSender(ABC):
    """One transfer of one request's KV to one decode group."""

    error: pb.Error | None = None

    @abstractmethod
    def send(self, handoff: KVHandoff) -> None:
        """Start the transfer; returns immediately."""

    @abstractmethod
    def poll(self) -> TransferState:
        """Where the transfer stands; never blocks."""

    @abstractmethod
    async def wait(self) -> TransferState:
        """Await DONE or FAILED (then `error` says why)."""

    @abstractmethod
    def cancel(self) -> None:
        """Give up on the transfer (the request was cancelled)."""


class KVReceiver(ABC):
    """The decode side: accepts handoffs and passes each to the node once it has fully landed."""

    @abstractmethod
    def poll(self, request_id: str) -> TransferState:
        """PENDING if nothing arrived yet, TRANSFERRING while bytes land, DONE once admitted, FAILED."""


class KVBackend(ABC):
    name: str  # what /metrics shows (nitsum_kv_transfer_backend)

    @abstractmethod
    def sender(self, address: str) -> KVSender:
        """A sender to the decode group leader at `address`."""

    @abstractmethod
    async def close(self) -> None:
        """Cancel transfers in flight and release connections."""
