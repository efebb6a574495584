"""Requests whose group died are resumed elsewhere, from the tokens their client already has.

The leading router keeps every dispatched request on the in-flight ledger in Redis (request ->
its QueuedRequest, and who holds it: the prefill group it was sent to, then the decode group the
prefill leader handed it to, a decode group it migrated to, a slot that parked it). The ledger
lives in Redis, so whichever router leads next can carry on.

Lifecycle of a recovery (`Recovery.sweep`, every `period_s` and at once when a failure is seen):
1. failure known: a group's leader stops answering health probes (`probe`: two probes in a row
   find it unreachable), a dispatch to it fails to connect, its lease expires, or a prefill leader
   reports that no decode group took the KV;
2. fence: an event of the request's next attempt goes on its output stream; from then on the
   gateway ignores whatever the old holder may still write;
3. read: the output stream, folded as the gateway folds it (`services/cluster/events.py`), says
   which tokens the client has and whether the request already finished;
4. re-queue: the request goes back into the router's queue with those tokens (`resume_ids`) and
   the new attempt; the scheduler places it like any request, a prefill group computes the KV of
   the prompt and those tokens, and the stream goes on with the next token. With no group to take
   it, it waits in the queue (parked) until one is back.

A request held by a live prefill (or colocated) group that never claimed it (a router that died
between putting it on the ledger and sending it) is resumed after `unclaimed_grace_s`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

import grpc

from router.decide.scheduler import role_does_prefill
from services.cluster import ClusterClient, GroupRecord
from services.cluster.events import fold
from services.rpc import ChannelPool, pb, pb_grpc

log = logging.getLogger("nitsum.router.live.recovery")
ROUTER_HOLDER = "router"  # holder of a request that is back in the router's queue


class Requeue(Protocol):
    """What recovery needs from the router (router.live.service.Router implements it)."""

    leading: bool

    def holds(self, request_id: str) -> bool: ...
    def requeue(self, request: pb.QueuedRequest) -> None: ...


class Recovery:
    def __init__(self, cluster: ClusterClient, router: Requeue, channels: ChannelPool, period_s: float = 0.25,
                 unclaimed_grace_s: float = 3.0) -> None:
        self.cluster = cluster
        self.router = router
        self.period_s = period_s
        self.unclaimed_grace_s = unclaimed_grace_s
        self.dead: dict[str, float] = {}  # group id -> when it was found dead (monotonic)
        self.resumed = 0
        self._misses: dict[str, int] = {}
        self._unclaimed_at: dict[str, float] = {}
        self._kick = asyncio.Event()
        self.channels = channels

    def mark_dead(self, group_id: str, why: str) -> None:
        if group_id not in self.dead:
            log.warning("group %s is gone (%s): resuming its requests elsewhere", group_id, why)
            self.dead[group_id] = time.monotonic()
        self._kick.set()

    def kick(self) -> None:
        self._kick.set()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(self._kick.wait(), self.period_s)
            except TimeoutError:
                pass
            self._kick.clear()
            if not self.router.leading:
                continue
            try:
                groups = await self.cluster.groups()
                await self.probe(groups)
                await self.sweep(groups)
            except Exception:
                log.exception("recovery sweep failed; retrying")
                await asyncio.sleep(self.period_s)

    # ---- failure detection ----------------------------------------------------------------
    async def probe(self, groups: list[GroupRecord]) -> None:
        """Health-probe every group leader; one that cannot be reached twice in a row is dead
        (a killed process refuses connections at once; a hung one stops renewing its lease)."""
        known = {g.group_id for g in groups}
        for gid in [g for g in self.dead if g not in known]:
            del self.dead[gid]  # its record is gone too: nothing routes to it any more
        results = await asyncio.gather(*(self._reachable(g) for g in groups if g.address))
        for g, ok in zip([g for g in groups if g.address], results, strict=True):
            if ok:
                self._misses.pop(g.group_id, None)
                self.dead.pop(g.group_id, None)
                continue
            self._misses[g.group_id] = self._misses.get(g.group_id, 0) + 1
            if self._misses[g.group_id] >= 2:
                self.mark_dead(g.group_id, "its leader does not answer")

    async def _reachable(self, g: GroupRecord) -> bool:
        channel = self.channels.get(g.address)
        stub = pb_grpc.DecodeStub(channel) if g.role == "decode" else pb_grpc.PrefillStub(channel)
        try:
            await stub.Health(pb.HealthRequest(), timeout=1.0)
            return True
        except grpc.aio.AioRpcError as e:
            # A slow leader (deadline) is not a dead one: its lease says when it stopped.
            return e.code() != grpc.StatusCode.UNAVAILABLE

    # ---- resuming -----------------------------------------------------------------------------
    async def sweep(self, groups: list[GroupRecord]) -> int:
        """Resume every request on the ledger whose holder is gone; returns how many."""
        live = {g.group_id for g in groups if g.group_id not in self.dead}
        live |= {s.slot_id for s in await self.cluster.slots()}
        prefill = {g.group_id for g in groups if role_does_prefill(g.role)}
        holders = await self.cluster.holders()
        resumed = 0
        for rid, holder in holders.items():
            if self.router.holds(rid):
                continue
            if holder in live and not (holder in prefill and await self._unclaimed(rid)):
                continue
            if await self.resume(rid):
                resumed += 1
        for rid in [r for r in self._unclaimed_at if r not in holders]:
            del self._unclaimed_at[rid]
        return resumed

    async def _unclaimed(self, rid: str) -> bool:
        """True once a request held by a prefill group has gone unclaimed past the grace."""
        request = await self.cluster.inflight_request(rid)
        if request is None or await self.cluster.prefill_claimed(rid, request.attempt):
            self._unclaimed_at.pop(rid, None)
            return False
        first = self._unclaimed_at.setdefault(rid, time.monotonic())
        return time.monotonic() - first > self.unclaimed_grace_s

    async def resume(self, rid: str) -> bool:
        """Fence, read what the client has, and put the request back in the queue; False when there
        was nothing to resume (finished, cancelled, or off the ledger)."""
        request = await self.cluster.inflight_request(rid)
        if request is None or await self.cluster.is_cancelled(rid):
            await self.cluster.drop_inflight(rid)
            return False
        attempt = request.attempt + 1
        await self.cluster.set_holder(rid, attempt, ROUTER_HOLDER)  # the old attempt can no longer touch it
        await self.cluster.emit(rid, pb.TokenEvent(attempt=attempt, time_s=time.time()))
        seen = fold(await self.cluster.output_events(rid))
        if seen.done:
            await self.cluster.drop_inflight(rid)
            return False
        if len(seen.tokens) >= request.sampling.max_tokens:  # its last event was lost: end it here
            await self.cluster.emit(rid, pb.TokenEvent(finish_reason="length", attempt=attempt, time_s=time.time(),
                                                       index=len(seen.tokens)))
            return False
        resumed = pb.QueuedRequest()
        resumed.CopyFrom(request)
        resumed.attempt = attempt
        del resumed.resume_ids[:]
        resumed.resume_ids.extend(seen.tokens)
        log.info("resuming %s (attempt %d) from its %d delivered tokens", rid, attempt, len(seen.tokens))
        self.resumed += 1
        self.router.requeue(resumed)
        return True
