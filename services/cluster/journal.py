"""The autopilot's journal in Redis, through a ClusterClient's connection: what the gateways
observed of each request (a capped stream; services/gateway/observed.py writes it,
router/live/autopilot.py reads it) and the autopilot's decisions (a capped list, so a new leading
router keeps the history). Schema: services/cluster/README.md."""

from __future__ import annotations

import json
from typing import Any

from .client import ClusterClient

OBSERVED_MAXLEN = 50_000  # gateway observations kept for the autopilot (about the last hour at 14 req/s)
DECISIONS_KEPT = 500  # autopilot decisions kept in Redis


async def add_observations(cluster: ClusterClient, docs: list[dict[str, Any]]) -> None:
    """Append the gateway's observations of requests (JSON objects) to the capped stream."""
    if not docs:
        return
    async with cluster.redis.pipeline(transaction=False) as p:
        for doc in docs:
            p.xadd(cluster.keys.observed, {"j": json.dumps(doc, separators=(",", ":"))}, maxlen=OBSERVED_MAXLEN,
                   approximate=True)
        await p.execute()

async def read_observations(cluster: ClusterClient, last_id: str, count: int = 5000) -> tuple[str, list[dict[str, Any]]]:
    """Observations after `last_id` ("$" for only new ones: answers the stream's last id and none),
    oldest first, at most `count`; the id to pass next time."""
    if last_id == "$":
        items: Any = await cluster.redis.xrevrange(cluster.keys.observed, count=1)
        return (items[0][0].decode() if items else "0-0"), []
    reply: Any = await cluster.redis.xread({cluster.keys.observed: last_id}, count=count)
    out: list[dict[str, Any]] = []
    for _, entries in reply or []:
        for eid, data in entries:
            last_id = eid.decode()
            try:
                out.append(json.loads(data[b"j"]))
            except (KeyError, ValueError):
                continue  # not ours: skipped, not fatal
    return last_id, out

async def push_decision(cluster: ClusterClient, doc: dict[str, Any]) -> None:
    async with cluster.redis.pipeline(transaction=False) as p:
        p.lpush(cluster.keys.decisions, json.dumps(doc, separators=(",", ":")))
        p.ltrim(cluster.keys.decisions, 0, DECISIONS_KEPT - 1)
        await p.execute()

async def decisions(cluster: ClusterClient, limit: int = DECISIONS_KEPT) -> list[dict[str, Any]]:
    """The autopilot's last decisions, oldest first."""
    raw: Any = await cluster.redis.lrange(cluster.keys.decisions, 0, max(0, limit - 1))
    return [json.loads(r) for r in reversed(raw)]
