"""Migration pause: how long a running request stops while it moves to another decode group.

For each context length, a request decodes on a source engine; `kvtransfer.migration.migrate`
pre-copies its KV while it keeps decoding, then pauses for the last tokens. The pause is reported
in seconds and in decode steps (divided by the median decode step time of the same request at
that context, measured on the source just before). Both engines run in this process and the KV
moves through the in-process channel, so the figure isolates the protocol's pause from the wire.

    python -m bench.migration [--model DIR] [--contexts 256,2048,8192]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from kvtransfer.migration import migrate
from services.engine import EngineArgs, LLMEngine, SamplingParams
from services.engine.make_model import make_model

DEFAULT_MODEL = Path(".nitsum/models/small-bf16")


def ensure_small(path: Path) -> Path:
    if not (path / "config.json").is_file():
        print(f"making the small preset in {path} ...", file=sys.stderr)
        make_model("small", path, "bfloat16", seed=0)
    return path


def pause_at(src: LLMEngine, dst: LLMEngine, context: int) -> dict[str, float]:
    rid = f"ctx{context}"
    src.add_request(rid, [1 + i % 30000 for i in range(context)], SamplingParams(max_tokens=64, ignore_eos=True))
    while src.computed_tokens(rid) < context:
        src.step()  # prefill, in chunks
    steps = []
    for _ in range(6):
        t = time.perf_counter()
        src.step()
        steps.append(time.perf_counter() - t)
    step_s = statistics.median(steps)
    report = migrate(src, dst, rid, keep_decoding=src.step)
    dst.abort(rid)
    return {"context": context, "pause_ms": report.pause_s * 1e3, "decode_step_ms": step_s * 1e3,
            "pause_steps": report.pause_s / step_s, "precopy_rounds": report.rounds,
            "tokens_in_pause": report.tokens_in_pause}


def measure(model: Path, contexts: list[int]) -> dict[str, object]:
    """Pause figures for each context; `migration_pause_steps` is the largest, in decode steps."""
    model = ensure_small(model)
    common = dict(model=str(model), max_num_seqs=4, max_num_batched_tokens=2048,
                  max_model_len=max(contexts) + 128, num_kv_blocks=(max(contexts) + 256) // 16 * 2)
    src = LLMEngine(EngineArgs(**common))  # type: ignore[arg-type]
    dst = LLMEngine(EngineArgs(**common))  # type: ignore[arg-type]
    rows = []
    for c in contexts:
        row = pause_at(src, dst, c)
        print(f"context {c}: pause {row['pause_ms']:.2f} ms = {row['pause_steps']:.2f} decode steps "
              f"({row['precopy_rounds']} pre-copy rounds)", file=sys.stderr)
        rows.append(row)
    src.shutdown()
    dst.shutdown()
    return {"model_dir": str(model), "channel": "in-process", "contexts": rows,
            "migration_pause_steps": max(r["pause_steps"] for r in rows)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--contexts", default="256,2048,8192")
    args = ap.parse_args(argv)
    print(json.dumps(measure(args.model, [int(c) for c in args.contexts.split(",")])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
