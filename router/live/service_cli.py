"""`nitsum router`: the live router-coordinator as its own process."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
from typing import Any

from pydantic import ValidationError

from services.cliutil import explain, fail, setup_logging
from services.config import RedisSettings, RouterConfig, TierPolicy

log = logging.getLogger("nitsum.router")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis-url", required=True)
    p.add_argument("--redis-prefix", default="nitsum:")
    p.add_argument("--tiers", default=None, help="tiers file (JSON or .toml), the same one the gateway reads")
    p.add_argument("--router-id", default=None, help="consumer name in the tier streams (default: host-pid)")
    p.add_argument("--claim-idle-ms", type=int, default=5000,
                   help="take over entries another router left pending this long")
    p.add_argument("--host", default="127.0.0.1", help="address the /metrics server binds")
    p.add_argument("--metrics-port", type=int, default=0, help="serve /metrics on this port (0: off)")
    p.add_argument("--admin-port", type=int, default=0,
                   help="serve the admin API (/admin/plan, and /metrics) on this port (0: off)")
    p.add_argument("--admin-key", default=os.environ.get("NITSUM_ADMIN_KEY", ""),
                   help="key the admin API requires (default: $NITSUM_ADMIN_KEY; empty: admin calls refused)")
    p.add_argument("--plan", default=None,
                   help="initial plan for the slots, e.g. p2,p2,d4 (used when Redis holds none yet; a plan "
                        "applied at runtime survives a router restart)")
    p.add_argument("--slots", type=int, default=None, help="slots in the cluster (default: what --plan uses)")
    p.add_argument("--schedule", choices=("tier", "fcfs"), default="tier",
                   help="tier: deadline order across tiers, room kept for the higher tiers; fcfs: arrival order "
                        "(the baseline; run the slots with the same --schedule)")
    p.add_argument("--no-orchestrate", action="store_true",
                   help="do not apply the plan stored in Redis to the slots (static prefill/decode groups only)")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("router", help="run the router: tier queues -> prefill/decode groups")
    add_arguments(p)
    p.set_defaults(func=run)


def build_config(args: argparse.Namespace) -> RouterConfig:
    return RouterConfig(router_id=args.router_id or f"{socket.gethostname()}-{os.getpid()}",
                        redis=RedisSettings(url=args.redis_url, prefix=args.redis_prefix),
                        policy=TierPolicy.load(args.tiers), claim_idle_ms=args.claim_idle_ms,
                        schedule=args.schedule)


async def serve(config: RouterConfig, host: str = "127.0.0.1", metrics_port: int = 0, admin_port: int = 0,
                admin_key: str = "", orchestrate: bool = True, plan: Any = None) -> int:
    from router.live.service import Router
    from router.reconfig.orchestrator import Orchestrator
    from services.cluster import ClusterClient
    from services.tasks import TaskSet

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    cluster = ClusterClient(config.redis.url, config.redis.prefix)
    router = Router(config, cluster)
    orchestrator = Orchestrator(cluster, router, channels=router.channels)
    orchestrator.on_report.append(router.metrics.observe_reconfig)
    tasks = TaskSet("router-main")
    if metrics_port:
        from prometheus_client import start_http_server

        start_http_server(metrics_port, host, registry=router.metrics.registry)
    if admin_port:
        tasks.spawn(_serve_admin(orchestrator, router, host, admin_port, admin_key, stop), name="admin")
    if orchestrate:
        tasks.spawn(_bootstrap(orchestrator, router, stop, plan), name="bootstrap")
    try:
        await router.run(stop)
    finally:
        await tasks.cancel_all()
        await orchestrator.close()
        await cluster.close()
    return 0


async def _bootstrap(orchestrator: Any, router: Any, stop: asyncio.Event, initial: Any = None) -> None:
    """Once this router leads: store `initial` as the plan if Redis holds none, then bring the
    slots to the stored plan (retrying on failure)."""
    if initial is not None and await orchestrator.cluster.get_plan() is None:
        await orchestrator.store_initial(initial)
    while not stop.is_set():
        if not router.leading:
            await asyncio.sleep(0.1)
            continue
        try:
            report = await orchestrator.bootstrap()
        except Exception:
            log.exception("could not bring the slots to the stored plan; retrying")
            await asyncio.sleep(2.0)
            continue
        if report is None or report.result != "failed":
            router.metrics.plan_epoch.set(orchestrator.epoch)  # also when it adopted a serving plan
            break
        await asyncio.sleep(2.0)
    while not stop.is_set():  # then watch for slots that die while serving, and for their return
        await asyncio.sleep(1.0)
        if router.leading:
            try:
                await orchestrator.heal()
            except Exception:
                log.exception("could not re-plan around a lost slot; retrying")


async def _serve_admin(orchestrator: Any, router: Any, host: str, port: int, key: str, stop: asyncio.Event) -> None:
    """Serve the admin API while this router leads: routers standing by share the port and take it
    over with the lead (a router that loses the lead gives the port up)."""
    import uvicorn

    from router.live.admin import build_app

    app = build_app(orchestrator, router.metrics, key, lambda: router.leading)
    while not stop.is_set():
        if not router.leading:
            await asyncio.sleep(0.1)
            continue
        try:
            sock = socket.create_server((host, port), reuse_port=False)
        except OSError as e:  # the last leader still holds it, for a moment: try again
            log.info("admin port %d not free yet (%s); retrying", port, e)
            await asyncio.sleep(0.5)
            continue
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]  # the router owns SIGTERM/SIGINT
        serving = asyncio.ensure_future(server.serve(sockets=[sock]))
        while router.leading and not stop.is_set() and not serving.done():
            await asyncio.sleep(0.1)
        server.should_exit = True
        await asyncio.wait([serving], timeout=5.0)
        sock.close()


def run(args: argparse.Namespace) -> int:
    setup_logging()
    try:
        config = build_config(args)
        plan = None
        if args.plan:
            from router.decide.plans import parse_plan

            plan = parse_plan(args.plan, slots=args.slots)
    except ValidationError as e:
        return fail("router", explain(e))
    except ValueError as e:
        return fail("router", str(e))
    return asyncio.run(serve(config, args.host, args.metrics_port, args.admin_port, args.admin_key,
                             not args.no_orchestrate, plan))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nitsum router")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
