"""Sensitivity runs (router/sim/sensitivity.py): forced changes happen on schedule, dearer moves pause longer."""

from __future__ import annotations

from router.decide.planner import PlanDecision, PlannerConfig
from router.decide.plans import parse_plan
from router.decide.workload import TierLoad, WorkloadEstimate
from router.sim.cluster import SimConfig
from router.sim.sensitivity import ScaledCostPlanner, forced_pair, run_forced
from router.sim.trace import TraceRequest
from services.tiers import DEFAULT_TIERS
from tests.router.test_sim import PERF, check_accounting


def test_forced_changes_recut_the_cluster_every_period_and_lose_no_request() -> None:
    reqs = [TraceRequest(i * 0.1, 800, 100, "standard", "x") for i in range(300)]
    res = run_forced(reqs, PERF, DEFAULT_TIERS, 8, SimConfig(), 5.0)
    check_accounting(res)
    a, b = forced_pair(PERF, 8)
    assert (a.to_str(), b.to_str()) == ("c2,c2,c2,c2", "c4,c4")
    times = [r.at_s for r in res.reconfigurations]
    # Arrivals end at 29.9 s: changes at 5, 10, ..., 25 s, none while the run drains.
    assert len(times) == 5 and all(abs(t - 5.0 * round(t / 5.0)) < 1e-9 for t in times)
    assert {r.to_plan for r in res.reconfigurations} == {a.to_str(), b.to_str()}


def test_scaled_cost_multiplies_the_pause_of_the_planners_own_choice() -> None:
    load = WorkloadEstimate(0.0, 30.0, (TierLoad("standard", 3.0, (2000,) * 8, 200.0),))
    current = parse_plan("c2,c2,c2,c2", 8)
    measured = {"c4,c4": 0.3}  # as the digital twin would report it: 30% better on the traffic seen

    def decide(scale: float) -> PlanDecision:
        planner = ScaledCostPlanner(PERF, DEFAULT_TIERS, 8, PlannerConfig(), scale)
        return planner.decide(1000.0, current, load, measured=measured)[0]

    base, dear = decide(1.0), decide(5.0)
    assert base.changed and dear.changed and dear.plan.to_str() == base.plan.to_str()
    assert dear.cost.pause_s == 5.0 * base.cost.pause_s > 0
