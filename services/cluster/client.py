"""Async access to the mesh's Redis: tier queues, output streams, the in-flight ledger, cancellation,
registry, plan, leader.

Every service talks to Redis only through `ClusterClient`, so the schema in README.md is the
whole contract. Queue and output entries carry protobuf messages (field `m`); registry hashes
carry the typed records of `schema.py`.

Redis may restart under a running mesh (`nitsum up` keeps its data in an append-only file): every
command is retried with backoff for about `REDIS_OUTAGE_S` before its caller sees the error, and
callers waiting for a connection queue for one instead of failing (`BlockingConnectionPool`).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.rpc import pb

from .schema import ROUTER_GROUP, GroupRecord, Keys, PlanDoc, SlotRecord

OUTPUT_TTL_MS = 600_000  # an output stream nobody reads disappears after 10 minutes
CANCEL_TTL_MS = 600_000
REDIS_OUTAGE_S = 20.0  # how long a command keeps retrying while Redis is unreachable
MAX_CONNECTIONS = 512  # per client; past that, callers wait for a free connection
REDIS_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)  # Redis unreachable (not a bad command)

# Refresh the leader lock only if we still hold it.
_REFRESH_LEADER = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
# XADD unless the stream already holds `limit` entries: the check and the add in one step.
_ENQUEUE_IF_ROOM = """
local depth = redis.call('XLEN', KEYS[1])
if depth >= tonumber(ARGV[1]) then
  return {0, depth}
