"""The decode leader's half of the block hand-off (the protocol: prefill_node/kv_send.py):
reservations between `ReserveKV` and `CommitKV` / `ReleaseKV`. A reservation whose KV landed but
that is never committed (its prefill group died) is freed `timeout_s` later."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from kvtransfer.group_transfer import backend_of, receive_blocks, reserve_blocks
from services.engine import BadRequestError, EngineError, LLMEngine, SamplingParams
from services.node.engine_loop import EngineLoop
from services.node.frame import slo_of
from services.rpc import engine_id, error, pb
from services.tasks import TaskSet

log = logging.getLogger("nitsum.decode")


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
            return pb.ReserveKVReply(error=error(pb.BAD_REQUEST, f"request {rid!r} is already reserved here"))
        if req.backend != self.backend:
            return pb.ReserveKVReply(error=error(pb.UNAVAILABLE, f"decode group {self.group_id} moves KV blocks "
                                                                  f"over {self.backend!r}, not {req.backend!r}"))
        timeout_s = min(req.timeout_s or self.timeout_s, self.timeout_s)
        try:
            blocks = await self.loop.call(reserve_blocks, self.engine, rid, list(q.prompt_ids), params, req.num_tokens,
                                          slo_of(q))
        except BadRequestError as e:
            return pb.ReserveKVReply(error=error(pb.BAD_REQUEST, str(e)))
        except EngineError as e:
            return pb.ReserveKVReply(error=error(pb.OVERLOADED, f"decode group {self.group_id}: {e}", 1.0))
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
            return error(pb.UNAVAILABLE, f"decode group {self.group_id} holds no reservation {req.transfer_id!r}")
        del self._reserved[rid]
        if not await res.landed:
            return error(pb.UNAVAILABLE, f"KV of {rid} did not land on every rank of {self.group_id}")
        try:
            await self.loop.call(self.engine.finish_receive, rid, list(req.output_ids), res.num_tokens)
        except EngineError as e:
            await self.loop.call(self.engine.abort, rid)
            return error(pb.OVERLOADED, f"decode group {self.group_id}: {e}", 1.0)
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
