"""LLMEngine: continuous batching over a paged KV cache, on one TP group.

The leader process (rank 0) owns the scheduler, the sampler and the requests; ranks 1..N-1 run in
worker processes and execute what the leader broadcasts. `step()` is schedule -> execute -> update.

Request lifecycle: add_request -> (prefill chunks) -> decode steps -> finished ("stop" | "length")
or aborted. Disaggregated serving: `prefill_only=True` finishes after the first token with
finish_reason "prefilled" and keeps the KV until `export_kv` + `release`; the decode side resumes
with `add_prefilled`. KV import/export and the KV API of the transports live in `kv_io.py`, step
timings in `profiling.py`; both are mixed into `LLMEngine`.
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import random
import time
from dataclasses import dataclass, replace
from typing import Any

import torch

from services.engine.batch import StepBatch
from services.engine.config import EngineArgs, ModelConfig, context_error
from services.engine.dist import TPGroup, make_store
from services.engine.errors import BadRequestError
from services.engine.kv_io import KVImportExport
from services.engine.model.layers import RowParallelLinear
from services.engine.model.sampling import SamplingParams, sample
from services.engine.policy import NO_SLO, SLO
from services.engine.profiling import Profiling
from services.engine.runner import ModelRunner
from services.engine.scheduler import ScheduledChunk, Scheduler, SchedulerConfig, SeqStatus, Sequence
from services.engine.tokenizer import Tokenizer
from services.engine.worker import Shutdown, Step, handler_modules, run_worker, set_threads

log = logging.getLogger(__name__)


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "prefilled"
    logprobs: list[float] | None = None
    index: int = 0  # position of new_token_ids[0] among the request's generated tokens


def attach_group(runner: ModelRunner, group: TPGroup | None) -> None:
    """Point a loaded model's all-reduces at `group` (a slot keeping its shard across epochs)."""
    runner.group = group
    for module in runner.model.modules():
        if isinstance(module, RowParallelLinear):
            module.group = group


