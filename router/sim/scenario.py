"""Scenarios: a workload composed from real traces, for `nitsum sim --scenario FILE`.

A scenario is a JSON file (format and rationale: docs/scenarios.md) listing *sources*, each
turned into requests on one clock (scenario time 0 = the start of the run):

- `servegen`: a ServeGen-format folder (router/sim/servegen.py), a time window of its clock,
  and its clients mapped to tiers by client id or by volume rank in that window; each client's
  arrivals follow its windows' rate and inter-arrival distribution, its lengths its own dataset
  entries (or a fallback, e.g. a named Azure trace's, where it has none);
- `azure`: an Azure LLM inference trace CSV with a tier (or a split of tiers), optionally
  rate-scaled, shifted, tiled over the run, and with its prompts scaled;
- `bulk`: N requests landing at time t (or spread over a span) in one tier: a batch job.

`build_requests(scenario, tiers, seed, rate_scale)` is deterministic for a seed: every client
and source draws from its own generator (seeded by the seed, the source's index and the client
id), so adding a source or a client changes no other's requests.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

from router.sim import servegen
from router.sim.trace import TraceRequest, _read_azure, parse_tier_map

ARRIVAL_SHAPES = ("cv", "fitted")


@dataclass(frozen=True)
class Lengths:
    """Where a request's prompt and output lengths come from (when not a client's own dataset)."""

    azure: str = ""  # sample (prompt, output) pairs jointly from this Azure trace's rows
    fixed: tuple[int, int] | None = None  # every request: (prompt, output)
    prompt_scale: float = 1.0  # multiply prompts (e.g. long-context variants of a trace)
    output_scale: float = 1.0

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        if self.fixed is not None:
            prompts, outputs = np.full(n, self.fixed[0]), np.full(n, self.fixed[1])
        else:
            p, o = _azure_lengths(self.azure)
            idx = rng.integers(0, len(p), n)
            prompts, outputs = p[idx], o[idx]
        return self.scaled(prompts, outputs)

    def scaled(self, prompts: np.ndarray, outputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return (np.maximum(1, np.rint(prompts * self.prompt_scale)).astype(np.int64),
                np.maximum(1, np.rint(outputs * self.output_scale)).astype(np.int64))


@dataclass(frozen=True)
class ClientGroup:
    """Clients of a ServeGen source that go to one tier: by id, by volume rank, or the rest."""

    tier: str  # a tier, or a split: "standard:0.8/batch:0.2"
    ids: tuple[int, ...] = ()
    ranks: tuple[int, int] | None = None  # 1-based, inclusive: (1, 3) = the three largest clients
    rest: bool = False
    lengths: Lengths | None = None  # None: each client's own dataset, else the source's fallback
    rate_scale: float = 1.0


@dataclass(frozen=True)
class Source:
    kind: str  # "servegen" | "azure" | "bulk"
    path: str = ""
    tier: str = ""
    rate_scale: float = 1.0
    offset_s: float = 0.0  # where the source's start lands on the scenario clock
    # servegen
    start_s: float = 0.0
    end_s: float = 0.0
    clients: tuple[ClientGroup, ...] = ()
    arrivals: str = "cv"
    lengths: Lengths | None = None  # servegen: fallback for clients without a dataset; bulk: required
    # azure
    repeat: bool = False  # tile the trace until the scenario's duration
    # bulk
    count: int = 0
    over_s: float = 0.0  # spread the job's arrivals uniformly over this span (0: all at offset_s)


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    duration_s: float
    sources: tuple[Source, ...]
    rate_scale: float = 1.0
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes (rationale, provenance)


# ---- parsing ----------------------------------------------------------------------------------

def load_scenario(path: str) -> Scenario:
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"scenario {path}: not valid JSON ({e})") from None
    return parse_scenario(data, os.path.dirname(os.path.abspath(path)), path)


def _get(d: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str, default: Any = None) -> Any:
    if key not in d:
        if default is None:
            raise ValueError(f"{where}: missing {key!r}")
        return default
    v = d[key]
    if isinstance(v, bool) and kind is not bool or not isinstance(v, kind):
        raise ValueError(f"{where}: {key!r} must be {getattr(kind, '__name__', kind)}, got {v!r}")
    return v


def _positive(v: float, what: str) -> float:
    if not v > 0 or not math.isfinite(v):
        raise ValueError(f"{what} must be > 0, got {v}")
    return float(v)


def parse_scenario(data: Any, base_dir: str = ".", where: str = "scenario") -> Scenario:
    """Validate a scenario document; relative paths are resolved against `base_dir`."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: a scenario is a JSON object")
    known = {"name", "description", "duration_s", "rate_scale", "seed", "sources", "rationale", "notes"}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
    raw = _get(data, "sources", list, where)
    if not raw:
        raise ValueError(f"{where}: 'sources' is empty")
    sources = tuple(_source(s, base_dir, f"{where} sources[{i}]") for i, s in enumerate(raw))
    ends = [_natural_end(s) for s in sources]
    duration = float(_get(data, "duration_s", (int, float), where, max(ends)))
    return Scenario(str(data.get("name", os.path.basename(where))), str(data.get("description", "")),
                    _positive(duration, f"{where}: duration_s"), sources,
                    _positive(float(_get(data, "rate_scale", (int, float), where, 1.0)), f"{where}: rate_scale"),
                    int(_get(data, "seed", int, where, 0)),
                    {k: data[k] for k in ("rationale", "notes") if k in data})


