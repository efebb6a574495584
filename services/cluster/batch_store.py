"""The Files and Batch API's state in Redis: files, batches, each batch's results and the request
in flight for each of its lines, and the lease of the gateway that runs it.

It talks over a `ClusterClient`'s connection (same retries through a Redis restart) and follows
the schema in README.md. What makes a batch survive its gateway: every write a batch's runner makes
is fenced by its lease (a runner that lost it changes nothing), a line's result is written once
(the first answer for a line index wins, so a line run twice counts once), and the counts the API
shows are the sizes of the two result hashes, never a counter kept beside them.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, fields
from typing import Any

from services.rpc import pb

from .client import ClusterClient

FINAL_STATUSES = ("completed", "failed", "expired", "cancelled")

# HSET fields of a batch if its status is one of ARGV[2] (space-separated) and, when ARGV[1] is not
# empty, the lease is held by ARGV[1]; a final status also takes it off the active set.
# KEYS: batch, lease, active set. ARGV: token, allowed statuses, batch id, final ("1"/"0"), field, value, ...
_TRANSITION = """
if ARGV[1] ~= '' and redis.call('GET', KEYS[2]) ~= ARGV[1] then
  return {0, 'lease lost'}
end
local status = redis.call('HGET', KEYS[1], 'status')
if not status then
  return {0, 'gone'}
end
local allowed = false
for s in string.gmatch(ARGV[2], '%S+') do
  if s == status then allowed = true end
end
if not allowed then
  return {0, status}
end
for i = 5, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
if ARGV[4] == '1' then
  redis.call('SREM', KEYS[3], ARGV[3])
end
return {1, status}
"""
# A line's result, once: -1 lease lost, 0 already recorded, 1 recorded.
# KEYS: lease, out, err, running, batch. ARGV: token, index, "out"|"err", line, prompt tokens, completion tokens.
_RECORD = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return -1
end
redis.call('HDEL', KEYS[4], ARGV[2])
if redis.call('HEXISTS', KEYS[2], ARGV[2]) == 1 or redis.call('HEXISTS', KEYS[3], ARGV[2]) == 1 then
  return 0
end
redis.call('HSET', ARGV[3] == 'out' and KEYS[2] or KEYS[3], ARGV[2], ARGV[4])
redis.call('HINCRBY', KEYS[5], 'input_tokens', ARGV[5])
redis.call('HINCRBY', KEYS[5], 'output_tokens', ARGV[6])
return 1
"""
_HOLD_LEASE = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if holder then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""
_RELEASE_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def _encode(record: Any) -> dict[str, str]:
    return {k: str(v) for k, v in asdict(record).items()}


def _decode(cls: type, raw: dict[bytes, bytes]) -> Any:
    text = {k.decode(): v.decode() for k, v in raw.items()}
    return cls(**{f.name: int(text[f.name]) if f.type == "int" else text[f.name]
                  for f in fields(cls) if f.name in text})


@dataclass(frozen=True)
class FileRecord:
    file_id: str
    owner: str  # who may see it: a digest of the API key that uploaded it
    filename: str
    purpose: str  # "batch" (uploaded) or "batch_output" (a batch's output or error file)
    bytes: int
    created_at: int
    lines: int = 0


@dataclass(frozen=True)
class BatchRecord:
    """A batch as stored; 0 is an unset time, "" an unset file id. `completed` and `failed` are
    not stored: they are the sizes of the batch's result hashes."""

    batch_id: str
    owner: str
    endpoint: str
    input_file_id: str
    completion_window: str
    tier: str
    status: str
    created_at: int
    expires_at: int
    metadata: str = "{}"  # JSON object
    errors: str = ""  # JSON list of {code, message, param, line} when the batch failed
    model: str = ""
    total: int = 0
    output_file_id: str = ""
    error_file_id: str = ""
    in_progress_at: int = 0
    finalizing_at: int = 0
    completed_at: int = 0
    failed_at: int = 0
    expired_at: int = 0
    cancelling_at: int = 0
    cancelled_at: int = 0
    input_tokens: int = 0
    output_tokens: int = 0


@dataclass(frozen=True)
class BatchView:
    record: BatchRecord
    completed: int
    failed: int


@dataclass(frozen=True)
class InFlight:
    """The request that was in flight for a line when its runner last wrote (entry id "" until
    its tier queue accepted it)."""

    entry_id: str
    request: pb.QueuedRequest


