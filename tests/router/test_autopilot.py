"""The autopilot's rules, tick by tick, on a real Redis: what the gateways observed feeds the
estimate, the planner's choice is applied, a failed move backs off, the hourly cap, a running
reconfiguration or a missing slot blocks moves, a pinned plan is applied and held, measured move
pauses replace the modelled ones.

The orchestrator here is a stand-in that records what it was asked and answers a report of the
result the test chooses: a failed reconfiguration cannot be provoked on demand otherwise (the end-
to-end test, tests/e2e/test_autopilot.py, runs the real one)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from router.decide.perfmodel import DEVICES, Efficiency, ModelSpec, PerfModel
from router.decide.planner import PlannerConfig
from router.decide.plans import Plan, parse_plan
from router.live.admin import _control
from router.live.autopilot import Autopilot, AutopilotSettings
from router.live.autopilot_inputs import MoveCosts, model_spec, telemetry_points
from router.profile import Profile
from router.reconfig.report import GroupReport, ReconfigReport
from services.cluster import ClusterClient, GroupRecord, journal
from services.cluster.redis_server import RedisServer
from services.metrics import RouterMetrics
from services.tiers import Tier

TIERS = (Tier("interactive", ttft_s=1.0, tpot_s=0.025, weight=4.0), Tier("batch", ttft_s=30.0, tpot_s=0.5, weight=1.0))
SPEC = ModelSpec("toy", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=128,
                 vocab_size=512, dtype_bytes=4)


def slow_profile() -> Profile:
    flops = PerfModel(DEVICES["cpu"], SPEC).terms(1000, 0, 0, 1).flops / 1000
    eff = Efficiency(mem_eff=1.0, flops_eff=flops / DEVICES["cpu"].peak_flops / 1e-3, overhead_s=0.01, row_s=0.002)
    return Profile(DEVICES["cpu"], SPEC, (), eff)


@dataclass
class StandInRouter:
    leading: bool = True

    def routable(self, g: GroupRecord) -> bool:
        return True


@dataclass
class StandInOrchestrator:
    plan: Plan | None
    result: str = "committed"
    busy: bool = False
    target: Plan | None = None
    applied: list[str] = field(default_factory=list)
    on_report: list[Any] = field(default_factory=list)

    async def apply(self, plan: Plan) -> ReconfigReport:
        self.applied.append(plan.to_str())
        report = ReconfigReport(0, 1, plan.to_str(), result=self.result, seconds=0.5)
        if self.result == "committed":
            self.plan = self.target = plan
        for cb in self.on_report:
            cb(report)
        return report


@pytest.fixture
def cluster(redis_server: RedisServer) -> Any:
    return ClusterClient(redis_server.url, f"t{uuid.uuid4().hex[:8]}:")


def pilot(cluster: ClusterClient, plan: str = "d1,p1,p1,p1", **settings: Any) -> tuple[Autopilot, StandInOrchestrator]:
    current = parse_plan(plan, 4)
    orch = StandInOrchestrator(current, target=current)
    defaults: dict[str, Any] = {"interval_s": 1.0, "window_s": 10.0, "min_hold_s": 0.0, "correct": False}
    ap = Autopilot(AutopilotSettings(**{**defaults, **settings}), StandInRouter(), orch, cluster, TIERS, RouterMetrics(),
                   slow_profile(), tps=(1, 2, 4))
    return ap, orch


async def observe(cluster: ClusterClient, now: float, rate: float, prompt: int, output: int, seconds: float = 10.0) -> None:
    docs: list[dict[str, Any]] = []
    for i in range(int(rate * seconds)):
        at = now - seconds + i / rate
        docs.append({"k": "a", "at": at, "tier": "interactive", "prompt": prompt})
        docs.append({"k": "f", "at": at + 0.5, "tier": "interactive", "outcome": "ok", "prompt": prompt,
                     "output": output, "ttft": 0.1, "tpot": 0.01, "met": True})
    await journal.add_observations(cluster, docs)


def test_the_load_the_gateways_saw_drives_a_move(cluster: ClusterClient) -> None:
    async def go() -> None:
        ap, orch = pilot(cluster)
        now = time.time()
        idle = await ap.tick(now)
        assert idle is not None and idle["action"] == "keep" and "no load" in idle["reason"]
        await observe(cluster, now + 1, rate=4.0, prompt=16, output=64)
        moved = await ap.tick(now + 1)
        assert moved is not None and moved["action"] == "switch", moved
        assert orch.applied == [moved["to"]] and moved["to"] == moved["ranking"][0][0]
        assert moved["report"]["result"] == "committed"
        assert moved["offered"]["interactive"] == pytest.approx(4.0, rel=0.15)
        assert moved["measured_goodput"]["interactive"] > 0
        kept = await ap.tick(now + 2)
        assert kept is not None and kept["action"] == "keep"  # the new plan meets the load
        history = await journal.decisions(cluster)
        assert [d["action"] for d in history] == ["keep", "switch", "keep"]
        assert history[1]["to"] == moved["to"]
        await cluster.close()

    asyncio.run(go())


def test_a_failed_move_backs_off_and_the_hourly_cap_holds(cluster: ClusterClient) -> None:
    async def go() -> None:
        ap, orch = pilot(cluster, backoff_s=60.0, max_moves_per_hour=1)
        now = time.time()
        await ap.tick(now - 1)  # the autopilot reads observations from its start on
        await observe(cluster, now, rate=4.0, prompt=16, output=64)
        orch.result = "rolled_back"
        failed = await ap.tick(now)
        assert failed is not None and failed["action"] == "failed", failed
        assert failed["report"]["result"] == "rolled_back"
        held = await ap.tick(now + 1)
        assert held is not None and held["action"] == "hold" and "backing off" in held["reason"]
        assert len(orch.applied) == 1
        ap._backoff_until = 0.0  # the back-off has passed
        orch.result = "committed"
        await observe(cluster, now + 2, rate=4.0, prompt=16, output=64)
        moved = await ap.tick(now + 2)
        assert moved is not None and moved["action"] == "switch"
        await observe(cluster, now + 3, rate=6.0, prompt=480, output=4)
        capped = await ap.tick(now + 13)
        assert capped is not None and capped["action"] == "hold" and "cap 1" in capped["reason"]
        assert len(orch.applied) == 2
        await cluster.close()

    asyncio.run(go())


def test_no_move_while_reconfiguring_or_healing(cluster: ClusterClient) -> None:
    async def go() -> None:
        ap, orch = pilot(cluster)
        now = time.time()
        await ap.tick(now - 1)
        await observe(cluster, now, rate=4.0, prompt=16, output=64)
        orch.busy = True
        busy = await ap.tick(now)
        assert busy is not None and busy["action"] == "skip" and "reconfiguration is running" in busy["reason"]
        orch.busy, orch.target = False, parse_plan("d2,p1,p1", 4)  # asked for more than runs: a slot is gone
        healing = await ap.tick(now + 1)
        assert healing is not None and healing["action"] == "skip" and "heals first" in healing["reason"]
        assert orch.applied == []
        await cluster.close()

    asyncio.run(go())


def test_a_pinned_plan_is_applied_and_held(cluster: ClusterClient) -> None:
    async def go() -> None:
        ap, orch = pilot(cluster)
        now = time.time()
        ap.tps = (1, 2)  # a model whose heads do not split four ways
        with pytest.raises(ValueError, match="TP 1, 2 only"):
            ap.control(pin="c4", enabled=False)  # refused, and nothing changed
        assert ap.settings.enabled and ap.pinned is None
        with pytest.raises(ValueError, match="interval_s"):
            ap.control(interval_s=0.1)
        ap.control(pin="d1,p1,p1,p1")
        assert await ap.tick(now) is None  # already runs: nothing to do
        await observe(cluster, now, rate=4.0, prompt=16, output=64)
        assert await ap.tick(now + 1) is None  # pinned: the load does not move it
        ap.control(pin="p2,d2")
        pinned = await ap.tick(now + 2)
        assert pinned is not None and pinned["action"] == "pin" and orch.applied == ["p2,d2"]
        ap.control(unpin=True)
        freed = await ap.tick(now + 3)
        assert freed is not None and freed["action"] in ("keep", "switch")
        assert ap.status()["pinned"] is None
        await cluster.close()

    asyncio.run(go())


def test_measured_pauses_replace_the_modelled_move_costs() -> None:
    costs = MoveCosts()
    old = parse_plan("p1,d1,d2", 4)
    report = ReconfigReport(1, 2, "d1,p1,p2", groups=[
        GroupReport("g0", "decode", 1, [0], kept=False, pause_s=0.3),  # slot 0: p1 -> d1, a role flip
        GroupReport("g1", "prefill", 1, [1], kept=False, pause_s=0.4),  # slot 1: d1 -> p1
        GroupReport("g2", "prefill", 2, [2, 3], kept=False, pause_s=2.0),  # d2 -> p2 on the same slots: a role flip
    ])
    costs.observe(old, report)
    assert costs.mean("role") == pytest.approx(0.9)
    assert costs.mean("retp") is None
    costs.observe(parse_plan("p2,d2", 4), ReconfigReport(2, 3, "p1,p1,d2", groups=[
        GroupReport("g3", "prefill", 1, [0], kept=False, pause_s=1.2),
        GroupReport("g4", "prefill", 1, [1], kept=False, pause_s=0.8),
        GroupReport("g5", "decode", 2, [2, 3], kept=True)]))
    assert costs.mean("retp") == pytest.approx(1.0)
    cfg = costs.planner_config(PlannerConfig())
    assert (cfg.role_switch_s, cfg.group_setup_s) == (pytest.approx(0.9), pytest.approx(1.0))
    costs.observe(old, ReconfigReport(1, 2, "x", result="failed", groups=[GroupReport("g", "decode", 1, [0], False, 9.0)]))
    assert costs.mean("role") == pytest.approx(0.9)  # a failed move is no measure of a move


def test_group_telemetry_becomes_profile_points(tiny_model_dir: Path) -> None:
    prefill = GroupRecord("p0", "prefill", 1, 1, "x:1", step_base_s=0.002, step_per_token_s=1e-5)
    decode = GroupRecord("d0", "decode", 2, 1, "x:2", step_base_s=0.003, step_per_decode_s=0.001, step_per_context_s=1e-6)
    fresh = GroupRecord("d1", "decode", 1, 1, "x:3")  # nothing measured yet: no points
    points = telemetry_points([prefill, decode, fresh])
    assert {(p.kind, p.tp) for p in points} == {("prefill", 1), ("decode", 2)}
    p256 = next(p for p in points if p.kind == "prefill" and p.tokens == 256)
    assert p256.seconds == pytest.approx(0.002 + 256e-5)
    d4 = next(p for p in points if p.kind == "decode" and p.tokens == 4 and p.context == 512)
    assert d4.seconds == pytest.approx(0.003 + 0.004 + 4 * 512e-6)
    spec = model_spec(tiny_model_dir)
    assert (spec.num_heads, spec.num_kv_heads, spec.vocab_size) == (4, 2, 512)


class _Pilot:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def control(self, *args: Any) -> dict[str, Any]:
        self.calls.append(args)
        return {"ok": True}


@pytest.mark.parametrize("body,code", [(b"[]", "invalid_body"), (b"{}", "invalid_body"), (b"nope", "invalid_json"),
                                       (b'{"enable": true}', "unknown_field"), (b'{"enabled": "yes"}', "invalid_type"),
                                       (b'{"interval_s": true}', "invalid_type"), (b'{"pin": 3}', "invalid_type")])
def test_the_admin_api_refuses_malformed_control(body: bytes, code: str) -> None:
    stand_in = _Pilot()
    response = _control(stand_in, body)
    assert response.status_code == 400
    assert json.loads(bytes(response.body))["error"]["code"] == code
    assert stand_in.calls == []


def test_the_admin_api_passes_good_control() -> None:
    stand_in = _Pilot()
    response = _control(stand_in, b'{"enabled": false, "interval_s": 2, "pin": "p1,d1"}')
    assert response.status_code == 200 and stand_in.calls == [(False, 2, "p1,d1", False)]
