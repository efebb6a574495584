"""A prefill -> decode hand-off fails over: a decode group that died or refused is replaced by
another live one, the request's stream is pointed at it, and the failures show in /metrics."""

from __future__ import annotations

import asyncio

from kvtransfer.grpc_backend import GrpcKVBackend
from prefill_node.handoff import DecodeTarget, hand_off, pick_decode_group
from services.cluster.redis_server import free_port
from services.cluster.schema import GroupRecord
from services.metrics import NodeMetrics
from services.rpc import pb
from tests.kvtransfer.test_grpc_backend import _handoff, _serve


def _group(gid: str, role: str = "decode", epoch: int = 1, free: int = 10, running: int = 0) -> GroupRecord:
    return GroupRecord(gid, role, 1, epoch, f"127.0.0.1:{hash(gid) % 1000 + 1}", running=running, max_running=64,
                       free_kv_blocks=free, block_size=16)


def test_failover_prefers_an_untried_decode_group_of_the_same_epoch_with_room() -> None:
    """The router's placement rule (router/decide/scheduler.py), over the live groups not tried yet:
    room for the request, the request's epoch first, then the fewest running per TP rank."""
    request = pb.QueuedRequest(request_id="r", prompt_ids=[1] * 100, sampling=pb.SamplingParams(max_tokens=60))
    groups = [_group("p0", role="prefill", free=99), _group("d0", free=50), _group("d1", free=30),
              _group("d2", free=40, epoch=2), _group("d3", free=30, running=3), _group("d4", free=9)]
    assert pick_decode_group(groups, {"d0"}, 1, request) == DecodeTarget("d1", groups[2].address)
    assert pick_decode_group(groups, {"d0", "d1", "d3"}, 1, request) == DecodeTarget("d2", groups[3].address)
    assert pick_decode_group(groups, {"d0", "d1", "d2", "d3"}, 1, request) is None  # d4: 9 blocks < 10


def test_failover_may_go_to_a_colocated_group() -> None:
    """A colocated group decodes too: a hand-off fails over to it like to a decode group."""
    request = pb.QueuedRequest(request_id="r", prompt_ids=[1] * 100, sampling=pb.SamplingParams(max_tokens=60))
    groups = [_group("p0", role="prefill", free=99), _group("d0", free=50), _group("c1", role="colocated", free=50)]
    assert pick_decode_group(groups, {"d0"}, 1, request) == DecodeTarget("c1", groups[2].address)


def _value(metrics: NodeMetrics, name: str, labels: dict[str, str] | None = None) -> float:
    return metrics.registry.get_sample_value(name, labels or {}) or 0.0


def test_a_dead_or_refusing_decode_group_is_replaced_by_a_live_one() -> None:
    async def body() -> None:
        landed: list[str] = []

        async def admit(h):  # type: ignore[no-untyped-def]
            landed.append(h.request.request_id)

        async def refuse(h):  # type: ignore[no-untyped-def]
            return pb.Error(kind=pb.OVERLOADED, message="no free blocks", retry_after_s=1.0)

        live, _, live_address = await _serve(admit)
        full, _, full_address = await _serve(refuse)
        dead = DecodeTarget("d-dead", f"127.0.0.1:{free_port()}")  # nothing listens: it died
        others = [DecodeTarget("d-full", full_address), DecodeTarget("d-live", live_address)]
        redirected: list[str] = []

        async def find_other(tried: set[str]) -> DecodeTarget | None:
            return next((t for t in others if t.group_id not in tried), None)

        async def redirect(t: DecodeTarget) -> None:
            redirected.append(t.group_id)

        metrics = NodeMetrics()
        metrics.set_kv_backend("grpc")
        backend = GrpcKVBackend(timeout_s=5)
        result = await hand_off(backend, _handoff("r1"), dead, find_other, redirect, metrics)
        assert result.target == DecodeTarget("d-live", live_address) and landed == ["r1"]
        assert [g for g, _ in result.failures] == ["d-dead", "d-full"]
        assert redirected == ["d-full", "d-live"]
        assert _value(metrics, "nitsum_kv_transfer_failures_total", {"reason": "unavailable"}) == 1
        assert _value(metrics, "nitsum_kv_transfer_failures_total", {"reason": "overloaded"}) == 1
        assert _value(metrics, "nitsum_kv_handoff_failovers_total") == 2
        assert _value(metrics, "nitsum_kv_transfer_backend", {"backend": "grpc"}) == 1
        assert _value(metrics, "nitsum_kv_transfer_backend", {"backend": "nixl"}) == 0

        # Out of attempts: the request fails with the last error instead of hanging.
        result = await hand_off(backend, _handoff("r2"), dead, find_other, redirect, metrics, max_attempts=2)
        assert result.target is None and result.error is not None and result.error.kind == pb.OVERLOADED
        assert landed == ["r1"]
        await backend.close()
        await live.stop(None)
        await full.stop(None)
    asyncio.run(body())


def test_a_cancelled_request_is_not_handed_elsewhere() -> None:
    async def body() -> None:
        async def cancelled(h):  # type: ignore[no-untyped-def]
            return pb.Error(kind=pb.CANCELLED, message="cancelled before decode")

        server, _, address = await _serve(cancelled)
        asked: list[set[str]] = []

        async def find_other(tried: set[str]) -> DecodeTarget | None:
            asked.append(tried)
            return None

        async def redirect(t: DecodeTarget) -> None:
            raise AssertionError("no failover for a cancelled request")

        backend = GrpcKVBackend(timeout_s=5)
        result = await hand_off(backend, _handoff("r3"), DecodeTarget("d0", address), find_other, redirect,
                                NodeMetrics())
        assert result.target is None and result.error is not None and result.error.kind == pb.CANCELLED
        assert asked == []
        await backend.close()
        await server.stop(None)
    asyncio.run(body())