class BatchStore:
    def __init__(self, cluster: ClusterClient) -> None:
        self.redis = cluster.redis
        self.keys = cluster.keys

    # ---- files ------------------------------------------------------------------------------
    async def put_file(self, record: FileRecord, content: bytes) -> None:
        async with self.redis.pipeline(transaction=True) as p:
            p.set(self.keys.file_content(record.file_id), content)
            p.hset(self.keys.file(record.file_id), mapping=_encode(record))  # type: ignore[arg-type]
            await p.execute()

    async def file(self, file_id: str) -> FileRecord | None:
        raw: Any = await self.redis.hgetall(self.keys.file(file_id))
        return _decode(FileRecord, raw) if raw else None

    async def file_content(self, file_id: str) -> bytes | None:
        raw: Any = await self.redis.get(self.keys.file_content(file_id))
        return raw

    async def delete_file(self, file_id: str) -> bool:
        return bool(await self.redis.delete(self.keys.file(file_id), self.keys.file_content(file_id)))

    # ---- batches ------------------------------------------------------------------------------
    async def create_batch(self, record: BatchRecord) -> None:
        async with self.redis.pipeline(transaction=True) as p:
            p.hset(self.keys.batch(record.batch_id), mapping=_encode(record))  # type: ignore[arg-type]
            p.zadd(self.keys.batches_of(record.owner), {record.batch_id: time.time()})  # finer than created_at
            p.sadd(self.keys.batches_active, record.batch_id)
            await p.execute()

    async def batch(self, batch_id: str) -> BatchRecord | None:
        raw: Any = await self.redis.hgetall(self.keys.batch(batch_id))
        return _decode(BatchRecord, raw) if raw else None

    async def view(self, batch_id: str) -> BatchView | None:
        views = await self._views([batch_id])
        return views[0] if views else None

    async def _views(self, batch_ids: list[str]) -> list[BatchView]:
        async with self.redis.pipeline(transaction=True) as p:  # one snapshot: record and counts agree
            for bid in batch_ids:
                p.hgetall(self.keys.batch(bid))
                p.hlen(self.keys.batch_results(bid, "out"))
                p.hlen(self.keys.batch_results(bid, "err"))
            replies = await p.execute()
        return [BatchView(_decode(BatchRecord, raw), int(ok), int(bad))
                for raw, ok, bad in zip(replies[::3], replies[1::3], replies[2::3], strict=True) if raw]

    async def list_batches(self, owner: str, after: str | None, limit: int) -> tuple[list[BatchView], bool] | None:
        """The owner's batches, newest first, after the batch `after` (None if it is not theirs),
        and whether more follow."""
        index = self.keys.batches_of(owner)
        start = 0
        if after is not None:
            rank: Any = await self.redis.zrevrank(index, after)
            if rank is None:
                return None
            start = int(rank) + 1
        raw: Any = await self.redis.zrevrange(index, start, start + limit)
        ids = [r.decode() for r in raw]
        return await self._views(ids[:limit]), len(ids) > limit

    async def active_batches(self) -> list[str]:
        raw: Any = await self.redis.smembers(self.keys.batches_active)
        return sorted(r.decode() for r in raw)

    async def transition(self, batch_id: str, allowed: tuple[str, ...], changes: dict[str, str | int],
                         token: str = "") -> tuple[bool, str]:
        """Set `changes` if the batch's status is in `allowed` (and, given a token, its lease is
        held by it): (done, the status it had, or why not)."""
        final = "1" if str(changes.get("status", "")) in FINAL_STATUSES else "0"
        args: list[str] = [token, " ".join(allowed), batch_id, final]
        for k, v in changes.items():
            args += [k, str(v)]
        done, status = await self.redis.eval(_TRANSITION, 3, self.keys.batch(batch_id), self.keys.batch_lease(batch_id),
                                             self.keys.batches_active, *args)
        return bool(done), status.decode() if isinstance(status, bytes) else str(status)

    # ---- the runner's lease and a batch's lines ---------------------------------------------
    async def hold_lease(self, batch_id: str, token: str, ttl_ms: int) -> bool:
        """Take the batch's lease if free, or refresh it if ours; True while we hold it."""
        return bool(await self.redis.eval(_HOLD_LEASE, 1, self.keys.batch_lease(batch_id), token, ttl_ms))

    async def release_lease(self, batch_id: str, token: str) -> None:
        await self.redis.eval(_RELEASE_LEASE, 1, self.keys.batch_lease(batch_id), token)

    async def record_line(self, batch_id: str, token: str, index: int, ok: bool, line: str,
                          prompt_tokens: int = 0, completion_tokens: int = 0) -> int:
        """-1 the lease is lost (nothing written), 0 the line had a result already, 1 recorded."""
        keys = [self.keys.batch_lease(batch_id), self.keys.batch_results(batch_id, "out"),
                self.keys.batch_results(batch_id, "err"), self.keys.batch_running(batch_id), self.keys.batch(batch_id)]
        return int(await self.redis.eval(_RECORD, len(keys), *keys, token, index, "out" if ok else "err", line,
                                         prompt_tokens, completion_tokens))

    async def done_lines(self, batch_id: str) -> set[int]:
        async with self.redis.pipeline(transaction=True) as p:
            p.hkeys(self.keys.batch_results(batch_id, "out"))
            p.hkeys(self.keys.batch_results(batch_id, "err"))
            out, err = await p.execute()
        return {int(k) for k in [*out, *err]}

    async def results(self, batch_id: str, kind: str) -> list[str]:
        """The lines of one result hash ("out" or "err") in input order."""
        raw: Any = await self.redis.hgetall(self.keys.batch_results(batch_id, kind))
        return [v.decode() for _, v in sorted(raw.items(), key=lambda kv: int(kv[0]))]

    async def set_in_flight(self, batch_id: str, index: int, flight: InFlight) -> None:
        await self.redis.hset(self.keys.batch_running(batch_id), str(index),
                              flight.entry_id.encode() + b" " + flight.request.SerializeToString())

    async def in_flight(self, batch_id: str) -> dict[int, InFlight]:
        raw: Any = await self.redis.hgetall(self.keys.batch_running(batch_id))
        out = {}
        for k, v in raw.items():
            entry, _, request = v.partition(b" ")
            out[int(k)] = InFlight(entry.decode(), pb.QueuedRequest.FromString(request))
        return out

    async def drop_in_flight(self, batch_id: str) -> None:
        await self.redis.delete(self.keys.batch_running(batch_id))

