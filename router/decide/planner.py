"""Goodput-maximising planner: which plan (TP groups and roles) to run for the workload seen now.

Pure decision code. `Planner.decide(now, current, workload, state) -> (decision, state)`
enumerates every plan for the
slots (power-of-two TP groups that fit the model, each prefill, decode or colocated), predicts
each plan's per-tier goodput with a queueing model on top of the perf model (`predict`,
below), subtracts the goodput lost while moving from the current plan, and
switches only when the gain clears a hysteresis margin and the current plan has been held for
`min_dwell_s`. Every decision carries a human-readable explanation (`nitsum plan explain`). What the
planner remembers between decisions is an explicit value (`PlannerState`), which the caller keeps:
the `Planner` itself holds only its configuration and candidates.

The model assumes Poisson arrivals, so on bursty traffic its ranking is only a first guess.
When the caller can *measure* candidates on the traffic itself (the simulator's digital twin,
router/sim/twin.py, replays the live arrivals through the candidates its `shortlist` proposes),
`decide(..., measured=...)` chooses among the measured plans instead, net of each move's pause.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np

from router.decide.perfmodel import PerfModel
from router.decide.plans import Group, Plan, enumerate_plans, parse_plan
from router.decide.workload import WorkloadEstimate
from services.tiers import Tier


@dataclass(frozen=True)
class PlannerConfig:
    # Hysteresis: a new plan must beat the current one by this share of its score...
    margin: float = 0.05
    # ...and the current plan must have been in place this long (no flapping on a burst).
    min_dwell_s: float = 20.0
    # Horizon over which a reconfiguration pause is paid back; longer = more willing to move.
    horizon_s: float = 60.0
    # Modelled reconfiguration costs (until the orchestrator measures them, issue "adaptive TP"):
    # forming process groups + warm-up for a group that changes TP, and a role flip alone.
    group_setup_s: float = 1.5
    role_switch_s: float = 0.2
    roles: str = "pdc"
    # With measured gains (the digital twin): they come from the traffic itself, not a model, so
    # a smaller margin suffices; the pause is paid back over the twin's memory (its half-life).
    measured_margin: float = 0.01
    measured_horizon_s: float = 600.0
    measured_dwell_s: float = 120.0  # measured gains move slowly; so should the plan


@dataclass(frozen=True)
class PlannerState:
    """What the planner remembers between decisions: when the plan last changed (the dwell rule)."""

    last_change_s: float = float("-inf")


@dataclass(frozen=True)
class ReconfigCost:
    pause_s: float  # how long the affected slots serve nothing
    affected_slots: tuple[int, ...]
    fetched_bytes: float  # weights pulled from peers (TP-aware reuse keeps the rest)
    reused_bytes: float


@dataclass(frozen=True)
class PlanDecision:
    plan: Plan
    changed: bool
    explanation: str
    prediction: PlanPrediction
    cost: ReconfigCost
    ranking: tuple[tuple[str, float], ...] = field(default=())  # top plans by net score


def align(old: Plan, new: Plan) -> Plan:
    """Place `new`'s groups on slots so that groups that exist in both keep their slots.

    Unmatched groups go to the lowest free block aligned to their size (NVLink domains and
    weight-shard nesting both like aligned blocks). Falls back to in-order slots.
    """
    free = set(range(new.num_slots))
    placed: list[Group | None] = [None] * len(new.groups)
    pool = list(old.groups)
    for i, g in enumerate(new.groups):
        match = next((o for o in pool if o.role == g.role and o.tp == g.tp), None)
        if match is not None and set(match.slots) <= free:
            pool.remove(match)
            placed[i] = match
            free -= set(match.slots)
    for i, g in sorted(enumerate(new.groups), key=lambda x: -x[1].tp):
        if placed[i] is not None:
            continue
        start = next((s for s in range(0, new.num_slots, g.tp)
                      if set(range(s, s + g.tp)) <= free), None)
        if start is None:
            return new
        placed[i] = Group(g.role, tuple(range(start, start + g.tp)))
        free -= set(range(start, start + g.tp))
    return Plan(tuple(p for p in placed if p is not None), epoch=new.epoch, num_slots=new.num_slots)


def reconfig_cost(old: Plan, new: Plan, perf: PerfModel, cfg: PlannerConfig) -> ReconfigCost:
    """Pause and weight traffic of moving from `old` to `new` (already aligned)."""
    old_of = {s: g for g in old.groups for s in g.slots}
    w = perf.model.weight_bytes
    pause, fetched, reused = 0.0, 0.0, 0.0
    affected: list[int] = []
    for g in new.groups:
        if g in old.groups:
            continue
        for s in g.slots:
            o = old_of.get(s)
            affected.append(s)
            need = w / g.tp
            if o is not None and o.slots == g.slots:
                pause = max(pause, cfg.role_switch_s)  # same shard, only the role flips
                reused += need
                continue
            # A new shard nests in the old one when the groups nest (aligned blocks).
            nested = o is not None and (set(o.slots) <= set(g.slots) or set(g.slots) <= set(o.slots))
            have = min(need, w / o.tp) if nested and o is not None else 0.0
            fetched += need - have
            reused += have
            pause = max(pause, cfg.group_setup_s + perf.weight_fetch_time(need - have))
    return ReconfigCost(pause, tuple(sorted(affected)), fetched, reused)


class Planner:
    """Chooses plans. Configuration and candidates only: the state between decisions is the
    caller's `PlannerState`, passed in and handed back."""

    def __init__(self, perf: PerfModel, tiers: tuple[Tier, ...], slots: int,
                 cfg: PlannerConfig | None = None, tps: tuple[int, ...] | None = None) -> None:
        """`tps`: the TP degrees the model can be cut into (services/engine/tp.py; None: any)."""
        self.perf, self.tiers, self.slots = perf, tiers, slots
        self.cfg = cfg or PlannerConfig()
        min_tp = next((t for t in (1, 2, 4, 8) if perf.fits(t) and (tps is None or t in tps)), None)
        if min_tp is None or min_tp > slots:
            raise ValueError(f"{perf.model.name} does not fit on {slots} {perf.device.name} slots")
        self.candidates = [p for p in enumerate_plans(slots, min_tp=min_tp, roles=self.cfg.roles)
                           if tps is None or all(g.tp in tps for g in p.groups)]

    def best_static(self, workload: WorkloadEstimate) -> Plan:
        """The plan the model predicts best for this workload, ignoring move costs."""
        return max(self.candidates, key=lambda p: (predict(p, workload, self.perf, self.tiers).score,
                                                   p.to_str()))

    def shortlist(self, workload: WorkloadEstimate, k: int) -> list[Plan]:
        """The model's `k` best plans for this workload (candidates worth measuring)."""
        cache: dict[tuple[object, ...], Any] = {}
        return sorted(self.candidates, key=lambda p: (-predict(p, workload, self.perf, self.tiers, cache).score,
                                                      p.to_str()))[:k]

    def decide(self, now_s: float, current: Plan, workload: WorkloadEstimate, state: PlannerState = PlannerState(),
               observed_score: float | None = None,
               measured: Mapping[str, float] | None = None) -> tuple[PlanDecision, PlannerState]:
        """`observed_score`: the tier-weighted goodput the current plan actually delivered over
        the window, if known. The model's error on the current plan is added to the hysteresis:
        a predicted gain smaller than the model's own error is not worth a move.

        `measured`: plan text -> relative goodput gain over the current plan that something
        better than the model measured (the simulator's digital twin, router/sim/twin.py). When
        given, only those plans are candidates and their measured gains replace the model's."""
        decision = (self._decide_measured(now_s, current, workload, measured, state) if measured is not None
                    else self._decide_modelled(now_s, current, workload, state, observed_score))
        return decision, PlannerState(now_s) if decision.changed else state

    def _decide_modelled(self, now_s: float, current: Plan, workload: WorkloadEstimate, state: PlannerState,
                         observed_score: float | None) -> PlanDecision:
        cache: dict[tuple[object, ...], Any] = {}
        cur_pred = predict(current, workload, self.perf, self.tiers, cache)
        weight = {t.name: t.weight for t in self.tiers}
        ceiling = sum(weight.get(t.tier, 0.0) * t.rate for t in workload.tiers)
        doubt = abs(cur_pred.score - observed_score) if observed_score is not None else 0.0
        threshold = cur_pred.score * (1 + self.cfg.margin) + doubt + 1e-6
        if threshold >= ceiling:
            # No plan can beat this one by the margin: skip the search (most ticks at low load).
            text = _explain(current, cur_pred, workload, f"keep {current.to_str()}: predicted to meet "
                            "(nearly) every SLO already", ())
            return PlanDecision(current, False, text, cur_pred, ReconfigCost(0.0, (), 0.0, 0.0), ())
        scored: list[tuple[float, Plan, PlanPrediction, ReconfigCost]] = []
        for cand in self.candidates:
            plan = align(current, cand)
            pred = predict(plan, workload, self.perf, self.tiers, cache)
            cost = reconfig_cost(current, plan, self.perf, self.cfg)
            # Goodput the affected slots would have delivered during the pause, over the horizon.
            penalty = cur_pred.score * len(cost.affected_slots) / self.slots * cost.pause_s / self.cfg.horizon_s
            scored.append((pred.score - penalty, plan, pred, cost))
        scored.sort(key=lambda x: (-x[0], x[1].to_str()))
        net, best, pred, cost = scored[0]
        ranking = tuple((p.to_str(), round(s, 3)) for s, p, _, _ in scored[:5])
        dwell_left = state.last_change_s + self.cfg.min_dwell_s - now_s
        if best.same_layout(current) or net <= threshold or dwell_left > 0:
            why = ("it is already the best plan" if best.same_layout(current) else
                   f"held for {dwell_left:.0f} s more (dwell)" if dwell_left > 0 else
                   f"best alternative {best.to_str()} nets {net:.2f} < {threshold:.2f} (hysteresis)")
            text = _explain(current, cur_pred, workload, f"keep {current.to_str()}: {why}", ranking)
            return PlanDecision(current, False, text, cur_pred, ReconfigCost(0.0, (), 0.0, 0.0), ranking)
        chosen = best.with_epoch(current.epoch + 1)
        why = (f"switch {current.to_str()} -> {best.to_str()}: predicted score {pred.score:.2f} vs "
               f"{cur_pred.score:.2f}, minus {pred.score - net:.2f} for a {cost.pause_s:.1f} s pause on "
               f"{len(cost.affected_slots)} slot(s) ({cost.fetched_bytes / 1e9:.1f} GB fetched, "
               f"{cost.reused_bytes / 1e9:.1f} GB reused)")
        return PlanDecision(chosen, True, _explain(best, pred, workload, why, ranking), pred, cost, ranking)

    def _decide_measured(self, now_s: float, current: Plan, workload: WorkloadEstimate,
                         measured: Mapping[str, float], state: PlannerState) -> PlanDecision:
        cur_pred = predict(current, workload, self.perf, self.tiers)
        scored: list[tuple[float, Plan, ReconfigCost]] = []
        for text, gain in measured.items():
            plan = align(current, parse_plan(text, self.slots, current.epoch))
            cost = reconfig_cost(current, plan, self.perf, self.cfg)
            # The share of the horizon's goodput the paused slots give up, as in decide().
            penalty = len(cost.affected_slots) / self.slots * cost.pause_s / self.cfg.measured_horizon_s
            scored.append((gain - penalty, plan, cost))
        scored.sort(key=lambda x: (-x[0], x[1].to_str()))
        ranking = tuple((p.to_str(), round(g, 4)) for g, p, _ in scored[:5])
        none = ReconfigCost(0.0, (), 0.0, 0.0)
        dwell_left = state.last_change_s + self.cfg.measured_dwell_s - now_s
        if not scored or scored[0][0] <= self.cfg.measured_margin or dwell_left > 0:
            why = ("no candidate measured yet" if not scored else
                   f"held for {dwell_left:.0f} s more (dwell)" if dwell_left > 0 else
                   f"best measured alternative {scored[0][1].to_str()} nets {scored[0][0]:+.1%} "
                   f"<= {self.cfg.measured_margin:.0%} (hysteresis)")
            text = _explain(current, cur_pred, workload, f"keep {current.to_str()}: {why}", ranking)
            return PlanDecision(current, False, text, cur_pred, none, ranking)
        net, best, cost = scored[0]
        why = (f"switch {current.to_str()} -> {best.to_str()}: measured {measured[best.to_str()]:+.1%} "
               f"goodput on the traffic seen, {net:+.1%} net of a {cost.pause_s:.1f} s pause on "
               f"{len(cost.affected_slots)} slot(s) ({cost.fetched_bytes / 1e9:.1f} GB fetched, "
               f"{cost.reused_bytes / 1e9:.1f} GB reused)")
        pred = predict(best, workload, self.perf, self.tiers)
        return PlanDecision(best.with_epoch(current.epoch + 1), True, _explain(best, pred, workload, why, ranking),
                            pred, cost, ranking)


