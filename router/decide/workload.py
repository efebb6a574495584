"""Workload estimator: per-tier arrival rate and length distributions over a sliding window.

The planner asks "what is the load now?"; this answers from the last `window_s` seconds of
arrivals (rate, prompt lengths) and completions (output lengths, which are only known once a
request finishes, so the estimator never peeks at the future). The simulator feeds it through its
two `observe_*` calls; the live router does not run a plan loop yet, so nothing live feeds it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class TierLoad:
    tier: str
    rate: float  # arrivals per second over the window
    prompt_samples: tuple[int, ...]  # recent prompt lengths (the planner needs the tail, not just a mean)
    mean_output: float  # mean output tokens of recent completions

    @property
    def mean_prompt(self) -> float:
        return sum(self.prompt_samples) / len(self.prompt_samples) if self.prompt_samples else 0.0


@dataclass(frozen=True)
class WorkloadEstimate:
    now_s: float
    window_s: float
    tiers: tuple[TierLoad, ...]

    @property
    def total_rate(self) -> float:
        return sum(t.rate for t in self.tiers)

    def describe(self) -> str:
        return "; ".join(f"{t.tier}: {t.rate:.2f} req/s, prompt {t.mean_prompt:.0f}, output {t.mean_output:.0f}"
                         for t in self.tiers if t.rate > 0) or "idle"


class WorkloadEstimator:
    """Sliding-window statistics per tier; memory is bounded by the window, not the run."""

    def __init__(self, window_s: float = 60.0, max_samples: int = 256,
                 default_output: float = 128.0) -> None:
        if window_s <= 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        self.window_s = window_s
        self.max_samples = max_samples
        self.default_output = default_output
        self._arrivals: dict[str, deque[tuple[float, int]]] = {}
        self._outputs: dict[str, deque[tuple[float, int]]] = {}
        self._first_s: float | None = None
        self._outcomes: deque[tuple[float, float]] = deque()

    def observe_arrival(self, now_s: float, tier: str, prompt_tokens: int) -> None:
        if self._first_s is None:
            self._first_s = now_s
        self._arrivals.setdefault(tier, deque()).append((now_s, prompt_tokens))

    def observe_finish(self, now_s: float, tier: str, output_tokens: int) -> None:
        self._outputs.setdefault(tier, deque()).append((now_s, output_tokens))

    def observe_outcome(self, now_s: float, credit: float) -> None:
        """A request ended: `credit` is its tier's weight if it met both targets, else 0."""
        self._outcomes.append((now_s, credit))

    def observed_score(self, now_s: float) -> float | None:
        """Tier-weighted goodput (per second) of the requests that ended in the window."""
        while self._outcomes and self._outcomes[0][0] < now_s - self.window_s:
            self._outcomes.popleft()
        if self._first_s is None or now_s - self._first_s < self.window_s:
            return None  # not a full window yet
        return sum(c for _, c in self._outcomes) / self.window_s

    def estimate(self, now_s: float) -> WorkloadEstimate:
        start = now_s - self.window_s
        # Early in a run the window is not full yet: divide by the time actually observed.
        span = min(self.window_s, max(1e-9, now_s - (self._first_s if self._first_s is not None else now_s)))
        loads = []
        for tier in sorted(set(self._arrivals) | set(self._outputs)):
            arr = self._trim(self._arrivals.get(tier), start)
            out = self._trim(self._outputs.get(tier), start, keep_last=32)
            prompts = [p for _, p in arr]
            step = max(1, len(prompts) // self.max_samples)
            mean_out = sum(o for _, o in out) / len(out) if out else self.default_output
            loads.append(TierLoad(tier, len(arr) / max(span, 1.0), tuple(prompts[::step]), mean_out))
        return WorkloadEstimate(now_s, self.window_s, tuple(loads))

    @staticmethod
    def _trim(q: deque[tuple[float, int]] | None, start: float, keep_last: int = 0) -> deque[tuple[float, int]]:
        if q is None:
            return deque()
        # Output lengths stay useful past the window (a tier with long outputs finishes rarely).
        while q and q[0][0] < start and len(q) > keep_last:
            q.popleft()
        return q
