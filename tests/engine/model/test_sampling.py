"""The sampler never fails on a finite input, and a request's draws depend only on its seed and
the token's index (so a request resumed elsewhere draws the same tokens)."""

from __future__ import annotations

import pytest
import torch

from services.engine.errors import BadRequestError
from services.engine.model.sampling import SamplingParams, draw_seed, sample


def test_a_temperature_under_the_floor_is_greedy_and_never_overflows() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0], [50.0, -50.0, 0.0]])
    for t in (1e-40, 1e-7, 0.0):
        p = SamplingParams(temperature=t, seed=1)
        assert p.greedy
        assert sample(logits, [p, p], [0, 0])[0] == [1, 0]


def test_logits_that_overflowed_fall_back_to_the_most_likely_token() -> None:
    p = SamplingParams(temperature=0.5, top_p=0.9, top_k=2, seed=3)
    logits = torch.tensor([[float("inf"), 1.0, 2.0], [float("nan"), float("nan"), float("nan")],
                           [3.4e38, -3.4e38, 3.4e38]])
    tokens, _ = sample(logits, [p, p, p], [0, 1, 2])
    assert len(tokens) == 3 and all(0 <= t < 3 for t in tokens)


def test_huge_top_k_and_non_finite_parameters() -> None:
    logits = torch.randn(1, 50)
    assert 0 <= sample(logits, [SamplingParams(temperature=1.0, top_k=2**40, seed=1)], [0])[0][0] < 50
    for bad in ({"temperature": float("nan")}, {"top_p": float("inf")}, {"temperature": float("inf")}):
        with pytest.raises(BadRequestError):
            SamplingParams(**bad)  # type: ignore[arg-type]


def test_draws_depend_on_the_seed_and_the_index_only() -> None:
    logits = torch.randn(1, 1000)
    p = SamplingParams(temperature=1.0, seed=42)
    alone = [sample(logits, [p], [i])[0][0] for i in range(20)]
    other = SamplingParams(temperature=1.0, seed=7)
    in_a_batch = [sample(torch.cat([logits, logits]), [other, p], [i + 3, i])[0][1] for i in range(20)]
    assert alone == in_a_batch  # what else is in the batch does not matter
    assert alone != [sample(logits, [other], [i])[0][0] for i in range(20)]
    assert len({draw_seed(42, i) for i in range(1000)}) == 1000 and all(0 <= draw_seed(-5, i) < 2**63 for i in range(9))