def _explain(plan: Plan, pred: PlanPrediction, workload: WorkloadEstimate, headline: str,
             ranking: tuple[tuple[str, float], ...]) -> str:
    lines = [headline, f"workload: {workload.describe()}"]
    lines += [f"  {t.tier}: predicted TTFT ok {t.ttft_ok:.0%}, TPOT {t.tpot_s * 1e3:.0f} ms (ok {t.tpot_ok:.0%}), "
              f"goodput {t.goodput:.2f}/{t.rate:.2f} req/s" for t in pred.tiers]
    lines += [f"  groups: {g}" for g in pred.notes]
    if ranking:
        lines.append("  top plans (net score): " + ", ".join(f"{p} {s:.2f}" for p, s in ranking))
    return "\n".join(lines)


# ---- goodput prediction: a queueing model on top of the perf model -------------------------

CHUNK_TOKENS = 8192  # prefill token budget per forward (vLLM V1's API-server default)
MAX_RUNNING = 256  # decode batch cap per group


@dataclass(frozen=True)
class TierPrediction:
    tier: str
    rate: float
    ttft_ok: float  # predicted share of requests meeting TTFT
    tpot_s: float  # predicted TPOT (rate-weighted over decode groups)
    tpot_ok: float
    goodput: float  # req/s meeting both


