"""What one engine step runs: the scheduler's plan for the step and the tensors built from it.

`StepBatch` is plain data (lists of ints) so the group leader can broadcast it to the other TP
ranks cheaply; every rank then builds the same `AttnMeta` tensors from it. Decode sequences (one
new token each) come first in the packed token order, then prefill chunks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch


@dataclass
class SeqChunk:
    """One sequence's share of a step: `tokens` new tokens after `context` already cached ones."""

    tokens: list[int]
    context: int
    block_table: list[int]


@dataclass
class StepBatch:
    decode: list[SeqChunk] = field(default_factory=list)
    prefill: list[SeqChunk] = field(default_factory=list)
    # Rows of the packed token order whose logits are needed (last token of finished prompts).
    sample_rows: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.decode) + sum(len(c.tokens) for c in self.prefill)


@dataclass
class PrefillSegment:
    start: int  # first row in the packed token order
    length: int
    context: int
    key_blocks: torch.Tensor | None  # blocks holding all context+length keys; None when context == 0


@dataclass
class AttnMeta:
    input_ids: torch.Tensor
    positions: torch.Tensor
    # Where each new token's K/V is written: (block, offset in block).
    cache_blocks: torch.Tensor
    cache_offsets: torch.Tensor
    num_decode: int
    decode_tables: torch.Tensor | None  # [B, max blocks] block tables of the decode sequences
    decode_lens: torch.Tensor | None  # [B] keys of each decode sequence, its new token's included
    prefill: list[PrefillSegment]
    sample_rows: torch.Tensor
    block_size: int

    @cached_property
    def decode_mask(self) -> torch.Tensor:
        """[B, 1, 1, max blocks * block_size], True where a key is valid: for the PyTorch attention
        path, which reads whole gathered blocks (the CPU kernel stops at each sequence's length)."""
        assert self.decode_tables is not None and self.decode_lens is not None
        span = self.decode_tables.shape[1] * self.block_size
        keys = torch.arange(span, device=self.decode_lens.device)
        return (keys[None, :] < self.decode_lens[:, None]).view(len(self.decode_lens), 1, 1, span)


def build_meta(batch: StepBatch, block_size: int, device: torch.device) -> AttnMeta:
    ids: list[int] = []
    pos: list[int] = []
    for c in batch.decode:
        ids.append(c.tokens[0])
        pos.append(c.context)
    segments: list[PrefillSegment] = []
    for c in batch.prefill:
        n = len(c.tokens)
        key_blocks = None
        if c.context:
            key_blocks = torch.tensor(c.block_table[: -(-(c.context + n) // block_size)], dtype=torch.long,
                                      device=device)
        segments.append(PrefillSegment(len(ids), n, c.context, key_blocks))
        ids.extend(c.tokens)
        pos.extend(range(c.context, c.context + n))
    tables = [c.block_table for c in batch.decode] + [c.block_table for c in batch.prefill for _ in c.tokens]
    cache_blocks = [table[p // block_size] for table, p in zip(tables, pos, strict=True)]
    decode_tables = decode_lens = None
    if batch.decode:
        decode_lens = torch.tensor([c.context + 1 for c in batch.decode], dtype=torch.long, device=device)
        width = max(-(-(c.context + 1) // block_size) for c in batch.decode)
        decode_tables = torch.tensor([c.block_table[:width] + [0] * (width - len(c.block_table[:width]))
                                      for c in batch.decode], dtype=torch.long, device=device)

    def t(x: list[int]) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.long, device=device)

    return AttnMeta(t(ids), t(pos), t(cache_blocks), t([p % block_size for p in pos]), len(batch.decode),
                    decode_tables, decode_lens, segments, t(batch.sample_rows), block_size)
