"""The gateway's side of the mesh: readiness, admission to a tier queue, and a request's events.

Lifecycle of one request here: `ready()` (503 if no prefill or no decode group, or no router, has
been seen for a while) -> `submit()` (429 if the tier's queue is at its limit, else XADD to the
tier stream) -> `events()` (the request's output stream, read through the gateway's one
`OutputMux` and folded as the router folds it, `services/cluster/events.py`, until a finish reason
or an error) -> `forget()`; `cancel()` when the client went away first.

A request that waits holds no Redis connection: one reader task reads every waiting request's
stream. Failures elsewhere end a request with a clear error within a bounded time: no leading
router for `router_grace_s`, or the request gone from Redis after a Redis restart lost it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from services.cluster import ClusterClient, GroupRecord
from services.cluster.client import REDIS_ERRORS
from services.cluster.events import OutputFold
from services.config import GatewayConfig
from services.gateway.observed import ObservationLog
from services.rpc import pb
from services.tasks import TaskSet

from .errors import ApiError, bad_request, internal, overloaded, timeout, unavailable

log = logging.getLogger("nitsum.gateway")
_READ_BLOCK_MS = 1000
_CHECK_EVERY_S = 1.0  # a waiting request with no event this long checks that it can still be answered


@dataclass
class _Waiter:
    last_id: str = "0-0"
    queue: asyncio.Queue[list[tuple[str, pb.TokenEvent]]] = field(default_factory=asyncio.Queue)


class OutputMux:
    """One task reads the output streams of every request this gateway is waiting on (one XREAD of
    many streams) and hands each request its events; a private wake stream ends a blocked read
    when a request starts waiting."""

    def __init__(self, cluster: ClusterClient, tasks: TaskSet) -> None:
        self.cluster = cluster
        self.wake_id = f"wake:{uuid.uuid4().hex}"  # read as an output stream: never a request id
        self._waiters: dict[str, _Waiter] = {self.wake_id: _Waiter("$")}
        self._changed = asyncio.Event()
        self._blocked = False  # in (or about to start) a blocking read that lacks a new waiter
        self.outages = 0  # times a read failed because Redis was unreachable
        self.healthy = True
        tasks.spawn(self._run(), name="output-mux")

    def register(self, request_id: str) -> asyncio.Queue[list[tuple[str, pb.TokenEvent]]]:
        waiter = self._waiters.setdefault(request_id, _Waiter())
        self._changed.set()
        return waiter.queue

    def unregister(self, request_id: str) -> None:
        self._waiters.pop(request_id, None)

    async def wake_if_blocked(self) -> None:
        """End the blocking read in progress, so that it starts again with the new waiter; a read
        not started yet will include it anyway."""
        if self._blocked:
            self._blocked = False
            await self.cluster.wake(self.cluster.keys.output(self.wake_id))

    async def _run(self) -> None:
        backoff = 0.05
        while True:
            if len(self._waiters) == 1:
                self._changed.clear()
                await self._changed.wait()
            self._blocked = True  # before `last` is taken: a waiter added after it wakes the read
            last = {rid: w.last_id for rid, w in self._waiters.items()}
            try:
                batches = await self.cluster.read_outputs(last, _READ_BLOCK_MS)
            except REDIS_ERRORS as e:
                self.outages += 1
                self.healthy = False
                log.warning("reading output streams failed (%s); retrying in %.2fs", e, backoff)
                await asyncio.sleep(backoff)
                backoff = min(1.0, backoff * 2)
                continue
            self._blocked = False
            self.healthy, backoff = True, 0.05
            for rid, items in batches.items():
                waiter = self._waiters.get(rid)
                if waiter is None or not items:
                    continue
                waiter.last_id = items[-1][0]
                if rid != self.wake_id:
                    waiter.queue.put_nowait(items)


class Upstream:
    def __init__(self, config: GatewayConfig, cluster: ClusterClient, tasks: TaskSet) -> None:
        self.config = config
        self.cluster = cluster
        self.tasks = tasks
        self.mux = OutputMux(cluster, tasks)
        self.observed = ObservationLog(cluster, tasks)
        self._groups: list[GroupRecord] = []
        self._groups_at = float("-inf")
        self._max_len = 0  # the context length last served, kept through a reconfiguration
        started = time.monotonic()
        self._role_seen = {"prefill": started, "decode": started, "router": started}
        self._seen_ever: set[str] = set()
        tasks.spawn(self._watch_router(), name="router-watch")

    # ---- readiness ------------------------------------------------------------------------
    async def groups(self, fresh: bool = False) -> list[GroupRecord]:
        now = time.monotonic()
        if fresh or now - self._groups_at > self.config.readiness_cache_s:
            self._groups = await self.cluster.groups()
            self._groups_at = now
            for phase in {p for g in self._groups for p in g.phases}:
                self._role_seen[phase] = now
                self._seen_ever.add(phase)
        return self._groups

    def missing(self, groups: list[GroupRecord], grace_s: float) -> list[str]:
        """Roles (prefill, decode, router) not serving now and not within `grace_s` of having served:
        a group being replaced (a slot restarting, a re-cut) or a router failing over is waited for.
        A colocated group serves both prefill and decode."""
        now, roles = time.monotonic(), {p for g in groups for p in g.phases}
        if self.router_leading:
            roles.add("router")
        return [r for r in ("prefill", "decode", "router")
                if r not in roles and (r not in self._seen_ever or now - self._role_seen[r] > grace_s)]

    @property
    def router_leading(self) -> bool:
        return time.monotonic() - self._role_seen["router"] < 2.0 and "router" in self._seen_ever

    async def _watch_router(self) -> None:
        while True:
            try:
                await self.look_for_router()
            except REDIS_ERRORS:
                pass
            await asyncio.sleep(0.5)

    async def look_for_router(self) -> None:
        if await self.cluster.leader() is not None:
            self._role_seen["router"] = time.monotonic()
            self._seen_ever.add("router")

    async def ready(self) -> int:
        """The context length the ready groups serve, or 503 while a role is missing past its grace."""
        groups = await self.groups()
        missing = self.missing(groups, self.config.role_grace_s)
        if missing:  # the cached view may predate a group's or a router's arrival: look again
            groups = await self.groups(fresh=True)
            await self.look_for_router()
            missing = self.missing(groups, self.config.role_grace_s)
        if missing:
            what = " or ".join("router" if r == "router" else f"{r} group" for r in missing)
            raise unavailable(f"no {what} is ready; retry shortly", self.config.retry_after_s)
        lengths = [g.max_model_len for g in groups if g.max_model_len > 0]
        if lengths:
            self._max_len = min(lengths)
        return self._max_len or 1 << 30

    # ---- one request ------------------------------------------------------------------------
    async def submit(self, request: pb.QueuedRequest) -> str:
        """Put the request on its tier's stream; its entry id (429 when the tier's queue is full)."""
        tier = self.config.policy.tier(request.tier)
        self.mux.register(request.request_id)
        self.observed.arrival(tier.name, len(request.prompt_ids), request.arrival_s)
        try:
            entry_id, depth = await self.cluster.enqueue_if_room(request, tier.queue_limit)
            if entry_id is None:
                self.observed.finish(tier.name, "shed", len(request.prompt_ids))
                raise overloaded(f"tier {tier.name!r} has {depth} requests waiting (limit {tier.queue_limit}); "
                                 "retry later", max(1.0, tier.ttft_s))
            await self.mux.wake_if_blocked()
        except BaseException:
            self.mux.unregister(request.request_id)
            raise
        return entry_id

    async def events(self, request: pb.QueuedRequest, entry_id: str) -> AsyncIterator[pb.TokenEvent]:
        """The request's new tokens in order, one event per batch that adds any, the last with its
        finish reason; raises ApiError for an error event, a timeout, or a request nobody can answer."""
        rid = request.request_id
        queue = self.mux.register(rid)
        fold, started = OutputFold(), time.monotonic()
        outages = self.mux.outages
        try:
            while True:
                try:
                    batch = await asyncio.wait_for(queue.get(), _CHECK_EVERY_S)
                except TimeoutError:
                    await self._check(request, entry_id, fold, started, outages)
                    outages = self.mux.outages
                    continue
                for _, event in batch:
                    new = fold.add(event)
                    if new is None:
                        continue
                    if fold.error is not None:
                        raise error_of(fold.error, rid)
                    if new or fold.finish_reason:
                        yield pb.TokenEvent(token_ids=new, finish_reason=fold.finish_reason, time_s=event.time_s,
                                            index=len(fold.tokens) - len(new))
                    if fold.done:
                        return
        finally:
            self.mux.unregister(rid)

    async def _check(self, request: pb.QueuedRequest, entry_id: str, fold: OutputFold, started: float,
                     outages: int) -> None:
        """No event for a while: fail now if the request cannot be answered any more."""
        rid, elapsed = request.request_id, time.monotonic() - started
        # A tier may keep a request waiting up to its maximum wait and then its TTFT target (the
        # batch tier: minutes): its first token is not given up on before that.
        tier = self.config.policy.tier(request.tier)
        first = max(self.config.first_event_timeout_s, tier.max_wait_s + tier.ttft_s)
        limit = self.config.request_timeout_s if fold.tokens else first
        if elapsed > limit:
            raise timeout(f"request {rid} got no {'end' if fold.tokens else 'first token'} within {limit:.0f}s")
        if not self.mux.healthy and elapsed > self.config.router_grace_s:
            raise unavailable(f"request {rid}: the cluster state (Redis) is unreachable; retry the request", 2.0)
        if "router" in self.missing([], self.config.router_grace_s):
            raise unavailable(f"request {rid}: no router has been running for {self.config.router_grace_s:.0f}s; "
                              "retry the request", self.config.retry_after_s)
        if self.mux.outages != outages and not await self._still_known(request, entry_id):
            raise unavailable(f"request {rid} was lost when the cluster state (Redis) restarted; retry it", 1.0)

    async def _still_known(self, request: pb.QueuedRequest, entry_id: str) -> bool:
        """After a Redis outage: is the request still queued, dispatched, or answering?"""
        try:
            return (await self.cluster.queued_entry_exists(request.tier, entry_id)
                    or await self.cluster.is_inflight(request.request_id)
                    or await self.cluster.output_exists(request.request_id))
        except REDIS_ERRORS:
            return True  # cannot tell yet: the next check asks again

    def cancel(self, request_id: str) -> None:
        """Tell the router and the groups to drop the request (from a cancelled context: no await)."""
        self.tasks.spawn(self._cancel(request_id), name=f"cancel-{request_id}")

    async def _cancel(self, request_id: str) -> None:
        await self.cluster.cancel(request_id)
        await self.cluster.drop_output(request_id)

    def forget(self, request_id: str) -> None:
        self.tasks.spawn(self.cluster.drop_output(request_id), name=f"drop-{request_id}")


def error_of(error: pb.Error, request_id: str) -> ApiError:
    if error.kind == pb.BAD_REQUEST:
        return bad_request(error.message)
    if error.kind == pb.OVERLOADED:
        return overloaded(error.message or "overloaded; retry later", error.retry_after_s or 1.0)
    if error.kind == pb.UNAVAILABLE:
        return unavailable(error.message or "no group can serve this now", error.retry_after_s or 1.0)
    return internal(request_id)
