"""Tier isolation: does a batch flood leave interactive requests their SLO?

    python -m bench.isolation [--model DIR] [--plan p1,d1] [--interactive-rate 1.0] [--unloaded-s 30]
                              [--flooded-s 60] [--flood-x 10] [--out FILE]

One run, two meshes (`nitsum up`'s Mesh on the `small` preset unless --model; with --pin, slot i
runs on core i only), each first warmed up, then:

  unloaded   interactive requests only, at a steady rate well inside capacity;
  flooded    the same interactive stream, plus batch requests at `--flood-x` times the mesh's
             batch capacity on top (most of them past the batch tier's queue limit: 429).

The first mesh runs the tier-aware schedule (`nitsum up --schedule tier`: the engines order
prompts by TTFT deadline, cap a prefill step at a quarter of the tightest TTFT target and guard
mixed steps to the TPOT target; the router keeps room for the higher tiers, decode rows within
the interactive TPOT). The second runs `--schedule fcfs`: first come, first served in the router
and the engines, as a vLLM deployment behind a FIFO queue.

Tiers are scaled to this host before the meshes start: an engine like a slot's (the same thread
count) times the interactive prompt's prefill and a one-row decode step, and the interactive
targets are TTFT = 4 x that prefill (at least 0.5 s) and TPOT = 3 x that step; batch has lax
targets (600 s, 10 s) and a queue of 16. The batch capacity the flood is scaled from is the
smaller of the prefill slot's rate and the decode rows the TPOT guard leaves the batch tier.

Every request goes through the official `openai` client (bench/replay.py's sender, streaming,
greedy, EOS ignored). Reported per mesh and phase: interactive SLO attainment and TTFT/TPOT
p50/p90; batch sent, completed, 429 (each must carry Retry-After), and lost (anything else).
Progress goes to stderr; the last stdout line is one JSON object with
`interactive_attainment_ratio` (flooded / unloaded, tier-aware; target >= 0.95) and
`fcfs_interactive_attainment_ratio` (flooded fcfs / unloaded fcfs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.mesh import small_model
from bench.replay import ReplayConfig, ReplayRequest, RequestResult, replay
from services.launch import LaunchConfig, Mesh
from services.tiers import Tier

PROMPT = {"interactive": 96, "batch": 256}
OUTPUT = {"interactive": 24, "batch": 48}
BATCH_QUEUE = 16


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class HostTiming:
    threads: int
    prefill_s: dict[str, float]  # per tier's prompt length
    decode_1_s: float  # one decode row
    decode_step_s: dict[int, float]  # rows -> seconds, at the batch context


def time_host(model: Path, threads: int) -> HostTiming:
    """The engine as one slot runs it (its thread count): prefills of the two prompt lengths and
    decode steps of a few batch sizes (the fastest of three tries each)."""
    import torch

    from services.engine import EngineArgs, LLMEngine

    torch.set_num_threads(threads)
    eng = LLMEngine(EngineArgs(model=str(model), dtype="float32"))
    try:
        eng.time_prefill(16)
        ctx = PROMPT["batch"] + OUTPUT["batch"] // 2
        prefill = {t: min(eng.time_prefill(n) for _ in range(3)) for t, n in PROMPT.items()}
        steps = {b: min(eng.time_decode_step(b, ctx) for _ in range(3)) for b in (1, 2, 4, 8, 16)}
        one = min(eng.time_decode_step(1, PROMPT["interactive"] + OUTPUT["interactive"]) for _ in range(3))
    finally:
        eng.shutdown()
    return HostTiming(threads, prefill, one, steps)


def host_tiers(timing: HostTiming) -> tuple[Tier, ...]:
    ttft = max(0.5, round(4 * timing.prefill_s["interactive"], 2))
    tpot = round(3 * timing.decode_1_s, 3)
    return (Tier("interactive", ttft_s=ttft, tpot_s=tpot, weight=4.0, queue_limit=64, max_wait_s=30.0),
            Tier("batch", ttft_s=600.0, tpot_s=10.0, weight=1.0, queue_limit=BATCH_QUEUE, max_wait_s=300.0))


def batch_capacity(timing: HostTiming, tiers: tuple[Tier, ...]) -> float:
    """Batch requests a second the mesh can finish: its prefill slot's rate, or the decode rows
    the TPOT guard leaves the batch tier (0.75 of those within 0.9 x the interactive TPOT)."""
    limit = 0.9 * tiers[0].tpot_s
    rows = max([b for b, s in timing.decode_step_s.items() if s <= limit] or [1])
    batch_rows = max(1, int(0.75 * rows))
    step = timing.decode_step_s.get(batch_rows) or timing.decode_step_s[1] * batch_rows
    return min(1.0 / timing.prefill_s["batch"], batch_rows / (OUTPUT["batch"] * step))


def workload(interactive_rate: float, duration_s: float, batch_rate: float) -> list[ReplayRequest]:
    reqs: list[tuple[float, str]] = [(i / interactive_rate, "interactive") for i in range(int(duration_s * interactive_rate))]
    if batch_rate > 0:
        reqs += [(0.5 + i / batch_rate, "batch") for i in range(int(duration_s * batch_rate))]
    reqs.sort()
    return [ReplayRequest(i, at, tier, "synthetic", PROMPT[tier], OUTPUT[tier], PROMPT[tier], OUTPUT[tier])
            for i, (at, tier) in enumerate(reqs)]


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return round(s[min(len(s) - 1, int(q * len(s)))], 4)


def summarize(results: list[RequestResult]) -> dict[str, Any]:
    inter = [r for r in results if r.tier == "interactive"]
    batch = [r for r in results if r.tier == "batch"]
    ttft = [r.ttft_s for r in inter if r.ttft_s is not None]
    tpot = [r.tpot_s for r in inter if r.tpot_s is not None]
    shed = [r for r in batch if r.status == 429]
    ok_batch = [r for r in batch if r.outcome == "ok" and r.completion_tokens == r.max_tokens]
    out: dict[str, Any] = {
        "interactive": {"sent": len(inter), "met": sum(r.met for r in inter),
                        "attainment": round(sum(r.met for r in inter) / len(inter), 4) if inter else None,
                        "errors": sum(r.outcome != "ok" for r in inter),
                        "ttft_p50_s": _pct(ttft, 0.5), "ttft_p90_s": _pct(ttft, 0.9),
                        "tpot_p50_s": _pct(tpot, 0.5), "tpot_p90_s": _pct(tpot, 0.9)},
    }
    if batch:
        out["batch"] = {"sent": len(batch), "completed": len(ok_batch), "shed_429": len(shed),
                        "shed_with_retry_after": sum(int(r.retry_after or 0) >= 1 for r in shed),
                        "lost": len(batch) - len(ok_batch) - len(shed),
                        "errors": sorted({r.error or r.outcome for r in batch if r not in ok_batch and r not in shed})[:5]}
    return out


async def _phase(url: str, tiers: tuple[Tier, ...], requests: list[ReplayRequest], name: str) -> dict[str, Any]:
    config = ReplayConfig(traces=(), url=url, tiers=tiers, tier_map="", out_dir=Path("."), max_requests=len(requests),
                          max_concurrency=1024, context_len=4096, request_timeout_s=900.0, drain_timeout_s=900.0)
    _log(f"[{name}] {len(requests)} requests")
    results, _, wall = await replay(config, requests)
    summary = summarize(results)
    summary["wall_s"] = round(wall, 1)
    _log(f"[{name}] {json.dumps(summary)}")
    return summary


def _warm_up(url: str, tiers: tuple[Tier, ...]) -> None:
    """Steps of several shapes, so every group's step-time model (what the guards predict with)
    has seen batches of 1 to 8 rows and prompts in chunks, as a serving group soon would."""
    burst = [ReplayRequest(i, 0.05 * i, "interactive", "warm-up", 96, 16, 96, 16) for i in range(8)]
    burst += [ReplayRequest(8 + i, 4.0 + 0.05 * i, "batch", "warm-up", 256, 16, 256, 16) for i in range(4)]
    burst += [ReplayRequest(12 + i, 8.0 + 1.5 * i, "interactive", "warm-up", 96, 16, 96, 16) for i in range(4)]
    asyncio.run(_phase(url, tiers, burst, "warm-up"))


def run_mesh(model: Path, plan: str, schedule: str, tiers: tuple[Tier, ...], log_dir: Path,
             phases: list[tuple[str, list[ReplayRequest]]], pin: bool = True) -> dict[str, Any]:
    tiers_file = log_dir / "tiers.json"
    tiers_file.parent.mkdir(parents=True, exist_ok=True)
    tiers_file.write_text(json.dumps({"tiers": [t.__dict__ for t in tiers]}))
    config = LaunchConfig(model=model, plan=plan, port=0, tiers=tiers_file, log_dir=log_dir / schedule,
                          schedule=schedule, startup_timeout_s=300, pin_slots=pin)
    out: dict[str, Any] = {}
    _log(f"starting the {schedule} mesh ({plan})")
    with Mesh(config) as mesh:
        _warm_up(mesh.url, tiers)
        for name, reqs in phases:
            out[name] = asyncio.run(_phase(mesh.url, tiers, reqs, f"{schedule} {name}"))
            time.sleep(2.0)
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 4) if a is not None and b else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.isolation", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint (default: the small preset)")
    p.add_argument("--plan", default="p1,d1")
    p.add_argument("--interactive-rate", type=float, default=1.0, help="interactive requests a second")
    p.add_argument("--unloaded-s", type=float, default=30.0)
    p.add_argument("--flooded-s", type=float, default=60.0)
    p.add_argument("--flood-x", type=float, default=10.0, help="batch arrival rate, in multiples of batch capacity")
    p.add_argument("--log-dir", default=".nitsum/bench-isolation")
    p.add_argument("--pin", action="store_true",
                   help="slot i on core i only (as each GPU is its own device); off by default: on a 2-core host a "
                        "pinned slot's I/O threads queue behind its compute thread (interactive TPOT 0.23 s pinned "
                        "vs 0.04 s not, unloaded)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    model = Path(args.model) if args.model else small_model()
    slots = sum(int(g[1:] or 1) for g in args.plan.split(","))
    threads = max(1, (os.cpu_count() or 1) // slots)
    timing = time_host(model, threads)
    tiers = host_tiers(timing)
    capacity = batch_capacity(timing, tiers)
    flood_rate = args.flood_x * capacity
    _log(f"host: prefill {timing.prefill_s}, decode {timing.decode_step_s} ({threads} thread(s) a slot); "
         f"tiers {[(t.name, t.ttft_s, t.tpot_s) for t in tiers]}; batch capacity {capacity:.2f}/s, flood {flood_rate:.2f}/s")
    unloaded = workload(args.interactive_rate, args.unloaded_s, 0.0)
    flooded = workload(args.interactive_rate, args.flooded_s, flood_rate)
    log_dir = Path(args.log_dir)
    runs = {s: run_mesh(model, args.plan, s, tiers, log_dir, [("unloaded", unloaded), ("flooded", flooded)],
                        args.pin) for s in ("tier", "fcfs")}
    att = {s: {ph: runs[s][ph]["interactive"]["attainment"] for ph in ("unloaded", "flooded")} for s in runs}
    batch = runs["tier"]["flooded"]["batch"]
    out: dict[str, Any] = {
        "bench": "isolation", "model": str(model), "plan": args.plan, "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(), "threads_per_slot": threads, "pinned": args.pin,
        "host_timing": {"prefill_s": timing.prefill_s, "decode_step_s": timing.decode_step_s},
        "tiers": {t.name: {"ttft_s": t.ttft_s, "tpot_s": t.tpot_s, "queue_limit": t.queue_limit} for t in tiers},
        "interactive_rate": args.interactive_rate, "batch_capacity_per_s": round(capacity, 3),
        "flood_rate_per_s": round(flood_rate, 3), "runs": runs,
        "interactive_attainment_ratio": _ratio(att["tier"]["flooded"], att["tier"]["unloaded"]),
        "fcfs_interactive_attainment_ratio": _ratio(att["fcfs"]["flooded"], att["fcfs"]["unloaded"]),
        "batch_lost": sum(runs[s]["flooded"]["batch"]["lost"] for s in runs),
        "batch_shed_without_retry_after": sum(runs[s]["flooded"]["batch"]["shed_429"]
                                              - runs[s]["flooded"]["batch"]["shed_with_retry_after"] for s in runs),
    }
    out["target_met"] = bool((out["interactive_attainment_ratio"] or 0) >= 0.95 and out["batch_lost"] == 0
                             and batch["shed_429"] > 0 and out["batch_shed_without_retry_after"] == 0)
    line = json.dumps(out)
    if args.out:
        Path(args.out).write_text(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
