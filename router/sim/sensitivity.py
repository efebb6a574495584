"""Sensitivity runs for `nitsum sim --report DIR --sensitivity`: what churn and dearer moves cost.

- **Forced TP changes**: a planner that re-cuts the whole cluster between colocated groups of
  the two smallest feasible TP degrees (`c2,c2,c2,c2` <-> `c4,c4` for 70B on 8 slots) every N
  seconds, whatever the load, paying each move's modelled pause and migrating the running
  requests: goodput against the better of the two plans held static. It bounds what a workload
  that forces a TP change every N seconds would cost.
- **Move cost x k**: Nitsum's policy where every move's pause is k times the modelled one. The
  planner is *not* told (it plans with the modelled cost), so this measures how much an error in
  the cost model would hurt, not how a planner that knew would adapt.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from router.decide.perfmodel import PerfModel
from router.decide.planner import (
    PlanDecision,
    Planner,
    PlannerConfig,
    PlannerState,
    align,
    predict,
    reconfig_cost,
)
from router.decide.plans import Plan, parse_plan
from router.decide.workload import WorkloadEstimate
from router.sim.cluster import SimConfig, SimResult, Simulator
from router.sim.policies import feasible_tps
from router.sim.trace import TraceRequest
from router.sim.twin import Twin
from services.tiers import Tier

FORCED_PERIODS_S = (5.0, 10.0, 30.0, 60.0)
COST_SCALES = (0.5, 2.0, 5.0)
_FRESH = PlannerState()


class ForcedPlanner(Planner):
    """Flips between two plans at every call (the simulator calls it every period)."""

    def __init__(self, perf: PerfModel, tiers: tuple[Tier, ...], slots: int, a: Plan, b: Plan,
                 until_s: float) -> None:
        super().__init__(perf, tiers, slots)
        self.a, self.b, self.until_s = a, b, until_s

    def decide(self, now_s: float, current: Plan, workload: WorkloadEstimate, state: PlannerState = _FRESH,
               observed_score: float | None = None,
               measured: Mapping[str, float] | None = None) -> tuple[PlanDecision, PlannerState]:
        if now_s > self.until_s:  # the arrivals are over: let the run drain (and end)
            pred = predict(current, workload, self.perf, self.tiers)
            return PlanDecision(current, False, "forced: arrivals over", pred, reconfig_cost(current, current, self.perf,
                                                                                             self.cfg)), state
        other = self.b if current.to_str() == self.a.to_str() else self.a
        target = align(current, other)
        cost = reconfig_cost(current, target, self.perf, self.cfg)
        pred = predict(target, workload, self.perf, self.tiers)
        text = f"forced: {current.to_str()} -> {target.to_str()}"
        return PlanDecision(target.with_epoch(current.epoch + 1), True, text, pred, cost), PlannerState(now_s)


class ScaledCostPlanner(Planner):
    """Nitsum's planner, deciding on the modelled cost, whose moves then pause `scale` x as long."""

    def __init__(self, perf: PerfModel, tiers: tuple[Tier, ...], slots: int, cfg: PlannerConfig | None,
                 scale: float) -> None:
        super().__init__(perf, tiers, slots, cfg)
        self.scale = scale

    def decide(self, now_s: float, current: Plan, workload: WorkloadEstimate, state: PlannerState = _FRESH,
               observed_score: float | None = None,
               measured: Mapping[str, float] | None = None) -> tuple[PlanDecision, PlannerState]:
        decision, new_state = super().decide(now_s, current, workload, state, observed_score, measured)
        if not decision.changed:
            return decision, new_state
        cost = dataclasses.replace(decision.cost, pause_s=decision.cost.pause_s * self.scale)
        return dataclasses.replace(decision, cost=cost), new_state


def forced_pair(perf: PerfModel, slots: int) -> tuple[Plan, Plan]:
    tps = feasible_tps(perf, slots)
    if len(tps) < 2:
        raise ValueError("forced TP changes need two feasible TP degrees")
    a, b = tps[0], tps[1]
    return (parse_plan(",".join([f"c{a}"] * (slots // a)), slots), parse_plan(",".join([f"c{b}"] * (slots // b)), slots))


def run_forced(requests: list[TraceRequest], perf: PerfModel, tiers: tuple[Tier, ...], slots: int, cfg: SimConfig,
               period_s: float) -> SimResult:
    a, b = forced_pair(perf, slots)
    planner = ForcedPlanner(perf, tiers, slots, a, b, max((r.arrival_s for r in requests), default=0.0))
    return Simulator(list(requests), perf, tiers, a, dataclasses.replace(cfg, plan_interval_s=period_s),
                     planner).run()


def run_scaled_cost(requests: list[TraceRequest], perf: PerfModel, tiers: tuple[Tier, ...], slots: int,
                    cfg: SimConfig, planner_cfg: PlannerConfig, scale: float) -> SimResult:
    tps = feasible_tps(perf, slots)
    start = parse_plan(",".join([f"c{tps[0]}"] * (slots // tps[0])), slots)
    planner = ScaledCostPlanner(perf, tiers, slots, planner_cfg, scale)
    twin = Twin(planner, perf, tiers, cfg, start)
    return Simulator(list(requests), perf, tiers, start, cfg, planner, None, twin).run()
