"""TP-layout remapping: moving a KV tensor through the plan's byte descriptors gives every
destination rank exactly the heads it owns."""

from __future__ import annotations

import itertools
from types import SimpleNamespace
from typing import cast

import numpy as np
import pytest

from kvtransfer.remap import BlockLayout, expand_plan, kv_head_range, plan_transfer
from services.engine.config import ModelConfig
from services.engine.model.sharding import kv_head_range as engine_kv_head_range

LAYERS, BLOCK, HEAD_DIM, ELEM = 3, 4, 8, 2
CASES = [(k, a, b) for k in (4, 2) for a, b in itertools.product((1, 2, 4), repeat=2)]


def layout(k: int, tp: int) -> BlockLayout:
    return BlockLayout.for_rank(LAYERS, k, tp, BLOCK, HEAD_DIM, ELEM)


def rank_caches(kv: np.ndarray, k: int, tp: int, block_ids: np.ndarray, num_blocks: int) -> list[np.ndarray]:
    """Each rank's cache [num_blocks, L, 2, local_heads, B, D] with logical block i at block_ids[i]."""
    caches = []
    for r in range(tp):
        h0, h1 = kv_head_range(k, r, tp)
        cache = np.zeros((num_blocks, LAYERS, 2, h1 - h0, BLOCK, HEAD_DIM), dtype=np.uint16)
        cache[block_ids] = kv[:, :, :, h0:h1]
        caches.append(cache)
    return caches


def apply(descs: np.ndarray, src: np.ndarray, dst: np.ndarray) -> None:
    s, d = src.reshape(-1).view(np.uint8), dst.reshape(-1).view(np.uint8)
    for so, do, n in descs.tolist():
        d[do:do + n] = s[so:so + n]


@pytest.mark.parametrize("k,tp_src,tp_dst", CASES)
def test_plan_moves_exactly_the_owned_heads(k: int, tp_src: int, tp_dst: int) -> None:
    rng = np.random.default_rng(k * 100 + tp_src * 10 + tp_dst)
    n, cache_blocks = 5, 12
    kv = rng.integers(0, 2**16, size=(n, LAYERS, 2, k, BLOCK, HEAD_DIM), dtype=np.uint16)
    src_ids = rng.choice(cache_blocks, n, replace=False)
    dst_ids = rng.choice(cache_blocks, n, replace=False)
    src = rank_caches(kv, k, tp_src, src_ids, cache_blocks)
    expected = rank_caches(kv, k, tp_dst, dst_ids, cache_blocks)
    dst = [np.zeros_like(c) for c in expected]

    plan = plan_transfer(k, tp_src, tp_dst)
    for (s, d), descs in expand_plan(plan, layout(k, tp_src), layout(k, tp_dst), src_ids, dst_ids).items():
        apply(descs, src[s], dst[d])
    for got, want in zip(dst, expected, strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("k,tp_src,tp_dst", CASES)
def test_each_piece_comes_from_a_rank_that_holds_it(k: int, tp_src: int, tp_dst: int) -> None:
    plan = plan_transfer(k, tp_src, tp_dst)
    for rank in plan.ranks:
        d0, d1 = kv_head_range(k, rank.dst_rank, tp_dst)
        received = []
        for p in rank.pieces:
            s0 = kv_head_range(k, p.src_rank, tp_src)[0]
            src_global = list(range(s0 + p.src_heads[0], s0 + p.src_heads[1]))
            assert src_global == list(range(d0 + p.dst_heads[0], d0 + p.dst_heads[1]))
            received += src_global
        assert received == list(range(d0, d1))


def test_replicated_heads_are_spread_over_their_holders() -> None:
    # 2 KV heads at TP 4 -> TP 4: each destination reads from its own replica, not rank 0 for all.
    assert plan_transfer(2, 4, 4).pairs() == [(0, 0), (1, 1), (2, 2), (3, 3)]
    # TP 4 -> TP 1 gathers nothing through one rank: two source ranks feed the destination.
    assert plan_transfer(2, 4, 1).pairs() == [(0, 0), (2, 0)]
    # TP 1 -> TP 4 with 2 heads: the one source rank feeds each destination its replica.
    assert plan_transfer(2, 1, 4).pairs() == [(0, 0), (0, 1), (0, 2), (0, 3)]


def test_same_split_is_one_descriptor_per_block_and_runs_merge() -> None:
    lay = layout(4, 1)
    plan = plan_transfer(4, 1, 1)
    every_other = expand_plan(plan, lay, lay, [0, 2, 4, 6], [1, 3, 5, 7])[(0, 0)]
    assert every_other.tolist() == [[b * lay.block_bytes, (b + 1) * lay.block_bytes, lay.block_bytes]
                                    for b in (0, 2, 4, 6)]
    run = expand_plan(plan, lay, lay, [3, 4, 5, 9], [10, 11, 12, 0])[(0, 0)]
    assert run.tolist() == [[3 * lay.block_bytes, 10 * lay.block_bytes, 3 * lay.block_bytes],
                            [9 * lay.block_bytes, 0, lay.block_bytes]]


@pytest.mark.parametrize("k,tp", [(4, 1), (4, 2), (4, 4), (2, 4), (2, 1), (8, 2)])
def test_head_split_matches_the_engine(k: int, tp: int) -> None:
    cfg = cast(ModelConfig, SimpleNamespace(num_key_value_heads=k))
    for r in range(tp):
        assert kv_head_range(k, r, tp) == engine_kv_head_range(cfg, r, tp)


def test_unsplittable_heads_are_rejected() -> None:
    with pytest.raises(ValueError, match="cannot be split"):
        plan_transfer(3, 1, 2)
