"""TP-layout remapping for block-level KV transfer: which source rank feeds which destination rank
with which KV heads, and the byte ranges that realise it. Pure functions, no I/O.

A rank's KV cache is one contiguous tensor `[num_blocks, num_layers, 2 (k, v), local_kv_heads,
block_size, head_dim]`, so within one block of one rank the chunk (layer, k|v, heads h0:h1) is one
contiguous byte range. KV heads are split over a group's ranks as in
`services.engine.model.sharding.kv_head_range`: evenly when there are at least as many heads as ranks,
else replicated (rank r holds head r // (tp / num_kv_heads)).

How it is used:
1. `plan_transfer(num_kv_heads, tp_src, tp_dst)` -> `TransferPlan`: for each destination rank the
   pieces (source rank, source-local heads, destination-local heads) that together are exactly the
   heads it owns, each piece read from one source rank that holds those heads. Replicated heads are
   spread over their holders so no source rank serves the whole group (no gather through one
   process).
2. `expand_plan(plan, src_layout, dst_layout, src_blocks, dst_blocks)` -> for each (source rank,
   destination rank) pair an `(N, 3)` int64 array of byte descriptors `(src_offset, dst_offset,
   length)` relative to each rank's cache base, adjacent ranges merged: with the same head split
   on both sides that is one descriptor per block, and runs of consecutive block ids on both
   sides become one descriptor.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Columns of a descriptor array.
SRC_OFFSET, DST_OFFSET, LENGTH = 0, 1, 2

HeadRange = tuple[int, int]


def kv_head_range(num_kv_heads: int, rank: int, tp: int) -> HeadRange:
    """Global KV heads [start, stop) held by `rank` of a TP-`tp` group (the engine's split)."""
    if num_kv_heads >= tp:
        per = num_kv_heads // tp
        return rank * per, (rank + 1) * per
    head = rank // (tp // num_kv_heads)
    return head, head + 1


def _check_split(num_kv_heads: int, tp: int) -> None:
    if tp < 1 or num_kv_heads < 1:
        raise ValueError(f"tp ({tp}) and num_kv_heads ({num_kv_heads}) must be >= 1")
    if num_kv_heads % tp and tp % num_kv_heads:
        raise ValueError(f"{num_kv_heads} KV heads cannot be split over TP {tp}: one must divide the other")


@dataclass(frozen=True)
class HeadPiece:
    """Heads a destination rank takes from one source rank; ranges are rank-local."""

    src_rank: int
    src_heads: HeadRange
    dst_heads: HeadRange

    @property
    def num_heads(self) -> int:
        return self.src_heads[1] - self.src_heads[0]


@dataclass(frozen=True)
class RankPlan:
    dst_rank: int
    pieces: tuple[HeadPiece, ...]


@dataclass(frozen=True)
class TransferPlan:
    num_kv_heads: int
    tp_src: int
    tp_dst: int
    ranks: tuple[RankPlan, ...]

    def pairs(self) -> list[tuple[int, int]]:
        """The (source rank, destination rank) connections the plan uses."""
        return sorted({(p.src_rank, r.dst_rank) for r in self.ranks for p in r.pieces})


def _holder(num_kv_heads: int, tp_src: int, head: int, dst_rank: int) -> int:
    """The source rank to read global `head` from; replicas are chosen round-robin by dst rank."""
    if num_kv_heads >= tp_src:
        return head // (num_kv_heads // tp_src)
    replicas = tp_src // num_kv_heads
    return head * replicas + dst_rank % replicas


def plan_transfer(num_kv_heads: int, tp_src: int, tp_dst: int) -> TransferPlan:
    """Which source rank sends which heads to each destination rank."""
    _check_split(num_kv_heads, tp_src)
    _check_split(num_kv_heads, tp_dst)
    ranks = []
    for dst in range(tp_dst):
        d0, d1 = kv_head_range(num_kv_heads, dst, tp_dst)
        pieces: list[HeadPiece] = []
        for head in range(d0, d1):
            src = _holder(num_kv_heads, tp_src, head, dst)
            s_local = head - kv_head_range(num_kv_heads, src, tp_src)[0]
            d_local = head - d0
            last = pieces[-1] if pieces else None
            if last and last.src_rank == src and last.src_heads[1] == s_local and last.dst_heads[1] == d_local:
                pieces[-1] = HeadPiece(src, (last.src_heads[0], s_local + 1), (last.dst_heads[0], d_local + 1))
            else:
                pieces.append(HeadPiece(src, (s_local, s_local + 1), (d_local, d_local + 1)))
        ranks.append(RankPlan(dst, tuple(pieces)))
    return TransferPlan(num_kv_heads, tp_src, tp_dst, tuple(ranks))


@dataclass(frozen=True)
class BlockLayout:
    """One rank's cache geometry; byte sizes derive from it."""

    num_layers: int
    local_kv_heads: int
    block_size: int
    head_dim: int
    elem_size: int

    @classmethod
    def for_rank(cls, num_layers: int, num_kv_heads: int, tp: int, block_size: int, head_dim: int,
                 elem_size: int) -> BlockLayout:
        _check_split(num_kv_heads, tp)
        return cls(num_layers, max(1, num_kv_heads // tp), block_size, head_dim, elem_size)

    @property
    def head_bytes(self) -> int:
        return self.block_size * self.head_dim * self.elem_size

    @property
    def chunk_bytes(self) -> int:
        """One (layer, k|v) chunk of one block: all local heads."""
        return self.local_kv_heads * self.head_bytes

    @property
    def block_bytes(self) -> int:
        return self.num_layers * 2 * self.chunk_bytes


def merge_descriptors(descs: np.ndarray) -> np.ndarray:
    """Merge runs where both the source and the destination ranges continue the previous one."""
    if len(descs) < 2:
        return descs
    src, dst, n = descs[:, SRC_OFFSET], descs[:, DST_OFFSET], descs[:, LENGTH]
    starts_run = np.ones(len(descs), dtype=bool)
    starts_run[1:] = (src[1:] != src[:-1] + n[:-1]) | (dst[1:] != dst[:-1] + n[:-1])
    starts = np.flatnonzero(starts_run)
    return np.stack([src[starts], dst[starts], np.add.reduceat(n, starts)], axis=1)


def piece_descriptors(piece: HeadPiece, src_layout: BlockLayout, dst_layout: BlockLayout,
                      src_blocks: np.ndarray, dst_blocks: np.ndarray) -> np.ndarray:
    """Unmerged descriptors for one piece over the given blocks, in (block, layer, k|v) order."""
    chunks = np.arange(src_layout.num_layers * 2, dtype=np.int64)
    hb = src_layout.head_bytes
    src = (src_blocks[:, None] * (src_layout.num_layers * 2) + chunks[None, :]) * src_layout.chunk_bytes
    dst = (dst_blocks[:, None] * (dst_layout.num_layers * 2) + chunks[None, :]) * dst_layout.chunk_bytes
    src = src.reshape(-1) + piece.src_heads[0] * hb
    dst = dst.reshape(-1) + piece.dst_heads[0] * hb
    return np.stack([src, dst, np.full_like(src, piece.num_heads * hb)], axis=1)


def _check_layouts(src: BlockLayout, dst: BlockLayout, src_blocks: np.ndarray, dst_blocks: np.ndarray) -> None:
    if (src.num_layers, src.block_size, src.head_dim, src.elem_size) != (
            dst.num_layers, dst.block_size, dst.head_dim, dst.elem_size):
        raise ValueError(f"layouts differ beyond the head split: {src} vs {dst}")
    if src_blocks.shape != dst_blocks.shape or src_blocks.ndim != 1:
        raise ValueError(f"src and dst block ids must be 1-D and equally long: "
                         f"{src_blocks.shape} vs {dst_blocks.shape}")


def expand_plan(plan: TransferPlan, src_layout: BlockLayout, dst_layout: BlockLayout,
                src_blocks: list[int] | np.ndarray, dst_blocks: list[int] | np.ndarray
                ) -> dict[tuple[int, int], np.ndarray]:
    """Merged byte descriptors per (src rank, dst rank): block `src_blocks[i]` -> `dst_blocks[i]`."""
    sb = np.asarray(src_blocks, dtype=np.int64)
    db = np.asarray(dst_blocks, dtype=np.int64)
    _check_layouts(src_layout, dst_layout, sb, db)
    out: dict[tuple[int, int], list[np.ndarray]] = {}
    for rank in plan.ranks:
        for piece in rank.pieces:
            descs = piece_descriptors(piece, src_layout, dst_layout, sb, db)
            out.setdefault((piece.src_rank, rank.dst_rank), []).append(descs)
    return {pair: merge_descriptors(np.concatenate(parts)) for pair, parts in out.items()}
