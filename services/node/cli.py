"""Flags and start-up shared by `nitsum prefill` and `nitsum decode` (one process per slot)."""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path

from pydantic import ValidationError

from services.cliutil import explain, fail, setup_logging
from services.config import NodeConfig, RedisSettings


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint folder")
    p.add_argument("--group-id", required=True, help="the group this slot serves in, e.g. p0 or d0")
    p.add_argument("--rank", type=int, default=0, help="this slot's rank in its group (0: the leader)")
    p.add_argument("--tp", type=int, default=1, help="the group's TP degree (its number of slots)")
    p.add_argument("--epoch", type=int, default=0, help="plan epoch the group belongs to")
    p.add_argument("--dist-addr", default=None, help="host:port of the group's TCPStore (tp > 1)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="gRPC port of the leader (0: a free one)")
    p.add_argument("--metrics-port", type=int, default=0, help="serve /metrics on this port (0: off)")
    p.add_argument("--redis-url", required=True)
    p.add_argument("--redis-prefix", default="nitsum:")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--kv-backend", choices=("grpc", "auto", "nixl", "local"),
                   default=os.environ.get("NITSUM_KV_BACKEND", "auto"),
                   help="prefill -> decode KV hand-off: grpc (gathered bytes), or every rank its own blocks over "
                        "auto (NIXL where it works, else sockets), nixl or local (default: $NITSUM_KV_BACKEND "
                        "or auto)")


def build_config(role: str, args: argparse.Namespace) -> NodeConfig:
    return NodeConfig(role=role, model=Path(args.model), group_id=args.group_id, rank=args.rank, tp=args.tp,  # type: ignore[arg-type]
                      epoch=args.epoch, dist_addr=args.dist_addr, host=args.host, port=args.port,
                      metrics_port=args.metrics_port, redis=RedisSettings(url=args.redis_url, prefix=args.redis_prefix),
                      device=args.device, dtype=args.dtype, block_size=args.block_size,
                      max_num_seqs=args.max_num_seqs, kv_backend=args.kv_backend)


def run_node(role: str, args: argparse.Namespace) -> int:
    from services.node.frame import run_follower

    setup_logging()
    try:
        config = build_config(role, args)
        if not config.model.is_dir():
            return fail(role, f"--model {config.model}: not a folder")
    except ValidationError as e:
        return fail(role, explain(e))
    if not config.is_leader:
        return run_follower(config)
    if role == "prefill":
        from prefill_node.service import PrefillLeader as Leader
    else:
        from decode_node.service import DecodeLeader as Leader  # type: ignore[assignment]
    return asyncio.run(Leader(config).serve())
