"""The peers' policies as simulator baselines: a Dynamo-like SLA planner and Llumnix-like migration.

Both run on the same simulator, perf model and engine settings as every other policy
(router/sim/policies.py says which engine and router order each gets); what they model:

**Dynamo-like** (`DynamoPlanner`): NVIDIA Dynamo's SLA planner for disaggregated serving. A
pre-deployment profile fixes one TP degree per role (`profile_tps`: for prefill, the degree with
the most prompt tokens per second per slot whose prefill of the trace's mean prompt fits the
tightest TTFT target; for decode, the degree with the most output tokens per second per slot at
the tightest TPOT target). Every `interval_s` (60 s) it predicts the next interval's load as the
last interval's (Dynamo's constant predictor) and sets the replica counts: prefill replicas =
prompt tokens/s over one replica's prefill throughput, decode replicas = output tokens/s over
one replica's decode throughput at the TPOT target, each at least 1. Dynamo gives slots it does
not need back to the pool; here the cluster is fixed, so the slots left over go to the role
whose replicas are busiest (a more generous baseline than idle slots), and when the demand
exceeds the slots both roles shrink in proportion (as Dynamo does at its GPU budget). A change of
counts is a role flip on the slots that change (0.2 s pause, the planner's modelled cost).
Not modelled: Dynamo's KV-aware router (the scheduler is Nitsum's), its correction factors from
observed TTFT/ITL, and its ARIMA/Prophet predictors.

**Llumnix-like** (`LlumnixSimulator`): colocated instances of one TP degree, requests dispatched
in strict tier priority to the least-loaded instance (the scheduler's `order="priority"`), and
live migration of running requests between instances to balance their KV load: every
`rebalance_s` seconds, if the most and least loaded decode instances' KV use differs by more than
`imbalance`, the running sequence with the smallest KV on the most loaded one moves (at its next
step boundary) to the least loaded one. Llumnix's migration copies the KV in stages while the
request keeps decoding, so the request stops only for the last stage: modelled as the KV transfer
time of one block plus the transfer's fixed latency. Not modelled: Llumnix's per-priority
headroom ("virtual usage") and instance auto-scaling; the destination's KV is reserved at once
(no double-booked memory during the copy).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import cast

from router.decide.perfmodel import PerfModel
from router.decide.planner import (
    PlanDecision,
    Planner,
    PlannerConfig,
    PlannerState,
    ReconfigCost,
    align,
    predict,
    reconfig_cost,
)
from router.decide.plans import Plan, parse_plan
from router.decide.workload import WorkloadEstimate
from router.sim.cluster import SimConfig, Simulator
from router.sim.group import Join, SimGroup
from router.sim.trace import TraceRequest
from services.tiers import Tier

MAX_BATCH = 256
_FRESH = PlannerState()


def decode_capacity(perf: PerfModel, tp: int, context: float, tpot_s: float) -> tuple[int, float]:
    """(largest batch whose step fits `tpot_s`, its output tokens per second) for one decode replica."""
    kv_rows = int(perf.kv_capacity_tokens(tp) / max(1.0, context))
    lo, hi = 0, max(1, min(MAX_BATCH, kv_rows))
    while lo < hi:  # step time grows with the batch: bisect for the largest that fits
        mid = (lo + hi + 1) // 2
        if perf.decode_step_time(mid, int(mid * context), tp) <= tpot_s:
            lo = mid
        else:
            hi = mid - 1
    if lo == 0:
        return 0, 0.0
    return lo, lo / perf.decode_step_time(lo, int(lo * context), tp)


def prefill_capacity(perf: PerfModel, tp: int, prompt: float) -> float:
    """Prompt tokens per second of one prefill replica on prompts of `prompt` tokens."""
    tokens = max(1, int(prompt))
    return tokens / perf.prefill_time(tokens, tp)


def profile_tps(perf: PerfModel, tiers: tuple[Tier, ...], slots: int, prompt: float, output: float) -> tuple[int, int]:
    """(prefill TP, decode TP): Dynamo's pre-deployment profile, one degree per role."""
    tps = [t for t in (1, 2, 4, 8) if t <= slots // 2 and perf.fits(t)] or [t for t in (1, 2, 4, 8) if perf.fits(t)]
    ttft, tpot = min(t.ttft_s for t in tiers), min(t.tpot_s for t in tiers)
    meets = [t for t in tps if perf.prefill_time(max(1, int(prompt)), t) <= ttft] or [tps[-1]]
    p_tp = max(meets, key=lambda t: (prefill_capacity(perf, t, prompt) / t, -t))
    ctx = prompt + output / 2
    d_tp = max(tps, key=lambda t: (decode_capacity(perf, t, ctx, tpot)[1] / t, -t))
    return p_tp, d_tp


class DynamoPlanner(Planner):
    """Replica counts per role, re-planned at every call (the variant calls it every 60 s)."""

    def __init__(self, perf: PerfModel, tiers: tuple[Tier, ...], slots: int, prefill_tp: int, decode_tp: int,
                 cfg: PlannerConfig | None = None) -> None:
        super().__init__(perf, tiers, slots, cfg)
        self.prefill_tp, self.decode_tp = prefill_tp, decode_tp
        self.ttft = min(t.ttft_s for t in tiers)
        self.tpot = min(t.tpot_s for t in tiers)

    def replicas(self, workload: WorkloadEstimate) -> tuple[int, int, float, float]:
        """(prefill replicas, decode replicas, prefill demand, decode demand) for the predicted load;
        demands are in replicas (1.5 = one and a half replicas' worth of work)."""
        rate = workload.total_rate
        if rate <= 0:
            return 1, 1, 0.0, 0.0
        prompt = sum(t.rate * t.mean_prompt for t in workload.tiers) / rate
        output = sum(t.rate * t.mean_output for t in workload.tiers) / rate
        p_need = rate * prompt / prefill_capacity(self.perf, self.prefill_tp, prompt)
        _, per_decode = decode_capacity(self.perf, self.decode_tp, prompt + output / 2, self.tpot)
        d_need = rate * output / per_decode if per_decode > 0 else math.inf
        budget = self.slots
        p, d = 1, 1
        # Fill the slots one replica at a time, to the role furthest behind its demand (then the
        # busiest): at the budget both roles end up short in proportion, under it the spare
        # slots go where utilisation is highest.
        while True:
            options = [(need / n, role) for role, need, n, tp in
                       (("p", p_need, p, self.prefill_tp), ("d", d_need, d, self.decode_tp))
                       if (p + (role == "p")) * self.prefill_tp + (d + (role == "d")) * self.decode_tp <= budget]
            if not options:
                break
            _, role = max(options)
            p, d = (p + 1, d) if role == "p" else (p, d + 1)
        return p, d, p_need, d_need

    def plan_for(self, p: int, d: int) -> Plan:
        # Wider groups first so every group sits on an aligned block of slots.
        groups = sorted([f"p{self.prefill_tp}"] * p + [f"d{self.decode_tp}"] * d, key=lambda g: -int(g[1:]))
        return parse_plan(",".join(groups), self.slots)

    def decide(self, now_s: float, current: Plan, workload: WorkloadEstimate, state: PlannerState = _FRESH,
               observed_score: float | None = None,
               measured: Mapping[str, float] | None = None) -> tuple[PlanDecision, PlannerState]:
        if workload.total_rate <= 0:  # nothing arrived: nothing to predict from, keep the plan
            return PlanDecision(current, False, f"keep {current.to_str()}: dynamo-like: no load in the last "
                                "interval", predict(current, workload, self.perf, self.tiers),
                                ReconfigCost(0.0, (), 0.0, 0.0)), state
        p, d, p_need, d_need = self.replicas(workload)
        target = align(current, self.plan_for(p, d))
        pred = predict(target, workload, self.perf, self.tiers)
        head = (f"dynamo-like: predicted load needs {p_need:.2f} prefill (TP {self.prefill_tp}) and {d_need:.2f} "
                f"decode (TP {self.decode_tp}) replicas -> {p} + {d} on {self.slots} slots")
        if sorted(g.to_str() for g in target.groups) == sorted(g.to_str() for g in current.groups):
            return PlanDecision(current, False, f"keep {current.to_str()}: {head}", pred,
                                ReconfigCost(0.0, (), 0.0, 0.0)), state
        cost = reconfig_cost(current, target, self.perf, self.cfg)
        why = f"switch {current.to_str()} -> {target.to_str()}: {head}"
        return PlanDecision(target.with_epoch(current.epoch + 1), True, why, pred, cost), PlannerState(now_s)


def dynamo_start(perf: PerfModel, tiers: tuple[Tier, ...], slots: int,
                 requests: list[TraceRequest]) -> DynamoPlanner:
    """The planner with its per-role TP from a profile at the trace's mean lengths."""
    n = max(1, len(requests))
    prompt = sum(r.prompt_tokens for r in requests) / n
    output = sum(r.output_tokens for r in requests) / n
    p_tp, d_tp = profile_tps(perf, tiers, slots, prompt, output)
    return DynamoPlanner(perf, tiers, slots, p_tp, d_tp)


class LlumnixSimulator(Simulator):
    """The simulator plus Llumnix's load-balancing migration between colocated instances."""

    rebalance_s = 1.0
    imbalance = 0.1  # KV-use difference (share of an instance's blocks) that triggers a migration
    handshake_s = 0.005  # fixed cost of the last migration stage, beyond its one block of KV

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.handlers["rebalance"] = self._on_rebalance
        self.marked: dict[str, tuple[int, str]] = {}  # group -> (sequence, destination) at its next step boundary
        self.migrations = 0
        if self.reqs:
            self.push(self.reqs[0].arrival_s + self.rebalance_s, "rebalance", None)

    def _on_rebalance(self, _: object) -> None:
        groups = [g for g in self.groups.values() if g.alive and g.group.does_decode]
        if len(groups) > 1:
            use = {g.gid: 1 - g.free_blocks / max(1, g.kv_blocks) for g in groups}
            hi = max(groups, key=lambda g: (use[g.gid], g.gid))
            lo = min(groups, key=lambda g: (use[g.gid], g.gid))
            gap = use[hi.gid] - use[lo.gid]
            if gap > self.imbalance and hi.decoding and hi.gid not in self.marked:
                fs, rid = min(hi.decoding, key=lambda e: (hi.ctx_of[e[1]], e[1]))
                blocks = -(-(hi.ctx_of[rid] + fs) // hi.block_size)  # its context and remaining steps
                # Move only if it narrows the gap (never ping-pong one sequence between two groups).
                if abs(gap - blocks / max(1, hi.kv_blocks) - blocks / max(1, lo.kv_blocks)) < gap:
                    self.marked[hi.gid] = (rid, lo.gid)
                    hi.interrupt(self.now)
        if self.events:  # anything still to happen; a queue nothing can serve must not keep the run alive
            self.push(self.now + self.rebalance_s, "rebalance", None)

    def _on_iter(self, payload: object) -> None:
        gid, version = cast(tuple[str, int], payload)
        g = self.groups.get(gid)
        if g is None or g.version != version or not g.alive:
            return
        for rid in g.end(self.now, self._finish):
            self._prefilled(rid, g)
        if gid in self.marked:
            self._migrate_out(g, *self.marked.pop(gid))
        g.start(self.now, self._finish)
        self._mark_dirty()

    def _migrate_out(self, g: SimGroup, rid: int, dest: str) -> None:
        entry = next((e for e in g.decoding if e[1] == rid), None)
        dst = self.groups.get(dest)
        if entry is None or dst is None or not dst.alive or dst is g:
            return  # it finished meanwhile, or its destination was reconfigured away
        g.decoding.remove(entry)
        g.decoding.sort()  # a sorted list is a heap
        stored = g.ctx_of.pop(rid)  # the group keeps context minus the step it joined at
        g.ctx_base -= stored
        ctx = stored + g.step
        if g.tpot_guard:
            g._drop_target(rid)
        join = Join(rid, entry[0] - g.step, ctx)
        self._release(rid)
        self._reserve(rid, dst, join.context + join.remaining)
        self.migrations += 1
        block = g.block_size
        self.push(self.now + self.handshake_s + self.perf.kv_transfer_time(block, g.tp, dst.tp), "join", join)


def llumnix_config(cfg: SimConfig) -> SimConfig:
    """Llumnix runs vLLM instances: vLLM's engine (FCFS, fixed token budget), strict tier priority
    in its global scheduler."""
    return SimConfig(**{**cfg.__dict__, "order": "priority", "tpot_guard": 0.0, "step_cap_share": 0.0})
