"""Block transfer bandwidth: each backend moving 64 MiB and 512 MiB of KV between two processes in
the `small` model's real block layout, against single-process memcpy of the same bytes measured
in the same run.

    python -m bench.kvtransfer [--sizes-mib 64,512] [--backends nixl,local] [--repeats 5]

Layout: one rank at TP 1, cache `[blocks, 12, 2, 4, 16, 64]` bf16 (196,608 bytes per block); the
source and destination block ids are two random permutations, so neighbouring blocks almost never
merge and the transfer is ~one descriptor per block. A send is timed from `send()` to the
sender's DONE (the data has landed in the receiver's cache), after one untimed warm-up transfer
that faults in the receiver's pages. Then the migration pause of a running request on the small
model at each `--contexts` length (see `bench/migration.py`), in decode steps. Progress goes to
stderr; the last line on stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np
import torch

from bench.migration import DEFAULT_MODEL
from bench.migration import measure as measure_pause
from kvtransfer.agent import make_agent
from kvtransfer.remap import BlockLayout, expand_plan, plan_transfer
from kvtransfer.state import TransferState

SMALL = BlockLayout(num_layers=12, local_kv_heads=4, block_size=16, head_dim=64, elem_size=2)
TARGET_NIXL_VS_MEMCPY = 0.25


@dataclass(frozen=True)
class Order:
    """What a bench rank does once connected: send `repeats + 1` transfers, or receive them."""

    role: str  # "send" | "receive"
    peer_metadata: bytes
    descs: np.ndarray
    transfers: int
    timeout_s: float


@dataclass(frozen=True)
class Result:
    seconds: list[float]
    error: str | None


def log(msg: str) -> None:
    print(f"[bench.kvtransfer] {msg}", file=sys.stderr, flush=True)


def bench_rank(backend: str, name: str, num_blocks: int, conn: Connection) -> None:
    torch.set_num_threads(1)
    shape = (num_blocks, SMALL.num_layers, 2, SMALL.local_kv_heads, SMALL.block_size, SMALL.head_dim)
    cache = torch.ones(shape, dtype=torch.bfloat16) if name.endswith("src") else torch.zeros(shape, dtype=torch.bfloat16)
    agent = make_agent(backend, name, cache)  # type: ignore[arg-type]
    conn.send(agent.metadata())
    order: Order = conn.recv()
    seconds: list[float] = []
    error = None
    try:
        if order.role == "send":
            peer = agent.add_peer(order.peer_metadata)
            for i in range(order.transfers):
                t0 = time.perf_counter()
                state = agent.send(peer, order.descs, f"bench-{i}", order.timeout_s).wait(0.0)
                seconds.append(time.perf_counter() - t0)
                if state is not TransferState.DONE:
                    raise RuntimeError(f"transfer {i} ended {state.value}")
        else:
            for i in range(order.transfers):
                if agent.receive(f"bench-{i}", order.timeout_s).wait() is not TransferState.DONE:
                    raise RuntimeError(f"receive {i} failed")
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    conn.send(Result(seconds[1:], error))  # the first transfer is the warm-up
    conn.recv()  # stop
    agent.close()


def run_backend(backend: str, size_bytes: int, repeats: int, timeout_s: float) -> Result:
    """Start a sender and a receiver process, move `size_bytes` repeats+1 times, stop both."""
    num_blocks = max(1, size_bytes // SMALL.block_bytes)
    rng = np.random.default_rng(0)
    descs = expand_plan(plan_transfer(4, 1, 1), SMALL, SMALL, rng.permutation(num_blocks),
                        rng.permutation(num_blocks))[(0, 0)]
    ctx = mp.get_context("spawn")
    ends = {role: ctx.Pipe() for role in ("src", "dst")}
    procs = {role: ctx.Process(target=bench_rank, args=(backend, f"bench-{backend}-{role}", num_blocks, ends[role][1]),
                               daemon=True) for role in ends}
    try:
        for p in procs.values():
            p.start()
        md = {role: ends[role][0].recv() for role in ends}
        ends["dst"][0].send(Order("receive", md["src"], descs, repeats + 1, timeout_s))
        ends["src"][0].send(Order("send", md["dst"], descs, repeats + 1, timeout_s))
        result: Result = ends["src"][0].recv()
        ends["dst"][0].recv()
        log(f"{backend}: {len(descs)} descriptors, {num_blocks} blocks")
        for role in ends:
            ends[role][0].send("stop")
        return result
    finally:
        for p in procs.values():
            p.join(10.0)
            if p.is_alive():
                p.kill()
                p.join(2.0)


def memcpy_gbps(size_bytes: int, repeats: int) -> float:
    """Best of `repeats` copies (a ceiling: other processes on the host can only slow a copy)."""
    src = torch.ones(size_bytes // 2, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault in
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return size_bytes / min(times) / 1e9


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes-mib", default="64,512")
    ap.add_argument("--backends", default="nixl,local")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--timeout-s", type=float, default=120.0)
    ap.add_argument("--contexts", default="256,2048,8192", help="migration pause at these context lengths")
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="small-preset checkpoint for migration")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes_mib.split(",")]
    out: dict[str, object] = {"model": "small", "block_bytes": SMALL.block_bytes,
                              "block_ids": "random permutations (about one descriptor per block)",
                              "repeats": args.repeats, "statistic": "median (memcpy: best, a ceiling)",
                              "memcpy_threads": torch.get_num_threads()}
    memcpy: dict[str, float] = {}
    for mib in sizes:
        memcpy[f"{mib}MiB"] = round(memcpy_gbps(mib << 20, 2 * args.repeats), 3)
        log(f"memcpy {mib} MiB: {memcpy[f'{mib}MiB']} GB/s")
    for backend in args.backends.split(","):
        figures: dict[str, object] = {}
        for mib in sizes:
            log(f"{backend} {mib} MiB ...")
            res = run_backend(backend, mib << 20, args.repeats, args.timeout_s)
            if res.error or not res.seconds:
                figures[f"{mib}MiB"] = None
                log(f"{backend} {mib} MiB failed: {res.error}")
                continue
            moved = (mib << 20) // SMALL.block_bytes * SMALL.block_bytes
            figures[f"{mib}MiB"] = round(moved / statistics.median(res.seconds) / 1e9, 3)
            figures[f"{mib}MiB_best"] = round(moved / min(res.seconds) / 1e9, 3)
            log(f"{backend} {mib} MiB: {figures[f'{mib}MiB']} GB/s (best {figures[f'{mib}MiB_best']})")
        out[f"{backend}_gbps"] = figures
    big = f"{max(sizes)}MiB"
    out["memcpy_gbps"] = memcpy[big]
    out["memcpy_gbps_by_size"] = memcpy
    nixl = out.get("nixl_gbps")
    nixl_big = nixl.get(big) if isinstance(nixl, dict) else None
    out["nixl_vs_memcpy"] = round(nixl_big / memcpy[big], 3) if isinstance(nixl_big, float) else None
    out["nixl_vs_memcpy_target"] = TARGET_NIXL_VS_MEMCPY
    log("migration pause ...")
    migration = measure_pause(args.model, [int(c) for c in args.contexts.split(",")])
    out["migration"] = migration
    out["migration_pause_steps"] = migration["migration_pause_steps"]
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
