"""Mesh overhead benchmark: what the serving path (gateway -> Redis -> router -> prefill group ->
KV handoff -> decode group -> Redis -> gateway -> SSE) adds on top of the engine alone.

    python -m bench.mesh [--url URL] [--model DIR] [--plan p1,d1] [--requests 12]
                         [--prompt-tokens 128] [--max-tokens 32] [--device cpu]

Without --url it starts its own mesh (`nitsum up`'s Mesh) on the `small` preset (made once under
`.nitsum/models/small`). In one run, for the same prompt ids and sampling seeds (temperature 1,
top-k 50: greedy decoding of random weights tends to loop on tokens with no text, which a client
cannot time), EOS ignored:

1. engine only (an `LLMEngine` in this process; the mesh is idle meanwhile): time to the first
   token of a lone request (prefill + first sample), and the mean time per token after it;
2. through the mesh, one streaming request at a time (openai-style SSE): time from sending the
   request to the first chunk (TTFT) and the mean gap per token after it (TPOT).

Overheads, each the median over requests of (mesh - engine) for the same prompt run back to back:
TTFT; per token, the mean gap between tokens from the second on (the steady streaming cost); and,
separately, the gap between the first and second token, which in the mesh is the KV handoff from
the prefill group to the decode group. Unpaired figures are printed too.
Targets (issue 3): TTFT overhead p50 <= 15 ms, per-token overhead <= 1 ms. Progress goes to stderr;
the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def prompts(vocab: int, n: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab) for _ in range(length)] for _ in range(n)]


@dataclass(frozen=True)
class Timing:
    """One request: time to the first token, the gap to the second (in the mesh: the KV handoff
    from the prefill group to the decode group), and the mean gap per token after that."""

    ttft: float
    second_gap: float
    steady_tpot: float
    tpot: float  # mean gap per token after the first, handoff included

    @classmethod
    def of(cls, start: float, times: list[float], tokens: int) -> Timing:
        if len(times) < 3 or tokens < 3:
            raise ValueError(f"{len(times)} timed chunks for {tokens} tokens; need at least 3")
        return cls(times[0] - start, times[1] - times[0], (times[-1] - times[1]) / (tokens - 2),
                   (times[-1] - times[0]) / (tokens - 1))


class EngineOnly:
    """An LLMEngine in this process: the baseline, timed the same way as the mesh."""

    def __init__(self, model: Path, device: str, max_tokens: int) -> None:
        from services.engine import EngineArgs, LLMEngine

        self.engine = LLMEngine(EngineArgs(model=str(model), device=device))
        self.max_tokens = max_tokens
        self._n = 0

    def run(self, prompt: list[int], seed: int) -> Timing:
        from services.engine import SamplingParams

        self._n += 1
        params = SamplingParams(max_tokens=self.max_tokens, temperature=1.0, top_k=50, seed=seed, ignore_eos=True)
        start = time.perf_counter()
        self.engine.add_request(f"bench-{self._n}", prompt, params)
        times: list[float] = []
        while self.engine.has_unfinished():
            for out in self.engine.step():
                times.extend(time.perf_counter() for _ in out.new_token_ids)
        return Timing.of(start, times, len(times))

    def close(self) -> None:
        self.engine.shutdown()


def through_mesh(client: httpx.Client, url: str, model_name: str, prompt: list[int], max_tokens: int,
                 seed: int) -> Timing:
    """One streaming request through the gateway, timed per SSE chunk."""
    body = {"model": model_name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 1.0, "top_k": 50,
            "seed": seed,
            "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    times: list[float] = []
    tokens = 0
    with client.stream("POST", f"{url}/v1/completions", json=body, headers={"X-Nitsum-Tier": "interactive"}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"]:
                # the finish chunk comes with the last token's event, so the last chunk times the last token
                times.append(time.perf_counter())
    return Timing.of(start, times, tokens)


def measure(engine: EngineOnly, url: str, ids: list[list[int]], max_tokens: int) -> dict[str, list[Timing]]:
    """Engine-only and mesh runs of each prompt back to back, so drifting load on a shared host
    hits both alike; the first pair is an untimed warm-up."""
    got: dict[str, list[Timing]] = {"engine": [], "mesh": []}
    with httpx.Client(timeout=300) as client:
        model_name = client.get(f"{url}/v1/models").json()["data"][0]["id"]
        for i, prompt in enumerate([ids[0], *ids]):
            try:
                e = engine.run(prompt, seed=i)
                m = through_mesh(client, url, model_name, prompt, max_tokens, seed=i)
            except ValueError as err:  # too few chunks to time (tokens with no text of their own)
                _log(f"request {i}: skipped, {err}")
                continue
            if i:
                got["engine"].append(e)
                got["mesh"].append(m)
                _log(f"request {i}: ttft engine {e.ttft * 1000:.1f} ms, mesh {m.ttft * 1000:.1f} ms; "
                     f"2nd-token gap engine {e.second_gap * 1000:.1f} ms, mesh {m.second_gap * 1000:.1f} ms; "
                     f"steady tpot engine {e.steady_tpot * 1000:.2f} ms, mesh {m.steady_tpot * 1000:.2f} ms")
    return got


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.mesh")
    p.add_argument("--url", default=None, help="a running mesh (default: start one)")
    p.add_argument("--model", default=None, help="checkpoint (default: the small preset)")
    p.add_argument("--plan", default="p1,d1")
    p.add_argument("--requests", type=int, default=12)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per engine, here and in every mesh process (OMP_NUM_THREADS)")
    args = p.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the mesh's processes
    import torch

    torch.set_num_threads(args.threads)

    from services.engine.config import ModelConfig
    from services.launch import LaunchConfig, Mesh

    model = Path(args.model) if args.model else small_model()
    ids = prompts(ModelConfig.from_dir(model).vocab_size, args.requests, args.prompt_tokens)
    engine = EngineOnly(model, args.device, args.max_tokens)
    mesh = None
    url = args.url
    try:
        if url is None:
            _log(f"starting a mesh with plan {args.plan}")
            mesh = Mesh(LaunchConfig(model=model, plan=args.plan, port=0, device=args.device)).start()
            url = mesh.url
        _log(f"{args.requests} requests x {args.prompt_tokens} prompt tokens, {args.max_tokens} new; mesh at {url}")
        got = measure(engine, url, ids, args.max_tokens)
    finally:
        engine.close()
        if mesh is not None:
            mesh.stop()
    print(json.dumps(report(args, got)))
    return 0


def report(args: argparse.Namespace, got: dict[str, list[Timing]]) -> dict[str, Any]:
    eng, net = got["engine"], got["mesh"]

    def p50(xs: list[Timing], f: str) -> float:
        return statistics.median(getattr(x, f) for x in xs) * 1000.0

    def mean(xs: list[Timing], f: str) -> float:
        return statistics.mean(getattr(x, f) for x in xs) * 1000.0

    def paired(f: str) -> float:
        return statistics.median((getattr(m, f) - getattr(e, f)) * 1000.0 for m, e in zip(net, eng, strict=True))

    # Headline figures are medians of per-request differences (engine and mesh run the same prompt
    # back to back), which a shared host's drifting load affects far less than the unpaired ones.
    out: dict[str, Any] = {
        "plan": args.plan, "requests": len(net), "prompt_tokens": args.prompt_tokens,
        "max_tokens": args.max_tokens, "device": args.device, "threads": args.threads,
        "engine_ttft_p50_ms": round(p50(eng, "ttft"), 3), "mesh_ttft_p50_ms": round(p50(net, "ttft"), 3),
        "ttft_overhead_p50_ms": round(paired("ttft"), 3),
        "ttft_overhead_p50_unpaired_ms": round(p50(net, "ttft") - p50(eng, "ttft"), 3),
        "engine_steady_tpot_ms": round(mean(eng, "steady_tpot"), 3),
        "mesh_steady_tpot_ms": round(mean(net, "steady_tpot"), 3),
        "token_overhead_ms": round(paired("steady_tpot"), 3),
        "token_overhead_unpaired_ms": round(mean(net, "steady_tpot") - mean(eng, "steady_tpot"), 3),
        "handoff_overhead_p50_ms": round(paired("second_gap"), 3),
        "tpot_overhead_ms": round(paired("tpot"), 3),
    }
    out["ttft_target_met"] = out["ttft_overhead_p50_ms"] <= 15.0
    out["token_target_met"] = out["token_overhead_ms"] <= 1.0
    for k in ("ttft_overhead_p50_ms", "token_overhead_ms", "handoff_overhead_p50_ms"):
        _log(f"{k}: {out[k]}")
    return out


def small_model() -> Path:
    path = Path(".nitsum/models/small")
    if not (path / "config.json").is_file():
        from services.engine.make_model import make_model

        _log(f"making the small preset in {path} (once)")
        make_model(preset="small", out=path, dtype="float32", seed=0)
    return path


if __name__ == "__main__":
    raise SystemExit(main())
