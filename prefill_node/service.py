"""A prefill group leader: runs each assigned prompt, emits its first token straight to the
request's output stream (so TTFT never waits for the KV transfer), then hands the KV to the
decode group named in the assignment and answers the router.

Lifecycle of one request here: Prefill RPC -> add_request(prefill_only) -> the step that
samples the first token -> first token event -> KV hand-off -> reply. A request the router resumes
after its group died (`attempt` > 0) carries the tokens its client has (`resume_ids`): they are
computed with the prompt, and the token sampled here is the next one (`index`). The hand-off goes to the
router's decode group, or, when that one fails mid-way, to another live decode group
(`handoff.fail_over`). With agents open (kv_backend auto | nixl | local) it is the block
path (`kv_send.py`: every rank writes its own blocks, then release); when that
reaches no decode group, or without agents, it is export_kv + release + the gathered bytes over
gRPC. A request that finishes at its first token (stop token, max_tokens 1) skips the handoff.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from kvtransfer.base import KVHandoff
from kvtransfer.grpc_backend import GrpcKVBackend
from services.config import NodeConfig
from services.engine import BadRequestError, LLMEngine, RequestOutput
from services.metrics import NodeMetrics
from services.node.frame import GroupLeader, PrefillRPC, emit_first_token, sampling_of, slo_of
from services.rpc import engine_id, error, pb, pb_grpc, request_of

from .handoff import DecodeTarget, HandoffResult, fail_over, hand_off, pick_decode_group
from .kv_send import BlockSender

log = logging.getLogger("nitsum.prefill")


class PrefillLeader(PrefillRPC, GroupLeader, pb_grpc.PrefillServicer):
    def __init__(self, config: NodeConfig, metrics: NodeMetrics | None = None) -> None:
        super().__init__(config, metrics)
        self.kv = GrpcKVBackend(self.config.kv_chunk_bytes, self.config.kv_timeout_s)
        self.blocks: BlockSender | None = None  # the block path, once this group's agents are open
        self._waiting: dict[str, asyncio.Future[RequestOutput | None]] = {}

    def add_services(self, server: grpc.aio.Server) -> None:
        pb_grpc.add_PrefillServicer_to_server(self, server)

    async def start(self, engine: LLMEngine) -> None:
        await super().start(engine)
        if engine.kv_agent is not None:
            assert self.loop is not None
            self.blocks = BlockSender(engine, self.loop, self.metrics, self.config.kv_timeout_s)

    async def close(self) -> None:
        await self.kv.close()
        if self.blocks is not None:
            await self.blocks.close()

    def on_outputs(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            waiter = self._waiting.pop(out.request_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(out)

    async def on_cancel(self, request_id: str) -> None:
        assert self.loop is not None and self.engine is not None
        for eid in [e for e in self._waiting if request_of(e) == request_id]:
            waiter = self._waiting.pop(eid)
            await self.loop.call(self.engine.abort, eid)
            self.metrics.aborted.inc()
            self.aborted += 1
            if not waiter.done():
                waiter.set_result(None)

    async def Health(self, request: pb.HealthRequest, context: grpc.aio.ServicerContext) -> pb.HealthReply:  # noqa: N802
        return self.health()

    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortReply:  # noqa: N802
        found = any(request_of(e) == request.request_id for e in self._waiting)
        await self.on_cancel(request.request_id)
        return pb.AbortReply(found=found)

    async def drain(self, command: pb.DrainCommand) -> tuple[pb.DrainResult, list[KVHandoff]]:
        """For a reconfiguration: wait (up to `wait_s`) until every prompt given to this group has
        been answered and its KV handed off; the router sends no new ones. `in_flight`: how many
        were still in flight when the wait began. Nothing is ever parked here."""
        pending, _ = await self._wait_prefills(command.wait_s)
        return pb.DrainResult(in_flight=pending), []

    async def _prefill(self, request: pb.PrefillRequest) -> pb.PrefillReply:
        assert self.loop is not None and self.engine is not None
        q, rid, eid = request.request, request.request.request_id, engine_id(request.request)
        if await self.cluster.is_cancelled(rid):
            return pb.PrefillReply(error=error(pb.CANCELLED, "cancelled before prefill"))
        if not await self.cluster.claim_prefill(rid, q.attempt, self.config.group_id):
            # Dispatched twice (a router died mid-dispatch): the first dispatch serves it; this
            # one must not touch the request's stream.
            log.info("request %s was already taken by a prefill group; dropping the duplicate", rid)
            return pb.PrefillReply(error=error(pb.CANCELLED, "duplicate dispatch"))
        started = time.perf_counter()
        waiter: asyncio.Future[RequestOutput | None] = asyncio.get_running_loop().create_future()
        self._waiting[eid] = waiter
        try:
            await self.loop.call(self.engine.add_request, eid, list(q.prompt_ids), sampling_of(q.sampling), True,
                                 list(q.resume_ids), slo_of(q))
        except BadRequestError as e:
            self._waiting.pop(eid, None)
            err = error(pb.BAD_REQUEST, str(e))
            await self.cluster.emit(rid, pb.TokenEvent(error=err, time_s=time.time(), attempt=q.attempt))
            return pb.PrefillReply(error=err)
        out = await waiter
        if out is None:
            return pb.PrefillReply(error=error(pb.CANCELLED, "cancelled during prefill"))
        prefill_s = time.perf_counter() - started
        first, done = await emit_first_token(self.cluster, q, out, request.decode_group)
        if done:
            return pb.PrefillReply(first_token=first, finished=True, prefill_s=prefill_s)
        return await self._hand_off(request, first, prefill_s)

    async def _hand_off(self, request: pb.PrefillRequest, first: int, prefill_s: float) -> pb.PrefillReply:
        assert self.loop is not None and self.engine is not None
        q, rid, eid = request.request, request.request.request_id, engine_id(request.request)

        async def find_other(tried: set[str]) -> DecodeTarget | None:
            return pick_decode_group(await self.cluster.groups(), tried, request.epoch, q)

        async def redirect(target: DecodeTarget) -> None:
            await self.cluster.emit(rid, pb.TokenEvent(time_s=time.time(), next_group=target.group_id,
                                                       attempt=q.attempt))

        target = DecodeTarget(request.decode_group, request.decode_address)
        attempts = self.config.kv_handoff_attempts
        if self.blocks is not None:
            blocks = self.blocks

            async def attempt(t: DecodeTarget) -> pb.Error | None:
                return await blocks.attempt(q, [*q.resume_ids, first], request.epoch, t)

            try:
                result = await fail_over(attempt, target, find_other, redirect, self.metrics, attempts, rid)
            except Exception:
                log.exception("block hand-off of %s failed", rid)
                result = HandoffResult(None)
            if result.target is not None or (result.error is not None and result.error.kind == pb.CANCELLED):
                await self.loop.call(self.engine.release, eid)
                return await self._reply(rid, result, first, prefill_s, q.attempt)
            log.warning("KV blocks of %s reached no decode group; sending the KV over gRPC", rid)
            target = result.last_tried or target  # the group the request's stream names now
        try:
            kv = await self.loop.call(self.engine.export_kv, eid)
        finally:
            await self.loop.call(self.engine.release, eid)
        result = await hand_off(self.kv, KVHandoff(q, (*q.resume_ids, first), kv, request.epoch), target, find_other,
                                redirect, self.metrics, attempts)
        return await self._reply(rid, result, first, prefill_s, q.attempt)

    async def _reply(self, rid: str, result: HandoffResult, first: int, prefill_s: float,
                     attempt: int) -> pb.PrefillReply:
        if result.target is None:
            err = result.error or error(pb.UNAVAILABLE, "KV transfer failed")
            if err.kind == pb.BAD_REQUEST:  # the client's fault: any decode group would refuse it
                await self.cluster.emit(rid, pb.TokenEvent(error=err, time_s=time.time(), attempt=attempt))
            elif err.kind != pb.CANCELLED:
                # No decode group took the KV now: the router resumes the request from the tokens its
                # client has once a decode group can take it (router/live/recovery.py).
                err = error(pb.UNAVAILABLE, f"no decode group took the KV of {rid}: {err.message}")
            return pb.PrefillReply(error=err, first_token=first, prefill_s=prefill_s)
        return pb.PrefillReply(first_token=first, prefill_s=prefill_s, transfer_s=result.seconds)
