"""A decode group leader: admits each request whose KV has landed into its running batch and
streams every step's new tokens to the requests' output streams.

Lifecycle of one request here: KV handoff arrives (kvtransfer receiver) -> add_prefilled (joins
the batch at the next step) -> one event per step -> the event with finish_reason. Over the block
path (this group's agents open): ReserveKV (blocks reserved, the ranks await the KV) -> the prefill
ranks write it -> CommitKV (joins the batch) or ReleaseKV (blocks freed); kv_receive.py. A cancelled
request is aborted at once, which frees its KV blocks and its place in the batch.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from kvtransfer.base import KVHandoff
from kvtransfer.grpc_backend import GrpcKVReceiver
from services.config import NodeConfig
from services.engine import BadRequestError, EngineError, LLMEngine, RequestOutput
from services.metrics import NodeMetrics
from services.node.frame import GroupLeader, sampling_of, slo_of
from services.rpc import engine_id, error, pb, pb_grpc, request_of

from .kv_receive import BlockReceiver
from .migration import Migrator

log = logging.getLogger("nitsum.decode")


class DecodeLeader(GroupLeader, pb_grpc.DecodeServicer):
    def __init__(self, config: NodeConfig, metrics: NodeMetrics | None = None) -> None:
        super().__init__(config, metrics)
        self.receiver = GrpcKVReceiver(self._admit)
        self.admitting = True  # False once a reconfiguration drains this group
        # Both keyed by the engine's id of a request's attempt (services.rpc.engine_id).
        self._active: set[str] = set()
        self._requests: dict[str, pb.QueuedRequest] = {}
        self._outbox: asyncio.Queue[list[tuple[str, pb.TokenEvent]] | asyncio.Future[None]] = asyncio.Queue()
        self.migrator = Migrator(self.cluster, config.kv_chunk_bytes)
        self.blocks: BlockReceiver | None = None  # the block path, once this group's agents are open

    def add_services(self, server: grpc.aio.Server) -> None:
        pb_grpc.add_DecodeServicer_to_server(self, server)
        pb_grpc.add_KVTransferServicer_to_server(self.receiver, server)
        self.tasks.spawn(self._write_events(), name="event-writer")

    async def start(self, engine: LLMEngine) -> None:
        await super().start(engine)
        if engine.kv_agent is not None:
            assert self.loop is not None
            self.blocks = BlockReceiver(engine, self.loop, self.kv_metadata, self.tasks, self.config.group_id,
                                        self.config.kv_timeout_s)

    async def close(self) -> None:
        await self.migrator.close()

    async def _admit(self, handoff: KVHandoff) -> pb.Error | None:
        self.metrics.kv_transfer_bytes.labels("received").inc(handoff.kv.k.numel() * handoff.kv.k.element_size() * 2)
        return await self._add_prefilled(handoff)

    async def _add_prefilled(self, handoff: KVHandoff) -> pb.Error | None:
        """A request whose KV is here joins the batch; None once it runs, else why not."""
        assert self.loop is not None and self.engine is not None
        q = handoff.request
        if not self.admitting:
            return error(pb.OVERLOADED, f"decode group {self.config.group_id} is being reconfigured",
                         retry_after_s=0.5)
        if await self.cluster.is_cancelled(q.request_id):
            return error(pb.CANCELLED, "cancelled before decode")
        eid = engine_id(q)
        self._active.add(eid)  # before the engine can emit its first decode step
        self._requests[eid] = q
        try:
            await self.loop.call(self.engine.add_prefilled, eid, list(q.prompt_ids), list(handoff.output_ids),
                                 handoff.kv, sampling_of(q.sampling), slo_of(q))
        except BadRequestError as e:
            self._forget(eid)
            return error(pb.BAD_REQUEST, str(e))
        except EngineError as e:
            self._forget(eid)
            return error(pb.OVERLOADED, f"decode group {self.config.group_id}: {e}", retry_after_s=1.0)
        await self._joined(q)
        return None

    async def _joined(self, q: pb.QueuedRequest) -> None:
        """A request joined the batch: drop an older attempt of it still running here (its group was
        only slow; the gateway ignores it), and check for a cancel published while its KV moved
        (the live feed missed it)."""
        older = [e for e, r in self._requests.items() if r.request_id == q.request_id and r.attempt < q.attempt]
        for eid in older:
            await self._abort(eid)
        if await self.cluster.is_cancelled(q.request_id):
            await self.on_cancel(q.request_id)

    def on_outputs(self, outputs: list[RequestOutput]) -> None:
        now = time.time()
        batch = []
        for out in outputs:
            q = self._requests.get(out.request_id)
            if out.request_id not in self._active or q is None:
                continue
            batch.append((q.request_id, self._event(out, q, now)))
            if out.finished:
                self._forget(out.request_id)
        if batch:
            self._outbox.put_nowait(batch)

    def _event(self, out: RequestOutput, q: pb.QueuedRequest, now: float) -> pb.TokenEvent:
        """One step's tokens of one request, as its output stream gets them."""
        # next_group names this group on every event: it holds the request (router/live/recovery.py).
        return pb.TokenEvent(token_ids=out.new_token_ids, finish_reason=out.finish_reason or "", time_s=now,
                             next_group=self.config.group_id, index=out.index, attempt=q.attempt)

    def _forget(self, request_id: str) -> None:
        self._active.discard(request_id)
        self._requests.pop(request_id, None)

    async def _write_events(self) -> None:
        """One writer keeps each request's events in step order."""
        while True:
            item = await self._outbox.get()
            batch: list[tuple[str, pb.TokenEvent]] = []
            flushed: list[asyncio.Future[None]] = []
            while True:
                if isinstance(item, asyncio.Future):
                    flushed.append(item)
                else:
                    batch.extend(item)
                if self._outbox.empty():
                    break
                item = self._outbox.get_nowait()
            await self._emit_until_written(batch)
            for f in flushed:
                if not f.done():
                    f.set_result(None)

    async def _emit_until_written(self, batch: list[tuple[str, pb.TokenEvent]]) -> None:
        """Tokens are never dropped: while Redis is away (restarting) the writer waits and retries,
        in order, and the engine keeps stepping into the outbox meanwhile."""
        delay = 0.1
        while batch:
            try:
                await self.cluster.emit_many(batch)
                return
            except Exception:
                log.exception("could not write %d token events; retrying in %.1fs", len(batch), delay)
                await asyncio.sleep(delay)
                delay = min(2.0, delay * 2)

    async def flush_events(self) -> None:
        """Return once every event of the steps run so far is in Redis."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._outbox.put_nowait(done)
        await done

    # ---- reconfiguration -------------------------------------------------------------------
    async def drain(self, command: pb.DrainCommand) -> tuple[pb.DrainResult, list[KVHandoff]]:
        """Empty this group for a reconfiguration. No new KV is admitted; a request within
        `finish_within` tokens of its end finishes here; every other one is taken out (KV of all
        its tokens, its tokens and sampling parameters) and migrated to one of `targets` (groups
        that stay and decode: decode or colocated), or returned to be parked when none takes it,
        for the next epoch's decode groups. Its stream continues without a repeated or lost
        token: the events of the steps run here are written before the KV leaves."""
        assert self.loop is not None and self.engine is not None
        engine = self.engine
        self.admitting = False
        ids = list(self._active)
        left = await self.loop.call(lambda: {r: engine.remaining_tokens(r) for r in ids if r in engine.seqs})
        taken = await self._take_out([r for r, n in left.items() if n > command.finish_within])
        deadline = time.monotonic() + command.wait_s
        while self._active and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        taken += await self._take_out(list(self._active))  # overran the wait: move them too
        await self.flush_events()
        targets = [(t.group_id, t.address) for t in command.targets]
        parked = [h for h in taken if not await self.migrator.send(h, targets)]
        return pb.DrainResult(finished=len(left) - len(taken), migrated=len(taken) - len(parked),
                              parked=len(parked)), parked

    async def _take_out(self, ids: list[str]) -> list[KVHandoff]:
        assert self.loop is not None and self.engine is not None
        out = []
        for rid in ids:
            q = self._requests.get(rid)
            if q is None or rid not in self._active:
                continue
            try:
                output_ids, kv = await self.loop.call(self.engine.take_out, rid)
            except EngineError:  # not running this step (e.g. preempted): it finishes here
                continue
            self._forget(rid)
            out.append(KVHandoff(q, tuple(output_ids), kv, self.config.epoch))
        return out

    async def on_cancel(self, request_id: str) -> None:
        for eid in [e for e in self._active if request_of(e) == request_id]:
            await self._abort(eid)
            self.metrics.aborted.inc()
            self.aborted += 1
            log.info("aborted %s (client gone); its KV blocks are free", eid)

    async def _abort(self, eid: str) -> None:
        assert self.loop is not None and self.engine is not None
        self._forget(eid)
        await self.loop.call(self.engine.abort, eid)

    # ---- the block path (kv_receive.py, prefill_node/kv_send.py) -------------------------------------------
    async def ReserveKV(self, request: pb.ReserveKVRequest, context: grpc.aio.ServicerContext) -> pb.ReserveKVReply:  # noqa: N802
        q = request.request
        if self.blocks is None:
            return pb.ReserveKVReply(error=error(pb.UNAVAILABLE, f"decode group {self.config.group_id} takes KV "
                                                                 "over gRPC only (no KV agents)"))
        if not self.admitting:
            return pb.ReserveKVReply(error=error(pb.OVERLOADED, f"decode group {self.config.group_id} is being "
                                                                "reconfigured", retry_after_s=0.5))
        if await self.cluster.is_cancelled(q.request_id):
            return pb.ReserveKVReply(error=error(pb.CANCELLED, "cancelled before decode"))
        return await self.blocks.reserve(request, sampling_of(q.sampling))

    async def CommitKV(self, request: pb.CommitKVRequest, context: grpc.aio.ServicerContext) -> pb.CommitKVReply:  # noqa: N802
        rid = request.request_id
        q = self.blocks.reserved(rid) if self.blocks is not None else None
        if self.blocks is None or q is None:
            return pb.CommitKVReply(error=error(pb.UNAVAILABLE, f"no KV reservation for {rid} here"))
        if not self.admitting:
            await self.blocks.release(pb.ReleaseKVRequest(request_id=rid, transfer_id=request.transfer_id))
            return pb.CommitKVReply(error=error(pb.OVERLOADED, f"decode group {self.config.group_id} is being "
                                                               "reconfigured", retry_after_s=0.5))
        self._active.add(rid)  # before the engine can emit its first decode step
        self._requests[rid] = q
        err = await self.blocks.commit(request)
        if err is not None:
            self._forget(rid)
            return pb.CommitKVReply(error=err)
        await self._joined(q)
        return pb.CommitKVReply()

    async def ReleaseKV(self, request: pb.ReleaseKVRequest, context: grpc.aio.ServicerContext) -> pb.ReleaseKVReply:  # noqa: N802
        return pb.ReleaseKVReply(found=self.blocks is not None and await self.blocks.release(request))

    async def Health(self, request: pb.HealthRequest, context: grpc.aio.ServicerContext) -> pb.HealthReply:  # noqa: N802
        return self.health()

    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortReply:  # noqa: N802
        found = any(request_of(e) == request.request_id for e in self._active)
        await self.on_cancel(request.request_id)
        return pb.AbortReply(found=found)
