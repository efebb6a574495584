"""A decode group leader: admits each request whose KV has landed into its running batch and
streams every step's new tokens to the requests' output streams.

Lifecycle of one request here: KV handoff arrives (kvtransfer receiver) -> add_prefilled (joins
the batch at the next step) -> one event per step -> the event with finish_reason. A cancelled
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
from services.engine import BadRequestError, EngineError, RequestOutput
from services.node.frame import GroupLeader, error, sampling_of
from services.rpc import pb, pb_grpc

log = logging.getLogger("nitsum.decode")


class DecodeLeader(GroupLeader, pb_grpc.DecodeServicer):
    def __init__(self, config: NodeConfig) -> None:
        super().__init__(config)
        self.receiver = GrpcKVReceiver(self._admit)
        self._active: set[str] = set()
        self._outbox: asyncio.Queue[list[tuple[str, pb.TokenEvent]]] = asyncio.Queue()

    def add_services(self, server: grpc.aio.Server) -> None:
        pb_grpc.add_DecodeServicer_to_server(self, server)
        pb_grpc.add_KVTransferServicer_to_server(self.receiver, server)
        self.tasks.spawn(self._write_events(), name="event-writer")

    async def close(self) -> None:
        return None

    async def _admit(self, handoff: KVHandoff) -> pb.Error | None:
        assert self.loop is not None and self.engine is not None
        q = handoff.request
        self.metrics.kv_transfer_bytes.labels("received").inc(handoff.kv.k.numel() * handoff.kv.k.element_size() * 2)
        if await self.cluster.is_cancelled(q.request_id):
            return error(pb.CANCELLED, "cancelled before decode")
        self._active.add(q.request_id)  # before the engine can emit its first decode step
        try:
            await self.loop.call(self.engine.add_prefilled, q.request_id, list(q.prompt_ids), list(handoff.output_ids),
                                 handoff.kv, sampling_of(q.sampling))
        except BadRequestError as e:
            self._active.discard(q.request_id)
            return error(pb.BAD_REQUEST, str(e))
        except EngineError as e:
            self._active.discard(q.request_id)
            return error(pb.OVERLOADED, f"decode group {self.config.group_id}: {e}", retry_after_s=1.0)
        # A cancel published while the KV was in flight was missed by the live feed: check again.
        if await self.cluster.is_cancelled(q.request_id):
            await self.on_cancel(q.request_id)
        return None

    def on_outputs(self, outputs: list[RequestOutput]) -> None:
        now = time.time()
        batch = []
        for out in outputs:
            if out.request_id not in self._active:
                continue
            if out.finished:
                self._active.discard(out.request_id)
            batch.append((out.request_id, pb.TokenEvent(token_ids=out.new_token_ids,
                                                        finish_reason=out.finish_reason or "", time_s=now)))
        if batch:
            self._outbox.put_nowait(batch)

    async def _write_events(self) -> None:
        """One writer keeps each request's events in step order."""
        while True:
            batch = await self._outbox.get()
            while not self._outbox.empty():
                batch.extend(self._outbox.get_nowait())
            try:
                await self.cluster.emit_many(batch)
            except Exception:
                log.exception("could not write %d token events", len(batch))

    async def on_cancel(self, request_id: str) -> None:
        if request_id not in self._active:
            return
        assert self.loop is not None and self.engine is not None
        self._active.discard(request_id)
        await self.loop.call(self.engine.abort, request_id)
        self.metrics.aborted.inc()
        self.aborted += 1
        log.info("aborted %s (client gone); its KV blocks are free", request_id)

    async def Health(self, request: pb.HealthRequest, context: grpc.aio.ServicerContext) -> pb.HealthReply:  # noqa: N802
        return self.health()

    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortReply:  # noqa: N802
        found = request.request_id in self._active
        await self.on_cancel(request.request_id)
        return pb.AbortReply(found=found)
