"""What the deploy tests share: the compose file read with .env.example's values, and the real
`nitsum` argument parser's subcommands."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML reads the compose and Prometheus files (test extra)")

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
NITSUM_IMAGE_ENTRYPOINT = ["nitsum"]
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def env_example() -> dict[str, str]:
    """.env.example as Compose reads it: a value may name a variable set above it (${VAR})."""
    env: dict[str, str] = {}
    for line in (DEPLOY / ".env.example").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f".env.example: {line!r} is not KEY=VALUE"
            env[key] = interpolate(value, env)
    return env


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error}, applied to every string in `value`."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2) or "", m.group(3) or ""
        if env.get(name, "") != "" or (name in env and ":" not in op):
            return env[name]
        if op.endswith("?"):
            raise AssertionError(f"compose needs {name} (its message: {arg}); .env.example must set it")
        return arg

    return _VAR.sub(one, value)


def load_compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


@pytest.fixture(scope="session")
def compose() -> dict[str, Any]:
    """docker-compose.yml with .env.example's values filled in."""
    return interpolate(load_compose(), env_example())


def nitsum_subcommands() -> dict[str, argparse.ArgumentParser]:
    """The subcommands of the real `nitsum` parser (services.cli.build_parser)."""
    from services.cli import build_parser

    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def nitsum_services(compose: dict[str, Any]) -> dict[str, list[str]]:
    """Compose services that run the Nitsum image -> their `nitsum` argv (subcommand first)."""
    return {name: list(svc["command"]) for name, svc in compose["services"].items()
            if svc.get("entrypoint") == NITSUM_IMAGE_ENTRYPOINT}


def option_value(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


def has_option(parser: argparse.ArgumentParser, flag: str) -> bool:
    return any(flag in a.option_strings for a in parser._actions)


def python_m(subcommand: str) -> list[str]:
    """argv prefix that runs `nitsum SUBCOMMAND` in this checkout: through services.cli when the
    lead has wired the subcommand there, else through the module's own entry point."""
    if subcommand in nitsum_subcommands():
        return [sys.executable, "-m", "services.cli", subcommand]
    fallback = {"up": ["services.up_cli"], "bench": ["bench.replay_cli", "bench"]}
    return [sys.executable, "-m", *fallback[subcommand]]
