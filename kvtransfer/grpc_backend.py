"""The portable KV backend: a request's KV as bytes, streamed in chunks over gRPC
(`KVTransfer.PushKV`) from the prefill leader to the decode leader's server.

The payload is the KVExport's tensors (all KV heads, gathered over the sender's TP ranks), so a
decode group of any TP degree can scatter it onto its own ranks.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import AsyncIterator

import grpc
import torch

from services.engine import KVExport
from services.rpc import ChannelPool, error, pb, pb_grpc
from services.tasks import TaskSet

from .base import ArrivalHandler, KVBackend, KVHandoff, KVReceiver, KVSender
from .faults import maybe_die
from .state import TransferState

log = logging.getLogger(__name__)


def kv_to_bytes(kv: KVExport) -> bytes:
    buf = io.BytesIO()
    torch.save({"num_tokens": kv.num_tokens, "k": kv.k.contiguous(), "v": kv.v.contiguous()}, buf)
    return buf.getvalue()


def kv_from_bytes(data: bytes) -> KVExport:
    doc = torch.load(io.BytesIO(data), weights_only=True)
    return KVExport(int(doc["num_tokens"]), doc["k"], doc["v"])


class GrpcKVSender(KVSender):
    def __init__(self, stub: pb_grpc.KVTransferStub, tasks: TaskSet, chunk_bytes: int, timeout_s: float) -> None:
        self._stub = stub
        self._tasks = tasks
        self._chunk = chunk_bytes
        self._timeout = timeout_s
        self._state = TransferState.PENDING
        self._task: asyncio.Task[None] | None = None
        self.bytes_sent = 0
        self.seconds = 0.0

    def send(self, handoff: KVHandoff) -> None:
        self._task = self._tasks.spawn(self._push(handoff), name=f"kv-send-{handoff.request.request_id}")

    def poll(self) -> TransferState:
        return self._state

    async def wait(self) -> TransferState:
        if self._task is not None:
            await asyncio.wait([self._task])
        return self._state

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _push(self, handoff: KVHandoff) -> None:
        started = time.perf_counter()
        self._state = TransferState.TRANSFERRING
        try:
            data = await asyncio.to_thread(kv_to_bytes, handoff.kv)
            header = pb.KVHandoffHeader(request=handoff.request, output_ids=handoff.output_ids,
                                        num_tokens=handoff.kv.num_tokens, total_bytes=len(data), epoch=handoff.epoch)
            ack = await self._stub.PushKV(self._chunks(header, data), timeout=self._timeout)
            self.bytes_sent = len(data)
            if ack.error.kind != pb.ERROR_KIND_UNSPECIFIED:
                self.error, self._state = ack.error, TransferState.FAILED
            else:
                self._state = TransferState.DONE
        except grpc.aio.AioRpcError as e:
            self.error = error(pb.UNAVAILABLE, f"KV transfer failed: {e.code().name}: {e.details()}")
            self._state = TransferState.FAILED
        except asyncio.CancelledError:
            self.error = error(pb.CANCELLED, "KV transfer cancelled")
            self._state = TransferState.FAILED
            raise
        finally:
            self.seconds = time.perf_counter() - started

    async def _chunks(self, header: pb.KVHandoffHeader, data: bytes) -> AsyncIterator[pb.KVChunk]:
        view = memoryview(data)
        for i, start in enumerate(range(0, max(len(data), 1), self._chunk)):
            piece = bytes(view[start:start + self._chunk])
            yield pb.KVChunk(header=header, data=piece) if i == 0 else pb.KVChunk(data=piece)


class GrpcKVReceiver(KVReceiver, pb_grpc.KVTransferServicer):
    """Served by the decode leader's gRPC server; admits each landed request via `on_arrival`."""

    def __init__(self, on_arrival: ArrivalHandler) -> None:
        self._on_arrival = on_arrival
        self._states: dict[str, TransferState] = {}
        self.bytes_received = 0

    def poll(self, request_id: str) -> TransferState:
        return self._states.get(request_id, TransferState.PENDING)

    def forget(self, request_id: str) -> None:
        self._states.pop(request_id, None)

    async def PushKV(self, request_iterator: AsyncIterator[pb.KVChunk], context: grpc.aio.ServicerContext) -> pb.KVAck:  # noqa: N802
        header: pb.KVHandoffHeader | None = None
        parts: list[bytes] = []
        async for chunk in request_iterator:
            if header is None:
                header = chunk.header
                self._states[header.request.request_id] = TransferState.TRANSFERRING
                maybe_die("kv-receive")
            parts.append(chunk.data)
        if header is None:
            return pb.KVAck(error=error(pb.BAD_REQUEST, "empty KV transfer"))
        rid = header.request.request_id
        data = b"".join(parts)
        self.bytes_received += len(data)
        if len(data) != header.total_bytes:
            self._states[rid] = TransferState.FAILED
            return pb.KVAck(error=error(pb.INTERNAL, f"KV for {rid}: got {len(data)} of {header.total_bytes} bytes"))
        kv = await asyncio.to_thread(kv_from_bytes, data)
        refused = await self._on_arrival(KVHandoff(header.request, tuple(header.output_ids), kv, header.epoch))
        self._states[rid] = TransferState.FAILED if refused is not None else TransferState.DONE
        return pb.KVAck(error=refused)


class GrpcKVBackend(KVBackend):
    """Keeps one channel per decode leader; every transfer task is owned here."""

    name = "grpc"

    def __init__(self, chunk_bytes: int = 4 << 20, timeout_s: float = 60.0) -> None:
        self._chunk = chunk_bytes
        self._timeout = timeout_s
        self._channels = ChannelPool()
        self.tasks = TaskSet("kv-send")

    def sender(self, address: str) -> KVSender:
        return GrpcKVSender(pb_grpc.KVTransferStub(self._channels.get(address)), self.tasks, self._chunk, self._timeout)

    async def close(self) -> None:
        await self.tasks.cancel_all()
        await self._channels.close()
