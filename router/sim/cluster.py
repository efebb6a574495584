"""The simulator's event loop: arrivals, router ticks, group iterations, planner runs, reconfigurations.

A request's life here mirrors the live mesh: it arrives in its tier's router queue; a router tick
calls `router.decide.scheduler.schedule()` (the same function the live router calls) which sheds it or
dispatches it to a prefill group and a decode group (reserving its KV there); the prefill group
runs it in chunks and emits the first token (TTFT); its KV crosses the interconnect to the
decode group (perf-model transfer time), where it joins the continuous batch until its last
token (TPOT). Every `plan_interval_s` the planner (`router.decide.planner.Planner`, same code as live)
may pick a new plan; the groups it changes stop, their running sequences migrate with their KV
to the new decode groups, prompts not yet prefilled go back to the router queue, and the new
groups serve nothing for the modelled pause. Every request ends exactly once: finished or shed.

`run()` replays a whole trace; `add()` + `run_until()` feed it one arrival at a time, which is
how the planner's digital twin (router/sim/twin.py) keeps its shadow runs level with the clock.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, cast

from router.decide.perfmodel import PerfModel
from router.decide.planner import Planner, PlannerState
from router.decide.plans import Plan
from router.decide.scheduler import GroupState, PendingRequest, SchedulerSnapshot, schedule
from router.decide.workload import WorkloadEstimate, WorkloadEstimator
from router.sim.group import Join, SimGroup
from router.sim.trace import TraceRequest
from services.engine.policy import STEP_CAP_SHARE, step_cap_s
from services.tiers import Tier


class TwinLike(Protocol):
    """What the simulator feeds and asks (router.sim.twin.Twin)."""

    def arrive(self, now: float, tier: str, prompt_tokens: int) -> None: ...

    def finished(self, tier: str, output_tokens: int) -> None: ...

    def gains(self, now: float, current: Plan, workload: WorkloadEstimate) -> Mapping[str, float]: ...


@dataclass(frozen=True)
class SimConfig:
    tick_s: float = 0.005  # router tick coalescing: changes within this window share one call
    plan_interval_s: float = 5.0
    window_s: float = 30.0  # workload estimator's sliding window
    block_size: int = 16
    max_running: int = 256
    chunk_tokens: int = 8192  # vLLM V1's default token budget per forward for the API server
    # A prefill group buffers about this much work; the rest waits in the router queue where
    # the deadline order can still put an urgent request first.
    prefill_buffer_s: float = 0.15
    order: str = "deadline"
    # A forward carrying a prefill chunk in a group that also decodes may take at most this share
    # of the tightest TPOT target among its decoding sequences (Sarathi-Serve's SLO-derived token
    # budget, per step); 0 = off (vLLM's fixed budget).
    tpot_guard: float = 0.9
    # A forward carrying prompt tokens takes at most this share of the tiers' tightest TTFT target
    # (services/engine/policy.py, as `nitsum up` runs the engines); 0 = off (vLLM's fixed budget).
    step_cap_share: float = STEP_CAP_SHARE
    min_chunk: int = 256  # the guards never cut a forward's prompt tokens below this (the engine's min_chunk_tokens)
    # Prompts a prefill group may hold before the rest wait in the router queue (the live
    # router's prefill_window); unbounded by default, where prefill_buffer_s bounds the tokens.
    prefill_window: int = 1 << 30


@dataclass(frozen=True)
class Reconfiguration:
    at_s: float
    from_plan: str
    to_plan: str
    pause_s: float
    slots: int
    explanation: str


@dataclass
class SimResult:
    requests: list[TraceRequest]
    first_token_s: list[float]
    finish_s: list[float]
    shed_reason: dict[int, str]
    duration_s: float
    reconfigurations: list[Reconfiguration] = field(default_factory=list)
    plans: list[tuple[float, str]] = field(default_factory=list)


class Simulator:
    """Runs one policy over one trace. Deterministic: same inputs, same result."""

    def __init__(self, requests: list[TraceRequest], perf: PerfModel, tiers: tuple[Tier, ...],
                 plan: Plan, cfg: SimConfig | None = None, planner: Planner | None = None,
                 progress: Callable[[float], None] | None = None, twin: TwinLike | None = None,
                 on_outcome: Callable[[float, float], None] | None = None) -> None:
        self.reqs, self.perf, self.tiers = requests, perf, tiers
        self.cfg = cfg or SimConfig()
        share = self.cfg.step_cap_share
        self.max_step_s = step_cap_s(min(t.ttft_s for t in tiers), share) if share > 0 else math.inf
        self.planner, self.progress, self.twin, self.on_outcome = planner, progress, twin, on_outcome
        self.planner_state = PlannerState()
        self.chained = False  # run(): each arrival schedules the next; add(): the caller feeds them
        n = len(requests)
        self.first = [math.nan] * n
        self.finish_t = [math.nan] * n
        self.shed: dict[int, str] = {}
        self.queue: dict[int, PendingRequest] = {}
        self.waiting: Counter[str] = Counter()  # queued per tier (the gateway's queue depth)
        self.reserved_on: dict[int, tuple[str, int]] = {}  # rid -> (decode group, blocks)
        self.decode_of: dict[int, str] = {}
        self.events: list[tuple[float, int, str, object]] = []
        self.seq = 0
        self.now = 0.0
        self.tick_pending = False
        self.groups: dict[str, SimGroup] = {}
        self.plan = plan
        self.tier_of = {t.name: t for t in tiers}
        self.tpot_of = [self.tier_of[r.tier].tpot_s for r in requests]
        self.deadline_of = [r.arrival_s + self.tier_of[r.tier].ttft_s for r in requests]
        self.workload = WorkloadEstimator(self.cfg.window_s)
        self.result = SimResult(requests, self.first, self.finish_t, self.shed,
                                duration_s=max((r.arrival_s for r in requests), default=0.0))
        self.handlers: dict[str, Callable[[object], None]] = {
            "arrive": self._on_arrive, "tick": self._on_tick, "iter": self._on_iter,
            "join": self._on_join, "resume": self._on_resume, "plan": self._on_plan}
        self._install(plan, pause_s=0.0)

    # -- event plumbing ------------------------------------------------------------------------
    def push(self, at: float, kind: str, payload: object) -> None:
        self.seq += 1
        heapq.heappush(self.events, (at, self.seq, kind, payload))

    def run(self) -> SimResult:
        self.chained = True
        if self.reqs:
            self.push(self.reqs[0].arrival_s, "arrive", 0)
        if self.planner is not None:
            self.push(self.cfg.plan_interval_s, "plan", None)
        self.run_until(math.inf)
        for rid in list(self.queue):  # only if something could never be placed anywhere
            self._shed(rid, "never placeable: larger than every group's KV memory")
        return self.result

    def add(self, r: TraceRequest) -> None:
        """Incremental mode (the planner's shadow runs): `r` arrives; `run_until` plays it."""
        self.reqs.append(r)
        self.first.append(math.nan)
        self.finish_t.append(math.nan)
        self.tpot_of.append(self.tier_of[r.tier].tpot_s)
        self.deadline_of.append(r.arrival_s + self.tier_of[r.tier].ttft_s)
        self.push(r.arrival_s, "arrive", len(self.reqs) - 1)

    def run_until(self, t: float) -> None:
        count = 0
        while self.events and self.events[0][0] <= t:
            self.now, _, kind, payload = heapq.heappop(self.events)
            self.handlers[kind](payload)
            count += 1
            if self.progress is not None and count % 20000 == 0:
                self.progress(min(1.0, self.now / max(self.result.duration_s, 1e-9)))

    # -- requests ------------------------------------------------------------------------------
    def _on_arrive(self, payload: object) -> None:
        rid = int(payload)  # type: ignore[call-overload]
        r = self.reqs[rid]
        self.workload.observe_arrival(self.now, r.tier, r.prompt_tokens)
        tier = self.tier_of[r.tier]
        if tier.has_room(self.waiting[r.tier]):  # what the gateway checks: a full tier's arrival gets 429
            self._enqueue(rid)
        else:
            self._shed(rid, f"tier {r.tier} queue full (limit {tier.queue_limit})")
        if self.twin is not None:
            self.twin.arrive(self.now, r.tier, r.prompt_tokens)
        if self.chained and rid + 1 < len(self.reqs):
            self.push(self.reqs[rid + 1].arrival_s, "arrive", rid + 1)
        self._mark_dirty()

    def _mark_dirty(self) -> None:
        if self.queue and not self.tick_pending:
            self.tick_pending = True
            self.push(self.now + self.cfg.tick_s, "tick", None)

    def _enqueue(self, rid: int) -> None:
        r = self.reqs[rid]
        self.queue[rid] = PendingRequest(str(rid), r.tier, r.arrival_s, r.prompt_tokens, r.output_tokens)
        self.waiting[r.tier] += 1

    def _dequeue(self, rid: int) -> None:
        if self.queue.pop(rid, None) is not None:
            self.waiting[self.reqs[rid].tier] -= 1

    def _shed(self, rid: int, reason: str) -> None:
        self._dequeue(rid)
        self.shed[rid] = reason
        self.workload.observe_outcome(self.now, 0.0)
        if self.on_outcome is not None:
            self.on_outcome(self.now, 0.0)

    def _finish(self, rid: int, at: float) -> None:
        self.finish_t[rid] = at
        self._release(rid)
        r = self.reqs[rid]
        self.workload.observe_finish(at, r.tier, r.output_tokens)
        if self.twin is not None:
            self.twin.finished(r.tier, r.output_tokens)
        tier = self.tier_of[r.tier]
        tpot = (at - self.first[rid]) / (r.output_tokens - 1) if r.output_tokens > 1 else 0.0
        credit = tier.weight if tier.met(self.first[rid] - r.arrival_s, tpot) else 0.0
        self.workload.observe_outcome(at, credit)
        if self.on_outcome is not None:
            self.on_outcome(at, credit)
        self._mark_dirty()

    def _reserve(self, rid: int, g: SimGroup, tokens: int) -> None:
        blocks = -(-tokens // g.block_size)
        g.free_blocks -= blocks
        g.reserved += 1
        self.reserved_on[rid] = (g.gid, blocks)
        self.decode_of[rid] = g.gid

    def _release(self, rid: int) -> None:
        gid, blocks = self.reserved_on.pop(rid, ("", 0))
        g = self.groups.get(gid)
        if g is not None:
            g.free_blocks += blocks
            g.reserved -= 1

    # -- router tick: the shared scheduler -----------------------------------------------------
    def _on_tick(self, _: object) -> None:
        self.tick_pending = False
        if not self.queue:
            return
        states = tuple(self._state(g) for g in self.groups.values() if self.now >= g.paused_until)
        if not states:
            return
        snap = SchedulerSnapshot(self.now, self.tiers, tuple(self.queue.values()), states, self.cfg.order,
                                 tpot_guard=self.cfg.tpot_guard)
        decisions = schedule(snap)
        for s in decisions.shed:
            self._shed(int(s.request_id), s.reason)
        for d in decisions.dispatch:
            rid = int(d.request_id)
            r = self.reqs[rid]
            self._dequeue(rid)
            self._reserve(rid, self.groups[d.decode_group], r.prompt_tokens + r.output_tokens)
            pre = self.groups[d.prefill_group]
            pre.prefill_q.append([rid, r.prompt_tokens, 0])
            pre.queued_tokens += r.prompt_tokens
            pre.interrupt(self.now)
            pre.start(self.now, self._finish)

    def _state(self, g: SimGroup) -> GroupState:
        rate = g.prefill_rate
        perf, tp = g.perf, g.tp
        return GroupState(g.gid, g.role, g.tp, g.free_blocks, g.block_size, g.reserved, g.max_running,
                          g.queued_tokens, max(2048, int(rate * self.cfg.prefill_buffer_s)), rate,
                          queued_requests=len(g.prefill_q), max_queued_requests=self.cfg.prefill_window,
                          context_tokens=g.context, decode_step_s=lambda n, ctx: perf.decode_step_time(n, ctx, tp),
                          prefill_deadlines=tuple((self.deadline_of[rid], prompt - done) for rid, prompt, done in g.prefill_q)
                          if self.cfg.order == "deadline" else None)

    # -- groups ----------------------------------------------------------------------------------
    def _on_iter(self, payload: object) -> None:
        gid, version = cast(tuple[str, int], payload)
        g = self.groups.get(gid)
        if g is None or g.version != version or not g.alive:
            return  # superseded by an interrupt or a reconfiguration
        for rid in g.end(self.now, self._finish):
            self._prefilled(rid, g)
        g.start(self.now, self._finish)
        self._mark_dirty()

    def _prefilled(self, rid: int, pre: SimGroup) -> None:
        r = self.reqs[rid]
        self.first[rid] = self.now
        if r.output_tokens <= 1:
            self._finish(rid, self.now)
            return
        join = Join(rid, r.output_tokens - 1, r.prompt_tokens + 1)
        dec = self.groups.get(self.decode_of[rid])
        if dec is pre:
            dec.pending.append(join)
            return
        dst_tp = dec.tp if dec is not None else pre.tp
        self.push(self.now + self.perf.kv_transfer_time(r.prompt_tokens, pre.tp, dst_tp), "join", join)

    def _on_join(self, payload: object) -> None:
        join: Join = payload  # type: ignore[assignment]
        g = self.groups.get(self.decode_of[join.rid])
        if g is None or not g.alive:
            g = self._migrate_target(join)  # its decode group was reconfigured away meanwhile
        g.pending.append(join)
        g.interrupt(self.now)
        g.start(self.now, self._finish)

    def _on_resume(self, payload: object) -> None:
        g = self.groups.get(str(payload))
        if g is not None and g.alive:
            g.start(self.now, self._finish)
        self._mark_dirty()

    # -- planner and reconfiguration -------------------------------------------------------------
    def _on_plan(self, _: object) -> None:
        assert self.planner is not None
        workload = self.workload.estimate(self.now)
        measured = self.twin.gains(self.now, self.plan, workload) if self.twin is not None else None
        decision, self.planner_state = self.planner.decide(self.now, self.plan, workload, self.planner_state,
                                                           self.workload.observed_score(self.now), measured)
        if decision.changed:
            self.result.reconfigurations.append(Reconfiguration(
                self.now, self.plan.to_str(), decision.plan.to_str(), decision.cost.pause_s,
                len(decision.cost.affected_slots), decision.explanation.splitlines()[0]))
            self._install(decision.plan, decision.cost.pause_s)
        # Keep planning while anything is in flight; stop once the run has drained.
        if self.events or (self.queue and self.now < self.result.duration_s + 3600):
            self.push(self.now + self.cfg.plan_interval_s, "plan", None)

    def _install(self, plan: Plan, pause_s: float) -> None:
        """Switch to `plan`: unchanged groups keep running, changed ones stop and are rebuilt."""
        keep = {g.group for g in self.groups.values() if g.group in plan.groups}
        moving: list[Join] = []
        for gid in [gid for gid, g in self.groups.items() if g.group not in keep]:
            old = self.groups.pop(gid)
            migrants, requeue = old.evacuate(self.now, self._finish)
            moving += migrants
            for rid in requeue:
                self._release(rid)
                self._enqueue(rid)
            for rid, (rgid, _) in list(self.reserved_on.items()):
                if rgid == gid:
                    del self.reserved_on[rid]  # its KV memory went with the group
        for grp in plan.groups:
            if grp in keep:
                continue
            gid = f"e{plan.epoch}-{grp.to_str()}-s{grp.slots[0]}"
            blocks = self.perf.kv_capacity_tokens(grp.tp) // self.cfg.block_size
            self.groups[gid] = SimGroup(gid, grp, self.perf, blocks, self.cfg.block_size, self.cfg.max_running,
                                        self.cfg.chunk_tokens, self.push, paused_until=self.now + pause_s,
                                        tpot_guard=self.cfg.tpot_guard, tpot_of=self.tpot_of,
                                        max_step_s=self.max_step_s, min_chunk=self.cfg.min_chunk,
                                        deadline_of=self.deadline_of if self.cfg.order == "deadline" else ())
            self.push(self.now + pause_s, "resume", gid)
        for join in moving:
            g = self._migrate_target(join)
            g.pending.append(join)
            g.interrupt(self.now)
            g.start(self.now, self._finish)
        self.plan = plan
        self.result.plans.append((self.now, plan.to_str()))
        self._mark_dirty()

    def _migrate_target(self, join: Join) -> SimGroup:
        """The decode-capable group with the most free KV takes a sequence whose group left."""
        g = max((g for g in self.groups.values() if g.group.does_decode),
                key=lambda g: (g.free_blocks, g.gid))
        self._release(join.rid)
        self._reserve(join.rid, g, join.context + join.remaining)
        return g
