"""The mesh's prefill -> decode hand-off over the block path: every rank of the prefill group writes
its own KV heads straight into the decode ranks that own them (`group_transfer.py`, through each
rank's agent: NIXL/UCX, or the socket fallback), and only block ids, agent metadata and the
request's ids pass through the two leaders (gRPC, `Decode.ReserveKV / CommitKV / ReleaseKV`).

Lifecycle of one attempt, prefill leader P -> decode leader D (both groups opened their agents when
they started: `open_agents`, per group and epoch, closed when the engine shuts down):
1. P -> D `ReserveKV`: D reserves blocks for the request's computed tokens (engine thread) and
   answers with the block ids and its ranks' agent metadata; then D's engine thread awaits the KV
   on every rank (`receive_blocks`, up to the attempt's timeout).
2. P: every P rank writes its (src, dst) pieces (`send_blocks`); P keeps its blocks meanwhile.
3. P -> D `CommitKV` (output ids, sampler state): once D saw the KV land on every rank the request
   joins D's batch (`finish_receive`). P releases its blocks.
On a failure at any step P sends `ReleaseKV` (D frees the reserved blocks; a receive that failed
already freed them, a dead D took them with it) and `fail_over` tries another decode group with
the same blocks; after the last one the caller falls back to the gRPC path. A reservation that
landed but is never committed (P died) is freed `timeout_s` later.

Both engine threads block while the KV moves (a few milliseconds for a prompt here); polling the
transfers from the step loop is not done yet.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import grpc

from services.engine import BadRequestError, EngineError, LLMEngine, SamplingParams
from services.metrics import NodeMetrics
from services.node.engine_loop import EngineLoop
from services.rpc import engine_id, pb, pb_grpc
from services.tasks import TaskSet

from .group_transfer import (
    BlockTarget,
    receive_blocks,
    reserve_blocks,
    send_blocks,
)
from .handoff import DecodeTarget

log = logging.getLogger(__name__)

_CHANNEL_OPTIONS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]


def _error(kind: int, message: str, retry_after_s: float = 0.0) -> pb.Error:
    return pb.Error(kind=kind, message=message, retry_after_s=retry_after_s)  # type: ignore[arg-type]


def backend_of(engine: LLMEngine) -> str:
    """The block backend of the engine's open agents ("nixl" | "local"), "" when none are open."""
    return str(engine.kv_agent.agent.backend_name) if engine.kv_agent is not None else ""


class BlockSender:
    """The prefill leader's side: one attempt = reserve on a decode group, send, commit."""

    def __init__(self, engine: LLMEngine, loop: EngineLoop, metrics: NodeMetrics, timeout_s: float) -> None:
        self.engine, self.loop, self.metrics = engine, loop, metrics
        self.timeout_s = timeout_s
        self.backend = backend_of(engine)
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._attempts = 0

    def _stub(self, address: str) -> pb_grpc.DecodeStub:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = grpc.aio.insecure_channel(address, options=_CHANNEL_OPTIONS)
        return pb_grpc.DecodeStub(channel)

    async def attempt(self, q: pb.QueuedRequest, output_ids: list[int], epoch: int,
                      target: DecodeTarget) -> pb.Error | None:
        """Hand the request's KV to `target`; None once it runs there, else why not (released)."""
        rid = engine_id(q)
        self._attempts += 1
        tid = f"{rid}@{target.group_id}#{self._attempts}"
        stub = self._stub(target.address)
        started = time.perf_counter()
        num_tokens = await self.loop.call(self.engine.computed_tokens, rid)
        try:
            reply = await stub.ReserveKV(pb.ReserveKVRequest(request=q, num_tokens=num_tokens, src_tp=self.engine.args.tp,
                                                             transfer_id=tid, timeout_s=self.timeout_s, epoch=epoch,
                                                             backend=self.backend),
                                         timeout=self.timeout_s)
        except grpc.aio.AioRpcError as e:
            return _error(pb.UNAVAILABLE, f"KV reserve on {target.group_id} failed: {e.code().name}: {e.details()}")
        if reply.error.kind != pb.ERROR_KIND_UNSPECIFIED:
            return reply.error
        err = await self._send_and_commit(stub, rid, tid, output_ids, target, reply)
        if err is None:
            self.metrics.kv_transfer_seconds.observe(time.perf_counter() - started)
            return None
        try:
            await stub.ReleaseKV(pb.ReleaseKVRequest(request_id=rid, transfer_id=tid), timeout=5.0)
        except grpc.aio.AioRpcError:
            pass  # a dead decode group took its blocks with it
        return err

    async def _send_and_commit(self, stub: pb_grpc.DecodeStub, rid: str, tid: str, output_ids: list[int],
                               target: DecodeTarget, reply: pb.ReserveKVReply) -> pb.Error | None:
        blocks = BlockTarget(reply.tp, tuple(reply.agent_metadata), tuple(reply.block_ids))
        try:
            sent = await self.loop.call(send_blocks, self.engine, rid, blocks, tid, self.timeout_s)
        except EngineError as e:
            sent = False
            log.warning("KV blocks of %s could not be sent: %s", rid, e)
        if not sent:
            return _error(pb.UNAVAILABLE, f"KV blocks of {rid} did not reach every rank of {target.group_id}")
        try:
            ack = await stub.CommitKV(pb.CommitKVRequest(request_id=rid, transfer_id=tid, output_ids=output_ids),
                                      timeout=self.timeout_s)
        except grpc.aio.AioRpcError as e:
            return _error(pb.UNAVAILABLE, f"KV commit on {target.group_id} failed: {e.code().name}: {e.details()}")
        return ack.error if ack.error.kind != pb.ERROR_KIND_UNSPECIFIED else None

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()


