"""The Redis schema against a real redis-server: queues, claims, output streams, leases, leader lock."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from services.cluster import ClusterClient, GroupRecord, PlanDoc
from services.cluster.redis_server import RedisServer
from services.rpc import pb

TIERS = ["interactive", "standard", "batch"]


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


async def _client(server: RedisServer) -> ClusterClient:
    c = ClusterClient(server.url, prefix=f"t{uuid.uuid4().hex[:8]}:")
    await c.ensure_queues(TIERS)
    return c


def _req(rid: str, tier: str = "standard") -> pb.QueuedRequest:
    return pb.QueuedRequest(request_id=rid, tier=tier, arrival_s=1.0, prompt_ids=[1, 2, 3],
                            sampling=pb.SamplingParams(max_tokens=4))


def test_queue_roundtrip_depth_and_ack(redis_server: RedisServer) -> None:
    async def body() -> None:
        c = await _client(redis_server)
        await c.ensure_queues(TIERS)  # idempotent
        await c.enqueue(_req("a", "interactive"))
        await c.enqueue(_req("b", "batch"))
        assert await c.queue_depth("interactive") == 1
        got = await c.read_queues("r1", TIERS, count=10, block_ms=100)
        assert {(e.tier, e.request.request_id) for e in got} == {("interactive", "a"), ("batch", "b")}
        assert list(got[0].request.prompt_ids) == [1, 2, 3]
        assert await c.read_queues("r1", TIERS, count=10, block_ms=10) == []
        for e in got:
            await c.ack(e)
        assert await c.queue_depth("interactive") == 0 and await c.queue_depth("batch") == 0
        await c.close()
    run(body())


def test_entries_of_a_dead_router_are_claimed_again(redis_server: RedisServer) -> None:
    async def body() -> None:
        c = await _client(redis_server)
        await c.enqueue(_req("x"))
        taken = await c.read_queues("dead-router", TIERS, count=10, block_ms=100)
        assert [e.request.request_id for e in taken] == ["x"]
        assert await c.claim_stale("live-router", "standard", min_idle_ms=60_000) == []
        await asyncio.sleep(0.05)
        claimed = await c.claim_stale("live-router", "standard", min_idle_ms=10)
        assert [e.request.request_id for e in claimed] == ["x"]
        await c.ack(claimed[0])
        assert await c.claim_stale("other", "standard", min_idle_ms=0) == []
        await c.close()
    run(body())


def test_output_stream_keeps_order_and_events_written_before_reading(redis_server: RedisServer) -> None:
    async def body() -> None:
        c = await _client(redis_server)
        await c.emit("r", pb.TokenEvent(token_ids=[5]))
        await c.emit_many([("r", pb.TokenEvent(token_ids=[6, 7])), ("r", pb.TokenEvent(finish_reason="stop"))])
        events = await c.read_output("r", "0-0", block_ms=100)
        assert [list(e.token_ids) for _, e in events] == [[5], [6, 7], []]
        assert events[-1][1].finish_reason == "stop"
        assert await c.read_output("r", events[-1][0], block_ms=20) == []
        ttl = await c.redis.pttl(c.keys.output("r"))
        assert 0 < ttl <= 600_000
        await c.drop_output("r")
        await c.close()
    run(body())


def test_group_lease_expires_without_heartbeat(redis_server: RedisServer) -> None:
    async def body() -> None:
        c = await _client(redis_server)
        g = GroupRecord("d0", "decode", 2, 0, "127.0.0.1:1", free_kv_blocks=10, max_model_len=512)
        await c.heartbeat_group(g, lease_ms=150)
        assert await c.groups() == [g]
        await asyncio.sleep(0.1)
        await c.heartbeat_group(g, lease_ms=150)  # a heartbeat refreshes the lease
        await asyncio.sleep(0.1)
        assert await c.groups() == [g]
        await asyncio.sleep(0.2)
        assert await c.groups() == []
        assert await c.redis.smembers(c.keys.groups) == set()
        await c.close()
    run(body())


def test_leader_lock_single_holder_and_takeover(redis_server: RedisServer) -> None:
    async def body() -> None:
        c = await _client(redis_server)
        assert await c.hold_leader("r1", ttl_ms=200)
        assert not await c.hold_leader("r2", ttl_ms=200)
        assert await c.hold_leader("r1", ttl_ms=200)  # refresh
        await asyncio.sleep(0.3)
        assert await c.hold_leader("r2", ttl_ms=200)  # r1 stopped refreshing
        await c.release_leader("r1")  # not the holder: no effect
        assert await c.leader() == "r2"
        await c.release_leader("r2")
        assert await c.leader() is None
        await c.close()
    run(body())


def test_cancel_is_seen_live_and_later(redis_server: RedisServer) -> None:
    async def body() -> None:
        c = await _client(redis_server)
        seen: list[str] = []

        async def listen() -> None:
            async for rid in c.cancellations():
                seen.append(rid)
                return

        task = asyncio.create_task(listen())
        await asyncio.sleep(0.1)
        await c.cancel("q1")
        await asyncio.wait_for(task, 2)
        assert seen == ["q1"]
        assert await c.is_cancelled("q1") and not await c.is_cancelled("q2")
        await c.close()
    run(body())


def test_only_the_first_prefill_claim_of_an_attempt_wins(redis_server: RedisServer) -> None:
    async def body() -> None:
        c = await _client(redis_server)
        assert await c.claim_prefill("q1", 0, "p0")
        assert not await c.claim_prefill("q1", 0, "p1")  # a second dispatch of attempt 0, to any group
        assert await c.claim_prefill("q2", 0, "p1")
        assert await c.claim_prefill("q1", 1, "p1")  # q1 resumed after p0 died: a new attempt
        assert await c.prefill_claimed("q1", 1) and not await c.prefill_claimed("q2", 1)
        await c.close()
    run(body())


def test_the_ledger_follows_a_request_from_dispatch_to_its_last_event(redis_server: RedisServer) -> None:
    async def body() -> None:
        c = await _client(redis_server)
        await c.ensure_queues(["batch"])
        q = pb.QueuedRequest(request_id="r1", tier="batch", prompt_ids=[1, 2])
        await c.enqueue(q)
        [entry] = await c.read_queues("router-a", ["batch"], 10, 100)
        await c.record_dispatch(entry.request, "p0", entry)
        assert await c.queue_depth("batch") == 0  # off the stream, in one transaction
        assert await c.holders() == {"r1": "p0"} and (await c.inflight_request("r1")) == q
        await c.emit("r1", pb.TokenEvent(token_ids=[7], next_group="d0"))
        assert await c.holders() == {"r1": "d0"}  # the prefill leader named the decode group
        await c.emit("r1", pb.TokenEvent(token_ids=[8], index=1, finish_reason="length"))
        assert await c.holders() == {} and not await c.is_inflight("r1")
        assert [list(e.token_ids) for e in await c.output_events("r1")] == [[7], [8]]
        await c.close()
    run(body())


def test_plan_roundtrip(redis_server: RedisServer) -> None:
    async def body() -> None:
        c = await _client(redis_server)
        assert await c.get_plan() is None
        plan = '{"groups": [{"role": "prefill", "tp": 1, "slots": [0]}]}'
        await c.set_plan(PlanDoc(3, plan, reconfiguring=True))
        stored = await c.get_plan()
        assert stored is not None and (stored.epoch, stored.plan, stored.target, stored.reconfiguring) == (3, plan, "", True)
        assert stored.set_at > 0
        await c.close()
    run(body())


def test_redis_server_stops_by_pid() -> None:
    from services.cluster.redis_server import start_redis_server
    server = start_redis_server()
    pid = server.pid
    server.stop()
    with pytest.raises(ProcessLookupError):
        import os
        os.kill(pid, 0)
