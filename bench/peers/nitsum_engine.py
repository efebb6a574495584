"""Nitsum's own engine as a benchmark subject: `LLMEngine` decode figures on one checkpoint.

Drives `LLMEngine.step()` directly, timing each step's tokens as `TokenEvent`s, with the same
prompts, token counts, warm-up and repeats as the other peers (see `decode_timing`). Greedy,
`ignore_eos=True`, so every sequence makes exactly `max_tokens` tokens.
"""

from __future__ import annotations

import time
from typing import Any

from bench.peers.decode_timing import (
    RunFigures,
    TokenEvent,
    measure_batches,
    summarize,
)


def load_engine(model_dir: str, dtype: str, max_num_seqs: int) -> Any:
    from services.engine import EngineArgs, LLMEngine

    return LLMEngine(EngineArgs(model=model_dir, tp=1, device="cpu", dtype=dtype, max_num_seqs=max_num_seqs))


def run_once(engine: Any, prompts: list[list[int]], max_tokens: int, tag: str) -> RunFigures:
    """Add every prompt at once, then step the engine until all sequences finish."""
    from services.engine import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    events: list[TokenEvent] = []
    t0 = time.perf_counter()
    for i, ids in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", ids, params)
    while engine.has_unfinished():
        outs = engine.step()
        now = time.perf_counter()
        events.extend(TokenEvent(now, o.request_id, len(o.new_token_ids)) for o in outs if o.new_token_ids)
    return summarize(events, t0, len(prompts), max_tokens)


def measure(engine: Any, batches: list[int], max_tokens: int, prompt_len: int, vocab: int, repeats: int = 3,
            seed: int = 0) -> dict[str, Any]:
    return measure_batches("nitsum", lambda prompts, n, tag: run_once(engine, prompts, n, tag), batches,
                           max_tokens, prompt_len, vocab, repeats, seed)
