"""The live router against a real redis-server and a stand-in prefill leader (gRPC): dispatch,
shedding with a reason, and taking over the queue of a router that died."""

from __future__ import annotations

import asyncio
import uuid

import grpc

from router.live.service import Router
from services.cluster import ClusterClient, GroupRecord
from services.cluster.redis_server import RedisServer
from services.config import RedisSettings, RouterConfig, TierPolicy
from services.rpc import pb, pb_grpc
from services.tiers import Tier


class FakePrefill(pb_grpc.PrefillServicer):
    """Answers every Prefill at once: one token, finished, written to the request's output stream."""

    def __init__(self, cluster: ClusterClient) -> None:
        self.cluster = cluster
        self.seen: list[pb.PrefillRequest] = []

    async def Prefill(self, request: pb.PrefillRequest, context: grpc.aio.ServicerContext) -> pb.PrefillReply:  # noqa: N802
        self.seen.append(request)
        await self.cluster.emit(request.request.request_id, pb.TokenEvent(token_ids=[5], finish_reason="length"))
        return pb.PrefillReply(first_token=5, finished=True)


POLICY = TierPolicy(tiers=(Tier("fast", ttft_s=1.0, tpot_s=0.1, queue_limit=2), Tier("slow", ttft_s=10.0, tpot_s=1.0)),
                    default_tier="fast")


def _config(url: str, prefix: str, router_id: str) -> RouterConfig:
    return RouterConfig(router_id=router_id, redis=RedisSettings(url=url, prefix=prefix), policy=POLICY,
                        claim_idle_ms=200, leader_ttl_ms=300)


def _request(rid: str, tier: str = "fast") -> pb.QueuedRequest:
    return pb.QueuedRequest(request_id=rid, tier=tier, arrival_s=1.0, prompt_ids=[1, 2, 3],
                            sampling=pb.SamplingParams(max_tokens=4))


async def _events(c: ClusterClient, rid: str, timeout_s: float = 5.0) -> list[pb.TokenEvent]:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        got = await c.read_output(rid, "0-0", 100)
        if got:
            return [e for _, e in got]
    return []


async def _fake_groups(c: ClusterClient) -> tuple[grpc.aio.Server, FakePrefill]:
    server = grpc.aio.server()
    fake = FakePrefill(c)
    pb_grpc.add_PrefillServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await c.heartbeat_group(GroupRecord("p0", "prefill", 1, 0, f"127.0.0.1:{port}", max_running=8,
                                        free_kv_blocks=100), 60_000)
    await c.heartbeat_group(GroupRecord("d0", "decode", 1, 0, "127.0.0.1:1", max_running=8, free_kv_blocks=100),
                            60_000)
    return server, fake


def test_a_full_tier_refuses_at_the_queue_and_the_rest_is_dispatched(redis_server: RedisServer) -> None:
    async def body() -> None:
        prefix = f"rt{uuid.uuid4().hex[:6]}:"
        c = ClusterClient(redis_server.url, prefix)
        await c.ensure_queues(["fast", "slow"])
        # The fast tier holds 2: the queue refuses the rest (the gateway answers them 429).
        added = [(await c.enqueue_if_room(_request(f"f{i}"), POLICY.tier("fast").queue_limit)) for i in range(4)]
        assert [entry is not None for entry, _ in added] == [True, True, False, False] and added[3][1] == 2
        router = Router(_config(redis_server.url, prefix, "r1"), ClusterClient(redis_server.url, prefix))
        stop = asyncio.Event()
        task = asyncio.create_task(router.run(stop))
        await asyncio.sleep(0.3)  # no group yet: what is queued stays queued, nothing is shed
        assert not await _events(c, "f0", timeout_s=0.1) and await c.queue_depth("fast") == 2
        server, fake = await _fake_groups(c)
        for rid in ("f0", "f1"):
            assert (await _events(c, rid))[0].finish_reason == "length"
        assert sorted(r.request.request_id for r in fake.seen) == ["f0", "f1"]
        assert all(r.decode_group == "d0" and r.decode_address == "127.0.0.1:1" for r in fake.seen)
        await asyncio.sleep(0.3)
        assert await c.queue_depth("fast") == 0  # dispatched and shed entries are acked and deleted
        stop.set()
        await task
        await server.stop(None)
        await router.cluster.close()
        await c.close()
    asyncio.run(body())


