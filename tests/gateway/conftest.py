"""A gateway app on a real redis-server, with the test standing in for the rest of the mesh."""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from services.cluster import ClusterClient, GroupRecord
from services.cluster.redis_server import RedisServer
from services.config import GatewayConfig, RedisSettings, TierPolicy
from services.gateway.app import create_app
from services.gateway.codec import load_codec
from services.rpc import pb


@dataclass
class Mesh:
    """The test's side of Redis: register groups, see queued requests, answer them."""

    url: str
    prefix: str
    answers: list[int] = field(default_factory=list)  # token ids each request gets back

    def run(self, coro_fn: Callable[[ClusterClient], object]) -> object:
        async def body() -> object:
            c = ClusterClient(self.url, self.prefix)
            try:
                return await coro_fn(c)  # type: ignore[misc]
            finally:
                await c.close()
        return asyncio.run(body())

    def ready(self, max_model_len: int = 512) -> None:
        """A prefill and a decode group registered, and a router leading (the gateway needs all three)."""
        async def reg(c: ClusterClient) -> None:
            for gid, role in (("p0", "prefill"), ("d0", "decode")):
                await c.heartbeat_group(GroupRecord(gid, role, 1, 0, "127.0.0.1:1", max_model_len=max_model_len),
                                        lease_ms=60_000)
            await c.hold_leader("test-router", 60_000)
        self.run(reg)

    def queued(self, tier: str) -> list[pb.QueuedRequest]:
        async def read(c: ClusterClient) -> list[pb.QueuedRequest]:
            items = await c.redis.xrange(c.keys.queue(tier))
            return [pb.QueuedRequest.FromString(d[b"m"]) for _, d in items]
        return self.run(read)  # type: ignore[return-value]


class Responder:
    """Acts as router + groups: answers every queued request with `tokens`, one event per token."""

    def __init__(self, mesh: Mesh, tiers: tuple[str, ...], tokens: list[int], finish: str = "length") -> None:
        self.mesh, self.tiers, self.tokens, self.finish = mesh, list(tiers), tokens, finish
        self.seen: list[pb.QueuedRequest] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._loop()), daemon=True)

    async def _loop(self) -> None:
        c = ClusterClient(self.mesh.url, self.mesh.prefix)
        await c.ensure_queues(self.tiers)
        while not self._stop.is_set():
            for e in await c.read_queues("test", self.tiers, 10, 50):
                self.seen.append(e.request)
                await c.ack(e)
                for i, t in enumerate(self.tokens):
                    last = i == len(self.tokens) - 1
                    await c.emit(e.request.request_id, pb.TokenEvent(token_ids=[t], index=i,
                                                                     finish_reason=self.finish if last else ""))
        await c.close()

    def __enter__(self) -> Responder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


KEYS_DOC = {"api_keys": {"sk-batch": {"tiers": ["batch"]},
                         "sk-all": {"tiers": ["interactive", "standard", "batch"], "default_tier": "interactive"}}}


@pytest.fixture
def keys_doc() -> dict:
    return KEYS_DOC


@pytest.fixture
def responder() -> type[Responder]:
    return Responder


@pytest.fixture(scope="session")
def codec(tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    return load_codec(tiny_model_dir)


@pytest.fixture
def make_gateway(redis_server: RedisServer, tiny_model_dir: Path, codec, tmp_path: Path):  # type: ignore[no-untyped-def]
    clients: list[TestClient] = []

    def make(tiers_doc: dict | None = None, **overrides: object) -> tuple[TestClient, Mesh]:
        prefix = f"gw{uuid.uuid4().hex[:8]}:"
        policy = TierPolicy()
        if tiers_doc is not None:
            path = tmp_path / f"{prefix[:-1]}.json"
            path.write_text(json.dumps(tiers_doc))
            policy = TierPolicy.load(path)
        config = GatewayConfig(model=tiny_model_dir, model_name="tiny", redis=RedisSettings(url=redis_server.url,
                               prefix=prefix), policy=policy, readiness_cache_s=0, **overrides)
        client = TestClient(create_app(config, codec))
        client.__enter__()
        clients.append(client)
        return client, Mesh(redis_server.url, prefix)

    yield make
    for c in clients:
        c.__exit__(None, None, None)


@pytest.fixture
def gateway(make_gateway) -> Iterator[tuple[TestClient, Mesh]]:  # type: ignore[no-untyped-def]
    yield make_gateway()
