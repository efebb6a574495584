"""The engine's step scheduler: which sequences run in the next step, and how many tokens each.

Lifecycle of a sequence: WAITING (queued, no KV) -> RUNNING (has blocks; prefilled in chunks of
at most the step's token budget, then decoded one token a step) -> FINISHED (blocks freed), or
HELD (prefill-only requests: finished prefill, blocks kept until the KV is exported and released).
When the cache runs out of blocks mid-decode, the newest running sequence is preempted: its blocks
are freed and it is re-queued at the front to be recomputed from its tokens so far.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

from services.engine.batch import SeqChunk, StepBatch
from services.engine.errors import BadRequestError
from services.engine.model.sampling import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    HELD = "held"  # prefilled or detached: keeps its blocks, not scheduled
    RECEIVING = "receiving"  # KV arriving from another group; not scheduled yet
    FINISHED = "finished"


@dataclass(eq=False)  # identity: queues find and remove a sequence without comparing its tokens
class Sequence:
    request_id: str
    token_ids: list[int]
    prompt_len: int
    params: SamplingParams  # its seed is set when it samples (LLMEngine._seeded)
    prefill_only: bool = False
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose KV is in the cache
    status: SeqStatus = SeqStatus.WAITING

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.prompt_len


class BlockAllocator:
    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"need {n} KV blocks, {len(self._free)} free")
        return [self._free.pop() for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


@dataclass
class ScheduledChunk:
    seq: Sequence
    num_tokens: int
    sample: bool


class Scheduler:
    def __init__(self, num_blocks: int, block_size: int, max_num_seqs: int, max_batched_tokens: int) -> None:
        self.blocks = BlockAllocator(num_blocks)
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_batched_tokens = max_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def check_fits(self, total_tokens: int) -> None:
        need = self.blocks_for(total_tokens)
        if need > self.blocks.num_blocks:
            raise BadRequestError(
                f"request needs {total_tokens} tokens of KV cache ({need} blocks) but the cache holds only "
                f"{self.blocks.num_blocks * self.block_size} tokens; shorten the prompt or max_tokens"
            )

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Give `seq` blocks for `num_tokens` tokens; False (nothing allocated) if too few are free."""
        need = self.blocks_for(num_tokens) - len(seq.block_table)
        if need <= 0:
            return True
        if need > self.blocks.num_free:
            return False
        seq.block_table += self.blocks.allocate(need)
        return True

    def free(self, seq: Sequence) -> None:
        self.blocks.free(seq.block_table)
        seq.block_table = []

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.free(seq)
        seq.num_computed = 0
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)

    def schedule(self) -> tuple[StepBatch, list[ScheduledChunk]]:
        budget = self.max_batched_tokens
        chunks: list[ScheduledChunk] = []
        for seq in list(self.running):
            if seq.status is not SeqStatus.RUNNING or budget == 0:
                continue
            n = min(len(seq.token_ids) - seq.num_computed, budget)
            while not self.grow(seq, seq.num_computed + n):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is SeqStatus.RUNNING:
                chunks.append(ScheduledChunk(seq, n, seq.num_computed + n == len(seq.token_ids)))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            n = min(len(seq.token_ids) - seq.num_computed, budget)
            if not self.grow(seq, seq.num_computed + n):
                break
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            chunks.append(ScheduledChunk(seq, n, seq.num_computed + n == len(seq.token_ids)))
            budget -= n
        return self._batch(chunks)

    def _batch(self, chunks: list[ScheduledChunk]) -> tuple[StepBatch, list[ScheduledChunk]]:
        # Single-token chunks run as decode rows (batched attention); longer ones as prefill.
        chunks.sort(key=lambda c: c.num_tokens != 1)
        batch = StepBatch()
        row = 0
        for c in chunks:
            s = c.seq
            part = SeqChunk(s.token_ids[s.num_computed : s.num_computed + c.num_tokens], s.num_computed, s.block_table)
            (batch.decode if c.num_tokens == 1 else batch.prefill).append(part)
            row += c.num_tokens
            if c.sample:
                batch.sample_rows.append(row - 1)
        return batch, chunks