end
return {1, redis.call('XADD', KEYS[1], '*', 'm', ARGV[2])}
"""
# One output event, and the ledger kept in step with it unless the event is from an attempt older
# than the one on the ledger (a group that was only slow, writing after the router resumed it).
# KEYS: output stream, inflight, holders. ARGV: request id, event, ttl ms, attempt, final, next group.
_EMIT = """
redis.call('XADD', KEYS[1], '*', 'm', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
local held = redis.call('HGET', KEYS[3], ARGV[1])
if not held or tonumber(ARGV[4]) < tonumber(string.match(held, '^%d+')) then
  return 0
end
if ARGV[5] == '1' then
  redis.call('HDEL', KEYS[2], ARGV[1])
  redis.call('HDEL', KEYS[3], ARGV[1])
elseif ARGV[6] ~= '' then
  redis.call('HSET', KEYS[3], ARGV[1], ARGV[4] .. ' ' .. ARGV[6])
end
return 1
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
        self._emit: AsyncScript | None = None  # registered with the first emit
        retries = int(REDIS_OUTAGE_S / 0.5) + 4  # backoff 0.05, 0.1, 0.2, 0.4, then 0.5 s a try
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=MAX_CONNECTIONS, timeout=REDIS_OUTAGE_S, decode_responses=False,
            socket_timeout=None, socket_connect_timeout=2.0, health_check_interval=5,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries),
            retry_on_error=[RedisConnectionError, RedisTimeoutError, ConnectionResetError, OSError])
        self.redis: aioredis.Redis = aioredis.Redis(connection_pool=pool)

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

    async def enqueue_if_room(self, request: pb.QueuedRequest, limit: int) -> tuple[str | None, int]:
        """(entry id, 0) once queued; (None, depth) when the tier's stream already holds `limit`."""
        added, value = await self.redis.eval(_ENQUEUE_IF_ROOM, 1, self.keys.queue(request.tier), limit,
                                             request.SerializeToString())
        if added:
            return (value.decode() if isinstance(value, bytes) else str(value)), 0
        return None, int(value)

    async def queue_depth(self, tier: str) -> int:
        """Requests in the tier's stream: enqueued and neither dispatched nor shed yet."""
        return int(await self.redis.xlen(self.keys.queue(tier)))

    async def read_queues(self, consumer: str, tiers: list[str], count: int, block_ms: int) -> list[QueueEntry]:
        streams: Any = {self.keys.queue(t): ">" for t in tiers}
        try:
            reply: Any = await self.redis.xreadgroup(ROUTER_GROUP, consumer, streams, count=count, block=block_ms)
        except ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
            await self.ensure_queues(tiers)  # a Redis that restarted without its data
            return []
        return [e for key, items in (reply or []) for e in self._entries(key, items)]

    async def claim_stale(self, consumer: str, tier: str, min_idle_ms: int) -> list[QueueEntry]:
        """Take over entries another (dead) router read but never acked."""
        key = self.keys.queue(tier)
        out: list[QueueEntry] = []
        start = "0-0"
        while True:
            try:
                reply: Any = await self.redis.xautoclaim(key, ROUTER_GROUP, consumer, min_idle_time=min_idle_ms,
                                                         start_id=start, count=100)
            except ResponseError as e:
                if "NOGROUP" not in str(e):
                    raise
                return out
            out += self._entries(key, reply[1])
            start = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
            if start == "0-0":
                return out

    async def queued_entry_exists(self, tier: str, entry_id: str) -> bool:
        return bool(await self.redis.xrange(self.keys.queue(tier), entry_id, entry_id))

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
        """Append events to their requests' output streams, keeping the in-flight ledger in step:
        an event naming a next group makes it the request's holder; a last event (finish reason or
        error) takes the request off the ledger; an event of an older attempt changes nothing."""
        if not events:
            return
        if self._emit is None:
            self._emit = self.redis.register_script(_EMIT)
        async with self.redis.pipeline(transaction=False) as p:
            for request_id, event in events:
                final = event.finish_reason or event.error.kind != pb.ERROR_KIND_UNSPECIFIED
                keys = [self.keys.output(request_id), self.keys.inflight, self.keys.holders]
                args = [request_id, event.SerializeToString(), OUTPUT_TTL_MS, event.attempt, "1" if final else "0",
                        event.next_group]
                await self._emit(keys, args, client=p)
            await p.execute()

    async def read_output(self, request_id: str, last_id: str, block_ms: int) -> list[tuple[str, pb.TokenEvent]]:
        reply: Any = await self.read_outputs({request_id: last_id}, block_ms)
        return reply.get(request_id, [])

    async def read_outputs(self, last_ids: dict[str, str], block_ms: int | None,
                           count: int = 512) -> dict[str, list[tuple[str, pb.TokenEvent]]]:
        """New events of many requests' output streams in one read (request id -> [(entry id, event)])."""
        streams: Any = {self.keys.output(rid): last for rid, last in last_ids.items()}
        reply: Any = await self.redis.xread(streams, block=block_ms, count=count)
        cut = len(self.keys.output(""))
        out: dict[str, list[tuple[str, pb.TokenEvent]]] = {}
        for key, items in reply or []:
            rid = (key.decode() if isinstance(key, bytes) else key)[cut:]
            out[rid] = [(eid.decode(), pb.TokenEvent.FromString(data[b"m"])) for eid, data in items if b"m" in data]
        return out

    async def output_events(self, request_id: str) -> list[pb.TokenEvent]:
        """Every event of a request's output stream so far, in order."""
        items: Any = await self.redis.xrange(self.keys.output(request_id))
        return [pb.TokenEvent.FromString(data[b"m"]) for _, data in items if b"m" in data]

    async def wake(self, key: str) -> None:
        """Add an entry to a private stream, ending a blocked `read_outputs` that includes it."""
        async with self.redis.pipeline(transaction=False) as p:
            p.xadd(key, {"w": b"1"}, maxlen=16, approximate=True)
            p.pexpire(key, OUTPUT_TTL_MS)
            await p.execute()

    async def output_exists(self, request_id: str) -> bool:
        return bool(await self.redis.exists(self.keys.output(request_id)))

    # ---- the in-flight ledger (router/live/recovery.py) -----------------------------------------
    async def record_dispatch(self, request: pb.QueuedRequest, holder: str, entry: QueueEntry | None) -> None:
        """A request leaves the router for `holder`: it goes on the ledger (so whichever router leads
        can resume it if its holder dies) and, in the same transaction, off its tier stream."""
        rid = request.request_id
        async with self.redis.pipeline(transaction=True) as p:
            p.hset(self.keys.inflight, rid, request.SerializeToString())
            p.hset(self.keys.holders, rid, f"{request.attempt} {holder}")
            if entry is not None:
                key = self.keys.queue(entry.tier)
                p.xack(key, ROUTER_GROUP, entry.entry_id)
                p.xdel(key, entry.entry_id)
            await p.execute()

    async def set_holder(self, request_id: str, attempt: int, holder: str) -> None:
        await self.redis.hset(self.keys.holders, request_id, f"{attempt} {holder}")

    async def holders(self) -> dict[str, str]:
        """Request id -> the group (or slot, or "router") holding it, for every request on the ledger."""
        raw: Any = await self.redis.hgetall(self.keys.holders)
        return {k.decode(): v.decode().partition(" ")[2] for k, v in raw.items()}

    async def inflight_request(self, request_id: str) -> pb.QueuedRequest | None:
        raw: Any = await self.redis.hget(self.keys.inflight, request_id)
        return None if raw is None else pb.QueuedRequest.FromString(raw)

    async def inflight_ids(self) -> set[str]:
        raw: Any = await self.redis.hkeys(self.keys.inflight)
        return {k.decode() for k in raw}

    async def is_inflight(self, request_id: str) -> bool:
        return bool(await self.redis.hexists(self.keys.inflight, request_id))

    async def drop_inflight(self, request_id: str) -> None:
        async with self.redis.pipeline(transaction=True) as p:
            p.hdel(self.keys.inflight, request_id)
            p.hdel(self.keys.holders, request_id)
            await p.execute()

    async def drop_output(self, request_id: str) -> None:
        await self.redis.delete(self.keys.output(request_id))

    # ---- cancellation --------------------------------------------------------------------
    async def cancel(self, request_id: str) -> None:
        """Mark a request cancelled (for whoever picks it up later) and tell the running holders now."""
        await self.redis.set(self.keys.cancelled(request_id), b"1", px=CANCEL_TTL_MS)
        await self.redis.publish(self.keys.cancel_channel, request_id.encode())

    async def claim_prefill(self, request_id: str, attempt: int, group_id: str) -> bool:
        """True for the first prefill group to take this attempt of the request. A router that lost
        its lease mid-dispatch may see its entry dispatched again by the next leader; this keeps
        each attempt served once."""
        return bool(await self.redis.set(self.keys.prefill_claim(request_id, attempt), group_id.encode(), nx=True,
                                         px=CANCEL_TTL_MS))

    async def prefill_claimed(self, request_id: str, attempt: int) -> bool:
        return bool(await self.redis.exists(self.keys.prefill_claim(request_id, attempt)))

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

    async def restarts(self) -> dict[str, int]:
        """Process name -> times `nitsum up` restarted it (services/supervise.py)."""
        raw: Any = await self.redis.hgetall(self.keys.restarts)
        return {k.decode(): int(v) for k, v in raw.items()}

    # ---- plan ----------------------------------------------------------------------------
    async def set_plan(self, doc: PlanDoc) -> None:
        await self.redis.set(self.keys.plan, replace(doc, set_at=time.time()).encode())

    async def get_plan(self) -> PlanDoc | None:
        raw: Any = await self.redis.get(self.keys.plan)
        return None if raw is None else PlanDoc.decode(raw)

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