@dataclass(frozen=True)
class PlanPrediction:
    score: float  # tier-weighted goodput
    tiers: tuple[TierPrediction, ...]
    notes: tuple[str, ...]


def predict(plan: Plan, workload: WorkloadEstimate, perf: PerfModel, tiers: tuple[Tier, ...],
            cache: dict[tuple[object, ...], object] | None = None) -> PlanPrediction:
    """Per-tier goodput of `plan` under `workload`.

    Prefill: each prefill-capable group takes a TP-proportional share of arrivals and serves
    them as an M/G/1 queue with non-preemptive priority by TTFT target (the scheduler's deadline
    order), so a tight tier waits only behind itself and the work in service; a prompt meets
    its TTFT if any group would make it (the scheduler places earliest-finish). Decode: Little's
    law gives the batch (rate x output length x TPOT), solved as a fixed point with the perf
    model's step time; a colocated group's TPOT is stretched by the time its prefills take.
    """
    loads = {t.tier: t for t in workload.tiers if t.rate > 0}
    active = sorted((t for t in tiers if t.name in loads), key=lambda t: t.ttft_s)
    if not active:
        return PlanPrediction(0.0, (), ("no load",))
    pre = [g for g in plan.groups if g.does_prefill]
    dec = [g for g in plan.groups if g.does_decode]
    rates = np.array([loads[t.name].rate for t in active])
    samples = [np.array(loads[t.name].prompt_samples or (1,), dtype=float) for t in active]
    out = float(np.dot(rates, [max(1.0, loads[t.name].mean_output) for t in active]) / rates.sum())
    prompt = float(np.dot(rates, [s.mean() for s in samples]) / rates.sum())
    pre_tp, dec_tp = sum(g.tp for g in pre), sum(g.tp for g in dec)
    # One decide() evaluates dozens of plans on one workload: share what does not depend on the plan.
    memo: dict[tuple[object, ...], Any] = {} if cache is None else cache

    def times(i: int, tp: int) -> np.ndarray:
        if (i, tp) not in memo:
            memo[(i, tp)] = perf.prefill_times(samples[i], tp)
        return cast(np.ndarray, memo[(i, tp)])

    util = {id(g): float(sum(r * g.tp / pre_tp * times(i, g.tp).mean() for i, r in enumerate(rates)))
            for g in pre}
    decode: dict[int, tuple[float, float, float]] = {}
    for g in dec:
        key = ("decode", g.tp, g.role, round(g.tp / dec_tp, 9), round(util.get(id(g), 0.0), 9))
        if key not in memo:
            memo[key] = _decode_group(perf, g, rates.sum() * g.tp / dec_tp, out, prompt, util.get(id(g), 0.0))
        decode[id(g)] = memo[key]
    # The scheduler sends each prompt to the group that finishes it first, so a prompt meets
    # its TTFT if any prefill group (at that group's load) would make it.
    per_group = []
    for g in pre:
        step = decode[id(g)][1] if id(g) in decode else 0.0
        tkey = ("ttft", g.tp, round(g.tp / pre_tp, 9), round(step, 9))
        if tkey not in memo:  # the same group shape at the same share recurs across plans
            base = [times(i, g.tp) for i in range(len(active))]
            memo[tkey] = _ttft_ok(base, active, rates * g.tp / pre_tp, samples, step)
        per_group.append(memo[tkey])
    ttft_ok = np.array([np.mean(np.max([pg[i] for pg in per_group], axis=0)) for i in range(len(active))])
    preds, score = _per_tier(active, tiers, rates, ttft_ok, dec, decode)
    notes = [f"{g.to_str()} slots {g.slots[0]}-{g.slots[-1]}: prefill busy {util[id(g)]:.0%}" for g in pre]
    notes += [f"{g.to_str()} slots {g.slots[0]}-{g.slots[-1]}: decode batch {decode[id(g)][0]:.0f}, "
              f"TPOT {decode[id(g)][1] * 1e3:.0f} ms, served {decode[id(g)][2]:.0%}" for g in dec]
    return PlanPrediction(score, tuple(preds), tuple(notes))


