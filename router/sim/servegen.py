"""ServeGen-format workload folders: per-client windowed arrival statistics and length distributions.

A ServeGen folder (alibaba/ServeGen, `data/<category>/<model>/`) holds, per client N:

- `chunk-N-trace.csv`: one row per window (10 minutes upstream), no header:
  `start_s, rate (req/s), cv (of inter-arrival gaps), family (Gamma | Weibull | empty when the
  rate is 0), shape, scale`.
- `chunk-N-dataset.json` (optional): `{window_start: {"input_tokens": "{tokens: p, ...}",
  "output_tokens": "..."}}`, a Python dict literal per field (read with `ast.literal_eval`,
  never `eval`), keyed every 6 h upstream; a window uses the latest entry at or before its start.

Arrivals in a window (`window_arrivals`), as upstream's `servegen/construct.py` draws them: the
number of requests is the window's rate x its length (x the scenario's rate scale), the gaps are
drawn from the window's distribution family and rescaled so they span the window, so the rate
is exact and the burstiness is the family's. Two differences from upstream, both deliberate:

- The count is rounded stochastically (floor, plus one with the fractional part's probability),
  not up: a fleet's rates scaled to one cluster are often well under one request per window,
  where rounding up would inflate them many times.
- `shape="cv"` (the default) sets the family's shape so that its CV equals the window's
  *recorded* CV. For Gamma rows that is the file's own shape (its fits are moment fits: CV =
  1/sqrt(shape) on every row); the Weibull rows' fitted shapes give a smaller CV than the one
  recorded (e.g. 3.5 for a recorded 8.6), so upstream's draws are less bursty than the traffic
  measured. `shape="fitted"` uses the file's shape as upstream does.
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

WINDOW_S = 600.0  # upstream's window; a folder with other spacing is read from its own rows
_TRACE = re.compile(r"^chunk-(\d+)-trace\.csv$")
_PAIR = re.compile(r"(-?\d+)\s*:\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)")


@dataclass(frozen=True)
class Window:
    start_s: float
    rate: float  # requests per second
    cv: float
    family: str  # "Gamma", "Weibull", or "" (no requests)
    shape: float
    scale: float


@dataclass(frozen=True)
class LengthPdf:
    """A discrete distribution of token counts: sorted values and their cumulative probabilities."""

    values: np.ndarray
    cdf: np.ndarray

    @classmethod
    def parse(cls, text: str) -> LengthPdf:
        pairs = _PAIR.findall(text)
        if pairs and len(pairs) == text.count(":") and text.strip()[:1] == "{":
            # The common case, `{int: float, ...}`, read directly: literal_eval was most of the
            # time a scenario took to load.
            keys = np.array([int(k) for k, _ in pairs], dtype=np.int64)
            vals = np.array([float(v) for _, v in pairs])
        else:
            pdf = ast.literal_eval(text)
            if not isinstance(pdf, dict) or not pdf:
                raise ValueError("a length distribution must be a non-empty {tokens: probability} literal")
            keys = np.array([int(k) for k in pdf], dtype=np.int64)
            vals = np.array([float(v) for v in pdf.values()])
        order = np.argsort(keys, kind="stable")
        values, probs = keys[order], vals[order]
        if (probs < 0).any() or probs.sum() <= 0:
            raise ValueError("length probabilities must be >= 0 and not all 0")
        return cls(values, np.cumsum(probs) / probs.sum())

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        idx = np.searchsorted(self.cdf, rng.random(n), side="right")
        return self.values[np.minimum(idx, len(self.values) - 1)]

    @property
    def mean(self) -> float:
        p = np.diff(np.concatenate(([0.0], self.cdf)))
        return float(np.dot(self.values, p))


@dataclass(frozen=True)
class ClientLengths:
    """One dataset entry of a client: input and output length distributions from `start_s` on."""

    start_s: float
    prompt: LengthPdf
    output: LengthPdf


@dataclass(frozen=True)
class Client:
    cid: int
    windows: tuple[Window, ...]

    def requests_in(self, start_s: float, end_s: float) -> float:
        """Expected requests in [start_s, end_s) (each window's rate x its overlap)."""
        total = 0.0
        for w, nxt in zip(self.windows, (*self.windows[1:], None), strict=True):
            stop = nxt.start_s if nxt is not None else w.start_s + WINDOW_S
            total += w.rate * max(0.0, min(stop, end_s) - max(w.start_s, start_s))
        return total


def client_ids(folder: str) -> list[int]:
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"ServeGen folder {folder!r} does not exist")
    ids = sorted(int(m.group(1)) for f in os.listdir(folder) if (m := _TRACE.match(f)))
    if not ids:
        raise ValueError(f"{folder}: no chunk-N-trace.csv files (is it a ServeGen data folder?)")
    return ids