def _natural_end(s: Source) -> float:
    if s.kind == "servegen":
        return s.offset_s + s.end_s - s.start_s
    if s.kind == "bulk":
        return s.offset_s + s.over_s + 1.0  # arrivals fall before the end: a job at t needs t + something
    times, _, _ = _azure_rows(s.path)
    return s.offset_s + float(times[-1]) / s.rate_scale + 1.0  # the last row arrives before the end


def _path(p: str, base_dir: str) -> str:
    return p if os.path.isabs(p) else os.path.normpath(os.path.join(base_dir, p))


def _lengths(d: Any, base_dir: str, where: str) -> Lengths:
    if not isinstance(d, dict):
        raise ValueError(f"{where}: lengths must be an object: {{\"azure\": PATH}} or {{\"fixed\": [PROMPT, OUTPUT]}}")
    scale = _positive(float(_get(d, "prompt_scale", (int, float), where, 1.0)), f"{where}: prompt_scale")
    oscale = _positive(float(_get(d, "output_scale", (int, float), where, 1.0)), f"{where}: output_scale")
    if ("azure" in d) == ("fixed" in d):
        raise ValueError(f"{where}: lengths need exactly one of 'azure' (a trace path) or 'fixed' ([prompt, output])")
    if "fixed" in d:
        fx = d["fixed"]
        if not (isinstance(fx, list) and len(fx) == 2 and all(isinstance(x, int) and x > 0 for x in fx)):
            raise ValueError(f"{where}: 'fixed' must be [PROMPT, OUTPUT], two positive integers")
        return Lengths(fixed=(fx[0], fx[1]), prompt_scale=scale, output_scale=oscale)
    path = _path(_get(d, "azure", str, where), base_dir)
    _azure_rows(path)  # fail now, not halfway through a sweep
    return Lengths(azure=path, prompt_scale=scale, output_scale=oscale)


def _source(d: Any, base_dir: str, where: str) -> Source:
    if not isinstance(d, dict):
        raise ValueError(f"{where}: a source is a JSON object")
    kind = _get(d, "type", str, where)
    rate_scale = _positive(float(_get(d, "rate_scale", (int, float), where, 1.0)), f"{where}: rate_scale")
    offset = float(_get(d, "offset_s", (int, float), where, 0.0))
    if offset < 0:
        raise ValueError(f"{where}: offset_s must be >= 0")
    fields = {"servegen": {"type", "folder", "start_s", "end_s", "clients", "arrivals", "lengths", "rate_scale",
                           "offset_s"},
              "azure": {"type", "path", "tier", "rate_scale", "offset_s", "repeat", "prompt_scale", "output_scale"},
              "bulk": {"type", "count", "tier", "at_s", "over_s", "lengths"}}
    if kind not in fields:
        raise ValueError(f"{where}: unknown source type {kind!r}; use servegen, azure or bulk")
    unknown = set(d) - fields[kind]
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {sorted(unknown)} for a {kind} source")
    lengths = _lengths(d["lengths"], base_dir, f"{where} lengths") if "lengths" in d else None
    if kind == "servegen":
        folder = _path(_get(d, "folder", str, where), base_dir)
        servegen.client_ids(folder)  # exists and looks like a ServeGen folder
        start, end = float(_get(d, "start_s", (int, float), where, 0.0)), float(_get(d, "end_s", (int, float), where))
        if not end > start >= 0:
            raise ValueError(f"{where}: need 0 <= start_s < end_s, got {start}, {end}")
        arrivals = _get(d, "arrivals", str, where, "cv")
        if arrivals not in ARRIVAL_SHAPES:
            raise ValueError(f"{where}: arrivals must be one of {ARRIVAL_SHAPES}, got {arrivals!r}")
        groups = tuple(_client_group(c, base_dir, f"{where} clients[{i}]")
                       for i, c in enumerate(_get(d, "clients", list, where)))
        if not groups:
            raise ValueError(f"{where}: 'clients' is empty")
        return Source("servegen", folder, "", start_s=start, end_s=end, clients=groups, arrivals=arrivals,
                      lengths=lengths, rate_scale=rate_scale, offset_s=offset)
    tier = _get(d, "tier", str, where)
    if kind == "azure":
        path = _path(_get(d, "path", str, where), base_dir)
        _azure_rows(path)
        scaled = Lengths(azure=path, prompt_scale=_positive(float(_get(d, "prompt_scale", (int, float), where, 1.0)),
                                                             f"{where}: prompt_scale"),
                         output_scale=_positive(float(_get(d, "output_scale", (int, float), where, 1.0)),
                                                f"{where}: output_scale"))
        return Source("azure", path, tier, repeat=bool(_get(d, "repeat", bool, where, False)), lengths=scaled,
                      rate_scale=rate_scale, offset_s=offset)
    count = int(_get(d, "count", int, where))
    over = float(_get(d, "over_s", (int, float), where, 0.0))
    if count <= 0 or over < 0:
        raise ValueError(f"{where}: a bulk job needs count > 0 and over_s >= 0")
    if lengths is None:
        raise ValueError(f"{where}: a bulk job needs 'lengths'")
    return Source("bulk", "", tier, offset_s=float(_get(d, "at_s", (int, float), where)), count=count, over_s=over,
                  lengths=lengths)


