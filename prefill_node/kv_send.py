"""The prefill leader's half of the block hand-off: reserve blocks on a decode group, write this
group's KV heads into them from every rank, commit (or release). The protocol, both halves:

1. P -> D `ReserveKV`: D reserves blocks for the request's computed tokens (engine thread) and
   answers with the block ids and its ranks' agent metadata; then D's engine thread awaits the KV
   on every rank (`receive_blocks`, up to the attempt's timeout).
2. P: every P rank writes its (src, dst) pieces (`kvtransfer.group_transfer.send_blocks`, through
   each rank's agent: NIXL/UCX, or the socket fallback); P keeps its blocks meanwhile.
3. P -> D `CommitKV` (the tokens so far): once D saw the KV land on every rank the request joins
   D's batch (`finish_receive`). P releases its blocks.
On a failure at any step P sends `ReleaseKV` and `handoff.fail_over` tries another decode group
with the same blocks; after the last one the caller falls back to the gathered-bytes gRPC path.
The receiving half is decode_node/kv_receive.py. Both engine threads block while the KV moves
(a few milliseconds for a prompt here); polling the transfers from the step loop is not done yet.
"""

from __future__ import annotations

import logging
import time

import grpc

from kvtransfer.group_transfer import BlockTarget, backend_of, send_blocks
from services.engine import EngineError, LLMEngine
from services.metrics import NodeMetrics
from services.node.engine_loop import EngineLoop
from services.rpc import ChannelPool, engine_id, error, pb, pb_grpc

from .handoff import DecodeTarget

log = logging.getLogger("nitsum.prefill")


class BlockSender:
    """The prefill leader's side: one attempt = reserve on a decode group, send, commit."""

    def __init__(self, engine: LLMEngine, loop: EngineLoop, metrics: NodeMetrics, timeout_s: float) -> None:
        self.engine, self.loop, self.metrics = engine, loop, metrics
        self.timeout_s = timeout_s
        self.backend = backend_of(engine)
        self._channels = ChannelPool()
        self._attempts = 0
        # KV bytes a token holds across the group's ranks (each rank writes its heads' share).
        cache = engine.runner.kv_cache
        self.token_bytes = cache[0].numel() * cache.element_size() // engine.args.block_size * engine.args.tp

    def _stub(self, address: str) -> pb_grpc.DecodeStub:
        return pb_grpc.DecodeStub(self._channels.get(address))

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
            return error(pb.UNAVAILABLE, f"KV reserve on {target.group_id} failed: {e.code().name}: {e.details()}")
        if reply.error.kind != pb.ERROR_KIND_UNSPECIFIED:
            return reply.error
        err = await self._send_and_commit(stub, rid, tid, output_ids, target, reply)
        if err is None:
            self.metrics.kv_transfer_seconds.observe(time.perf_counter() - started)
            self.metrics.kv_transfer_bytes.labels("sent").inc(num_tokens * self.token_bytes)
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
            return error(pb.UNAVAILABLE, f"KV blocks of {rid} did not reach every rank of {target.group_id}")
        try:
            ack = await stub.CommitKV(pb.CommitKVRequest(request_id=rid, transfer_id=tid, output_ids=output_ids),
                                      timeout=self.timeout_s)
        except grpc.aio.AioRpcError as e:
            return error(pb.UNAVAILABLE, f"KV commit on {target.group_id} failed: {e.code().name}: {e.details()}")
        return ack.error if ack.error.kind != pb.ERROR_KIND_UNSPECIFIED else None

    async def close(self) -> None:
        await self._channels.close()