@lru_cache(maxsize=1024)
def load_client(folder: str, cid: int) -> Client:
    path = os.path.join(folder, f"chunk-{cid}-trace.csv")
    windows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            parts = line.strip().split(",")
            if not line.strip():
                continue
            if len(parts) != 6:
                raise ValueError(f"{path}:{n}: expected 6 columns (start, rate, cv, family, shape, scale)")
            start, rate, cv, family = float(parts[0]), float(parts[1]), float(parts[2] or 0), parts[3]
            if family not in ("", "Gamma", "Weibull"):
                raise ValueError(f"{path}:{n}: unknown inter-arrival family {family!r} (Gamma, Weibull or empty)")
            shape = float(parts[4]) if parts[4] else 0.0
            scale = float(parts[5]) if parts[5] else 0.0
            windows.append(Window(start, rate if family else 0.0, cv, family, shape, scale))
    windows.sort(key=lambda w: w.start_s)
    return Client(cid, tuple(windows))


def lengths_at(entries: tuple[ClientLengths, ...], t: float) -> ClientLengths | None:
    """The latest dataset entry at or before `t` (the first one before any), as upstream."""
    best = entries[0] if entries else None
    for entry in entries:
        if entry.start_s <= t:
            best = entry
    return best


@lru_cache(maxsize=256)
def client_lengths(folder: str, cid: int) -> tuple[ClientLengths, ...]:
    """A client's dataset entries, sorted by start; empty when the folder has no dataset file for it."""
    path = os.path.join(folder, f"chunk-{cid}-dataset.json")
    if not os.path.exists(path):
        return ()
    with open(path) as f:
        data = json.load(f)
    out = []
    for start, fields in data.items():
        try:
            prompt, output = fields["input_tokens"], fields["output_tokens"]
        except (KeyError, TypeError):
            raise ValueError(f"{path}: entry {start!r} needs input_tokens and output_tokens") from None
        if prompt in ("{}", "") or output in ("{}", ""):
            continue  # upstream skips empty entries too
        out.append(ClientLengths(float(start), LengthPdf.parse(prompt), LengthPdf.parse(output)))
    return tuple(sorted(out, key=lambda e: e.start_s))


def by_volume(folder: str, start_s: float, end_s: float) -> list[int]:
    """Client ids, most requests in [start_s, end_s) first (ties by id)."""
    vols = {cid: load_client(folder, cid).requests_in(start_s, end_s) for cid in client_ids(folder)}
    return sorted(vols, key=lambda c: (-vols[c], c))


def weibull_shape_for_cv(cv: float) -> float:
    """The Weibull shape k whose CV is `cv` (CV^2 = G(1+2/k)/G(1+1/k)^2 - 1, decreasing in k)."""
    def cv_of(k: float) -> float:
        return math.sqrt(max(0.0, math.exp(math.lgamma(1 + 2 / k) - 2 * math.lgamma(1 + 1 / k)) - 1))

    lo, hi = math.log(0.05), math.log(50.0)  # CV from about 1e5 down to 0.03
    for _ in range(60):
        mid = (lo + hi) / 2
        if cv_of(math.exp(mid)) > cv:
            lo = mid
        else:
            hi = mid
    return math.exp((lo + hi) / 2)


def window_arrivals(w: Window, start_s: float, end_s: float, rate_scale: float, rng: np.random.Generator,
                    shape: str = "cv") -> np.ndarray:
    """Arrival times in [start_s, end_s) (a window, or the part of it a scenario keeps)."""
    span = end_s - start_s
    expected = w.rate * rate_scale * span
    if expected <= 0 or not w.family or span <= 0:
        return np.empty(0)
    n = int(expected) + int(rng.random() < expected - int(expected))
    if n == 0:
        return np.empty(0)
    if w.family == "Gamma":
        k = 1.0 / (w.cv * w.cv) if shape == "cv" and w.cv > 0 else w.shape
        gaps = rng.gamma(max(k, 1e-3), 1.0, n + 1)
    else:
        k = weibull_shape_for_cv(w.cv) if shape == "cv" and w.cv > 0 else w.shape
        gaps = rng.weibull(max(k, 0.05), n + 1)
    # n + 1 gaps span the window: n arrivals strictly inside it, the window's rate exactly.
    times = np.cumsum(gaps)
    return start_s + times[:n] * (span / times[-1])
