"""`nitsum slot`: one slot process (services/node/slot.py), which the router re-cuts into groups."""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path

from services.cliutil import fail, setup_logging
from services.config import RedisSettings, SlotConfig

KV_BACKENDS = ("grpc", "auto", "nixl", "local")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index", type=int, required=True, help="this slot's place in plans (0, 1, ...)")
    p.add_argument("--model", required=True, help="checkpoint folder")
    p.add_argument("--redis-url", required=True)
    p.add_argument("--redis-prefix", default="nitsum:")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="SlotControl gRPC port (0: a free one)")
    p.add_argument("--metrics-port", type=int, default=0, help="serve /metrics on this port (0: off)")
    p.add_argument("--device", default="cpu",
                   help="cpu, or this slot's GPU: cuda:N (cuda = cuda:0, e.g. the one GPU a container sees)")
    p.add_argument("--kv-cache-gib", type=float, default=1.0, help="KV cache memory of this slot, GiB")
    p.add_argument("--dist-timeout", type=float, default=60.0,
                   help="seconds to wait for peer slots when forming process groups")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--host-reserve-gib", type=float, default=None,
                   help="CPU slots: host memory kept warm for the KV cache and re-cut weights, GiB (default: "
                        "--kv-cache-gib + 4x the model's weights; 0: freed memory goes back to the OS and each switch faults it in again)")
    p.add_argument("--schedule", choices=("tier", "fcfs"), default="tier",
                   help="the engine's policy: tier (prompts by TTFT deadline, steps guarded to the tightest TPOT, "
                        "the lowest tier preempted first; the default) or fcfs (first come, first served, as vLLM)")
    p.add_argument("--max-step-s", type=float, default=0.0,
                   help="with --schedule tier: a step that carries prompt tokens takes at most this long, so an "
                        "urgent prompt arriving mid-prefill waits one such step (nitsum up sets a quarter of the "
                        "tiers' tightest TTFT target; 0: no cap)")
    p.add_argument("--cpus", default=None,
                   help="run only on these host CPUs, e.g. 0 or 2,3 (the slot's own cores, as a GPU is its own; "
                        "default: any)")
    p.add_argument("--kv-backend", choices=KV_BACKENDS, default=os.environ.get("NITSUM_KV_BACKEND", "auto"),
                   help="prefill -> decode KV hand-off: grpc (gathered bytes), or every rank its own blocks over "
                        "auto (NIXL where it works, else sockets), nixl or local (default: $NITSUM_KV_BACKEND "
                        "or auto)")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("slot", help="run one slot (one accelerator) that the router re-cuts into groups")
    add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    setup_logging()
    model = Path(args.model)
    if not (model / "config.json").is_file():
        return fail("slot", f"--model {model}: no config.json there (a Hugging Face checkpoint folder is needed)")
    if args.kv_backend not in KV_BACKENDS:
        return fail("slot", f"--kv-backend {args.kv_backend}: choose one of {', '.join(KV_BACKENDS)}")
    if args.index < 0:
        return fail("slot", f"--index {args.index}: slots are numbered from 0")
    if args.host_reserve_gib is not None and args.host_reserve_gib < 0:
        return fail("slot", f"--host-reserve-gib {args.host_reserve_gib}: give 0 or more")
    if args.cpus:
        try:
            cpus = {int(c) for c in args.cpus.split(",") if c.strip()}
            os.sched_setaffinity(0, cpus)
        except (ValueError, OSError) as e:
            return fail("slot", f"--cpus {args.cpus}: {e} (give CPU numbers this host has, comma-separated)")
    if not args.device.startswith("cuda"):
        _keep_host_memory(model, args)
    config = SlotConfig(index=args.index, model=model, redis=RedisSettings(url=args.redis_url, prefix=args.redis_prefix),
                        host=args.host, port=args.port, metrics_port=args.metrics_port,
                        device="cuda:0" if args.device == "cuda" else args.device,
                        kv_cache_bytes=int(args.kv_cache_gib * (1 << 30)), dist_timeout_s=args.dist_timeout,
                        dtype=args.dtype, block_size=args.block_size, max_num_seqs=args.max_num_seqs,
                        kv_backend=args.kv_backend, schedule=args.schedule,
                        max_step_s=max(0.0, args.max_step_s))
    return asyncio.run(_serve(config))


async def _serve(config: SlotConfig) -> int:
    """The composition root of a slot process: the slot gets the roles it may host. (Imported
    here, after `_keep_host_memory`: torch and the roles must not start threads before it.)"""
    from decode_node.colocated import ColocatedLeader
    from decode_node.migration import ParkingLot
    from decode_node.service import DecodeLeader
    from prefill_node.service import PrefillLeader
    from services.node.roles import Roles
    from services.node.slot import Slot

    roles = Roles(leaders={"prefill": PrefillLeader, "decode": DecodeLeader, "colocated": ColocatedLeader},
                  parking=ParkingLot(config.redis))
    return await Slot(config, roles).serve()


def _keep_host_memory(model: Path, args: argparse.Namespace) -> None:
    """Before any thread starts: keep freed memory for the next epoch's weights (services/engine/weights/hostmem.py).
    A TP 2 -> 1 switch holds the old shard and the new whole model, each plain and packed; the
    KV cache comes out of the same reserve (allocated once, lent to every epoch)."""
    from services.engine.config import EngineArgs, ModelConfig
    from services.engine.errors import ModelLoadError
    from services.engine.weights.hostmem import keep_freed_memory

    if args.host_reserve_gib is not None:
        reserve = int(args.host_reserve_gib * (1 << 30))
    else:
        try:
            cfg = ModelConfig.from_dir(model)
            reserve = int(args.kv_cache_gib * (1 << 30)) + 4 * cfg.num_params * EngineArgs(str(model), dtype=args.dtype).torch_dtype(cfg).itemsize
        except ModelLoadError:
            return  # the slot reports the checkpoint's problem itself
    if reserve > 0:  # 0: glibc's defaults, freed memory goes back to the OS
        keep_freed_memory(reserve)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nitsum slot")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
