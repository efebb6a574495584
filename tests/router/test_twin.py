"""Digital twin: shadow runs replay the live arrivals exactly, never peek, and find the better plan."""

from __future__ import annotations

import math

import pytest

from router.decide.perfmodel import PerfModel
from router.decide.planner import Planner, PlannerConfig
from router.decide.plans import parse_plan
from router.decide.workload import WorkloadEstimate
from router.sim.cluster import SimConfig, Simulator
from router.sim.trace import load_traces
from router.sim.twin import Twin, TwinConfig
from services.tiers import DEFAULT_TIERS

PERF = PerfModel.builtin("h200", "llama-3.1-70b")
TIER_NAMES = {t.name for t in DEFAULT_TIERS}
MAP = "code=interactive,conv=standard:0.8/batch:0.2"
IDLE = WorkloadEstimate(0.0, 30.0, ())


def test_incremental_run_matches_a_batch_run(make_trace) -> None:  # type: ignore[no-untyped-def]
    code = make_trace("code", 150, 5.0, (500, 4000), (5, 40))
    conv = make_trace("conv", 150, 5.0, (200, 2000), (20, 300), seed=2)
    reqs = load_traces([code, conv], MAP, TIER_NAMES)
    plan = parse_plan("c4,c2,c2", 8)
    batch = Simulator(reqs, PERF, DEFAULT_TIERS, plan).run()
    live = Simulator([], PERF, DEFAULT_TIERS, plan)
    for r in reqs:  # fed one arrival at a time, as the twin is
        live.run_until(r.arrival_s)
        live.add(r)
    live.run_until(math.inf)
    assert live.result.finish_s == batch.finish_s and live.result.first_token_s == batch.first_token_s


def test_shadows_never_see_an_output_length_before_a_request_finishes() -> None:
    twin = Twin(Planner(PERF, DEFAULT_TIERS, 8), PERF, DEFAULT_TIERS, SimConfig(), parse_plan("c4,c4", 8))
    shadow = twin.shadows["c4,c4"].sim
    twin.arrive(1.0, "standard", 500)
    twin.finished("standard", 40)
    twin.arrive(2.0, "standard", 500)
    assert [r.output_tokens for r in shadow.reqs] == [128, 40]  # a prior, then what finished


def test_twin_measures_the_plan_that_serves_long_interactive_prompts(make_trace) -> None:  # type: ignore[no-untyped-def]
    # 6-7k-token interactive prompts: a TP 2 prefill takes ~0.9 s (always late), TP 8 ~0.3 s.
    code = make_trace("code", 300, 1.0, (6000, 7000), (5, 20))
    reqs = load_traces([code], "code=interactive", TIER_NAMES)
    planner = Planner(PERF, DEFAULT_TIERS, 8, PlannerConfig())
    start = parse_plan("c2,c2,c2,c2", 8)
    twin = Twin(planner, PERF, DEFAULT_TIERS, SimConfig(), start,
                TwinConfig(judge_after_s=60.0, warmup_s=10.0, refresh_s=1e9))
    twin.track("c8", 0.0)
    gains: dict[str, float] = {}
    for r in reqs:
        twin.arrive(r.arrival_s, r.tier, r.prompt_tokens)
        gains = dict(twin.gains(r.arrival_s, start, IDLE))
    assert gains["c8"] > 1.0  # more than twice the goodput
    decision, _ = planner.decide(reqs[-1].arrival_s, start, IDLE, measured=gains)
    assert decision.changed and decision.plan.to_str() == "c8" and "measured" in decision.explanation


def test_shadows_only_play_up_to_now() -> None:
    # A request that arrives later than `now` is never simulated before its time.
    twin = Twin(Planner(PERF, DEFAULT_TIERS, 8), PERF, DEFAULT_TIERS, SimConfig(), parse_plan("c8", 8))
    twin.arrive(10.0, "interactive", 1000)
    twin.gains(5.0, parse_plan("c8", 8), IDLE)
    shadow = twin.shadows["c8"].sim
    assert math.isnan(shadow.first[0]) and shadow.now <= 5.0
    twin.gains(11.0, parse_plan("c8", 8), IDLE)
    assert not math.isnan(shadow.first[0])


def test_discounted_record_survives_runs_far_longer_than_its_half_life() -> None:
    from router.sim.twin import Shadow

    s = Shadow(sim=None, start_s=0.0)  # type: ignore[arg-type]
    for t in range(0, 2_000_000, 1000):  # 23 days at one outcome per 1000 s, half-life 60 s
        s.record(float(t), 1.0, 60.0)
    recent = s.credit_since(1_990_000.0) * 2.0 ** ((s.base_s - 1_999_000.0) / 60.0)
    assert math.isfinite(recent) and recent == pytest.approx(1.0, rel=1e-4)  # the newest; the rest 2^-16 and less
