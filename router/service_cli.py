"""`nitsum router`: the live router-coordinator as its own process."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket

from pydantic import ValidationError

from services.cliutil import explain, fail, setup_logging
from services.config import RedisSettings, RouterConfig, TierPolicy


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis-url", required=True)
    p.add_argument("--redis-prefix", default="nitsum:")
    p.add_argument("--tiers", default=None, help="tiers file (JSON or .toml), the same one the gateway reads")
    p.add_argument("--router-id", default=None, help="consumer name in the tier streams (default: host-pid)")
    p.add_argument("--claim-idle-ms", type=int, default=5000,
                   help="take over entries another router left pending this long")
    p.add_argument("--host", default="127.0.0.1", help="address the /metrics server binds")
    p.add_argument("--metrics-port", type=int, default=0, help="serve /metrics on this port (0: off)")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("router", help="run the router: tier queues -> prefill/decode groups")
    add_arguments(p)
    p.set_defaults(func=run)


def build_config(args: argparse.Namespace) -> RouterConfig:
    return RouterConfig(router_id=args.router_id or f"{socket.gethostname()}-{os.getpid()}",
                        redis=RedisSettings(url=args.redis_url, prefix=args.redis_prefix),
                        policy=TierPolicy.load(args.tiers), claim_idle_ms=args.claim_idle_ms)


async def serve(config: RouterConfig, host: str = "127.0.0.1", metrics_port: int = 0) -> int:
    from router.service import Router
    from services.cluster import ClusterClient

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    cluster = ClusterClient(config.redis.url, config.redis.prefix)
    router = Router(config, cluster)
    if metrics_port:
        from prometheus_client import start_http_server

        start_http_server(metrics_port, host, registry=router.metrics.registry)
    try:
        await router.run(stop)
    finally:
        await cluster.close()
    return 0


def run(args: argparse.Namespace) -> int:
    setup_logging()
    try:
        config = build_config(args)
    except ValidationError as e:
        return fail("router", explain(e))
    except ValueError as e:
        return fail("router", str(e))
    return asyncio.run(serve(config, args.host, args.metrics_port))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nitsum router")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
