"""`transformers` peer of the engine benchmark: `generate` decode figures on one checkpoint.

Greedy `generate` with `min_new_tokens = max_new_tokens`, so every sequence makes exactly
`max_tokens` tokens, on the same prompts as the other peers. A batch of `batch` concurrent
sequences is one batched, left-padded `generate` call (the prompts share one length, so there is no
padding to add). A stopping criterion that never stops is called once per generation step, after
the step's tokens exist: its timestamps are the token events `decode_timing.summarize` reads, so the
prefill is kept out of decode figures exactly as for the other peers.

`bench/engine.py` runs it in a child process (a clean heap and thread pool); it also runs alone:

    python -m bench.peers.transformers_peer --model DIR --batches 1,8 --max-tokens 32
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch
from transformers import AutoModelForCausalLM, StoppingCriteria, StoppingCriteriaList

from bench.peers.decode_timing import (
    RunFigures,
    TokenEvent,
    measure_batches,
    parse_batches,
    prompt_vocab,
    summarize,
)


class StepClock(StoppingCriteria):
    """Records one token per sequence each time `generate` finishes a step; never stops it."""

    def __init__(self, batch: int) -> None:
        self.ids = [f"r{i}" for i in range(batch)]
        self.events: list[TokenEvent] = []

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any
    ) -> torch.BoolTensor:
        now = time.perf_counter()
        self.events.extend(TokenEvent(now, rid, 1) for rid in self.ids)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]


def load_model(model_dir: str, dtype: str) -> Any:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    return model.eval()


@torch.inference_mode()
def run_once(model: Any, prompts: list[list[int]], max_tokens: int) -> RunFigures:
    """One batched greedy `generate` of every prompt, timed step by step."""
    input_ids = torch.tensor(prompts, dtype=torch.long)
    clock = StepClock(len(prompts))
    t0 = time.perf_counter()
    out = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_tokens,
        min_new_tokens=max_tokens,
        pad_token_id=model.config.pad_token_id or 0,
        stopping_criteria=StoppingCriteriaList([clock]),
    )
    if out.shape[1] != input_ids.shape[1] + max_tokens:
        raise RuntimeError(f"generate made {out.shape[1] - input_ids.shape[1]} tokens, not {max_tokens}")
    return summarize(clock.events, t0, len(prompts), max_tokens)


def measure(model: Any, batches: list[int], max_tokens: int, prompt_len: int, vocab: int, repeats: int = 3,
            seed: int = 0) -> dict[str, Any]:
    return measure_batches("transformers", lambda prompts, n, _tag: run_once(model, prompts, n), batches,
                           max_tokens, prompt_len, vocab, repeats, seed)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batches", type=parse_batches, default=[1, 8, 32, 64])
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    model = load_model(args.model, args.dtype)
    vocab = prompt_vocab(args.model)
    figures = measure(model, args.batches, args.max_tokens, args.prompt_len, vocab, args.repeats)
    print(json.dumps({"peer": "transformers", "dtype": args.dtype, "batches": figures}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