def _client_group(d: Any, base_dir: str, where: str) -> ClientGroup:
    if not isinstance(d, dict):
        raise ValueError(f"{where}: a client group is a JSON object")
    unknown = set(d) - {"ids", "ranks", "rest", "tier", "lengths", "rate_scale"}
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}")
    picks = [k for k in ("ids", "ranks", "rest") if k in d]
    if len(picks) != 1:
        raise ValueError(f"{where}: give exactly one of 'ids' ([N, ...]), 'ranks' ([FIRST, LAST]) or 'rest' (true)")
    ids: tuple[int, ...] = ()
    ranks = None
    if "ids" in d:
        ids = tuple(_get(d, "ids", list, where))
        if not ids or not all(isinstance(i, int) and i >= 0 for i in ids):
            raise ValueError(f"{where}: 'ids' must be a non-empty list of client numbers")
    elif "ranks" in d:
        r = d["ranks"]
        if not (isinstance(r, list) and len(r) == 2 and all(isinstance(x, int) for x in r) and 1 <= r[0] <= r[1]):
            raise ValueError(f"{where}: 'ranks' must be [FIRST, LAST], 1-based, FIRST <= LAST")
        ranks = (r[0], r[1])
    elif d["rest"] is not True:
        raise ValueError(f"{where}: 'rest' must be true")
    lengths = _lengths(d["lengths"], base_dir, f"{where} lengths") if "lengths" in d else None
    return ClientGroup(_get(d, "tier", str, where), ids, ranks, "rest" in d, lengths,
                       _positive(float(_get(d, "rate_scale", (int, float), where, 1.0)), f"{where}: rate_scale"))


# ---- building requests ----------------------------------------------------------------------