class LLMEngine(KVImportExport, Profiling):
    def __init__(self, args: EngineArgs, runner: ModelRunner | None = None, group: TPGroup | None = None,
                 tokenizer: Tokenizer | None = None) -> None:
        """Build the group and load the weights; or, with `runner` (a slot re-cut at runtime),
        serve a model already in memory over `group`, whose other ranks the caller has formed.
        `tokenizer`: the checkpoint's, if the caller has it already (else read from `args.model`)."""
        self.model_config = cfg = runner.cfg if runner is not None else ModelConfig.from_dir(args.model)
        args.validate_for(cfg)
        self.tokenizer = tokenizer or Tokenizer(args.model, extra_eos_ids=cfg.eos_token_ids)
        self.model_name = args.model
        self._procs: list[mp.process.BaseProcess] = []
        self.args = args
        if runner is None:
            self.group = self._start_group(args) if args.tp > 1 else None
            runner = ModelRunner(args, cfg, 0, self.group)
        else:
            self.group = group
            attach_group(runner, group)
        self.runner = runner
        self.max_model_len = args.model_len(cfg)
        self.scheduler = Scheduler(SchedulerConfig(self.runner.num_blocks, args.block_size, args.max_num_seqs,
                                                   args.max_num_batched_tokens, args.schedule, args.tpot_guard,
                                                   args.min_chunk_tokens, args.max_step_s or math.inf))
        self.seqs: dict[str, Sequence] = {}
        self._rng = random.Random(args.seed)
        self.kv_agent: Any = None  # rank 0's KV agent, once a transport opened one; closed at shutdown

    def _start_group(self, args: EngineArgs) -> TPGroup:
        set_threads(args.tp)
        store = make_store(args.dist_addr or "127.0.0.1:0", is_master=True, timeout_s=args.dist_timeout_s)
        if args.dist_addr is None:
            args = replace(args, dist_addr=f"127.0.0.1:{store.port}")
        if args.spawn_workers:
            ctx = mp.get_context("spawn")
            for rank in range(1, args.tp):
                p = ctx.Process(target=run_worker, args=(args, rank, handler_modules()), daemon=True,
                                name=f"nitsum-rank{rank}")
                p.start()
                self._procs.append(p)
        device = torch.device(args.device if args.device != "cuda" else "cuda:0")
        return TPGroup(store, args.dist_prefix, 0, args.tp, device, args.dist_timeout_s)

    # ---- requests -------------------------------------------------------------------------
    @property
    def weight_bytes(self) -> int:
        return self.runner.weight_bytes

    def _check_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        if request_id in self.seqs:
            raise BadRequestError(f"request id {request_id!r} is already in use")
        if not prompt_ids:
            raise BadRequestError("the prompt is empty; send at least one token")
        bad = [t for t in prompt_ids if not 0 <= t < self.model_config.vocab_size]
        if bad:
            raise BadRequestError(f"token id {bad[0]} is outside the vocabulary (0..{self.model_config.vocab_size - 1})")
        too_long = context_error(len(prompt_ids), params.max_tokens, self.max_model_len)
        if too_long is not None:
            raise BadRequestError(too_long)
        self.scheduler.check_fits(len(prompt_ids) + params.max_tokens)

    def _seeded(self, params: SamplingParams) -> SamplingParams:
        """A request that samples gets a seed here if it has none: its draws depend on nothing else
        (model/sampling.py), so it can move to another group and draw the same tokens there."""
        if params.greedy or params.seed is not None:
            return params
        return replace(params, seed=self._rng.getrandbits(63))

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    prefill_only: bool = False, output_ids: list[int] | tuple[int, ...] = (),
                    slo: SLO = NO_SLO) -> None:
        """Queue a request. `output_ids`: tokens it already generated elsewhere (a request resumed
        after its group died): they are computed again with the prompt, and generation goes on
        from there with `params.max_tokens` counting them. `slo`: its tier's deadline, TPOT target
        and weight, which the scheduler's policy orders and guards by (policy.py)."""
        self._check_request(request_id, prompt_ids, params)
        if len(output_ids) >= params.max_tokens:
            raise BadRequestError(f"request {request_id!r} already has its {params.max_tokens} tokens")
        seq = Sequence(request_id, [*prompt_ids, *output_ids], len(prompt_ids), self._seeded(params), prefill_only,
                       slo=slo)
        self.seqs[request_id] = seq
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> None:
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return
        if seq in self.scheduler.waiting:
            self.scheduler.waiting.remove(seq)
        if seq in self.scheduler.running:
            self.scheduler.running.remove(seq)
        self.scheduler.free(seq)
        seq.status = SeqStatus.FINISHED

    def num_requests(self) -> int:
        """Requests this engine holds: queued, running, holding KV for export, or receiving KV."""
        return len(self.seqs)

    def has_unfinished(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running)

    def kv_usage(self) -> tuple[int, int]:
        total = self.scheduler.blocks.num_blocks
        return total - self.scheduler.blocks.num_free, total

    # ---- the step ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        batch, chunks = self.scheduler.schedule()
        if not chunks:
            return []
        started = time.perf_counter()
        outputs = self._update(chunks, self._execute(batch))
        # The group's own step-time model, which the TPOT guard predicts with (policy.py).
        self.scheduler.step_time.observe(sum(len(c.tokens) for c in batch.prefill), len(batch.decode),
                                         sum(c.context for c in batch.decode), time.perf_counter() - started)
        return outputs

    def _execute(self, batch: StepBatch) -> torch.Tensor | None:
        self.send_to_ranks(Step(batch))
        return self.runner.execute(batch)

    def _update(self, chunks: list[ScheduledChunk], logits: torch.Tensor | None) -> list[RequestOutput]:
        sampled = [c.seq for c in chunks if c.sample]
        for c in chunks:
            c.seq.num_computed += c.num_tokens
        if not sampled:
            return []
        assert logits is not None
        tokens, logprobs = sample(logits, [s.params for s in sampled], [s.num_output for s in sampled])
        return [self._append(seq, tok, lp) for seq, tok, lp in zip(sampled, tokens, logprobs, strict=True)]

    def _append(self, seq: Sequence, token: int, logprob: float | None) -> RequestOutput:
        seq.token_ids.append(token)
        reason = self._finish_reason(seq, token)
        if reason is not None:
            self.scheduler.running.remove(seq)
            if reason == "prefilled":
                seq.status = SeqStatus.HELD
            else:
                seq.status = SeqStatus.FINISHED
                self.scheduler.free(seq)
                del self.seqs[seq.request_id]
        return RequestOutput(seq.request_id, [token], reason is not None, reason,
                             None if logprob is None else [logprob], seq.num_output - 1)

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.tokenizer.eos_token_ids):
            return "stop"
        if seq.num_output >= p.max_tokens or len(seq.token_ids) >= self.max_model_len:
            return "length"
        if seq.prefill_only:
            return "prefilled"
        return None

    # ---- convenience -------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        """Run prompts to completion in one continuous batch; returns each one's generated ids."""
        ids = [f"gen-{i}-{time.monotonic_ns()}" for i in range(len(prompts))]
        for rid, prompt in zip(ids, prompts, strict=True):
            self.add_request(rid, prompt, params)
        out: dict[str, list[int]] = {rid: [] for rid in ids}
        while self.has_unfinished():
            for o in self.step():
                out[o.request_id].extend(o.new_token_ids)
        return [out[rid] for rid in ids]

    def shutdown(self) -> None:
        """Stop the group's other ranks (they return from `serve_rank`) and join spawned ones.

        The runner (weights and KV cache) stays usable: a slot re-cut at runtime keeps it."""
        if self.kv_agent is not None:  # followers close theirs on Shutdown
            self.kv_agent.close()
            self.kv_agent = None
        if self.group is not None:
            try:
                self.send_to_ranks(Shutdown())
            except Exception:  # a worker already gone: fall through to terminate
                log.warning("could not tell workers to stop; terminating them")
        for p in self._procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
        self._procs.clear()
        self.group = None
