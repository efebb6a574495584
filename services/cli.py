"""The `nitsum` command: one entry point, a subcommand per service or tool.

Each package contributes its subcommands through a `register(subparsers)` function; every
subcommand's `func(args) -> int` is the exit code. Errors the user can fix print one line and
exit 2; nothing prints a stack trace for those.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from services.engine import cli as engine_cli

# Modules that contribute subcommands, in the order `nitsum --help` lists them. Each is imported
# lazily-cheap: a register() only declares arguments; heavy imports happen inside the commands.
COMMAND_MODULES = (
    "services.launch",  # up
    "services.gateway.cli",  # gateway
    "router.service_cli",  # router
    "prefill_node.cli",  # prefill
    "decode_node.cli",  # decode
    "services.node.slot_cli",  # slot
    "router.cli",  # sim, profile
    "services.replay_cli",  # bench replay
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nitsum", description="Nitsum: SLO-tiered LLM serving with adaptive TP.")
    parser.add_argument("--log-level", default=os.environ.get("NITSUM_LOG_LEVEL", "WARNING"),
                        help="DEBUG, INFO, WARNING (default) or ERROR")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    engine_cli.register(sub)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    plan = sub.add_parser("plan", help="inspect, explain and apply plans (slots cut into TP groups with roles)")
    plan_sub = plan.add_subparsers(dest="plan_command", metavar="PLAN_COMMAND")
    importlib.import_module("router.cli").register_plan(plan_sub)
    importlib.import_module("router.plan_cli").register(plan_sub)
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
