"""A colocated group leader: one replica that prefills and decodes (a plan's `c` groups).

It is a decode leader (KV hand-offs in, continuous batching, token events out, drain, migrate,
park: service.py) that also answers the router's Prefill RPC. To the router's scheduler a
colocated group is a prefill-capable group and a decode-capable group at once
(router/decide/scheduler.py), as the planner and the simulator count it, so a request comes here
in one of three ways:

- prefilled and decoded here (the router names this group for both phases): the request joins
  the engine whole, so its prompt is chunked into the same steps as the running batch under the
  engine's tier-aware policy (services/engine/policy.py: deadline order, TPOT guard, step cap);
  the RPC answers once its first token is on the request's stream; from then on it is any
  request decoding here (cancel, drain, migration);
- prefilled here for another decode-capable group: prefill only, the first token out, then its
  KV goes there over the gathered-bytes gRPC path, as a migration does (migration.py); when that
  group does not take it, this group decodes it itself;
- prefilled elsewhere: a KV hand-off comes in, as to any decode group.

Lifecycle of a prompt here: Prefill RPC -> claim (one prefill group per attempt, as a prefill
leader claims it) -> add_request (whole, or prefill_only for a hand-off) -> the step that samples
the first token -> its event (with prompt_tokens) -> [hand-off] -> reply. Drain (a re-cut): no new
prompts or KV; wait for the prompts in flight to be answered, then the decode leader's drain.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from kvtransfer.base import KVHandoff
from services.config import NodeConfig
from services.engine import BadRequestError, RequestOutput
from services.metrics import NodeMetrics
from services.node.frame import PrefillRPC, emit_first_token, sampling_of, slo_of
from services.rpc import engine_id, error, pb, pb_grpc, request_of

from .service import DecodeLeader

log = logging.getLogger("nitsum.colocated")

Waiter = asyncio.Future[RequestOutput | None]


class ColocatedLeader(PrefillRPC, DecodeLeader, pb_grpc.PrefillServicer):
    def __init__(self, config: NodeConfig, metrics: NodeMetrics | None = None) -> None:
        super().__init__(config, metrics)
        # Both keyed by engine id: prompts decoding here whose first token is not out yet, and
        # prompts prefilled here for another group (prefill only) until their first token.
        self._first: dict[str, Waiter] = {}
        self._prefilling: dict[str, Waiter] = {}

    def add_services(self, server: grpc.aio.Server) -> None:
        super().add_services(server)
        pb_grpc.add_PrefillServicer_to_server(self, server)

    # ---- engine outputs ----------------------------------------------------------------------
    def on_outputs(self, outputs: list[RequestOutput]) -> None:
        rest = []
        for out in outputs:
            waiter = self._prefilling.pop(out.request_id, None)
            if waiter is None:
                rest.append(out)
            elif not waiter.done():
                waiter.set_result(out)
        super().on_outputs(rest)

    def _event(self, out: RequestOutput, q: pb.QueuedRequest, now: float) -> pb.TokenEvent:
        event = super()._event(out, q, now)
        waiter = self._first.pop(out.request_id, None)
        if waiter is not None:  # its first token: the Prefill RPC answers once it is written
            event.prompt_tokens = len(q.prompt_ids)
            if not waiter.done():
                waiter.set_result(out)
        return event

    def _forget(self, request_id: str) -> None:
        super()._forget(request_id)
        waiter = self._first.pop(request_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)  # aborted before its first token

    # ---- the Prefill service -------------------------------------------------------------------
    async def _prefill(self, request: pb.PrefillRequest) -> pb.PrefillReply:
        q, rid = request.request, request.request.request_id
        if not self.admitting:  # being re-cut: the router resumes it elsewhere (router/live/recovery.py)
            return pb.PrefillReply(error=error(pb.UNAVAILABLE, f"colocated group {self.config.group_id} is being "
                                                               "reconfigured"))
        if await self.cluster.is_cancelled(rid):
            return pb.PrefillReply(error=error(pb.CANCELLED, "cancelled before prefill"))
        if not await self.cluster.claim_prefill(rid, q.attempt, self.config.group_id):
            log.info("request %s was already taken by a prefill group; dropping the duplicate", rid)
            return pb.PrefillReply(error=error(pb.CANCELLED, "duplicate dispatch"))
        if request.decode_group in ("", self.config.group_id):
            return await self._serve_here(q)
        return await self._prefill_for(request)

    async def _add(self, q: pb.QueuedRequest, eid: str, prefill_only: bool) -> pb.Error | None:
        """The request joins the engine; the error (already on its stream) when it cannot."""
        assert self.loop is not None and self.engine is not None
        try:
            await self.loop.call(self.engine.add_request, eid, list(q.prompt_ids), sampling_of(q.sampling),
                                 prefill_only, list(q.resume_ids), slo_of(q))
            return None
        except BadRequestError as e:  # the client's fault: any group would refuse it
            err = error(pb.BAD_REQUEST, str(e))
        await self.cluster.emit(q.request_id, pb.TokenEvent(error=err, time_s=time.time(), attempt=q.attempt))
        return err

    async def _serve_here(self, q: pb.QueuedRequest) -> pb.PrefillReply:
        """Prefill and decode in this engine; answered once the first token is written."""
        eid = engine_id(q)
        started = time.perf_counter()
        waiter: Waiter = asyncio.get_running_loop().create_future()
        self._first[eid] = waiter
        self._active.add(eid)  # before the engine can emit its first token
        self._requests[eid] = q
        err = await self._add(q, eid, prefill_only=False)
        if err is not None:
            self._forget(eid)
            return pb.PrefillReply(error=err)
        await self._joined(q)
        out = await waiter
        if out is None:
            return pb.PrefillReply(error=error(pb.CANCELLED, "cancelled during prefill"))
        prefill_s = time.perf_counter() - started
        await self.flush_events()  # the first token is on the stream before the router hears back
        return pb.PrefillReply(first_token=out.new_token_ids[0], finished=out.finished, prefill_s=prefill_s)

    async def _prefill_for(self, request: pb.PrefillRequest) -> pb.PrefillReply:
        """Prefill only, then hand the KV to the decode group the router named (or keep it)."""
        assert self.loop is not None and self.engine is not None
        q, rid, eid = request.request, request.request.request_id, engine_id(request.request)
        started = time.perf_counter()
        waiter: Waiter = asyncio.get_running_loop().create_future()
        self._prefilling[eid] = waiter
        err = await self._add(q, eid, prefill_only=True)
        if err is not None:
            self._prefilling.pop(eid, None)
            return pb.PrefillReply(error=err)
        out = await waiter
        if out is None:
            return pb.PrefillReply(error=error(pb.CANCELLED, "cancelled during prefill"))
        prefill_s = time.perf_counter() - started
        first, done = await emit_first_token(self.cluster, q, out, request.decode_group)
        if done:
            return pb.PrefillReply(first_token=first, finished=True, prefill_s=prefill_s)
        try:
            kv = await self.loop.call(self.engine.export_kv, eid)
        finally:
            await self.loop.call(self.engine.release, eid)
        handoff = KVHandoff(q, (*q.resume_ids, first), kv, request.epoch)
        sent = time.perf_counter()
        if await self.migrator.send(handoff, [(request.decode_group, request.decode_address)]):
            self.metrics.kv_transfer_bytes.labels("sent").inc(kv.k.numel() * kv.k.element_size() * 2)
            return pb.PrefillReply(first_token=first, prefill_s=prefill_s, transfer_s=time.perf_counter() - sent)
        log.warning("decode group %s did not take the KV of %s; it decodes here", request.decode_group, rid)
        err = await self._add_prefilled(handoff)
        if err is None:
            await self.migrator.name_holder(handoff, self.config.group_id)
            return pb.PrefillReply(first_token=first, prefill_s=prefill_s)
        if err.kind not in (pb.CANCELLED, pb.BAD_REQUEST):
            # The router resumes it from the tokens its client has once a group can take it.
            err = error(pb.UNAVAILABLE, f"no decode group took the KV of {rid}: {err.message}")
        elif err.kind == pb.BAD_REQUEST:
            await self.cluster.emit(rid, pb.TokenEvent(error=err, time_s=time.time(), attempt=q.attempt))
        return pb.PrefillReply(error=err, first_token=first, prefill_s=prefill_s)

    # ---- cancel, drain -------------------------------------------------------------------------
    async def on_cancel(self, request_id: str) -> None:
        await super().on_cancel(request_id)
        assert self.loop is not None and self.engine is not None
        for eid in [e for e in self._prefilling if request_of(e) == request_id]:
            waiter = self._prefilling.pop(eid)
            await self.loop.call(self.engine.abort, eid)
            self.metrics.aborted.inc()
            self.aborted += 1
            if not waiter.done():
                waiter.set_result(None)

    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortReply:  # noqa: N802
        found = any(request_of(e) == request.request_id for e in [*self._active, *self._prefilling])
        await self.on_cancel(request.request_id)
        return pb.AbortReply(found=found)

    async def drain(self, command: pb.DrainCommand) -> tuple[pb.DrainResult, list[KVHandoff]]:
        """For a reconfiguration: take no new prompt or KV, wait (up to `wait_s`) until every prompt
        given to this group is answered (its first token out, or its KV handed off), then drain
        as a decode group does, within what is left of `wait_s`."""
        self.admitting = False
        pending, deadline = await self._wait_prefills(command.wait_s)
        rest = pb.DrainCommand()
        rest.CopyFrom(command)
        rest.wait_s = max(0.0, deadline - time.monotonic())
        result, parked = await super().drain(rest)
        result.in_flight = pending
        return result, parked

    async def _take_out(self, ids: list[str]) -> list[KVHandoff]:
        # A prompt still on its way to its first token is not taken out (its KV is not whole yet):
        # if it outlives the drain, the router resumes it from its stream (router/live/recovery.py).
        return await super()._take_out([e for e in ids if e not in self._first])
