"""Small synthetic traces in the Azure CSV format (the real ones are too big for unit tests)."""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import pytest

TraceMaker = Callable[..., str]


def write_trace(path: Path, rows: list[tuple[float, int, int]]) -> str:
    t0 = datetime(2023, 11, 16, 18, 0, 0)
    with open(path, "w") as f:
        f.write("TIMESTAMP,ContextTokens,GeneratedTokens\n")
        for t, p, o in rows:
            f.write(f"{(t0 + timedelta(seconds=t)).strftime('%Y-%m-%d %H:%M:%S.%f')}0,{p},{o}\n")
    return str(path)


@pytest.fixture
def make_trace(tmp_path: Path) -> TraceMaker:
    def make(name: str, n: int, rate: float, prompt: tuple[int, int], output: tuple[int, int],
             seed: int = 1, start: float = 0.0) -> str:
        rng = random.Random(seed)
        t, rows = start, []
        for _ in range(n):
            t += rng.expovariate(rate)
            rows.append((t, rng.randint(*prompt), rng.randint(*output)))
        return write_trace(tmp_path / f"AzureLLMInferenceTrace_{name}.csv", rows)
    return make
