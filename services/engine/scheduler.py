"""The engine's step scheduler: which sequences run in the next step, and how many tokens each.

Lifecycle of a sequence: WAITING (queued, no KV) -> RUNNING (has blocks; prefilled in chunks of
at most the step's token budget, then decoded one token a step) -> FINISHED (blocks freed), or
HELD (prefill-only requests: finished prefill, blocks kept until the KV is exported and released).

A step: every decoding sequence gets its one token (a sequence out of KV blocks makes the policy's
victim give up its blocks and wait to be computed again from its tokens so far); then prompts get
the rest of the token budget in the policy's order, cut down so that the step fits the tightest
TPOT target among the decoding sequences (policy.py: the same functions the simulator's groups
use; `policy="fcfs"` is first come, first served, vLLM's way).
"""

from __future__ import annotations

import enum
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import services.engine.policy as policy
from services.engine.batch import SeqChunk, StepBatch
from services.engine.errors import BadRequestError
from services.engine.model.sampling import SamplingParams
from services.engine.policy import NO_SLO, SLO, StepTimeModel, Waiting


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
    slo: SLO = NO_SLO
    arrival: int = 0  # its place in first-come order

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def remaining(self) -> int:
        """Tokens still to compute before it samples."""
        return len(self.token_ids) - self.num_computed


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


@dataclass(frozen=True)
class SchedulerConfig:
    num_blocks: int
    block_size: int
    max_num_seqs: int
    max_batched_tokens: int
    policy: str = "tier"  # "tier" | "fcfs" (policy.py)
    tpot_guard: float = 0.9  # a step that also decodes fits this share of the tightest TPOT target
    min_chunk: int = 32  # the guard never cuts a step's prompt tokens below this
    max_step_s: float = math.inf  # a step carrying prompt tokens fits this (policy.step_cap_s)


class Scheduler:
    def __init__(self, config: SchedulerConfig, now: Callable[[], float] = time.time) -> None:
        self.config = config
        self.blocks = BlockAllocator(config.num_blocks)
        self.block_size = config.block_size
        self.max_num_seqs = config.max_num_seqs
        self.max_batched_tokens = config.max_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.step_time = StepTimeModel()
        self.now = now
        self._arrivals = 0

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
        self._arrivals += 1
        seq.arrival = self._arrivals
        self.waiting.append(seq)

    def queued_prompt_tokens(self) -> int:
        """Prompt tokens not computed yet, waiting or in a running prefill."""
        return sum(s.remaining for s in self.waiting) + sum(s.remaining for s in self.running if s.remaining > 1)

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
        chunks = self._decode_rows()
        decoding = [c.seq for c in chunks]
        budget = self.max_batched_tokens - len(chunks)
        if budget > 0:
            tightest = min((s.slo.tpot_s for s in decoding), default=math.inf)
            context = sum(s.num_computed for s in decoding)
            budget = policy.guarded_prefill_tokens(
                budget, len(decoding), tightest, lambda c: self.step_time.predict(c, len(decoding), context),
                self.config.tpot_guard, self.config.min_chunk, self.config.policy, self.config.max_step_s)
        chunks += self._prefill_chunks(budget)
        return self._batch(chunks)

    def _decode_rows(self) -> list[ScheduledChunk]:
        """Every running sequence with one token to compute gets it; one out of KV blocks makes the
        policy's victim give up its blocks (perhaps itself)."""
        chunks: list[ScheduledChunk] = []
        for seq in [s for s in self.running if s.remaining == 1]:
            if seq.status is not SeqStatus.RUNNING or len(chunks) >= self.max_batched_tokens:
                continue
            while not self.grow(seq, seq.num_computed + 1):
                victim = policy.preemption_victim(seq, self.running, _slo, self.config.policy)
                self._preempt(victim)
                chunks = [c for c in chunks if c.seq is not victim]
                if victim is seq:
                    break
            if seq.status is SeqStatus.RUNNING:
                chunks.append(ScheduledChunk(seq, 1, True))
        return chunks

    def _prefill_chunks(self, budget: int) -> list[ScheduledChunk]:
        """Prompt tokens, up to `budget`, to running prefills and then waiting sequences, in the
        policy's order; a waiting one starts only with a free batch place and blocks for its chunk."""
        rate = self.step_time.prefill_tokens_per_s() or 1e4
        pending = [s for s in self.running if s.status is SeqStatus.RUNNING and s.remaining > 1] + list(self.waiting)
        chunks: list[ScheduledChunk] = []
        for seq in policy.prefill_order(pending, _waiting, self.now(), rate, self.config.policy):
            if budget <= 0:
                break
            n = min(seq.remaining, budget)
            if seq.status is SeqStatus.WAITING:
                if len(self.running) >= self.max_num_seqs or not self.grow(seq, seq.num_computed + n):
                    if self.config.policy == "fcfs":
                        break  # first come, first served: nobody overtakes the head of the queue
                    continue
                self.waiting.remove(seq)
                seq.status = SeqStatus.RUNNING
                self.running.append(seq)
            elif not self.grow(seq, seq.num_computed + n):
                continue
            chunks.append(ScheduledChunk(seq, n, seq.num_computed + n == len(seq.token_ids)))
            budget -= n
        return chunks

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


def _slo(seq: Sequence) -> SLO:
    return seq.slo


def _waiting(seq: Sequence) -> Waiting:
    return Waiting(seq.slo, seq.remaining, seq.arrival)