def _per_tier(active: list[Tier], tiers: tuple[Tier, ...], rates: np.ndarray, ttft_ok: np.ndarray,
              dec: list[Group], decode: dict[int, tuple[float, float, float]]) -> tuple[list[TierPrediction], float]:
    pure = [g for g in dec if g.role == "decode"]
    tightest = min(t.tpot_s for t in tiers)
    preds, score = [], 0.0
    for i, t in enumerate(active):
        # The tightest-TPOT tier decodes on decode-only groups when there are any (scheduler rule).
        mine = pure if pure and t.tpot_s <= tightest else dec
        mine_tp = sum(g.tp for g in mine)
        tpot = sum(g.tp / mine_tp * decode[id(g)][1] for g in mine)
        tpot_ok = sum(g.tp / mine_tp * decode[id(g)][2] * _ramp(t.tpot_s, decode[id(g)][1]) for g in mine)
        good = rates[i] * ttft_ok[i] * tpot_ok
        score += t.weight * good
        preds.append(TierPrediction(t.name, float(rates[i]), float(ttft_ok[i]), tpot, tpot_ok, float(good)))
    return preds, float(score)


def _ramp(target: float, value: float) -> float:
    # TPOT varies around its mean; a +-10% ramp instead of a cliff keeps the search smooth.
    return min(1.0, max(0.0, 0.5 + (target - value) / (0.2 * target)))


