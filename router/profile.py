"""Profiles: timings measured on a real device, and the efficiency terms fitted to them.

`nitsum profile` times prefill forwards (several prompt lengths) and decode steps (several batch
sizes and contexts) with the engine at each TP degree asked for, then fits the perf model's
efficiency terms so its roofline reproduces the measurements. The CPU host is a device like any
other: its roofline numbers are nominal and the fit absorbs the difference.

Fitting: time = max(a * bytes, b * flops) + c + d * all-reduces + e * ring bytes is linear in
(a, b, c, d, e) once each point's roofline side is known, so we alternate: pick the side each
point is on under the current terms, solve a weighted (relative-error) non-negative least
squares, repeat until the sides stop changing. a, b, e map back to memory, compute and link
efficiency; c is the per-forward overhead; d the per-all-reduce latency.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import numpy as np

from router.decide.perfmodel import DEVICES, DeviceSpec, Efficiency, ModelSpec, PerfModel, StepTerms


@dataclass(frozen=True)
class ProfilePoint:
    kind: str  # "prefill" | "decode"
    tp: int
    tokens: int  # prefill: prompt tokens; decode: batch size
    context: int  # decode: KV tokens per sequence; prefill: 0
    seconds: float


@dataclass(frozen=True)
class Profile:
    device: DeviceSpec
    model: ModelSpec
    points: tuple[ProfilePoint, ...]
    efficiency: Efficiency

    def perf_model(self) -> PerfModel:
        return PerfModel(self.device, self.model, self.efficiency)

    def to_json(self) -> str:
        return json.dumps({"device": asdict(self.device), "model": asdict(self.model),
                           "efficiency": self.efficiency.as_dict(),
                           "points": [asdict(p) for p in self.points]}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Profile:
        try:
            doc = json.loads(text)
            return cls(DeviceSpec(**doc["device"]), ModelSpec(**doc["model"]),
                       tuple(ProfilePoint(**p) for p in doc["points"]), Efficiency(**doc["efficiency"]))
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"profile file is malformed: {exc}") from exc


def point_terms(perf: PerfModel, p: ProfilePoint) -> StepTerms:
    if p.kind == "prefill":
        return perf.terms(p.tokens, 0, 0, p.tp)
    if p.kind == "decode":
        return perf.terms(0, p.tokens, p.tokens * p.context, p.tp)
    raise ValueError(f"profile point kind {p.kind!r}: use prefill or decode")


def fit(perf: PerfModel, points: list[ProfilePoint], iterations: int = 20) -> Efficiency:
    """Efficiency terms that make `perf` reproduce `points` (relative least squares)."""
    if len(points) < 3:
        raise ValueError(f"need at least 3 profile points to fit, got {len(points)}")
    d = perf.device
    terms = [point_terms(perf.with_efficiency(replace(perf.eff, cache_gain=0.0)), p) for p in points]
    mem = np.array([t.mem_bytes / d.hbm_bw for t in terms])
    comp = np.array([t.flops / d.peak_flops for t in terms])
    ars = np.array([float(t.allreduces) for t in terms])
    ring = np.array([t.ring_bytes / d.link_bw for t in terms])
    rows = np.array([float(t.rows) for t in terms])
    kv_tokens = np.array([t.kv_tokens for t in terms])
    y = np.array([p.seconds for p in points])
    # theta = (1/mem_eff, 1/flops_eff, overhead, per-all-reduce latency incl. floor, 1/link_eff,
    #          per decode row, per KV token read)
    theta = np.array([1 / perf.eff.mem_eff, 1 / perf.eff.flops_eff, perf.eff.overhead_s,
                      perf.eff.allreduce_latency_s + d.link_latency_s, 1 / perf.eff.link_eff,
                      perf.eff.row_s, perf.eff.kv_token_s])
    side = None
    for _ in range(iterations):
        on_mem = theta[0] * mem >= theta[1] * comp
        if side is not None and np.array_equal(side, on_mem):
            break
        side = on_mem
        cols = np.stack([mem * on_mem, comp * ~on_mem, np.ones_like(y), ars, ring, rows, kv_tokens], axis=1)
        theta = _nnls_relative(cols, y, theta)
    # A term the data cannot see (theta ~ 0) is capped rather than reported as infinite efficiency.
    return replace(perf.eff, mem_eff=1 / max(theta[0], 1e-2), flops_eff=1 / max(theta[1], 1e-2),
                   overhead_s=float(theta[2]), allreduce_latency_s=max(0.0, float(theta[3]) - d.link_latency_s),
                   link_eff=1 / max(theta[4], 1e-2), cache_gain=0.0, row_s=float(theta[5]),
                   kv_token_s=float(theta[6]))


def _nnls_relative(cols: np.ndarray, y: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """Least squares on relative error, columns the data cannot determine keep their prior."""
    used = np.abs(cols).sum(axis=0) > 0
    theta = prior.copy()
    a = cols[:, used] / y[:, None]
    b = np.ones_like(y)
    active = np.ones(int(used.sum()), dtype=bool)
    for _ in range(used.sum()):  # drop negative coefficients one at a time (small NNLS)
        sol, *_ = np.linalg.lstsq(a[:, active], b, rcond=None)
        full = np.zeros(int(used.sum()))
        full[active] = sol
        if (full >= 0).all():
            break
        active[np.argmin(np.where(active, full, np.inf))] = False
    theta[used] = np.maximum(full, 0.0)
    return theta


def measure(model_dir: str, device: str, tps: list[int], prefill_tokens: list[int],
            batches: list[int], contexts: list[int], device_spec: str | None = None,
            threads: int | None = None) -> Profile:
    """Time the engine at each TP degree and fit (needs services.engine). `threads`: CPU threads
    per rank, as `nitsum up` gives each slot (its share of the cores); None: torch's default."""
    if threads is not None:
        import os

        import torch

        os.environ["OMP_NUM_THREADS"] = str(threads)  # the ranks a TP > 1 engine spawns
        torch.set_num_threads(threads)
    from services.engine import EngineArgs, LLMEngine  # the engine is optional for everything else

    spec = DEVICES[device_spec or ("cpu" if device == "cpu" else "h100")]
    points: list[ProfilePoint] = []
    model: ModelSpec | None = None
    for tp in tps:
        eng = LLMEngine(EngineArgs(model=model_dir, tp=tp, device=device, dtype="float32"))
        try:
            model = model or _model_spec(eng, model_dir)
            eng.time_prefill(prefill_tokens[0])  # warm-up: first calls pay allocation and caches
            eng.time_decode_step(batches[0], contexts[0])
            limit = int(getattr(eng, "max_model_len", 1 << 30))
            if max(prefill_tokens) > limit or max(contexts) >= limit:
                raise ValueError(f"the model holds at most {limit} tokens; lower --prefill-tokens/--contexts")
            points += [ProfilePoint("prefill", tp, n, 0, _best(eng.time_prefill, n)) for n in prefill_tokens]
            points += [ProfilePoint("decode", tp, b, c, _best(eng.time_decode_step, b, c))
                       for b in batches for c in contexts]
        finally:
            eng.shutdown()
    assert model is not None
    perf = PerfModel(spec, model, Efficiency())
    return Profile(spec, model, tuple(points), fit(perf, points))


def _best(fn: Callable[..., float], *args: int, tries: int = 3) -> float:
    # The fastest of a few tries: on a shared host, slower ones measure the neighbours, not us.
    return min(float(fn(*args)) for _ in range(tries))


def _model_spec(eng: object, model_dir: str) -> ModelSpec:
    c = eng.model_config  # type: ignore[attr-defined]
    heads = int(c.num_attention_heads)
    head_dim = int(getattr(c, "head_dim", 0) or c.hidden_size // heads)
    return ModelSpec(name=model_dir.rstrip("/").rsplit("/", 1)[-1], hidden_size=int(c.hidden_size),
                     num_layers=int(c.num_hidden_layers), num_heads=heads,
                     num_kv_heads=int(getattr(c, "num_key_value_heads", heads)), head_dim=head_dim,
                     intermediate_size=int(c.intermediate_size), vocab_size=int(c.vocab_size), dtype_bytes=4)


def relative_errors(perf: PerfModel, points: list[ProfilePoint]) -> list[float]:
    return [abs(perf.time_terms(point_terms(perf, p)) - p.seconds) / p.seconds for p in points]
