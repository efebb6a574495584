"""How much could switching plans gain on this trace at all? Bounds from static runs of every plan.

Given one static run per plan on the same requests (policy `static-any`), two reference figures
per segment length, both with free, instantaneous switches:

- **clairvoyant**: in each segment of the run, the plan that serves that segment's requests best,
  chosen knowing the outcome. No causal policy can do better by switching among static plans
  (a real switch also pays a pause and starts from another plan's backlog).
- **follow the leader**: in each segment, the plan with the best record on the requests that
  arrived before it (exponentially discounted, half-life `halflife_s`), as a planner with a
  perfect model of the past would choose; what Nitsum's digital twin approximates.

A request is credited to the segment it arrived in. Both are attainment (share of all requests
meeting both targets), comparable with the best single static plan's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from router.sim.cluster import SimResult
from services.tiers import Tier


@dataclass(frozen=True)
class OracleBound:
    segment_s: float
    best_static: str
    best_static_attainment: float
    clairvoyant: float
    follow_leader: float
    plans_used: int  # distinct plans the clairvoyant choice uses


def met_mask(res: SimResult, tiers: tuple[Tier, ...]) -> np.ndarray:
    """Per request: finished meeting both targets of its tier."""
    by_name = {t.name: t for t in tiers}
    out = np.zeros(len(res.requests), dtype=bool)
    for i, r in enumerate(res.requests):
        if i in res.shed_reason:
            continue
        ttft = res.first_token_s[i] - r.arrival_s
        tpot = (res.finish_s[i] - res.first_token_s[i]) / (r.output_tokens - 1) if r.output_tokens > 1 else 0.0
        out[i] = by_name[r.tier].met(ttft, tpot)
    return out


def bounds(arrivals: np.ndarray, masks: dict[str, np.ndarray], segments_s: tuple[float, ...] = (10, 30, 60),
           halflife_s: float = 600.0) -> list[OracleBound]:
    if not masks or len(arrivals) == 0:
        return []
    names = sorted(masks)
    met = np.array([masks[n] for n in names], dtype=float)  # plans x requests
    n = len(arrivals)
    best = int(np.argmax(met.sum(axis=1)))
    out = []
    for seg in segments_s:
        index = (arrivals // seg).astype(int)
        per_seg = np.zeros((len(names), index.max() + 1))
        for k in range(len(names)):
            per_seg[k] = np.bincount(index, weights=met[k], minlength=index.max() + 1)
        clairvoyant = per_seg.max(axis=0)
        # Ties (quiet segments where every plan meets everything) count as the best static plan.
        choice = (per_seg + 1e-9 * (np.arange(len(names)) == best)[:, None]).argmax(axis=0)
        # Follow the leader: discounted record up to each segment's start, decided per segment.
        decay = 0.5 ** (seg / halflife_s)
        record = np.zeros(len(names))
        leader = best  # before any history: the best static plan (a generous start)
        followed = 0.0
        for j in range(per_seg.shape[1]):
            if record.any():
                leader = int(np.argmax(record))
            followed += per_seg[leader, j]
            record = record * decay + per_seg[:, j]
        out.append(OracleBound(seg, names[best], float(met[best].sum() / n), float(clairvoyant.sum() / n),
                               followed / n, len(set(choice.tolist()))))
    return out
