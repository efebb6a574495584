"""What one engine step runs: the scheduler's plan for the step and the tensors built from it.

`StepBatch` is plain data (lists of ints) so the group leader can broadcast it to the other TP
ranks cheaply; every rank then builds the same `AttnMeta` tensors from it. Decode sequences (one
new token each) come first in the packed token order, then prefill chunks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    key_slots: torch.Tensor | None  # slots of all context+length keys; None when context == 0


@dataclass
class AttnMeta:
    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    num_decode: int
    decode_slots: torch.Tensor | None  # [B, S] cache slots of each decode sequence's keys
    decode_mask: torch.Tensor | None  # [B, 1, 1, S] True where a key is valid
    prefill: list[PrefillSegment]
    sample_rows: torch.Tensor


def _slots(block_table: list[int], start: int, stop: int, block_size: int) -> list[int]:
    return [block_table[p // block_size] * block_size + p % block_size for p in range(start, stop)]


def build_meta(batch: StepBatch, block_size: int, device: torch.device) -> AttnMeta:
    ids: list[int] = []
    pos: list[int] = []
    slots: list[int] = []
    for c in batch.decode:
        ids.append(c.tokens[0])
        pos.append(c.context)
        slots.append(c.block_table[c.context // block_size] * block_size + c.context % block_size)
    segments: list[PrefillSegment] = []
    for c in batch.prefill:
        n = len(c.tokens)
        seg_slots = _slots(c.block_table, 0, c.context + n, block_size)
        key_slots = torch.tensor(seg_slots, dtype=torch.long, device=device) if c.context else None
        segments.append(PrefillSegment(len(ids), n, c.context, key_slots))
        ids.extend(c.tokens)
        pos.extend(range(c.context, c.context + n))
        slots.extend(seg_slots[c.context :])
    decode_slots = decode_mask = None
    if batch.decode:
        lens = torch.tensor([c.context + 1 for c in batch.decode], dtype=torch.long)
        width = max(len(c.block_table) for c in batch.decode)
        tables = torch.tensor([c.block_table + [0] * (width - len(c.block_table)) for c in batch.decode])
        span = int(lens.max())
        all_slots = (tables[:, :, None] * block_size + torch.arange(block_size)).view(len(lens), -1)
        decode_slots = all_slots[:, :span].to(device)
        decode_mask = (torch.arange(span)[None, :] < lens[:, None]).view(len(lens), 1, 1, span).to(device)

    def t(x: list[int]) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.long, device=device)

    return AttnMeta(t(ids), t(pos), t(slots), len(batch.decode), decode_slots, decode_mask, segments,
                    t(batch.sample_rows))
