"""The peers' baselines behave as documented (router/sim/peers.py, router/sim/policies.py)."""

from __future__ import annotations

import pytest

from router.decide.planner import Planner
from router.decide.plans import parse_plan
from router.decide.workload import TierLoad, WorkloadEstimate
from router.sim.cluster import SimConfig, Simulator
from router.sim.peers import DynamoPlanner, LlumnixSimulator, llumnix_config, profile_tps
from router.sim.policies import DYNAMO_INTERVAL_S, run_variant, variants
from router.sim.trace import TraceRequest
from services.tiers import DEFAULT_TIERS
from tests.router.test_sim import PERF, check_accounting


def _load(rate: float, prompt: int, output: float) -> WorkloadEstimate:
    return WorkloadEstimate(0.0, 60.0, (TierLoad("standard", rate, (prompt,) * 8, output),))


def test_dynamo_sizes_each_role_from_its_load_with_tp_fixed_per_role() -> None:
    dyn = DynamoPlanner(PERF, DEFAULT_TIERS, 8, prefill_tp=2, decode_tp=2)
    p, d, p_need, d_need = dyn.replicas(_load(6.0, 8000, 10))  # prefill-heavy
    assert p > d and p_need > d_need and 2 * (p + d) == 8
    p, d, p_need, d_need = dyn.replicas(_load(6.0, 100, 1500))  # decode-heavy
    assert d > p and d_need > p_need and 2 * (p + d) == 8
    assert dyn.replicas(_load(0.0, 100, 10))[:2] == (1, 1)  # idle: one of each (its minimum), no more planned
    # A decision keeps the TP per role and only ever produces prefill and decode groups.
    plan = parse_plan("p2,p2,d2,d2", 8)
    decision, _ = dyn.decide(0.0, plan, _load(6.0, 100, 1500))
    assert decision.changed and {g.to_str() for g in decision.plan.groups} == {"p2", "d2"}
    assert sum(g.role == "decode" for g in decision.plan.groups) > 2
    # A pure role flip on the same slots: the planner's modelled cost for it, no weight traffic.
    assert decision.cost.pause_s == 0.2 and decision.cost.fetched_bytes == 0
    keep, _ = dyn.decide(60.0, decision.plan, _load(6.0, 100, 1500))
    assert not keep.changed


def test_dynamo_profile_picks_one_degree_per_role_that_meets_the_targets() -> None:
    p_tp, d_tp = profile_tps(PERF, DEFAULT_TIERS, 8, prompt=1000, output=200)
    assert p_tp in (2, 4) and d_tp in (2, 4)  # 70B needs TP >= 2; a role never takes more than half the slots
    tight = min(t.ttft_s for t in DEFAULT_TIERS)
    assert PERF.prefill_time(1000, p_tp) <= tight


def _requests(rows: list[tuple[float, int, int, str]]) -> list[TraceRequest]:
    return [TraceRequest(t, p, o, tier, "x") for t, p, o, tier in rows]


def test_dynamo_variant_replans_only_every_60_s(monkeypatch: pytest.MonkeyPatch) -> None:
    # A prefill-heavy minute, then a decode-heavy one: counts move, only at its 60 s ticks. The
    # profile is pinned to TP 2 for both roles, so that 8 slots allow more than one split.
    import router.sim.policies as policies

    monkeypatch.setattr(policies, "dynamo_start", lambda perf, tiers, slots, reqs: DynamoPlanner(perf, tiers, slots, 2, 2))
    rows = [(i * 0.5, 4000, 8, "standard") for i in range(120)]
    rows += [(60 + i * 0.5, 100, 600, "standard") for i in range(120)]
    reqs = _requests(rows)
    v = variants("dynamo-like", PERF, DEFAULT_TIERS, 8, reqs)[0]
    res = run_variant(v, reqs, PERF, DEFAULT_TIERS, 8, SimConfig())
    check_accounting(res)
    assert res.reconfigurations
    for r in res.reconfigurations:
        assert abs(r.at_s / DYNAMO_INTERVAL_S - round(r.at_s / DYNAMO_INTERVAL_S)) < 1e-6
        assert all(g[0] in "pd" for g in r.to_plan.split(","))


def test_llumnix_migrates_running_requests_to_balance_kv_load() -> None:
    # Two big-context requests land on one group (placement alternates by running count, ties by
    # id), two tiny ones on the other: KV use is lopsided, and one big one should move over.
    rows = [(0.0, 60000, 3000, "standard"), (0.0, 50, 3000, "standard"),
            (0.0, 60000, 3000, "standard"), (0.0, 50, 3000, "standard")]
    plan = parse_plan("c4,c4", 8)
    cfg = llumnix_config(SimConfig())
    still = Simulator(_requests(rows), PERF, DEFAULT_TIERS, plan, cfg).run()
    moved = LlumnixSimulator(_requests(rows), PERF, DEFAULT_TIERS, plan, cfg)
    moved.imbalance = 0.05
    res = moved.run()
    check_accounting(res)
    check_accounting(still)
    assert moved.migrations >= 1
    # Balanced groups decode the two big contexts in parallel batches: the slowest big one finishes sooner.
    assert max(res.finish_s[0], res.finish_s[2]) < max(still.finish_s[0], still.finish_s[2])


def test_adaptive_pd_only_ever_runs_its_frozen_tp() -> None:
    rows = [(i * 0.2, 200, 600, "standard") for i in range(150)]
    rows += [(30 + i * 0.2, 5000, 8, "interactive") for i in range(150)]
    reqs = _requests(sorted(rows))
    v = variants("adaptive-pd", PERF, DEFAULT_TIERS, 8, reqs, only_tp=2)[0]
    assert v.freeze_tp == 2 and v.plan.to_str() == "c2,c2,c2,c2"
    res = run_variant(v, reqs, PERF, DEFAULT_TIERS, 8, SimConfig(plan_interval_s=2.0))
    check_accounting(res)
    assert all(g.endswith("2") for _, plan in res.plans for g in plan.split(","))
    # Its candidates still span every role family at that TP (colocated, disaggregated, mixed).
    planner = Planner(PERF, DEFAULT_TIERS, 8)
    frozen = {p.to_str() for p in planner.candidates if all(g.tp == 2 for g in p.groups)}
    assert {"c2,c2,c2,c2", "p2,p2,d2,d2"} <= frozen or any(set(s.split(",")) == {"p2", "d2"} for s in frozen)
