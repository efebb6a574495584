"""Decode timing shared by every peer of the engine benchmark: prompts, token events, figures.

Standard library only: `vllm_peer.py` runs under `.venv-vllm`, which has no Nitsum packages, and
imports this module as a sibling file.

Every peer reports the same thing the same way. A run submits `batch` requests at time `t0`, all at
once, and records a `TokenEvent` each time tokens arrive for a request (an engine step, or one step
of `generate`). From those events:

- TTFT: time from `t0` until every request has its first token (all prefills done);
- decode time: from that moment until the last token; the tokens that arrive in between are the
  decode tokens, so prefill never counts in decode figures;
- ms/token: decode time / decode steps of one sequence (max_tokens - 1);
- decode tokens/s: decode tokens / decode time; end-to-end tokens/s: all tokens / (end - t0).
"""

from __future__ import annotations

import json
import random
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# Ids below this are left out of prompts: Llama-style vocabularies keep special tokens there.
FIRST_PROMPT_ID = 3


@dataclass(frozen=True)
class TokenEvent:
    """`n_tokens` new tokens of request `request_id` became visible at time `t` (perf_counter)."""

    t: float
    request_id: str
    n_tokens: int


@dataclass(frozen=True)
class RunFigures:
    """The figures of one timed run of `batch` concurrent sequences."""

    batch: int
    max_tokens: int
    ttft_s: float
    decode_s: float
    total_s: float
    ms_per_token: float
    decode_tokens_per_s: float
    e2e_tokens_per_s: float

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def make_prompts(n: int, prompt_len: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """`n` distinct random prompts of `prompt_len` ids; the same on every peer for the same seed."""
    rng = random.Random(seed)
    return [[rng.randrange(FIRST_PROMPT_ID, vocab_size) for _ in range(prompt_len)] for _ in range(n)]


def prompt_vocab(model_dir: str | Path) -> int:
    """Ids prompts may use: those both the model and its tokenizer know (some servers check both)."""
    folder = Path(model_dir)
    size = int(json.loads((folder / "config.json").read_text())["vocab_size"])
    tok_path = folder / "tokenizer.json"
    if tok_path.is_file():
        tok = json.loads(tok_path.read_text())
        vocab = tok.get("model", {}).get("vocab") or {}
        ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))
        ids += [t["id"] for t in tok.get("added_tokens", [])]
        if ids:
            size = min(size, max(ids) + 1)
    return size


def summarize(events: Sequence[TokenEvent], t0: float, batch: int, max_tokens: int) -> RunFigures:
    """Figures of a run from its token events; checks every sequence produced `max_tokens`."""
    counts: dict[str, int] = {}
    first_seen: dict[str, float] = {}
    for ev in events:
        counts[ev.request_id] = counts.get(ev.request_id, 0) + ev.n_tokens
        first_seen.setdefault(ev.request_id, ev.t)
    short = {rid: n for rid, n in counts.items() if n != max_tokens}
    if len(counts) != batch or short:
        raise RuntimeError(f"expected {batch} sequences of {max_tokens} tokens, got {counts}")
    t_first = max(first_seen.values())
    t_end = max(ev.t for ev in events)
    decode_tokens = sum(ev.n_tokens for ev in events if ev.t > t_first)
    decode_s = t_end - t_first
    steps = max(max_tokens - 1, 1)
    return RunFigures(
        batch=batch,
        max_tokens=max_tokens,
        ttft_s=t_first - t0,
        decode_s=decode_s,
        total_s=t_end - t0,
        ms_per_token=1e3 * decode_s / steps,
        decode_tokens_per_s=decode_tokens / decode_s if decode_s > 0 else 0.0,
        e2e_tokens_per_s=batch * max_tokens / (t_end - t0),
    )


def median_run(runs: Sequence[RunFigures]) -> RunFigures:
    """The run with the median decode time (a real run, not a blend of several)."""
    by_decode = sorted(runs, key=lambda r: r.decode_s)
    return by_decode[(len(by_decode) - 1) // 2]


def spread(runs: Sequence[RunFigures]) -> float:
    """Relative spread (max - min) / median of decode time: how noisy the repeats were."""
    times = [r.decode_s for r in runs]
    mid = statistics.median(times)
    return (max(times) - min(times)) / mid if mid > 0 else 0.0


def batch_figures(runs: Sequence[RunFigures]) -> dict[str, float | int]:
    """What a peer reports for one batch size: the median run, its spread, and the best run's
    speed (on a shared machine the best run is the least disturbed one)."""
    best = min(runs, key=lambda r: r.decode_s)
    return {
        **median_run(runs).as_dict(),
        "spread": spread(runs),
        "best_ms_per_token": best.ms_per_token,
        "best_decode_tokens_per_s": best.decode_tokens_per_s,
    }


def progress_line(subject: str, batch: int, figures: dict[str, float | int]) -> str:
    return (
        f"[{subject}] b={batch}: {figures['ms_per_token']:.2f} ms/token, "
        f"{figures['decode_tokens_per_s']:.1f} decode tok/s (spread {figures['spread']:.0%})"
    )


def parse_batches(text: str) -> list[int]:
    """'1,8,32,64' -> [1, 8, 32, 64]; rejects empty or non-positive entries."""
    batches = [int(part) for part in text.split(",") if part.strip()]
    if not batches or min(batches) < 1:
        raise ValueError(f"--batches wants positive integers like 1,8,32,64, got {text!r}")
    return batches


WARMUP_TOKENS = 4


def measure_batches(subject: str, run: Callable[[list[list[int]], int, str], RunFigures], batches: Sequence[int],
                    max_tokens: int, prompt_len: int, vocab: int, repeats: int = 3, seed: int = 0) -> dict[str, Any]:
    """Per-batch figures for one subject: a short untimed warm-up run on other prompts, then the
    median of `repeats` timed runs. `run(prompts, max_tokens, tag)` decodes one batch."""
    per_batch: dict[str, Any] = {}
    for batch in batches:
        run(make_prompts(batch, prompt_len, vocab, seed + 1000 + batch), WARMUP_TOKENS, f"w{batch}")
        prompts = make_prompts(batch, prompt_len, vocab, seed + batch)
        runs = [run(prompts, max_tokens, f"b{batch}r{r}") for r in range(repeats)]
        per_batch[str(batch)] = figures = batch_figures(runs)
        print(progress_line(subject, batch, figures), file=sys.stderr, flush=True)
    return per_batch
