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
    p.add_argument("--autopilot", choices=("on", "off"), default="on",
                   help="re-plan the cluster on its own from the live load (docs/adaptive-tp.md; default on; "
                        "needs --model or --profile, and the orchestrator)")
    p.add_argument("--autopilot-interval", type=float, default=5.0, help="seconds between the autopilot's decisions")
    p.add_argument("--autopilot-hold", type=float, default=30.0,
                   help="seconds a plan is kept at least (after a change, and after start)")
    p.add_argument("--autopilot-margin", type=float, default=0.05,
                   help="a new plan must beat the current one's predicted score by this share")
    p.add_argument("--autopilot-max-moves", type=int, default=20, help="at most this many plan changes an hour")
    p.add_argument("--autopilot-window", type=float, default=60.0,
                   help="seconds of arrivals and completions the workload estimate covers")
    p.add_argument("--autopilot-correct", choices=("on", "off"), default="on",
                   help="on: refit the perf model to the groups' measured steps and widen the hysteresis by the "
                        "model's error on the current plan; off: trust --profile as given")
    p.add_argument("--model", default=None,
                   help="the checkpoint the slots serve (its config.json shapes the autopilot's perf model and "
                        "the TP degrees it may choose)")
    p.add_argument("--profile", default=None,
                   help="`nitsum profile` output for this host: the autopilot's perf model (else the built-in "
                        "roofline, corrected online from the groups' measured steps)")


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
                admin_key: str = "", orchestrate: bool = True, plan: Any = None, autopilot: Any = None) -> int:
    """`autopilot`: (AutopilotSettings, Profile | None, model dir | None), or None for no plan loop."""
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
    pilot = None
    if orchestrate and autopilot is not None:
        from router.live.autopilot import Autopilot
        from services.engine.tp import supported_tps

        settings, profile, model_dir = autopilot
        tps = supported_tps(model_dir) if model_dir is not None and (model_dir / "config.json").is_file() else None
        pilot = Autopilot(settings, router, orchestrator, cluster, config.policy.tiers, router.metrics, profile,
                          model_dir, tps)
        tasks.spawn(pilot.run(stop), name="autopilot")
    if admin_port:
        tasks.spawn(_serve_admin(orchestrator, router, host, admin_port, admin_key, stop, pilot), name="admin")
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


async def _serve_admin(orchestrator: Any, router: Any, host: str, port: int, key: str, stop: asyncio.Event,
                       pilot: Any = None) -> None:
    """Serve the admin API while this router leads: routers standing by share the port and take it
    over with the lead (a router that loses the lead gives the port up)."""
    import uvicorn

    from router.live.admin import build_app

    app = build_app(orchestrator, router.metrics, key, lambda: router.leading, pilot)
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
        autopilot = _autopilot(args)
    except ValidationError as e:
        return fail("router", explain(e))
    except (ValueError, OSError) as e:
        return fail("router", str(e))
    return asyncio.run(serve(config, args.host, args.metrics_port, args.admin_port, args.admin_key,
                             not args.no_orchestrate, plan, autopilot))


def _autopilot(args: argparse.Namespace) -> Any:
    """The plan loop's settings, the host profile and the model directory (one-line errors)."""
    from pathlib import Path

    from router.live.autopilot import AutopilotSettings
    from router.profile import Profile

    if args.autopilot_interval < 0.5:
        raise ValueError(f"--autopilot-interval {args.autopilot_interval}: give 0.5 seconds or more")
    if args.autopilot_window <= 0:
        raise ValueError(f"--autopilot-window {args.autopilot_window}: give more than 0 seconds")
    if args.autopilot_max_moves < 0:
        raise ValueError(f"--autopilot-max-moves {args.autopilot_max_moves}: give 0 or more")
    settings = AutopilotSettings(enabled=args.autopilot == "on", interval_s=args.autopilot_interval,
                                 min_hold_s=args.autopilot_hold, margin=args.autopilot_margin,
                                 max_moves_per_hour=args.autopilot_max_moves, window_s=args.autopilot_window,
                                 correct=args.autopilot_correct == "on")
    profile = None
    if args.profile:
        try:
            profile = Profile.from_json(Path(args.profile).read_text())
        except FileNotFoundError:
            raise ValueError(f"--profile {args.profile}: no such file (make one with `nitsum profile`)") from None
    model = Path(args.model) if args.model else None
    if model is not None and not (model / "config.json").is_file():
        raise ValueError(f"--model {args.model}: no config.json there (give the checkpoint directory the slots serve)")
    return settings, profile, model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nitsum router")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
