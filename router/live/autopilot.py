"""The autopilot: the leading router re-cuts the running cluster on its own.

Every `interval_s` (default 5 s) while this router leads, one tick:

  1. read what the gateways saw since the last tick (the `observed` stream: arrivals per tier,
     shed ones included, and each request's outcome, lengths, TTFT and TPOT;
     services/gateway/observed.py) into a sliding-window workload estimate
     (router/decide/workload.py) and the measured goodput per tier;
  2. correct the perf model online: every `refit_s` the groups' measured step times (their Redis
     records: prefill tokens/s, decode step = base + per row + per KV token) become profile points
     of their TP degree, and the efficiency terms are refitted (router/profile.fit) to them and to
     the host profile's points for the TP degrees no group runs now;
  3. cost moves by what they cost here: the pause of past reconfigurations of the same kind (a role
     flip on the same slots, or a re-cut that changes TP), from the orchestrator's reports;
  4. ask the planner (router/decide/planner.py) for the best plan net of the move's cost, with its
     hysteresis (`margin`) and minimum hold (`min_hold_s`);
  5. apply a change through the orchestrator (the same path as `POST /admin/plan`), unless a
     reconfiguration runs already, a slot is missing (the orchestrator heals first), the last move
     failed less than the back-off ago (doubling to `max_backoff_s`), or `max_moves_per_hour`
     moves were made in the last hour.

Every tick is a decision (action keep | switch | pin | hold | skip | failed): one log line, an
entry in a bounded history in Redis (`GET /admin/decisions`, `nitsum plan history`; a new leader
keeps it) and the metrics `nitsum_autopilot_*`. `GET/POST /admin/autopilot` turns it on or off,
changes the interval, and pins a plan (applied, then held until unpinned). docs/adaptive-tp.md
explains how to read a decision.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from router.decide.perfmodel import DEVICES, PerfModel
from router.decide.planner import Planner, PlannerConfig, PlannerState, align, predict
from router.decide.plans import Plan, parse_plan
from router.decide.workload import WorkloadEstimate, WorkloadEstimator
from router.live.autopilot_inputs import MoveCosts, model_spec, telemetry_points
from router.profile import Profile, fit
from services.cluster import ClusterClient, journal
from services.cluster.client import REDIS_ERRORS
from services.metrics import RouterMetrics
from services.tiers import Tier

log = logging.getLogger("nitsum.autopilot")

ACTIONS = ("keep", "switch", "pin", "hold", "skip", "failed")


@dataclass
class AutopilotSettings:
    enabled: bool = True
    interval_s: float = 5.0
    window_s: float = 60.0  # the workload estimate's sliding window
    min_hold_s: float = 30.0  # a plan stays at least this long (also after start)
    margin: float = 0.05  # a new plan must beat the current one by this share of its predicted score
    horizon_s: float = 120.0  # over which a move's pause is paid back
    max_moves_per_hour: int = 20
    backoff_s: float = 30.0  # after a failed move; doubles per failure in a row
    max_backoff_s: float = 600.0
    roles: str = "pdc"
    refit_s: float = 30.0
    # False: trust the perf model as given (a --profile): no online refit, and the measured goodput
    # does not widen the hysteresis (the planner's "model doubt").
    correct: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


class Autopilot:
    def __init__(self, settings: AutopilotSettings, router: Any, orchestrator: Any, cluster: ClusterClient,
                 tiers: tuple[Tier, ...], metrics: RouterMetrics, profile: Profile | None = None,
                 model_dir: Path | None = None, tps: tuple[int, ...] | None = None,
                 planner_config: PlannerConfig | None = None) -> None:
        self.settings = settings
        self.router, self.orchestrator, self.cluster = router, orchestrator, cluster
        self.tiers, self.metrics = tiers, metrics
        self.profile, self.model_dir, self.tps = profile, model_dir, tps
        self.base_config = planner_config or PlannerConfig()
        self.estimator = WorkloadEstimator(settings.window_s, default_output=64.0)
        self.costs = MoveCosts()
        self.pinned: Plan | None = None
        self.last: dict[str, Any] | None = None  # the last decision, with the whole explanation
        self._observed_id = "$"
        self._outcomes: deque[tuple[float, str, bool]] = deque()  # (end, tier, met)
        self._perf: PerfModel | None = profile.perf_model() if profile else None
        self._refit_at = float("-inf")
        self._state = PlannerState(time.time())  # the minimum hold also applies after a (re)start
        self._moves: deque[float] = deque()
        self._failures = 0
        self._backoff_until = float("-inf")
        self._plan_before: Plan | None = None  # the plan a move (or an admin's) started from
        self._wake = asyncio.Event()
        orchestrator.on_report.append(self._on_report)

    # ---- control (the admin API) ------------------------------------------------------------
    def control(self, enabled: bool | None = None, interval_s: float | None = None,
                pin: str | None = None, unpin: bool = False) -> dict[str, Any]:
        """Change what was asked, after checking all of it (a bad value changes nothing)."""
        if interval_s is not None and not 0.5 <= interval_s <= 3600:
            raise ValueError(f"interval_s {interval_s}: give 0.5 to 3600 seconds")
        pinned = self.pinned
        if pin is not None:
            slots = self.orchestrator.plan.num_slots if self.orchestrator.plan else None
            pinned = parse_plan(pin, slots)
            if self.tps is not None and any(g.tp not in self.tps for g in pinned.groups):
                raise ValueError(f"plan {pin}: this model can be cut into TP {', '.join(map(str, self.tps))} only")
        if unpin:
            pinned = None
        self.pinned = pinned
        if interval_s is not None:
            self.settings.interval_s = float(interval_s)
        if enabled is not None:
            self.settings.enabled = enabled
        self.metrics.autopilot_on.set(1 if self.settings.enabled else 0)
        self._wake.set()
        return self.status()

    def status(self) -> dict[str, Any]:
        return {**self.settings.to_dict(), "pinned": self.pinned.to_str() if self.pinned else None,
                "perf_model": self._perf_source(), "move_costs_s": {k: self.costs.mean(k) for k in ("role", "retp")},
                "moves_last_hour": len(self._moves), "last_decision": self.last}

    def _perf_source(self) -> str:
        base = "the host profile" if self.profile else "the built-in roofline"
        return base + (", corrected online from the groups' measured steps" if self._refit_at > float("-inf") else "")

    # ---- the loop ----------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        self.metrics.autopilot_on.set(1 if self.settings.enabled else 0)
        while not stop.is_set():
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self.settings.interval_s)
            except TimeoutError:
                pass
            if stop.is_set() or not self.router.leading:
                continue
            try:
                await self.tick(time.time())
            except REDIS_ERRORS as e:
                log.warning("autopilot tick skipped: Redis unreachable (%s)", e)
            except Exception:
                log.exception("autopilot tick failed")

    async def tick(self, now: float) -> dict[str, Any] | None:
        await self._read_observations(now)
        estimate = self.estimator.estimate(now)
        measured = self._measured(now)
        for t in self.tiers:
            load = next((x for x in estimate.tiers if x.tier == t.name), None)
            self.metrics.offered_rate.labels(t.name).set(load.rate if load else 0.0)
            self.metrics.measured_goodput.labels(t.name).set(measured.get(t.name, 0.0))
        self.metrics.since_change.set(max(0.0, now - self._state.last_change_s))
        current = self.orchestrator.plan
        if current is None:
            return None  # nothing is served yet (bootstrap)
        if not self.orchestrator.busy:
            self._plan_before = current
        if self.pinned is not None:
            if self.pinned.same_layout(current) or self.orchestrator.busy:
                return None
            return await self._apply(now, current, align(current, self.pinned), "pin",
                                     f"pinned {self.pinned.to_str()}", estimate, measured, None)
        if not self.settings.enabled:
            return None
        why = self._blocked(now, current)
        if why is not None:
            return await self._record(now, why[0], current, None, why[1], estimate, measured, None)
        if estimate.total_rate <= 0:
            return await self._record(now, "keep", current, None, f"keep {current.to_str()}: no load in the last "
                                      f"{self.settings.window_s:g} s", estimate, measured, None)
        planner = await self._planner(now, current.num_slots)
        if planner is None:
            return await self._record(now, "skip", current, None, "no perf model: start the router with "
                                      "--model DIR or --profile FILE", estimate, measured, None)
        decision, state = planner.decide(now, current, estimate, self._state, self._observed_score(now))
        if not decision.changed:
            return await self._record(now, "keep", current, None, decision.explanation.split("\n", 1)[0],
                                      estimate, measured, decision)
        return await self._apply(now, current, decision.plan, "switch", decision.explanation.split("\n", 1)[0],
                                 estimate, measured, decision, state)

    def _blocked(self, now: float, current: Plan) -> tuple[str, str] | None:
        o = self.orchestrator
        if o.busy:
            return "skip", "a reconfiguration is running"
        if o.target is not None and not o.target.same_layout(current):
            return "skip", f"the cluster runs {current.to_str()} while {o.target.to_str()} is asked: a slot is " \
                           "missing, the orchestrator heals first"
        if now < self._backoff_until:
            return "hold", f"backing off {self._backoff_until - now:.0f} s more after {self._failures} failed move(s)"
        while self._moves and self._moves[0] < now - 3600:
            self._moves.popleft()
        if len(self._moves) >= self.settings.max_moves_per_hour:
            return "hold", f"{len(self._moves)} moves in the last hour (cap {self.settings.max_moves_per_hour})"
        return None

    async def _apply(self, now: float, current: Plan, plan: Plan, action: str, reason: str,
                     estimate: WorkloadEstimate, measured: dict[str, float], decision: Any,
                     state: PlannerState | None = None) -> dict[str, Any]:
        log.info("autopilot: %s -> %s (%s)", current.to_str(), plan.to_str(), reason)
        self._plan_before = current
        report = await self.orchestrator.apply(plan)
        done = report.result in ("committed", "unchanged")
        if done:
            self._state = state if state is not None else PlannerState(now)
            self._moves.append(now)
            self._failures = 0
        else:
            self._failures += 1
            self._backoff_until = time.time() + min(self.settings.max_backoff_s,
                                                    self.settings.backoff_s * 2 ** (self._failures - 1))
            self._state = PlannerState(now)  # what runs now (a fallback) is held too
            if action == "pin":
                self.pinned = None  # a pin that cannot be served is dropped, not retried forever
        entry = await self._record(now, action if done else "failed", current, plan, reason, estimate, measured,
                                   decision, {"result": report.result, "seconds": round(report.seconds, 3),
                                              "plan": report.plan, "error": report.error})
        return entry

    async def _record(self, now: float, action: str, current: Plan, to: Plan | None, reason: str,
                      estimate: WorkloadEstimate, measured: dict[str, float], decision: Any,
                      report: dict[str, Any] | None = None) -> dict[str, Any]:
        if decision is not None:
            predicted = {t.tier: round(t.goodput, 4) for t in decision.prediction.tiers}
        else:  # what the model expects of the plan that runs (nothing when idle)
            predicted = {k: round(v, 4) for k, v in self.prediction(current, estimate).items()}
        for t in self.tiers:
            self.metrics.predicted_goodput.labels(t.name).set(predicted.get(t.name, 0.0))
        entry: dict[str, Any] = {
            "at": round(now, 3), "action": action, "plan": current.to_str(), "to": to.to_str() if to else None,
            "reason": reason, "offered": {t.tier: round(t.rate, 4) for t in estimate.tiers},
            "predicted_goodput": predicted, "measured_goodput": {k: round(v, 4) for k, v in measured.items()},
            "ranking": [list(r) for r in decision.ranking] if decision is not None else [],
        }
        if report is not None:
            entry["report"] = report
        self.metrics.autopilot_decisions.labels(action).inc()
        same = self.last is not None and (self.last["action"], self.last["reason"]) == (action, reason)
        log.log(logging.DEBUG if same else logging.INFO, "autopilot %s: %s | offered %s | measured goodput %s", action, reason,
                 estimate.describe(), json.dumps(entry["measured_goodput"]))
        self.last = {**entry, "explanation": decision.explanation if decision is not None else reason}
        try:
            await journal.push_decision(self.cluster, entry)
        except REDIS_ERRORS:
            pass  # Redis away: the history misses this entry; the log line and the metrics have it
        return entry

    def _on_report(self, report: Any) -> None:
        """Every reconfiguration, the autopilot's or an admin's: its pauses price future moves, and
        the plan it left is held for the minimum hold like one the autopilot chose."""
        self.costs.observe(self._plan_before, report)
        if report.result != "failed":
            self._state = PlannerState(time.time())

    # ---- what the tick reads ------------------------------------------------------------------
    async def _read_observations(self, now: float) -> None:
        while True:
            self._observed_id, docs = await journal.read_observations(self.cluster, self._observed_id)
            for d in docs:
                at, tier = float(d.get("at", now)), str(d.get("tier", ""))
                if d.get("k") == "a":
                    self.estimator.observe_arrival(at, tier, int(d.get("prompt", 0)))
                elif d.get("k") == "f":
                    met = bool(d.get("met"))
                    if d.get("outcome") == "ok":
                        self.estimator.observe_finish(at, tier, int(d.get("output", 0)))
                    weight = next((t.weight for t in self.tiers if t.name == tier), 0.0)
                    self.estimator.observe_outcome(at, weight if met else 0.0)
                    self._outcomes.append((at, tier, met))
            if len(docs) < 5000:
                return

    def _measured(self, now: float) -> dict[str, float]:
        """Requests/s per tier that met both targets over the window (as the gateways saw them)."""
        start = now - self.settings.window_s
        while self._outcomes and self._outcomes[0][0] < start:
            self._outcomes.popleft()
        out = {t.name: 0.0 for t in self.tiers}
        for _, tier, met in self._outcomes:
            if met and tier in out:
                out[tier] += 1.0 / self.settings.window_s
        return out

    def _observed_score(self, now: float) -> float | None:
        return self.estimator.observed_score(now) if self.settings.correct else None

    async def _planner(self, now: float, slots: int) -> Planner | None:
        if self.settings.correct and now - self._refit_at >= self.settings.refit_s:
            await self._refit(now)
        if self._perf is None and self.model_dir is not None and (self.model_dir / "config.json").is_file():
            self._perf = PerfModel(DEVICES["cpu"], model_spec(self.model_dir))  # until a refit corrects it
        if self._perf is None:
            return None
        cfg = self.costs.planner_config(replace(self.base_config, margin=self.settings.margin,
                                                min_dwell_s=self.settings.min_hold_s,
                                                horizon_s=self.settings.horizon_s, roles=self.settings.roles))
        return Planner(self._perf, self.tiers, slots, cfg, self.tps)

    async def _refit(self, now: float) -> None:
        """The perf model, refitted to the groups' measured steps (and the host profile's points
        for TP degrees no group runs now)."""
        base = self._perf
        if base is None:
            if self.model_dir is None or not (self.model_dir / "config.json").is_file():
                return
            base = PerfModel(DEVICES["cpu"], model_spec(self.model_dir))
            self._perf = base
        live = telemetry_points([g for g in await self.cluster.groups() if self.router.routable(g)])
        if not live:
            return
        seen = {p.tp for p in live}
        profile_points = [p for p in (self.profile.points if self.profile else ()) if p.tp not in seen]
        try:
            self._perf = base.with_efficiency(fit(base, live + profile_points))
            self._refit_at = now
        except (ValueError, ArithmeticError) as e:
            log.debug("perf model refit skipped: %s", e)

    def prediction(self, plan: Plan, estimate: WorkloadEstimate) -> dict[str, float]:
        if self._perf is None or estimate.total_rate <= 0:
            return {}
        return {t.tier: t.goodput for t in predict(plan, estimate, self._perf, self.tiers).tiers}

    def explain(self, now: float | None = None, top: int = 6) -> dict[str, Any]:
        """The live estimate, the best candidate plans with predicted per-tier goodput (the current
        one first), and the last decision with its reasons: `nitsum plan explain --router`."""
        now = time.time() if now is None else now
        estimate = self.estimator.estimate(now)
        out: dict[str, Any] = {"status": self.status(), "workload": estimate.describe(),
                               "offered": {t.tier: round(t.rate, 4) for t in estimate.tiers},
                               "measured_goodput": {k: round(v, 4) for k, v in self._measured(now).items()},
                               "candidates": []}
        current = self.orchestrator.plan
        if self._perf is None or current is None:
            return out
        planner = Planner(self._perf, self.tiers, current.num_slots, self.base_config, self.tps)
        cache: dict[tuple[object, ...], Any] = {}
        scored = sorted(((predict(align(current, p), estimate, self._perf, self.tiers, cache), p)
                         for p in planner.candidates), key=lambda x: (-x[0].score, x[1].to_str()))
        plans = [(predict(current, estimate, self._perf, self.tiers, cache), current)]
        plans += [(pred, p) for pred, p in scored if not p.same_layout(current)][: top - 1]
        out["candidates"] = [{"plan": p.to_str(), "current": p is current, "score": round(pred.score, 4),
                              "tiers": {t.tier: {"goodput": round(t.goodput, 4), "rate": round(t.rate, 4),
                                                 "ttft_ok": round(t.ttft_ok, 3), "tpot_s": round(t.tpot_s, 4)}
                                        for t in pred.tiers}} for pred, p in plans]
        return out
