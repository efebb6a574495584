"""The `nitsum` command: one entry point, a subcommand per service or tool.

Each package contributes its subcommands through a `register(subparsers)` function; every
subcommand's `func(args) -> int` is the exit code. Errors the user can fix print one line and
exit 2; nothing prints a stack trace for those. This module and the launcher are the composition
root: the only modules of `services` that wire in the router, the roles and the benchmarks
(tests/test_architecture.py). A `register` only declares arguments; heavy imports happen inside
the commands.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

import bench.replay_cli
import decode_node.cli
import prefill_node.cli
import router.cli
import router.live.plan_cli
import router.live.service_cli
import services.gateway.cli
import services.node.slot_cli
import services.up_cli
from services.engine import cli as engine_cli
from services.gguf import cli as gguf_cli

# Modules that contribute subcommands, in the order `nitsum --help` lists them.
COMMAND_MODULES = (services.up_cli, services.gateway.cli, router.live.service_cli, prefill_node.cli,
                   decode_node.cli, services.node.slot_cli, router.cli, bench.replay_cli)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nitsum", description="Nitsum: SLO-tiered LLM serving with adaptive TP.")
    parser.add_argument("--log-level", default=os.environ.get("NITSUM_LOG_LEVEL", "WARNING"),
                        help="DEBUG, INFO, WARNING (default) or ERROR")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    engine_cli.register(sub)
    gguf_cli.register(sub)
    for module in COMMAND_MODULES:
        module.register(sub)
    plan = sub.add_parser("plan", help="inspect, explain and apply plans (slots cut into TP groups with roles)")
    plan_sub = plan.add_subparsers(dest="plan_command", metavar="PLAN_COMMAND")
    router.cli.register_plan(plan_sub)
    router.live.plan_cli.register(plan_sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except engine_cli.USER_ERRORS as e:
        print(f"nitsum: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
