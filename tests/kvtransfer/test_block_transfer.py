"""Block transfers between real rank processes on 127.0.0.1, on both backends: bytes land exactly,
TP layouts are remapped rank to rank, and a receiver killed mid-way fails the transfer in bounded
time with its handles released."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from kvtransfer.nixl_backend import nixl_works
from kvtransfer.remap import BlockLayout, expand_plan, kv_head_range, plan_transfer

from .rankproc import Outcome, RankSpec, Run, SendOrder, Started, ranks

LAYERS, KV_HEADS, BLOCK, HEAD_DIM = 12, 4, 16, 64  # the `small` model
BACKENDS = [pytest.param("nixl", marks=pytest.mark.skipif(not nixl_works(), reason="NIXL unusable here")),
            "local"]


def layout(tp: int) -> BlockLayout:
    return BlockLayout.for_rank(LAYERS, KV_HEADS, tp, BLOCK, HEAD_DIM, 2)


def cache_shape(num_blocks: int, tp: int) -> tuple[int, ...]:
    return (num_blocks, LAYERS, 2, layout(tp).local_kv_heads, BLOCK, HEAD_DIM)


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_blocks_land_exactly(backend: str) -> None:
    src_cache = torch.randn(cache_shape(24, 1)).to(torch.bfloat16)
    src_ids, dst_ids = [1, 4, 5, 6, 11, 20], [0, 2, 3, 9, 15, 23]
    descs = expand_plan(plan_transfer(KV_HEADS, 1, 1), layout(1), layout(1), src_ids, dst_ids)[(0, 0)]
    assert len(descs) == 5  # 4->2 and 5->3 merge into one range

    with ranks([RankSpec(f"{backend}-nc-src", backend, cache=src_cache),
                RankSpec(f"{backend}-nc-dst", backend, shape=cache_shape(24, 1))]) as r:
        src, dst = r.procs
        r.send(src, Run(sends=[SendOrder(dst, "t1", descs)]))
        r.send(dst, Run(receives=["t1"], return_cache=True))
        r.connect([src])  # after the send was posted: it must wait in BOOTSTRAPPING
        sent, got = r.collect(Outcome, [src, dst], 30.0)

    assert sent.first_states == {"t1": "bootstrapping"}
    assert sent.states == got.states == {"t1": "done"}
    assert sent.open_transfers == got.open_transfers == 0
    assert got.cache is not None
    assert torch.equal(got.cache[dst_ids].view(torch.int16), src_cache[src_ids].view(torch.int16))
    untouched = [b for b in range(24) if b not in dst_ids]
    assert not got.cache[untouched].view(torch.int16).any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tp_src,tp_dst", [(2, 1), (1, 4)])
def test_remapped_transfer_gives_each_rank_its_heads(backend: str, tp_src: int, tp_dst: int) -> None:
    n, cache_blocks = 6, 16
    gen = torch.Generator().manual_seed(tp_src * 10 + tp_dst)
    kv = torch.randn((n, LAYERS, 2, KV_HEADS, BLOCK, HEAD_DIM), generator=gen).to(torch.bfloat16)
    src_ids = torch.randperm(cache_blocks, generator=gen)[:n].tolist()
    dst_ids = torch.randperm(cache_blocks, generator=gen)[:n].tolist()
    tag = f"{backend}-{tp_src}to{tp_dst}"
    specs = []
    for s in range(tp_src):
        h0, h1 = kv_head_range(KV_HEADS, s, tp_src)
        cache = torch.zeros(cache_shape(cache_blocks, tp_src), dtype=torch.bfloat16)
        cache[src_ids] = kv[:, :, :, h0:h1]
        specs.append(RankSpec(f"{tag}-s{s}", backend, cache=cache))
    specs += [RankSpec(f"{tag}-d{d}", backend, shape=cache_shape(cache_blocks, tp_dst)) for d in range(tp_dst)]

    plan = plan_transfer(KV_HEADS, tp_src, tp_dst)
    descs = expand_plan(plan, layout(tp_src), layout(tp_dst), src_ids, dst_ids)
    with ranks(specs) as r:
        for s in range(tp_src):
            r.send(f"{tag}-s{s}", Run(sends=[SendOrder(f"{tag}-d{d}", f"x{s}-{d}", dd)
                                             for (ss, d), dd in descs.items() if ss == s]))
        for d in range(tp_dst):
            r.send(f"{tag}-d{d}", Run(receives=[f"x{s}-{dd}" for s, dd in descs if dd == d], return_cache=True))
        r.connect([f"{tag}-s{s}" for s in range(tp_src)])
        outcomes = r.collect(Outcome, [s.name for s in specs], 30.0)

    for out in outcomes:
        assert set(out.states.values()) == {"done"}, out.errors
    for d, out in enumerate(outcomes[tp_src:]):
        h0, h1 = kv_head_range(KV_HEADS, d, tp_dst)
        assert out.cache is not None
        assert torch.equal(out.cache[dst_ids].view(torch.int16), kv[:, :, :, h0:h1].view(torch.int16))


@pytest.mark.parametrize("backend", BACKENDS)
def test_receiver_killed_midway_fails_within_timeout(backend: str) -> None:
    blocks, timeout_s = 640, 8.0  # 120 MiB cache; the transfer sends it several times over
    src_cache = torch.ones(cache_shape(blocks, 1), dtype=torch.bfloat16)
    every_other = np.arange(0, blocks, 2)
    one_pass = expand_plan(plan_transfer(KV_HEADS, 1, 1), layout(1), layout(1), every_other, every_other)[(0, 0)]
    descs = np.concatenate([one_pass] * 32)  # ~1.9 GiB in 10240 ranges

    with ranks([RankSpec(f"{backend}-kill-src", backend, cache=src_cache),
                RankSpec(f"{backend}-kill-dst", backend, shape=cache_shape(blocks, 1))]) as r:
        src, dst = r.procs
        r.send(dst, Run(receives=["big"], timeout_s=timeout_s))
        r.send(src, Run(sends=[SendOrder(dst, "big", descs)], timeout_s=timeout_s))
        r.connect([src])
        r.collect(Started, [src], 30.0)
        t0 = time.monotonic()
        r.kill(dst)
        (sent,) = r.collect(Outcome, [src], timeout_s + 10.0)
        elapsed = time.monotonic() - t0

    assert sent.states == {"big": "failed"}, "the transfer finished before the kill: make it larger"
    assert elapsed < timeout_s + 2.0
    assert sent.open_transfers == 0
    if backend == "nixl":  # the broken endpoint is dropped; the peer must publish metadata again
        assert sent.peers == []
    print(f"{backend}: failed after {elapsed:.2f}s: {sent.errors['big']}; peers left {sent.peers}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_cancelled_send_fails_the_receiver_promptly(backend: str) -> None:
    blocks, timeout_s = 640, 20.0
    every_other = np.arange(0, blocks, 2)
    one_pass = expand_plan(plan_transfer(KV_HEADS, 1, 1), layout(1), layout(1), every_other, every_other)[(0, 0)]
    descs = np.concatenate([one_pass] * 32)

    with ranks([RankSpec(f"{backend}-cancel-src", backend, shape=cache_shape(blocks, 1)),
                RankSpec(f"{backend}-cancel-dst", backend, shape=cache_shape(blocks, 1))]) as r:
        src, dst = r.procs
        r.send(dst, Run(receives=["c"], timeout_s=timeout_s))
        r.send(src, Run(sends=[SendOrder(dst, "c", descs)], timeout_s=timeout_s, cancel_when_started=True))
        t0 = time.monotonic()
        r.connect([src])
        sent, got = r.collect(Outcome, [src, dst], timeout_s + 10.0)
        elapsed = time.monotonic() - t0

    assert sent.states == got.states == {"c": "failed"}
    assert sent.errors == {"c": "cancelled"}
    assert elapsed < timeout_s / 2  # told by the sender, not by its own timeout
    assert sent.open_transfers == got.open_transfers == 0
