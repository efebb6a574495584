"""The engine's scheduling policy, pure: which prompt is prefilled first, how many prompt tokens a
step that also decodes may carry, and which sequence gives up its KV cache when the cache runs out.

The engine's step scheduler (scheduler.py) and the simulator's group model (router/sim/group.py)
call these same functions, so what the simulator credits a group with is what the engine does.

Two policies:
- "tier" (the default): prompts go in TTFT-deadline order, those that can still make their deadline
  first, then the late ones (still served), and any that waited past its tier's maximum wait
  ahead of all; a step that carries prompt tokens next to decoding sequences is cut down to fit
  `guard` x the tightest TPOT target among them (never below `min_chunk`), by the group's own
  step-time model, and any step that carries prompt tokens to `max_step_s` (a share of the tiers'
  tightest TTFT target, `step_cap_s`: a prompt arriving mid-step waits for at most that); under KV pressure the least important sequence gives up its blocks (lowest
  tier weight, then the latest deadline), and never one of a heavier tier for a lighter one.
- "fcfs": first come, first served, the newest running sequence preempted: what vLLM does, the
  baseline.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

T = TypeVar("T")
POLICIES = ("tier", "fcfs")
# A step carrying prompt tokens takes at most this share of the tightest TTFT target the groups
# serve: an urgent prompt that arrives while a long one is being prefilled waits one such step.
STEP_CAP_SHARE = 0.25


def step_cap_s(tightest_ttft_s: float, share: float = STEP_CAP_SHARE) -> float:
    """The longest a step carrying prompt tokens may take, for tiers whose tightest TTFT target is this."""
    return share * tightest_ttft_s


@dataclass(frozen=True)
class SLO:
    """A request's tier as the engine sees it (set by the gateway, carried by the router and every
    hand-off and migration). Times are wall-clock seconds."""

    deadline_s: float = math.inf  # arrival + the tier's TTFT target
    tpot_s: float = math.inf  # the tier's TPOT target
    weight: float = 0.0  # the tier's weight: a sequence never gives up its KV for a lighter one
    starved_at_s: float = math.inf  # arrival + the tier's maximum wait: past it, it goes first


NO_SLO = SLO()  # a request with no tier (the engine on its own): no deadline, no TPOT target


@dataclass(frozen=True)
class Waiting:
    """What ordering needs of a prompt that waits for prefill."""

    slo: SLO
    remaining_tokens: int
    arrival: float  # its place in first-come order (any increasing number)


def prefill_order(items: Sequence[T], view: Callable[[T], Waiting], now_s: float, prefill_tokens_per_s: float,
                  policy: str = "tier") -> list[T]:
    """The order in which waiting prompts get prefill tokens."""
    if policy == "fcfs":
        return sorted(items, key=lambda item: view(item).arrival)
    rate = max(prefill_tokens_per_s, 1e-9)

    def key(item: T) -> tuple[int, float]:
        w = view(item)
        if now_s >= w.slo.starved_at_s:
            return 0, w.arrival  # waited too long: ahead of everything, oldest first
        late = now_s + w.remaining_tokens / rate > w.slo.deadline_s
        return (2 if late else 1), w.slo.deadline_s

    return sorted(items, key=key)


def guarded_prefill_tokens(budget: int, decode_rows: int, tightest_tpot_s: float,
                           step_time: Callable[[int], float], guard: float, min_chunk: int,
                           policy: str = "tier", max_step_s: float = math.inf) -> int:
    """How many prompt tokens a step with `decode_rows` decoding sequences may carry: the largest
    chunk (up to `budget`) whose predicted step time is within `guard` x the tightest TPOT target
    among them and within `max_step_s`, never below `min_chunk` so prefill always progresses.

    `step_time(c)` is the group's step-time model for a chunk of `c` tokens with this decode batch.
    It is convex in the chunk (a max of linear terms plus quadratic attention), so the chord from
    a point to the full budget lies above it: stepping along chords never overshoots the limit,
    and two chords get within a few percent of the largest chunk."""
    tpot_limit = guard * tightest_tpot_s if decode_rows and guard > 0 else math.inf
    limit_s = min(tpot_limit, max_step_s)
    if policy == "fcfs" or not math.isfinite(limit_s):
        return budget
    t_full = step_time(budget)
    if t_full <= limit_s:
        return budget
    lo, t_lo = 0, step_time(0)
    for _ in range(2):
        if t_lo >= limit_s:
            break
        lo += int((budget - lo) * (limit_s - t_lo) / max(t_full - t_lo, 1e-12))
        t_lo = step_time(lo)
    return min(budget, max(lo, min_chunk))


def preemption_victim(needy: T, running: Sequence[T], view: Callable[[T], SLO], policy: str = "tier") -> T:
    """Who gives up its KV blocks so that `needy` (running, out of blocks) can go on: with "fcfs" the
    newest running sequence; with "tier" the least important sequence that is not heavier than
    `needy` (lowest weight, then the latest deadline, then the newest), which may be `needy` itself."""
    if policy == "fcfs":
        return running[-1]
    mine = view(needy).weight
    candidates = [(i, s) for i, s in enumerate(running) if view(s).weight <= mine]
    _, victim = min(candidates, key=lambda c: (view(c[1]).weight, -view(c[1]).deadline_s, -c[0]))
    return victim


class StepTimeModel:
    """A group's own step time, fitted online to the steps it ran: seconds = a + b x prompt tokens
    + c x decoding sequences + d x KV tokens they read (least squares).

    Steps are kept per shape (powers of two of each feature), each shape's latest times averaged
    (weight `alpha` to the newest): a group that has run one batch size for minutes still
    remembers what larger ones cost, and a shape it runs again follows the host's current speed.
    What the TPOT guard predicts with, and what the group reports to the router."""

    FEATURES = 4

    def __init__(self, alpha: float = 0.2, min_samples: int = 8) -> None:
        self.alpha, self.min_samples = alpha, min_samples
        self._shapes: dict[tuple[int, int, int], np.ndarray] = {}
        self._seen = 0
        self._coef: np.ndarray | None = None
        self._dirty = False

    def observe(self, prefill_tokens: int, decode_rows: int, context_tokens: int, seconds: float) -> None:
        row = np.array((1.0, prefill_tokens, decode_rows, context_tokens, seconds), dtype=float)
        key = (int(prefill_tokens).bit_length(), int(decode_rows).bit_length(), int(context_tokens).bit_length())
        kept = self._shapes.get(key)
        self._shapes[key] = row if kept is None else kept + self.alpha * (row - kept)
        self._seen += 1
        self._dirty = True

    @property
    def coefficients(self) -> tuple[float, float, float, float] | None:
        """(a, b, c, d), or None until enough steps were seen."""
        if self._dirty:
            self._fit()
        if self._coef is None:
            return None
        a, b, c, d = (float(x) for x in self._coef)
        return a, b, c, d

    def predict(self, prefill_tokens: int, decode_rows: int, context_tokens: int) -> float:
        """Predicted seconds, 0.0 before the model has enough steps (nothing is guarded yet)."""
        coef = self.coefficients
        if coef is None:
            return 0.0
        a, b, c, d = coef
        return a + b * prefill_tokens + c * decode_rows + d * context_tokens

    def prefill_tokens_per_s(self) -> float:
        """Prompt tokens a second when prefill is all a step does, 0.0 when not known yet."""
        coef = self.coefficients
        return 1.0 / coef[1] if coef is not None and coef[1] > 0 else 0.0

    def _fit(self) -> None:
        self._dirty = False
        if self._seen < self.min_samples:
            return
        data = np.array(list(self._shapes.values()))
        x, y = data[:, : self.FEATURES], data[:, self.FEATURES]
        # A little ridge keeps columns that never varied (no decode yet, say) from blowing up.
        reg = 1e-9 * np.eye(self.FEATURES)
        coef = np.linalg.solve(x.T @ x + reg, x.T @ y)
        self._coef = np.maximum(coef, 0.0)  # a step never gets faster with more work
