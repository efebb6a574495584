"""Request traces for the simulator: loading, tier assignment and load scaling.

The Azure LLM inference traces (../shared/traces) have a wall-clock timestamp, a prompt length
and an output length per row. Each file is a *source* named after the part of its file name
after the last underscore (`AzureLLMInferenceTrace_code.csv` -> `code`). A tier map sends each
source to a tier, or splits it between tiers by share, e.g.
`code=interactive,conv=standard:0.8/batch:0.2` (the default): every code request is
interactive, and each conversation request is standard with probability 0.8, batch otherwise,
drawn with the run's seed (so a seed fixes the split).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from datetime import datetime

import numpy as np

DEFAULT_TIER_MAP = "code=interactive,conv=standard:0.8/batch:0.2"


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    tier: str
    source: str


def source_name(path: str) -> str:
    stem = os.path.splitext(os.path.basename(path))[0]
    return stem.rsplit("_", 1)[-1]


def parse_tier_map(text: str, tiers: set[str]) -> dict[str, list[tuple[str, float]]]:
    """`src=tier[:share][/tier[:share]...],...` -> {src: [(tier, share), ...]} (shares sum to 1)."""
    out: dict[str, list[tuple[str, float]]] = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        src, sep, rhs = item.partition("=")
        if not sep or not src or not rhs:
            raise ValueError(f"tier map entry {item!r}: write SOURCE=TIER[:SHARE][/TIER:SHARE...]")
        parts = []
        for piece in rhs.split("/"):
            name, _, share = piece.partition(":")
            if name not in tiers:
                raise ValueError(f"tier map entry {item!r}: unknown tier {name!r}; known: {', '.join(sorted(tiers))}")
            try:
                parts.append((name, float(share) if share else 1.0))
            except ValueError:
                raise ValueError(f"tier map entry {item!r}: share {share!r} is not a number") from None
        total = sum(s for _, s in parts)
        if total <= 0 or any(s < 0 for _, s in parts):
            raise ValueError(f"tier map entry {item!r}: shares must be >= 0 and not all 0")
        out[src.strip()] = [(n, s / total) for n, s in parts]
    return out


def _read_azure(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    times, prompts, outputs = [], [], []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        need = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"}
        if not reader.fieldnames or not need <= set(reader.fieldnames):
            raise ValueError(f"{path}: expected columns {sorted(need)}, got {reader.fieldnames}")
        for row in reader:
            # 7 fractional digits: strptime takes at most 6.
            times.append(datetime.strptime(row["TIMESTAMP"][:26], "%Y-%m-%d %H:%M:%S.%f").timestamp())
            prompts.append(int(row["ContextTokens"]))
            outputs.append(int(row["GeneratedTokens"]))
    if not times:
        raise ValueError(f"{path}: no requests")
    return np.array(times), np.array(prompts), np.array(outputs)


def load_traces(paths: list[str], tier_map: str, tiers: set[str], seed: int = 0,
                rate_scale: float = 1.0, limit_s: float | None = None) -> list[TraceRequest]:
    """Merge traces on one clock (time 0 = earliest request), assign tiers, scale the rate.

    `rate_scale` X divides every arrival time by X (X=2: the same requests twice as fast).
    """
    if rate_scale <= 0:
        raise ValueError(f"rate scale must be > 0, got {rate_scale}")
    mapping = parse_tier_map(tier_map, tiers)
    rng = np.random.default_rng(seed)
    loaded = []
    for path in paths:
        src = source_name(path)
        if src not in mapping:
            raise ValueError(f"trace {path}: source {src!r} is not in the tier map ({tier_map})")
        loaded.append((src, *_read_azure(path)))
    t0 = min(float(t[0]) for _, t, _, _ in loaded)
    reqs: list[TraceRequest] = []
    for src, times, prompts, outputs in loaded:
        names = [n for n, _ in mapping[src]]
        picks = rng.choice(len(names), size=len(times), p=[s for _, s in mapping[src]])
        for t, p, o, k in zip(times, prompts, outputs, picks, strict=True):
            arrival = (float(t) - t0) / rate_scale
            if limit_s is None or arrival <= limit_s:
                reqs.append(TraceRequest(arrival, int(p), int(o), names[k], src))
    reqs.sort(key=lambda r: (r.arrival_s, r.source))
    return reqs
