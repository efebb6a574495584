"""Shared fixtures: a real redis-server on a free port and the tiny demo checkpoint."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from services.cluster.redis_server import RedisServer, start_redis_server


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = start_redis_server()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `tiny` preset, made once per session (skips when the engine is not importable)."""
    make_model = pytest.importorskip("services.engine.make_model").make_model
    out = tmp_path_factory.mktemp("models") / "tiny"
    make_model(preset="tiny", out=out, dtype="float32", seed=0)
    return out