@lru_cache(maxsize=16)
def _azure_rows(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(arrival offsets from the first row, prompts, outputs) of an Azure-format trace."""
    times, prompts, outputs = _read_azure(path)
    order = np.argsort(times, kind="stable")
    return times[order] - times[order][0], prompts[order], outputs[order]


def _azure_lengths(path: str) -> tuple[np.ndarray, np.ndarray]:
    _, p, o = _azure_rows(path)
    return p, o


def _tiers(spec: str, tiers: set[str], where: str) -> list[tuple[str, float]]:
    try:
        return parse_tier_map(f"x={spec}", tiers)["x"]
    except ValueError as e:
        raise ValueError(f"{where}: tier {spec!r}: {str(e).split(': ', 1)[-1]}") from None


def _pick_tiers(split: list[tuple[str, float]], rng: np.random.Generator, n: int) -> list[str]:
    if len(split) == 1:
        return [split[0][0]] * n
    names = [t for t, _ in split]
    return [names[k] for k in rng.choice(len(names), size=n, p=[s for _, s in split])]


def resolve_clients(src: Source) -> list[tuple[int, ClientGroup]]:
    """(client id, its group) for every client a ServeGen source takes; a client goes to the first
    group that names it (ids, then ranks, then rest, in the order written)."""
    ranked = servegen.by_volume(src.path, src.start_s, src.end_s)
    known = set(ranked)
    taken: dict[int, ClientGroup] = {}
    for g in src.clients:
        if g.ids:
            missing = [i for i in g.ids if i not in known]
            if missing:
                raise ValueError(f"{src.path}: no client(s) {missing} (chunk-N-trace.csv)")
            chosen = list(g.ids)
        elif g.ranks is not None:
            chosen = ranked[g.ranks[0] - 1:g.ranks[1]]
        else:
            chosen = ranked
        for cid in chosen:
            taken.setdefault(cid, g)
    return sorted(taken.items())


def build_requests(sc: Scenario, tiers: set[str], seed: int | None = None, rate_scale: float = 1.0,
                   limit_s: float | None = None) -> list[TraceRequest]:
    """The scenario's requests, sorted by arrival; `rate_scale` multiplies every source's rate."""
    if rate_scale <= 0:
        raise ValueError(f"rate scale must be > 0, got {rate_scale}")
    seed = sc.seed if seed is None else seed
    end = min(sc.duration_s, limit_s) if limit_s is not None else sc.duration_s
    out: list[TraceRequest] = []
    for i, src in enumerate(sc.sources):
        scale = sc.rate_scale * rate_scale
        where = f"scenario {sc.name} sources[{i}]"
        if src.kind == "servegen":
            out += _servegen(src, i, tiers, seed, scale, end, where)
        elif src.kind == "azure":
            out += _azure(src, i, tiers, seed, scale, end, where)
        else:
            out += _bulk(src, i, tiers, seed, scale, end, where)
    out.sort(key=lambda r: (r.arrival_s, r.source))
    return out


def _servegen(src: Source, index: int, tiers: set[str], seed: int, scale: float, end: float,
              where: str) -> list[TraceRequest]:
    out: list[TraceRequest] = []
    shift = src.offset_s - src.start_s
    stop = min(src.end_s, end - shift)
    for cid, group in resolve_clients(src):
        split = _tiers(group.tier, tiers, where)
        rng = np.random.default_rng([seed, index, cid])
        client = servegen.load_client(src.path, cid)
        own = servegen.client_lengths(src.path, cid) if group.lengths is None else ()
        fallback = group.lengths or src.lengths
        if not own and fallback is None:
            raise ValueError(f"{where}: client {cid} has no chunk-{cid}-dataset.json; give its group or the "
                             "source 'lengths' (e.g. {\"azure\": PATH})")
        for w, nxt in zip(client.windows, (*client.windows[1:], None), strict=True):
            w_end = nxt.start_s if nxt is not None else w.start_s + servegen.WINDOW_S
            a, b = max(w.start_s, src.start_s), min(w_end, stop)
            if b <= a or not w.family:
                continue
            times = servegen.window_arrivals(w, a, b, scale * src.rate_scale * group.rate_scale, rng, src.arrivals)
            n = len(times)
            if n == 0:
                continue
            entry = servegen.lengths_at(own, w.start_s)
            if entry is not None:
                prompts, outputs = entry.prompt.sample(rng, n), entry.output.sample(rng, n)
                prompts, outputs = np.maximum(prompts, 1), np.maximum(outputs, 1)
            else:
                assert fallback is not None
                prompts, outputs = fallback.sample(rng, n)
            names = _pick_tiers(split, rng, n)
            label = f"servegen:{cid}"
            out += [TraceRequest(float(t + shift), int(p), int(o), tier, label)
                    for t, p, o, tier in zip(times, prompts, outputs, names, strict=True)]
    return out


def _azure(src: Source, index: int, tiers: set[str], seed: int, scale: float, end: float,
           where: str) -> list[TraceRequest]:
    times, prompts, outputs = _azure_rows(src.path)
    rng = np.random.default_rng([seed, index])
    span = float(times[-1]) + 1.0  # a tiled copy starts a second after the last row
    reps = max(1, math.ceil((end - src.offset_s) * scale * src.rate_scale / span)) if src.repeat else 1
    t = np.concatenate([times + k * span for k in range(reps)]) / (scale * src.rate_scale) + src.offset_s
    p, o = np.tile(prompts, reps), np.tile(outputs, reps)
    keep = t < end
    t, p, o = t[keep], p[keep], o[keep]
    if src.lengths is not None:
        p, o = src.lengths.scaled(p, o)
    names = _pick_tiers(_tiers(src.tier, tiers, where), rng, len(t))
    label = f"azure:{os.path.splitext(os.path.basename(src.path))[0].rsplit('_', 1)[-1]}"
    return [TraceRequest(float(a), int(x), int(y), tier, label) for a, x, y, tier in zip(t, p, o, names, strict=True)]


def _bulk(src: Source, index: int, tiers: set[str], seed: int, scale: float, end: float,
          where: str) -> list[TraceRequest]:
    rng = np.random.default_rng([seed, index])
    n = int(round(src.count * scale))
    if n == 0 or src.offset_s >= end:
        return []
    t = src.offset_s + (np.sort(rng.random(n)) * src.over_s if src.over_s > 0 else np.zeros(n))
    assert src.lengths is not None
    p, o = src.lengths.sample(rng, n)
    names = _pick_tiers(_tiers(src.tier, tiers, where), rng, n)
    return [TraceRequest(float(a), int(x), int(y), tier, f"bulk:{index}")
            for a, x, y, tier in zip(t, p, o, names, strict=True) if a < end]