@dataclass
class Reservation:
    transfer_id: str
    request: pb.QueuedRequest
    num_tokens: int
    landed: asyncio.Task[bool]  # the receive on every rank: True once all of the KV is here


class BlockReceiver:
    """The decode leader's side: reservations between ReserveKV and CommitKV / ReleaseKV."""

    def __init__(self, engine: LLMEngine, loop: EngineLoop, metadata: list[bytes], tasks: TaskSet,
                 group_id: str, timeout_s: float) -> None:
        self.engine, self.loop, self.tasks = engine, loop, tasks
        self.metadata = metadata
        self.group_id = group_id
        self.timeout_s = timeout_s
        self.backend = backend_of(engine)
        self._reserved: dict[str, Reservation] = {}

    def reserved(self, request_id: str) -> pb.QueuedRequest | None:
        """The request reserved under this engine id (`services.rpc.engine_id`)."""
        res = self._reserved.get(request_id)
        return None if res is None else res.request

    async def reserve(self, req: pb.ReserveKVRequest, params: SamplingParams) -> pb.ReserveKVReply:
        q, rid = req.request, engine_id(req.request)
        if rid in self._reserved:
            return pb.ReserveKVReply(error=_error(pb.BAD_REQUEST, f"request {rid!r} is already reserved here"))
        if req.backend != self.backend:
            return pb.ReserveKVReply(error=_error(pb.UNAVAILABLE, f"decode group {self.group_id} moves KV blocks "
                                                                  f"over {self.backend!r}, not {req.backend!r}"))
        timeout_s = min(req.timeout_s or self.timeout_s, self.timeout_s)
        try:
            blocks = await self.loop.call(reserve_blocks, self.engine, rid, list(q.prompt_ids), params, req.num_tokens)
        except BadRequestError as e:
            return pb.ReserveKVReply(error=_error(pb.BAD_REQUEST, str(e)))
        except EngineError as e:
            return pb.ReserveKVReply(error=_error(pb.OVERLOADED, f"decode group {self.group_id}: {e}", 1.0))
        landed = self.tasks.spawn(self._receive(rid, req.src_tp, req.transfer_id, timeout_s), name=f"kv-recv-{rid}")
        res = self._reserved[rid] = Reservation(req.transfer_id, q, req.num_tokens, landed)
        self.tasks.spawn(self._expire(rid, res, timeout_s), name=f"kv-expire-{rid}")
        return pb.ReserveKVReply(block_ids=blocks, tp=self.engine.args.tp, agent_metadata=self.metadata)

    async def _receive(self, rid: str, src_tp: int, transfer_id: str, timeout_s: float) -> bool:
        try:
            return await self.loop.call(receive_blocks, self.engine, rid, src_tp, transfer_id, timeout_s)
        except Exception:
            log.exception("receiving the KV blocks of %s failed", rid)
            await self.loop.call(self.engine.abort, rid)
            return False

    async def _expire(self, rid: str, res: Reservation, timeout_s: float) -> None:
        """Free a reservation whose KV landed but which nobody commits (its prefill group died)."""
        if not await res.landed:
            return
        await asyncio.sleep(timeout_s)
        if self._reserved.get(rid) is res:
            del self._reserved[rid]
            await self.loop.call(self.engine.abort, rid)
            log.warning("KV of %s landed but was never committed; its blocks are free again", rid)

    async def commit(self, req: pb.CommitKVRequest) -> pb.Error | None:
        """The request joins the batch once its KV landed on every rank; else its blocks are freed."""
        rid = req.request_id
        res = self._reserved.get(rid)
        if res is None or res.transfer_id != req.transfer_id:
            return _error(pb.UNAVAILABLE, f"decode group {self.group_id} holds no reservation {req.transfer_id!r}")
        del self._reserved[rid]
        if not await res.landed:
            return _error(pb.UNAVAILABLE, f"KV of {rid} did not land on every rank of {self.group_id}")
        try:
            await self.loop.call(self.engine.finish_receive, rid, list(req.output_ids), res.num_tokens)
        except EngineError as e:
            await self.loop.call(self.engine.abort, rid)
            return _error(pb.OVERLOADED, f"decode group {self.group_id}: {e}", 1.0)
        log.info("KV blocks of %s landed on every rank (%s); it joins the batch", rid, req.transfer_id)
        return None

    async def release(self, req: pb.ReleaseKVRequest) -> bool:
        """Give up a reservation (the prefill side failed): its blocks are freed once the receive ends."""
        res = self._reserved.get(req.request_id)
        if res is None or res.transfer_id != req.transfer_id:
            return False
        del self._reserved[req.request_id]
        self.tasks.spawn(self._free_when_done(req.request_id, res), name=f"kv-release-{req.request_id}")
        return True

    async def _free_when_done(self, rid: str, res: Reservation) -> None:
        if await res.landed:  # a failed receive freed them already
            await self.loop.call(self.engine.abort, rid)
