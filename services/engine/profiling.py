"""Timing an idle engine's forward passes: what `nitsum profile` (router/profile.py) fits the
planner's perf model to. Mixed into `LLMEngine`.

A timed step runs on the whole group as a real step does, over a scratch block table of the
engine's own cache; it needs an idle engine (no waiting or running request).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod

import torch

from services.engine.batch import SeqChunk, StepBatch
from services.engine.config import EngineArgs, ModelConfig
from services.engine.errors import BadRequestError, EngineError
from services.engine.runner import ModelRunner


class Profiling(ABC):
    """LLMEngine's step timings; the engine provides the state and the two methods below."""

    args: EngineArgs
    model_config: ModelConfig
    runner: ModelRunner

    @abstractmethod
    def has_unfinished(self) -> bool: ...

    @abstractmethod
    def _execute(self, batch: StepBatch) -> torch.Tensor | None: ...

    def _timed(self, batch: StepBatch, repeats: int) -> float:
        if self.has_unfinished():
            raise EngineError("profiling needs an idle engine")
        self._execute(batch)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            self._execute(batch)
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2]

    def _scratch_table(self, num_tokens: int) -> list[int]:
        need = -(-num_tokens // self.args.block_size)
        if need > self.runner.num_blocks:
            raise BadRequestError(f"{num_tokens} tokens of KV do not fit in {self.runner.num_blocks} blocks")
        return list(range(need))

    def time_prefill(self, num_tokens: int, repeats: int = 3) -> float:
        """Seconds for one prefill forward of `num_tokens` tokens (median of `repeats`)."""
        ids = [i % self.model_config.vocab_size for i in range(num_tokens)]
        batch = StepBatch(prefill=[SeqChunk(ids, 0, self._scratch_table(num_tokens))], sample_rows=[num_tokens - 1])
        return self._timed(batch, repeats)

    def time_decode_step(self, batch: int, context: int, repeats: int = 3) -> float:
        """Seconds for one decode step of `batch` sequences with `context` cached tokens each.

        The sequences share one scratch block table: the step reads as much KV as distinct ones would."""
        table = self._scratch_table(context + 1)
        chunks = [SeqChunk([1 + i % 100], context, table) for i in range(batch)]
        return self._timed(StepBatch(decode=chunks, sample_rows=list(range(batch))), repeats)
