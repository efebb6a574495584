"""Sampling parameters and the sampler: greedy, temperature, top-k, top-p, per-request seeds.

Token i of a request that samples is drawn from a generator seeded by (its seed, i), so its draws
do not depend on what else is in the batch, and nothing but the seed and the tokens so far has to
travel with the request: a request handed off, migrated, or resumed from its tokens on another
group after its group died draws exactly what it would have drawn where it was.

The sampler never fails on a finite input: a temperature under `MIN_TEMPERATURE` is greedy (as in
vLLM), and a row whose probabilities are not finite (logits that overflowed) falls back to argmax.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from services.engine.errors import BadRequestError

# Below this, dividing logits by the temperature can overflow float32: such requests are greedy.
MIN_TEMPERATURE = 1e-5
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise BadRequestError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not (math.isfinite(self.temperature) and math.isfinite(self.top_p)):
            raise BadRequestError("temperature and top_p must be finite numbers")
        if not 0.0 <= self.temperature <= 100.0:
            raise BadRequestError(f"temperature must be in [0, 100], got {self.temperature}")
        if self.top_k < 0:
            raise BadRequestError(f"top_k must be >= 0 (0 turns it off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise BadRequestError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE


def draw_seed(seed: int, index: int) -> int:
    """The generator seed for token `index` of a request seeded `seed` (splitmix64 of both)."""
    z = (seed * 0x9E3779B97F4A7C15 + index + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1  # 63 bits: torch takes it as a non-negative int64


def sample(logits: torch.Tensor, params: list[SamplingParams],
           indices: list[int]) -> tuple[list[int], list[float | None]]:
    """One token per row of `logits` [B, vocab] (float32); row r is token `indices[r]` of its request
    (0 for the first generated token). Logprobs are under the unmodified model."""
    tokens = logits.argmax(dim=-1).tolist()
    generator: torch.Generator | None = None
    for i, p in enumerate(params):
        if not p.greedy:
            generator = generator or torch.Generator()
            generator.manual_seed(draw_seed(p.seed or 0, indices[i]))
            tokens[i] = _draw(logits[i], p, generator, tokens[i])
    logprobs: list[float | None] = [None] * len(params)
    wanted = [i for i, p in enumerate(params) if p.logprobs]
    if wanted:
        lp = torch.log_softmax(logits[wanted], dim=-1)
        for j, i in enumerate(wanted):
            logprobs[i] = float(lp[j, tokens[i]])
    return tokens, logprobs


def _draw(row: torch.Tensor, p: SamplingParams, gen: torch.Generator, argmax: int) -> int:
    scaled = row.float() / p.temperature
    if p.top_k and p.top_k < scaled.numel():
        kth = torch.topk(scaled, p.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_vals, order = torch.sort(scaled, descending=True)
        probs = torch.softmax(sorted_vals, dim=-1)
        # Drop a token when the mass before it already reaches top_p (always keep the first).
        drop = probs.cumsum(dim=-1) - probs >= p.top_p
        scaled = scaled.clone()
        scaled[order[drop]] = float("-inf")
    probs = torch.softmax(scaled, dim=-1)
    if not bool(torch.isfinite(probs).all()) or not float(probs.sum()) > 0.0:
        return argmax  # logits that overflowed: the most likely token, never a crash
    return int(torch.multinomial(probs, 1, generator=gen).item())
