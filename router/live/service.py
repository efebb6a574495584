"""The live router: tier streams in, dispatches to prefill/decode groups out.

Loop (only while this router holds the leader lock): read new entries from every tier stream
(consumer group `routers`), take over entries a dead router left pending (XAUTOCLAIM), build a
`SchedulerSnapshot` from what is queued and the groups' Redis records, call the pure
`router.decide.scheduler.schedule`, then:
  - shed -> an OVERLOADED event on the request's output stream (the gateway answers 429) + ack;
  - dispatch -> the request goes on the in-flight ledger and off its tier stream (one Redis
    transaction), then a Prefill RPC to the prefill group leader naming the decode group.
A request cancelled while queued is dropped. Requests in neither list stay queued. An entry read
but not dispatched stays pending in its stream: a router that takes over the lead claims it.
Requests whose group dies are resumed by `router/live/recovery.py`, which puts them back in this queue.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from router.decide.scheduler import (
    DEFAULT_PREFILL_TOKENS_PER_S,
    GroupState,
    PendingRequest,
    SchedulerSnapshot,
    schedule,
)
from router.live.recovery import Recovery
from services.cluster import ClusterClient, GroupRecord, QueueEntry
from services.cluster.client import REDIS_ERRORS
from services.config import RouterConfig
from services.metrics import RouterMetrics
from services.rpc import ChannelPool, pb, pb_grpc
from services.tasks import TaskSet

log = logging.getLogger("nitsum.router")


@dataclass
class InFlight:
    """Load this router has sent to a group that the group's heartbeat may not show yet."""

    requests: int = 0
    tokens: int = 0
    blocks: int = 0
    deadlines: dict[str, tuple[float, int]] = field(default_factory=dict)  # prompts sent: TTFT deadline, tokens