def _decode_group(perf: PerfModel, g: Group, rate: float, out: float, prompt: float,
                  prefill_util: float) -> tuple[float, float, float]:
    """(batch, TPOT, share of the offered decode load served) for one decode-capable group."""
    ctx = prompt + out / 2
    cap = min(MAX_RUNNING, perf.kv_capacity_tokens(g.tp) / (prompt + out))
    free = max(0.05, 1.0 - prefill_util) if g.role == "colocated" else 1.0

    def tpot(b: float) -> float:
        return perf.decode_step_time(max(1, round(b)), int(b * ctx), g.tp) / free

    batch = rate * out * tpot(1)
    for _ in range(40):
        nxt = rate * out * tpot(batch)
        if nxt > cap:
            return cap, tpot(cap), cap / nxt
        if abs(nxt - batch) < 0.01:
            break
        batch = nxt
    return batch, tpot(batch), 1.0


def _ttft_ok(prefill: list[np.ndarray], active: list[Tier], rates: np.ndarray,
             samples: list[np.ndarray], decode_step: float) -> list[np.ndarray]:
    """Per tier, per sampled prompt: probability its prefill here ends within the TTFT target."""
    service = [p + np.ceil(s / CHUNK_TOKENS) * decode_step for p, s in zip(prefill, samples, strict=True)]
    rho = rates * np.array([s.mean() for s in service])
    w0 = float(np.dot(rates, [np.mean(s * s) for s in service])) / 2
    total = min(0.999, float(rho.sum()))
    ok = [np.zeros(len(s)) for s in samples]
    above = 0.0
    for i, t in enumerate(active):
        sigma = above + rho[i]
        if sigma >= 1.0:
            break  # this tier and all looser ones queue without bound
        wait = w0 / ((1 - above) * (1 - sigma))
        slack = t.ttft_s - service[i]
        # P(W > x) = rho * exp(-x * rho / W): waits with prob rho, exponential with mean W/rho.
        p_late = np.where(slack < 0, 1.0, total * np.exp(-np.maximum(slack, 0) * total / max(wait, 1e-9)))
        ok[i] = 1.0 - p_late
        above = sigma
    return ok
