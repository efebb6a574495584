"""Sampling parameters and the sampler: greedy, temperature, top-k, top-p, per-request seeds.

Each request that samples owns a `torch.Generator`, so its draws do not depend on what else is in
the batch, and its state can travel with the request (migration, prefill-to-decode hand-off).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.engine.errors import BadRequestError


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
        if not 0.0 <= self.temperature <= 100.0:
            raise BadRequestError(f"temperature must be in [0, 100], got {self.temperature}")
        if self.top_k < 0:
            raise BadRequestError(f"top_k must be >= 0 (0 turns it off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise BadRequestError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> tuple[list[int], list[float | None]]:
    """One token per row of `logits` [B, vocab] (float32); logprobs under the unmodified model."""
    tokens = logits.argmax(dim=-1).tolist()
    for i, p in enumerate(params):
        if not p.greedy:
            tokens[i] = _draw(logits[i], p, generators[i])
    logprobs: list[float | None] = [None] * len(params)
    wanted = [i for i, p in enumerate(params) if p.logprobs]
    if wanted:
        lp = torch.log_softmax(logits[wanted], dim=-1)
        for j, i in enumerate(wanted):
            logprobs[i] = float(lp[j, tokens[i]])
    return tokens, logprobs


def _draw(row: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> int:
    scaled = row / p.temperature
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
    return int(torch.multinomial(probs, 1, generator=gen).item())
