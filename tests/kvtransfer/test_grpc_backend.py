"""The gRPC KV backend moves a request's KV intact, in chunks, and reports failures by kind."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch

from kvtransfer.base import KVHandoff, TransferState
from kvtransfer.grpc_backend import GrpcKVBackend, GrpcKVReceiver
from services.cluster.redis_server import free_port
from services.engine import KVExport
from services.rpc import pb, pb_grpc


def _handoff(rid: str, tokens: int = 37) -> KVHandoff:
    g = torch.Generator().manual_seed(0)
    kv = KVExport(tokens, torch.randn(2, tokens, 2, 16, generator=g), torch.randn(2, tokens, 2, 16, generator=g))
    q = pb.QueuedRequest(request_id=rid, tier="standard", prompt_ids=list(range(tokens)),
                         sampling=pb.SamplingParams(max_tokens=4))
    return KVHandoff(q, (7,), kv, epoch=3)


async def _serve(on_arrival) -> tuple[grpc.aio.Server, GrpcKVReceiver, str]:  # type: ignore[no-untyped-def]
    receiver = GrpcKVReceiver(on_arrival)
    server = grpc.aio.server()
    pb_grpc.add_KVTransferServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, receiver, f"127.0.0.1:{port}"


def test_kv_arrives_intact_across_many_chunks() -> None:
    async def body() -> None:
        landed: list[KVHandoff] = []

        async def admit(h: KVHandoff) -> pb.Error | None:
            landed.append(h)
            return None

        server, receiver, address = await _serve(admit)
        backend = GrpcKVBackend(chunk_bytes=1024)  # the payload is ~19 KB: many chunks
        sent = _handoff("r1")
        sender = backend.sender(address)
        assert sender.poll() is TransferState.PENDING and receiver.poll("r1") is TransferState.PENDING
        sender.send(sent)
        assert await sender.wait() is TransferState.DONE
        assert receiver.poll("r1") is TransferState.DONE
        got = landed[0]
        assert got.request.request_id == "r1" and got.output_ids == (7,) and got.epoch == 3
        assert got.kv.num_tokens == 37 and torch.equal(got.kv.k, sent.kv.k) and torch.equal(got.kv.v, sent.kv.v)
        await backend.close()
        await server.stop(None)
    asyncio.run(body())


def test_refusal_and_unreachable_peer_fail_with_a_kind() -> None:
    async def body() -> None:
        async def refuse(h: KVHandoff) -> pb.Error | None:
            return pb.Error(kind=pb.OVERLOADED, message="no free blocks", retry_after_s=1.0)

        server, receiver, address = await _serve(refuse)
        backend = GrpcKVBackend(timeout_s=5)
        sender = backend.sender(address)
        sender.send(_handoff("r2"))
        assert await sender.wait() is TransferState.FAILED
        assert sender.error is not None and sender.error.kind == pb.OVERLOADED
        assert receiver.poll("r2") is TransferState.FAILED

        nowhere = backend.sender(f"127.0.0.1:{free_port()}")
        nowhere.send(_handoff("r3"))
        assert await nowhere.wait() is TransferState.FAILED
        assert nowhere.error is not None and nowhere.error.kind == pb.UNAVAILABLE
        await backend.close()
        await server.stop(None)
    asyncio.run(body())


@pytest.mark.parametrize("tokens", [1, 300])
def test_payload_sizes(tokens: int) -> None:
    from kvtransfer.grpc_backend import kv_from_bytes, kv_to_bytes
    h = _handoff("x", tokens)
    back = kv_from_bytes(kv_to_bytes(h.kv))
    assert back.num_tokens == tokens and torch.equal(back.k, h.kv.k)