@dataclass
class Router:
    config: RouterConfig
    cluster: ClusterClient
    tasks: TaskSet = field(default_factory=lambda: TaskSet("router"))
    queued: dict[str, QueueEntry] = field(default_factory=dict)  # request id -> entry
    dispatching: set[str] = field(default_factory=set)
    inflight: dict[str, InFlight] = field(default_factory=dict)
    channels: ChannelPool = field(default_factory=ChannelPool)  # shared with recovery and the orchestrator
    _groups: list[GroupRecord] = field(default_factory=list)
    _groups_at: float = float("-inf")
    leading: bool = False
    metrics: RouterMetrics = field(default_factory=RouterMetrics)
    # Reconfiguration (router/reconfig/orchestrator.py): groups being re-cut get no new work, and groups of
    # an epoch newer than `epoch` get none until every group of that epoch is ready.
    frozen: set[str] = field(default_factory=set)
    epoch: int | None = None  # None: route to every registered group (static groups)
    recovery: Recovery = field(init=False)
    _took_lead: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.recovery = Recovery(self.cluster, self, self.channels)

    async def run(self, stop: asyncio.Event) -> None:
        tiers = list(self.config.policy.names)
        await self._until_redis(lambda: self.cluster.ensure_queues(tiers), stop)
        self.tasks.spawn(self._hold_leadership(stop), name="leader-lock")
        self.tasks.spawn(self._follow_cancellations(), name="cancellations")
        self.tasks.spawn(self._claim_stale(stop), name="claim-stale")
        self.tasks.spawn(self.recovery.run(stop), name="recovery")
        backoff = 0.05
        try:
            while not stop.is_set():
                if not self.leading:
                    await asyncio.sleep(0.05)
                    continue
                try:
                    await self._tick(tiers)
                    backoff = 0.05
                except REDIS_ERRORS as e:  # Redis restarting: keep what is queued here, try again
                    log.warning("router tick failed (%s); retrying in %.2fs", e, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(1.0, backoff * 2)
        finally:
            await self.tasks.cancel_all()
            await self.channels.close()
            if self.leading:
                try:
                    await self.cluster.release_leader(self.config.router_id)
                except REDIS_ERRORS:
                    pass  # the lock expires by itself

    async def _until_redis(self, call: Any, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await call()
                return
            except REDIS_ERRORS as e:
                log.warning("Redis unreachable (%s); retrying", e)
                await asyncio.sleep(1.0)

    async def _tick(self, tiers: list[str]) -> None:
        block = self.config.read_block_ms if self.queued else 100
        for entry in await self.cluster.read_queues(self.config.router_id, tiers, self.config.read_count, block):
            self._take(entry)
        if self.queued:
            await self._schedule_once()

    def _take(self, entry: QueueEntry) -> None:
        rid = entry.request.request_id
        if rid not in self.queued and rid not in self.dispatching:
            self.queued[rid] = entry

    # ---- what recovery drives (router.live.recovery.Requeue) ------------------------------------------
    def holds(self, request_id: str) -> bool:
        return request_id in self.queued or request_id in self.dispatching

    def requeue(self, request: pb.QueuedRequest) -> None:
        """A resumed request: queued here only (its tier stream entry is long gone)."""
        self.queued[request.request_id] = QueueEntry(request.tier, "", request)

    async def _groups_now(self) -> list[GroupRecord]:
        now = time.monotonic()
        if now - self._groups_at > self.config.group_refresh_s:
            self._groups = await self.cluster.groups()
            self._groups_at = now
        return self._groups

    def snapshot(self, groups: list[GroupRecord]) -> SchedulerSnapshot:
        queued = tuple(PendingRequest(rid, e.tier, e.request.arrival_s, _context(e.request),
                                     e.request.sampling.max_tokens - len(e.request.resume_ids))
                       for rid, e in self.queued.items())
        states = []
        for g in groups:
            if not self.routable(g):
                continue
            extra = self.inflight.get(g.group_id, InFlight())
            # What the group measured of itself (its step-time model), else the scheduler's default;
            # its backlog as it last reported it, or as this router counts its own dispatches to it
            # (the report lags by a heartbeat), whichever is more.
            rate = g.prefill_tokens_per_s if g.prefill_tokens_per_s > 0 else DEFAULT_PREFILL_TOKENS_PER_S
            states.append(GroupState(g.group_id, g.role, g.tp, max(0, g.free_kv_blocks - extra.blocks), g.block_size,
                                     g.running + extra.requests, g.max_running,
                                     queued_tokens=max(g.queued_tokens, extra.tokens), prefill_tokens_per_s=rate,
                                     queued_requests=extra.requests, max_queued_requests=self.config.prefill_window,
                                     context_tokens=g.used_kv_blocks * g.block_size, decode_step_s=_decode_step(g),
                                     prefill_deadlines=tuple(extra.deadlines.values())))
        tier_aware = self.config.schedule == "tier"
        return SchedulerSnapshot(now_s=time.time(), tiers=self.config.policy.tiers, queued=queued, groups=tuple(states),
                                 order="deadline" if tier_aware else "fcfs",
                                 background_share=self.config.background_share if tier_aware else 1.0,
                                 tpot_guard=self.config.tpot_guard if tier_aware else 0.0)

    def routable(self, g: GroupRecord) -> bool:
        return (g.group_id not in self.frozen and g.group_id not in self.recovery.dead
                and (self.epoch is None or g.epoch <= self.epoch))

    # ---- what the orchestrator drives (router.reconfig.orchestrator.RoutingControl) -----------------------
    def freeze(self, group_ids: set[str]) -> None:
        self.frozen |= group_ids

    def unfreeze(self, group_ids: set[str]) -> None:
        self.frozen -= group_ids
        self._groups_at = float("-inf")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._groups_at = float("-inf")

    async def wait_idle(self, group_ids: set[str], timeout_s: float) -> None:
        """Until no dispatch this router started is still with one of `group_ids`."""
        deadline = time.monotonic() + timeout_s
        while any(self.inflight.get(g, InFlight()).requests for g in group_ids):
            if time.monotonic() > deadline:
                raise TimeoutError(f"dispatches to {sorted(group_ids)} did not finish within {timeout_s:.0f}s")
            await asyncio.sleep(0.005)

    async def _schedule_once(self) -> None:
        groups = await self._groups_now()
        start = time.perf_counter()
        decisions = schedule(self.snapshot(groups))
        self.metrics.schedule_seconds.observe(time.perf_counter() - start)
        by_id = {g.group_id: g for g in groups}
        for shed in decisions.shed:
            entry = self.queued[shed.request_id]
            if entry.request.attempt:
                continue  # a resumed request has streamed already: it waits, it is not shed
            del self.queued[shed.request_id]
            self.metrics.shed.labels(entry.tier).inc()
            err = pb.Error(kind=pb.OVERLOADED, message=shed.reason, retry_after_s=shed.retry_after_s)
            await self.cluster.emit(shed.request_id, pb.TokenEvent(error=err, time_s=time.time()))
            await self.cluster.ack(entry)
        for d in decisions.dispatch:
            prefill, decode = by_id[d.prefill_group], by_id[d.decode_group]
            if not (self.routable(prefill) and self.routable(decode)):
                continue  # frozen for a reconfiguration since the snapshot (the awaits above): stays queued
            entry = self.queued.pop(d.request_id)
            self.metrics.dispatched.labels(entry.tier).inc()
            self.dispatching.add(d.request_id)
            # The load is counted before the task starts, so `wait_idle` never misses a dispatch.
            q = entry.request
            blocks = math.ceil((len(q.prompt_ids) + q.sampling.max_tokens) / max(1, decode.block_size))
            p_load = self.inflight.setdefault(prefill.group_id, InFlight())
            d_load = self.inflight.setdefault(decode.group_id, InFlight())
            p_load.requests += 1
            p_load.tokens += _context(q)
            p_load.deadlines[q.request_id] = (q.arrival_s + self.config.policy.tier(q.tier).ttft_s, _context(q))
            if d_load is not p_load:  # a colocated group doing both phases holds the request once
                d_load.requests += 1
            d_load.blocks += blocks
            self.tasks.spawn(self._dispatch(entry, prefill, decode, p_load, d_load, blocks), name=f"dispatch-{d.request_id}")

    async def _dispatch(self, entry: QueueEntry, prefill: GroupRecord, decode: GroupRecord, p_load: InFlight,
                        d_load: InFlight, blocks: int) -> None:
        q = entry.request
        try:
            try:
                await self.cluster.record_dispatch(q, prefill.group_id, entry if entry.entry_id else None)
            except REDIS_ERRORS as e:  # not on the ledger: the request is still queued
                log.warning("could not dispatch %s (%s); it stays queued", q.request_id, e)
                self.queued.setdefault(q.request_id, entry)
                return
            t_disp = time.time()
            reply = await pb_grpc.PrefillStub(self.channels.get(prefill.address)).Prefill(
                pb.PrefillRequest(request=q, decode_group=decode.group_id, decode_address=decode.address,
                                  epoch=prefill.epoch), timeout=self.config.rpc_timeout_s)
            log.debug("request %s (%s): queued %.3fs, prefill %.3fs, KV hand-off %.3fs", q.request_id, q.tier,
                      t_disp - q.arrival_s, reply.prefill_s, reply.transfer_s)
            if reply.error.kind == pb.UNAVAILABLE:  # no decode group took its KV: resume it (below)
                log.info("request %s: %s; it waits for a decode group", q.request_id, reply.error.message)
                await self.cluster.set_holder(q.request_id, q.attempt, "")
                self.recovery.kick()
            elif reply.error.kind not in (pb.ERROR_KIND_UNSPECIFIED, pb.CANCELLED):
                log.info("request %s: %s", q.request_id, reply.error.message)
        except grpc.aio.AioRpcError as e:
            log.warning("prefill group %s failed request %s: %s", prefill.group_id, q.request_id, e.code().name)
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                self.recovery.mark_dead(prefill.group_id, f"a prefill RPC could not reach it ({e.details()})")
        finally:
            p_load.requests -= 1
            p_load.tokens -= _context(q)
            p_load.deadlines.pop(q.request_id, None)
            if d_load is not p_load:
                d_load.requests -= 1
            d_load.blocks -= blocks
            self.dispatching.discard(q.request_id)
            self._groups_at = float("-inf")  # the groups' load changed: re-read before the next decision

    async def _hold_leadership(self, stop: asyncio.Event) -> None:
        ttl = self.config.leader_ttl_ms
        while not stop.is_set():
            try:
                leading = await self.cluster.hold_leader(self.config.router_id, ttl)
            except Exception:
                log.exception("leader lock refresh failed")
                leading = False
            if leading != self.leading:
                log.info("router %s %s", self.config.router_id, "leads" if leading else "stands by")
                if leading:
                    self._took_lead.set()
            self.leading = leading
            self.metrics.leading.set(1 if leading else 0)
            await asyncio.sleep(ttl / 3000)

    async def _claim_stale(self, stop: asyncio.Event) -> None:
        """Take over entries another router read but never dispatched: at once when this router
        takes the lead (the lock says the last leader is gone), then those idle past the timeout."""
        while not stop.is_set():
            try:
                await asyncio.wait_for(self._took_lead.wait(), self.config.claim_idle_ms / 2000)
            except TimeoutError:
                pass
            took_lead, idle_ms = self._took_lead.is_set(), self.config.claim_idle_ms
            self._took_lead.clear()
            if not self.leading:
                continue
            try:
                for tier in self.config.policy.names:
                    for entry in await self.cluster.claim_stale(self.config.router_id, tier, 0 if took_lead else idle_ms):
                        if not self.holds(entry.request.request_id):
                            log.info("took over request %s left by another router", entry.request.request_id)
                            self._take(entry)
            except REDIS_ERRORS as e:
                log.warning("claiming stale entries failed (%s); retrying", e)
            if took_lead:
                self.recovery.kick()

    async def _follow_cancellations(self) -> None:
        while True:
            try:
                async for rid in self.cluster.cancellations():
                    entry = self.queued.pop(rid, None)
                    if entry is not None and entry.entry_id:
                        await self.cluster.ack(entry)
                    if self.leading:
                        await self.cluster.drop_inflight(rid)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("cancellation feed failed; resubscribing")
                await asyncio.sleep(0.5)


def _context(q: pb.QueuedRequest) -> int:
    """Tokens a prefill group computes for the request: its prompt and, resumed, what it had sent."""
    return len(q.prompt_ids) + len(q.resume_ids)


def _decode_step(g: GroupRecord) -> Callable[[int, int], float] | None:
    """The group's measured decode step (base + per row + per KV token read), None until it has one."""
    if g.step_per_decode_s <= 0 and g.step_per_context_s <= 0:
        return None
    base, per_row, per_token = g.step_base_s, g.step_per_decode_s, g.step_per_context_s
    return lambda rows, context: base + per_row * rows + per_token * context
