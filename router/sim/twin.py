"""Digital twin: shadow runs of candidate plans, fed the live arrivals, that tell the planner
how each candidate would have done on the traffic actually seen.

Why: the planner's queueing model (`router.decide.planner.predict`) assumes Poisson arrivals and knows
nothing of the engine's TPOT guard or deadline-aware ordering, so on a bursty trace it ranks
plans badly. The twin replays the same arrivals through the same simulator code (scheduler,
groups, perf model) once per candidate plan, each from the moment it starts being tracked, and
reports each candidate's tier-weighted goodput against the current plan's shadow over the
window both have seen (exponentially discounted, half-life `halflife_s`). DistServe chooses
its placement by simulation offline; this does it online, as the traffic arrives.

No peeking: a shadow sees a request when it arrives, with the mean output length of that
tier's recently *finished* requests (the true length is unknown until the request ends).

Lifecycle: `arrive()` / `finished()` on every real arrival and completion; `gains()` at each
planner tick advances every shadow to now, refreshes the candidate list from the planner's
model every `refresh_s` (at most `max_shadows` at once; a candidate judged no better than the
current plan is dropped and not tried again for `retry_s`), and returns the judged gains.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

from router.decide.perfmodel import PerfModel
from router.decide.planner import Planner
from router.decide.plans import Plan, parse_plan
from router.decide.workload import WorkloadEstimate
from router.sim.cluster import SimConfig, Simulator
from router.sim.trace import TraceRequest
from services.tiers import Tier


@dataclass(frozen=True)
class TwinConfig:
    halflife_s: float = 600.0  # older outcomes count half per half-life
    judge_after_s: float = 300.0  # a candidate is judged once it has this much common history
    warmup_s: float = 30.0  # a fresh shadow starts empty: skip its first outcomes
    refresh_s: float = 60.0  # how often to take new candidates from the planner's model
    shortlist: int = 4  # candidates the model proposes per refresh
    max_shadows: int = 6  # shadow runs at once (each costs about one simulation)
    retry_s: float = 900.0  # a dropped candidate is not tracked again for this long


@dataclass
class Shadow:
    sim: Simulator
    start_s: float
    times: list[float] = field(default_factory=list)  # outcome times, non-decreasing
    # prefix[k] = sum over the first k outcomes of credit * 2^((t - base) / halflife): any
    # window's discounted credit is then two lookups.
    prefix: list[float] = field(default_factory=lambda: [0.0])
    base_s: float = 0.0

    def record(self, t: float, credit: float, halflife_s: float) -> None:
        t = max(t, self.times[-1]) if self.times else t
        if t - self.base_s > 256 * halflife_s:  # keep 2^x far from overflow on long runs
            scale = 2.0 ** (-(t - self.base_s) / halflife_s)
            self.prefix = [p * scale for p in self.prefix]
            self.base_s = t
        self.times.append(t)
        self.prefix.append(self.prefix[-1] + credit * 2.0 ** ((t - self.base_s) / halflife_s))

    def credit_since(self, start_s: float) -> float:
        """Discounted credit of the outcomes at or after `start_s` (up to a common factor)."""
        k = bisect.bisect_left(self.times, start_s)
        return self.prefix[-1] - self.prefix[k]


class Twin:
    def __init__(self, planner: Planner, perf: PerfModel, tiers: tuple[Tier, ...], cfg: SimConfig,
                 start: Plan, twin_cfg: TwinConfig | None = None) -> None:
        self.planner, self.perf, self.tiers = planner, perf, tiers
        self.sim_cfg, self.cfg = cfg, twin_cfg or TwinConfig()
        self.shadows: dict[str, Shadow] = {}
        self.retry_at: dict[str, float] = {}
        self.mean_output: dict[str, float] = {}
        self.next_refresh_s = 0.0
        self.track(start.to_str(), 0.0)

    # -- fed by the real cluster -----------------------------------------------------------------
    def arrive(self, now: float, tier: str, prompt_tokens: int) -> None:
        out = max(1, round(self.mean_output.get(tier, 128.0)))
        r = TraceRequest(now, prompt_tokens, out, tier, "twin")
        for s in self.shadows.values():
            s.sim.add(r)

    def finished(self, tier: str, output_tokens: int) -> None:
        m = self.mean_output.get(tier)
        self.mean_output[tier] = float(output_tokens) if m is None else m + 0.02 * (output_tokens - m)

    # -- asked by the planner tick ---------------------------------------------------------------
    def gains(self, now: float, current: Plan, workload: WorkloadEstimate) -> dict[str, float]:
        """Judged candidates -> relative goodput gain over the current plan (0.05 = 5% better)."""
        cur = current.to_str()
        if cur not in self.shadows:
            self.track(cur, now)
        for s in self.shadows.values():
            s.sim.run_until(now)
        judged = {name: g for name in self.shadows if name != cur
                  and (g := self._gain(name, cur, now)) is not None}
        if now >= self.next_refresh_s and workload.total_rate > 0:
            self.next_refresh_s = now + self.cfg.refresh_s
            self._refresh(now, cur, workload, judged)
        return {k: v for k, v in judged.items() if k in self.shadows}

    def _gain(self, name: str, cur: str, now: float) -> float | None:
        a, b = self.shadows[name], self.shadows[cur]
        since = max(a.start_s, b.start_s) + self.cfg.warmup_s
        if now - since < self.cfg.judge_after_s:
            return None
        # Both sums carry their own base: bring them to a common one before comparing.
        mine = a.credit_since(since) * 2.0 ** ((a.base_s - now) / self.cfg.halflife_s)
        theirs = b.credit_since(since) * 2.0 ** ((b.base_s - now) / self.cfg.halflife_s)
        return (mine - theirs) / max(theirs, 1e-9)

    def _refresh(self, now: float, cur: str, workload: WorkloadEstimate, judged: dict[str, float]) -> None:
        # Candidates judged no better than the current plan make room for the model's next ideas.
        for name, gain in judged.items():
            if gain <= 0:
                del self.shadows[name]
                self.retry_at[name] = now + self.cfg.retry_s
        for plan in self.planner.shortlist(workload, self.cfg.shortlist):
            name = plan.to_str()
            if len(self.shadows) >= self.cfg.max_shadows:
                break
            if name not in self.shadows and self.retry_at.get(name, -math.inf) <= now:
                self.track(name, now)

    def track(self, name: str, now: float) -> None:
        plan = parse_plan(name, self.planner.slots)
        cfg = self.cfg
        sim = Simulator([], self.perf, self.tiers, plan, self.sim_cfg)
        shadow = Shadow(sim, now)
        sim.on_outcome = lambda t, c: shadow.record(t, c, cfg.halflife_s)
        self.shadows[name] = shadow
