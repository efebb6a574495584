"""Async access to the mesh's Redis: tier queues, output streams, cancellation, registry, plan, leader.

Every service talks to Redis only through `ClusterClient`, so the schema in README.md is the
whole contract. Queue and output entries carry protobuf messages (field `m`); registry hashes
carry the typed records of `schema.py`.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from services.rpc import pb

from .schema import ROUTER_GROUP, GroupRecord, Keys, SlotRecord

OUTPUT_TTL_MS = 600_000  # an output stream nobody reads disappears after 10 minutes
CANCEL_TTL_MS = 600_000

# Refresh the leader lock only if we still hold it.
_REFRESH_LEADER = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE_LEADER = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


@dataclass(frozen=True)
class QueueEntry:
    """A request read from a tier stream; ack it once dispatched or shed."""

    tier: str
    entry_id: str
    request: pb.QueuedRequest


class ClusterClient:
    def __init__(self, url: str, prefix: str = "nitsum:") -> None:
        self.url = url
        self.keys = Keys(prefix)
        # No client-side socket_timeout: with one, redis-py wraps every send in asyncio.wait_for,
        # which on Python 3.11 can swallow a task's cancellation and hang shutdown (fixed in 3.12).
        # Blocking reads here carry their own server-side BLOCK timeouts instead.
        self.redis: aioredis.Redis = aioredis.Redis.from_url(url, decode_responses=False, socket_timeout=None,
                                                             socket_connect_timeout=5.0)

    async def close(self) -> None:
        await self.redis.aclose()

    async def ping(self) -> bool:
        return bool(await self.redis.ping())

    # ---- tier queues -------------------------------------------------------------------
    async def ensure_queues(self, tiers: list[str]) -> None:
        for tier in tiers:
            try:
                await self.redis.xgroup_create(self.keys.queue(tier), ROUTER_GROUP, id="0", mkstream=True)
            except ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise

    async def enqueue(self, request: pb.QueuedRequest) -> str:
        entry_id: Any = await self.redis.xadd(self.keys.queue(request.tier), {"m": request.SerializeToString()})
        return entry_id.decode()

    async def queue_depth(self, tier: str) -> int:
        """Requests in the tier's stream: enqueued and neither dispatched nor shed yet."""
        return int(await self.redis.xlen(self.keys.queue(tier)))

    async def read_queues(self, consumer: str, tiers: list[str], count: int, block_ms: int) -> list[QueueEntry]:
        streams: Any = {self.keys.queue(t): ">" for t in tiers}
        reply: Any = await self.redis.xreadgroup(ROUTER_GROUP, consumer, streams, count=count, block=block_ms)
        return [e for key, items in (reply or []) for e in self._entries(key, items)]

    async def claim_stale(self, consumer: str, tier: str, min_idle_ms: int) -> list[QueueEntry]:
        """Take over entries another (dead) router read but never acked."""
        key = self.keys.queue(tier)
        reply: Any = await self.redis.xautoclaim(key, ROUTER_GROUP, consumer, min_idle_time=min_idle_ms, count=100)
        return list(self._entries(key, reply[1]))

    async def ack(self, entry: QueueEntry) -> None:
        key = self.keys.queue(entry.tier)
        async with self.redis.pipeline(transaction=True) as p:
            p.xack(key, ROUTER_GROUP, entry.entry_id)
            p.xdel(key, entry.entry_id)
            await p.execute()

    def _entries(self, key: bytes | str, items: list[Any]) -> list[QueueEntry]:
        key_s = key.decode() if isinstance(key, bytes) else key
        tier = key_s[len(self.keys.queue("")):]
        out = []
        for entry_id, data in items:
            if not data:  # deleted while pending
                continue
            out.append(QueueEntry(tier, entry_id.decode(), pb.QueuedRequest.FromString(data[b"m"])))
        return out

    # ---- per-request output streams ------------------------------------------------------
    async def emit(self, request_id: str, event: pb.TokenEvent) -> None:
        await self.emit_many([(request_id, event)])

    async def emit_many(self, events: list[tuple[str, pb.TokenEvent]]) -> None:
        if not events:
            return
        async with self.redis.pipeline(transaction=False) as p:
            for request_id, event in events:
                key = self.keys.output(request_id)
                p.xadd(key, {"m": event.SerializeToString()})
                p.pexpire(key, OUTPUT_TTL_MS)
            await p.execute()

    async def read_output(self, request_id: str, last_id: str, block_ms: int) -> list[tuple[str, pb.TokenEvent]]:
        reply: Any = await self.redis.xread({self.keys.output(request_id): last_id}, block=block_ms)
        return [
            (eid.decode(), pb.TokenEvent.FromString(data[b"m"])) for _, items in (reply or []) for eid, data in items
        ]

    async def drop_output(self, request_id: str) -> None:
        await self.redis.delete(self.keys.output(request_id))

    # ---- cancellation --------------------------------------------------------------------
    async def cancel(self, request_id: str) -> None:
        """Mark a request cancelled (for whoever picks it up later) and tell the running holders now."""
        await self.redis.set(self.keys.cancelled(request_id), b"1", px=CANCEL_TTL_MS)
        await self.redis.publish(self.keys.cancel_channel, request_id.encode())

    async def claim_prefill(self, request_id: str, group_id: str) -> bool:
        """True for the first prefill group to take this request. A router that died mid-dispatch
        leaves its entry to be claimed and dispatched again; this keeps the request served once."""
        return bool(await self.redis.set(self.keys.prefill_claim(request_id), group_id.encode(), nx=True,
                                         px=CANCEL_TTL_MS))

    async def is_cancelled(self, request_id: str) -> bool:
        return bool(await self.redis.exists(self.keys.cancelled(request_id)))

    async def cancellations(self) -> AsyncIterator[str]:
        """Request ids as they are cancelled (live only; check `is_cancelled` for earlier ones)."""
        pubsub = self.redis.pubsub()
        await pubsub.subscribe(self.keys.cancel_channel)
        try:
            async for message in pubsub.listen():
                if message.get("type") == "message":
                    yield message["data"].decode()
        finally:
            await pubsub.aclose()

    # ---- registry: slots and groups with leases -----------------------------------------
    async def heartbeat_group(self, group: GroupRecord, lease_ms: int) -> None:
        await self._put_leased(self.keys.group(group.group_id), self.keys.groups, group.group_id, group.encode(), lease_ms)

    async def heartbeat_slot(self, slot: SlotRecord, lease_ms: int) -> None:
        await self._put_leased(self.keys.slot(slot.slot_id), self.keys.slots, slot.slot_id, slot.encode(), lease_ms)

    async def _put_leased(self, key: str, index: str, member: str, mapping: dict[str, str], lease_ms: int) -> None:
        async with self.redis.pipeline(transaction=True) as p:
            p.hset(key, mapping=mapping)  # type: ignore[arg-type]
            p.pexpire(key, lease_ms)
            p.sadd(index, member)
            await p.execute()

    async def unregister_group(self, group_id: str) -> None:
        await self.redis.delete(self.keys.group(group_id))
        await self.redis.srem(self.keys.groups, group_id)

    async def unregister_slot(self, slot_id: str) -> None:
        await self.redis.delete(self.keys.slot(slot_id))
        await self.redis.srem(self.keys.slots, slot_id)

    async def groups(self) -> list[GroupRecord]:
        """Groups whose lease is live; members whose hash expired are dropped from the index."""
        raw = await self._live(self.keys.groups, self.keys.group)
        return [GroupRecord.decode(r) for r in raw]

    async def slots(self) -> list[SlotRecord]:
        raw = await self._live(self.keys.slots, self.keys.slot)
        return [SlotRecord.decode(r) for r in raw]

    async def _live(self, index: str, key_of: Any) -> list[dict[str, str]]:
        raw_members: Any = await self.redis.smembers(index)
        members = sorted(m.decode() for m in raw_members)
        if not members:
            return []
        async with self.redis.pipeline(transaction=False) as p:
            for m in members:
                p.hgetall(key_of(m))
            replies = await p.execute()
        live, dead = [], []
        for member, reply in zip(members, replies, strict=True):
            if reply:
                live.append({k.decode(): v.decode() for k, v in reply.items()})
            else:
                dead.append(member)
        if dead:
            await self.redis.srem(index, *dead)
        return live

    # ---- plan ----------------------------------------------------------------------------
    async def set_plan(self, epoch: int, plan: dict[str, Any]) -> None:
        await self.redis.set(self.keys.plan, json.dumps({"epoch": epoch, "plan": plan, "set_at": time.time()}))

    async def get_plan(self) -> tuple[int, dict[str, Any]] | None:
        raw: Any = await self.redis.get(self.keys.plan)
        if raw is None:
            return None
        doc = json.loads(raw)
        return int(doc["epoch"]), doc["plan"]

    # ---- router leader lock --------------------------------------------------------------
    async def hold_leader(self, router_id: str, ttl_ms: int) -> bool:
        """Take the leader lock if free, or refresh it if ours; True while we lead."""
        if await self.redis.set(self.keys.leader, router_id.encode(), nx=True, px=ttl_ms):
            return True
        return bool(await self.redis.eval(_REFRESH_LEADER, 1, self.keys.leader, router_id, ttl_ms))

    async def release_leader(self, router_id: str) -> None:
        await self.redis.eval(_RELEASE_LEADER, 1, self.keys.leader, router_id)

    async def leader(self) -> str | None:
        raw: Any = await self.redis.get(self.keys.leader)
        return raw.decode() if raw else None
