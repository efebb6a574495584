"""`nitsum prefill`: one slot of a prefill group (rank 0 leads the group and serves gRPC)."""

from __future__ import annotations

import argparse

from services.node.cli import add_arguments, run_node


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("prefill", help="run one slot of a prefill group")
    add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return run_node("prefill", args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nitsum prefill")
    add_arguments(parser)
    return run(parser.parse_args(argv))
