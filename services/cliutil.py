"""Small helpers the service subcommands share: one-line CLI errors and pydantic messages."""

from __future__ import annotations

import logging
import os
import sys

from pydantic import ValidationError


class CliError(Exception):
    """A user-facing start-up error: printed as one line, exit status 2."""


def explain(e: ValidationError) -> str:
    first = e.errors()[0]
    where = ".".join(str(x) for x in first["loc"])
    msg = str(first["msg"]).removeprefix("Value error, ")
    return f"{where}: {msg}" if where else msg


def fail(prog: str, message: str) -> int:
    print(f"nitsum {prog}: error: {message}", file=sys.stderr)
    return 2


def setup_logging() -> None:
    logging.basicConfig(level=os.environ.get("NITSUM_LOG_LEVEL", "WARNING"),
                        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
