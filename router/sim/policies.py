"""Nitsum and the baselines, as (plan, scheduler order, planner or not) over the same simulator.

Every policy gets the same scheduler (deadline-aware order, admission control, KV-respecting
placement), the same perf model and the same engine settings; what distinguishes them is only
how the plan is chosen (and, for priority-only, the order):

- `nitsum`: the planner re-plans every `plan_interval_s` from the sliding-window workload; it
  starts from all-colocated groups of the smallest TP that fits and pays modelled pauses.
- `static-colocated`: one plan for the whole run, every group colocated at one TP degree
  (vLLM-like); each degree that fits is run, and the best is chosen in hindsight.
- `static-disagg`: one plan for the whole run with separate prefill and decode groups, one TP
  degree per role and the replica counts of each (DistServe-like); every such split of the slots
  is run and the best is chosen in hindsight.
- `priority-only`: no plan changes; the plan the planner's model rates best for the whole
  trace's average workload, and strict tier priority (FIFO within a tier) instead of deadlines.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from router.perfmodel import PerfModel
from router.planner import Planner, PlannerConfig
from router.plans import Plan, enumerate_plans, parse_plan
from router.sim.cluster import SimConfig, SimResult, Simulator
from router.sim.trace import TraceRequest
from router.workload import WorkloadEstimate, WorkloadEstimator
from services.tiers import Tier

POLICIES = ("nitsum", "static-colocated", "static-disagg", "priority-only")


@dataclass(frozen=True)
class Variant:
    policy: str  # one of POLICIES
    label: str  # e.g. "static-colocated tp4", "static-disagg p4,d2,d2"
    plan: Plan
    adaptive: bool
    order: str


def feasible_tps(perf: PerfModel, slots: int) -> list[int]:
    return [t for t in (1, 2, 4, 8) if t <= slots and slots % t == 0 and perf.fits(t)]


def variants(policy: str, perf: PerfModel, tiers: tuple[Tier, ...], slots: int,
             requests: list[TraceRequest], only_tp: int | None = None) -> list[Variant]:
    """The runs a policy needs (several for a best-in-hindsight baseline)."""
    tps = feasible_tps(perf, slots)
    if not tps:
        raise ValueError(f"{perf.model.name} does not fit in {slots} {perf.device.name} slot(s) at any TP")
    if policy == "nitsum":
        start = parse_plan(",".join([f"c{tps[0]}"] * (slots // tps[0])), slots)
        return [Variant(policy, "nitsum", start, True, "deadline")]
    if policy == "static-colocated":
        chosen = [only_tp] if only_tp else tps
        if only_tp and only_tp not in tps:
            raise ValueError(f"TP {only_tp} is not feasible here; feasible: {tps}")
        return [Variant(policy, f"static-colocated tp{t}", parse_plan(",".join([f"c{t}"] * (slots // t)), slots),
                        False, "deadline") for t in chosen]
    if policy == "static-disagg":
        plans = [p for p in enumerate_plans(slots, min_tp=tps[0], roles="pd") if _uniform_per_role(p)]
        return [Variant(policy, f"static-disagg {p.to_str()}", p, False, "deadline") for p in plans]
    if policy == "priority-only":
        planner = Planner(perf, tiers, slots)
        return [Variant(policy, "priority-only", planner.best_static(_whole_trace(requests)), False, "priority")]
    raise ValueError(f"unknown policy {policy!r}; use one of {', '.join(POLICIES)}")


def _uniform_per_role(plan: Plan) -> bool:
    return all(len({g.tp for g in plan.groups if g.role == r}) == 1 for r in ("prefill", "decode"))


def _whole_trace(requests: list[TraceRequest]) -> WorkloadEstimate:
    est = WorkloadEstimator(window_s=max(1.0, requests[-1].arrival_s if requests else 1.0), max_samples=256)
    for r in requests:
        est.observe_arrival(r.arrival_s, r.tier, r.prompt_tokens)
        est.observe_finish(r.arrival_s, r.tier, r.output_tokens)
    return est.estimate(requests[-1].arrival_s if requests else 0.0)


def run_variant(v: Variant, requests: list[TraceRequest], perf: PerfModel, tiers: tuple[Tier, ...],
                slots: int, cfg: SimConfig, planner_cfg: PlannerConfig | None = None,
                progress: Callable[[float], None] | None = None) -> SimResult:
    planner = Planner(perf, tiers, slots, planner_cfg) if v.adaptive else None
    sim_cfg = SimConfig(**{**cfg.__dict__, "order": v.order})
    return Simulator(requests, perf, tiers, v.plan, sim_cfg, planner, progress).run()