def test_overload_is_shed_with_a_reason_and_a_retry_after(redis_server: RedisServer) -> None:
    """More prompt tokens queued than the prefill groups can clear within the tiers' patience: the
    newest are shed, each with an OVERLOADED event saying why and when to retry, and acked."""
    policy = TierPolicy(tiers=(Tier("fast", ttft_s=0.01, tpot_s=0.1, max_wait_s=0.01),), default_tier="fast")

    async def body() -> None:
        prefix = f"rt{uuid.uuid4().hex[:6]}:"
        c = ClusterClient(redis_server.url, prefix)
        await c.ensure_queues(["fast"])
        server, _ = await _fake_groups(c)  # one prefill group: 20k tokens/s, 0.02 s of patience: 400 tokens
        for i in range(4):
            await c.enqueue(pb.QueuedRequest(request_id=f"o{i}", tier="fast", arrival_s=1.0 + i, prompt_ids=[1] * 300,
                                             sampling=pb.SamplingParams(max_tokens=4)))
        config = RouterConfig(router_id="r1", redis=RedisSettings(url=redis_server.url, prefix=prefix), policy=policy)
        router = Router(config, ClusterClient(redis_server.url, prefix))
        stop = asyncio.Event()
        task = asyncio.create_task(router.run(stop))
        shed = [ev[0].error for rid in ("o1", "o2", "o3") if (ev := await _events(c, rid))]
        assert [e.kind for e in shed] == [pb.OVERLOADED] * 3
        assert all("overloaded" in e.message and e.retry_after_s > 0 for e in shed)
        assert (await _events(c, "o0"))[0].finish_reason == "length"  # the oldest fits, and is served
        await asyncio.sleep(0.3)
        assert await c.queue_depth("fast") == 0  # dispatched and shed entries are acked and deleted
        stop.set()
        await task
        await server.stop(None)
        await router.cluster.close()
        await c.close()
    asyncio.run(body())


def test_a_dead_routers_queue_is_taken_over(redis_server: RedisServer) -> None:
    async def body() -> None:
        prefix = f"rt{uuid.uuid4().hex[:6]}:"
        c = ClusterClient(redis_server.url, prefix)
        await c.ensure_queues(["fast", "slow"])
        dead = Router(_config(redis_server.url, prefix, "dead"), ClusterClient(redis_server.url, prefix))

        async def no_release(router_id: str) -> None:  # a crashed router never releases its lock
            return None
        dead.cluster.release_leader = no_release  # type: ignore[method-assign]
        stop_dead = asyncio.Event()
        dead_task = asyncio.create_task(dead.run(stop_dead))
        await c.enqueue(_request("s0", "slow"))
        for _ in range(250):  # it reads the entry (no group to send it to yet)...
            if "s0" in dead.queued:
                break
            await asyncio.sleep(0.02)
        assert "s0" in dead.queued
        dead_task.cancel()  # ...and dies without acking it
        await asyncio.gather(dead_task, return_exceptions=True)
        server, fake = await _fake_groups(c)
        heir = Router(_config(redis_server.url, prefix, "heir"), ClusterClient(redis_server.url, prefix))
        stop = asyncio.Event()
        task = asyncio.create_task(heir.run(stop))
        events = await _events(c, "s0", timeout_s=10)
        assert events and events[0].finish_reason == "length"
        assert [r.request.request_id for r in fake.seen] == ["s0"]  # served once
        stop.set()
        await task
        await server.stop(None)
        for r in (dead, heir):
            await r.cluster.close()
        await c.close()
    asyncio.run(body())
