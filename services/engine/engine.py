"""LLMEngine: continuous batching over a paged KV cache, on one TP group.

The leader process (rank 0) owns the scheduler, the sampler and the requests; ranks 1..N-1 run in
worker processes and execute what the leader broadcasts. `step()` is schedule -> execute -> update.

Request lifecycle: add_request -> (prefill chunks) -> decode steps -> finished ("stop" | "length")
or aborted. Disaggregated serving: `prefill_only=True` finishes after the first token with
finish_reason "prefilled" and keeps the KV until `export_kv` + `release`; the decode side resumes
with `add_prefilled`.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import random
import time
from dataclasses import dataclass, replace
from typing import Any

import torch

from services.engine.batch import SeqChunk, StepBatch
from services.engine.config import EngineArgs, ModelConfig
from services.engine.dist import TPGroup, make_store
from services.engine.errors import BadRequestError, EngineError
from services.engine.layers import RowParallelLinear
from services.engine.runner import ModelRunner
from services.engine.sampling import SamplingParams, sample
from services.engine.scheduler import ScheduledChunk, Scheduler, SeqStatus, Sequence
from services.engine.tokenizer import Tokenizer
from services.engine.worker import ReadKV, Shutdown, Step, WriteKV, run_worker, set_threads

log = logging.getLogger(__name__)


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "prefilled"
    logprobs: list[float] | None = None
    index: int = 0  # position of new_token_ids[0] among the request's generated tokens


@dataclass
class KVExport:
    """A request's KV with all heads: k and v are [layers, tokens, KV heads, head_dim]."""

    num_tokens: int
    k: torch.Tensor
    v: torch.Tensor


def attach_group(runner: ModelRunner, group: TPGroup | None) -> None:
    """Point a loaded model's all-reduces at `group` (a slot keeping its shard across epochs)."""
    runner.group = group
    for module in runner.model.modules():
        if isinstance(module, RowParallelLinear):
            module.group = group


class LLMEngine:
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
        self.scheduler = Scheduler(self.runner.num_blocks, args.block_size, args.max_num_seqs,
                                   args.max_num_batched_tokens)
        self.seqs: dict[str, Sequence] = {}
        self._rng = random.Random(args.seed)
        self.kv_agent: Any = None  # kvtransfer.group_transfer.RankAgent of rank 0, once opened

    def _start_group(self, args: EngineArgs) -> TPGroup:
        set_threads(args.tp)
        store = make_store(args.dist_addr or "127.0.0.1:0", is_master=True, timeout_s=args.dist_timeout_s)
        if args.dist_addr is None:
            args = replace(args, dist_addr=f"127.0.0.1:{store.port}")
        if args.spawn_workers:
            ctx = mp.get_context("spawn")
            for rank in range(1, args.tp):
                p = ctx.Process(target=run_worker, args=(args, rank), daemon=True, name=f"nitsum-rank{rank}")
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
        total = len(prompt_ids) + params.max_tokens
        if total > self.max_model_len:
            raise BadRequestError(
                f"this model's maximum context length is {self.max_model_len} tokens, but {total} were requested "
                f"({len(prompt_ids)} in the prompt, {params.max_tokens} for the completion); "
                "shorten the prompt or lower max_tokens"
            )
        self.scheduler.check_fits(total)

    def _seeded(self, params: SamplingParams) -> SamplingParams:
        """A request that samples gets a seed here if it has none: its draws depend on nothing else
        (sampling.py), so it can move to another group and draw the same tokens there."""
        if params.greedy or params.seed is not None:
            return params
        return replace(params, seed=self._rng.getrandbits(63))

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    prefill_only: bool = False, output_ids: list[int] | tuple[int, ...] = ()) -> None:
        """Queue a request. `output_ids`: tokens it already generated elsewhere (a request resumed
        after its group died): they are computed again with the prompt, and generation goes on
        from there with `params.max_tokens` counting them."""
        self._check_request(request_id, prompt_ids, params)
        if len(output_ids) >= params.max_tokens:
            raise BadRequestError(f"request {request_id!r} already has its {params.max_tokens} tokens")
        seq = Sequence(request_id, [*prompt_ids, *output_ids], len(prompt_ids), self._seeded(params), prefill_only)
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
        return self._update(chunks, self._execute(batch))

    def _execute(self, batch: StepBatch) -> torch.Tensor | None:
        if self.group is not None:
            self.group.broadcast_object(Step(batch))
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

    # ---- disaggregation and migration ---------------------------------------------------------
    # KV of computed tokens never changes, so any computed range can be copied out while the
    # request keeps decoding (pre-copy); `detach` stops it for the final copy of what is left.
    def _slots(self, seq: Sequence, start: int, stop: int) -> list[tuple[int, int]]:
        bs = self.args.block_size
        return [(seq.block_table[i // bs], i % bs) for i in range(start, stop)]

    def export_kv(self, request_id: str, start: int = 0, stop: int | None = None) -> KVExport:
        """KV of tokens [start, stop) (default: all computed) with all heads, gathered over the TP ranks."""
        seq = self.seqs.get(request_id)
        if seq is None or seq.status not in (SeqStatus.HELD, SeqStatus.RUNNING):
            raise EngineError(f"request {request_id!r} holds no KV to export")
        stop = seq.num_computed if stop is None else stop
        if not 0 <= start <= stop <= seq.num_computed:
            raise EngineError(f"cannot export tokens [{start}, {stop}) of {seq.num_computed} computed")
        slots = self._slots(seq, start, stop)
        local = self.runner.read_kv(slots)
        if self.group is not None:
            self.group.broadcast_object(ReadKV(slots))
            local = self.runner.assemble_heads(self.group.all_gather(local))
        return KVExport(len(slots), local[:, 0], local[:, 1])

    def computed_tokens(self, request_id: str) -> int:
        return self.seqs[request_id].num_computed

    def detach(self, request_id: str) -> Sequence:
        """Stop scheduling a running request but keep its KV, for the last copy of a migration."""
        seq = self.seqs.get(request_id)
        if seq is None or seq.status is not SeqStatus.RUNNING:
            raise EngineError(f"request {request_id!r} is not running")
        self.scheduler.running.remove(seq)
        seq.status = SeqStatus.HELD
        return seq

    def release(self, request_id: str) -> None:
        self.abort(request_id)

    def remaining_tokens(self, request_id: str) -> int:
        """Tokens this request may still generate (its max_tokens minus what it has)."""
        seq = self.seqs[request_id]
        return seq.params.max_tokens - seq.num_output

    def take_out(self, request_id: str) -> tuple[list[int], KVExport]:
        """Stop-and-copy migration in one call: detach a running request, copy out all its KV and
        its sampler state, and free it here. Returns its generated ids and the KV."""
        seq = self.detach(request_id)
        try:
            kv = self.export_kv(request_id)
        finally:
            self.release(request_id)
        return seq.token_ids[seq.prompt_len:], kv

    def begin_receive(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        """Reserve a request whose KV will arrive in pieces (`receive_kv`), then `finish_receive`."""
        self._check_request(request_id, prompt_ids, params)
        seq = Sequence(request_id, list(prompt_ids), len(prompt_ids), self._seeded(params))
        seq.status = SeqStatus.RECEIVING
        self.seqs[request_id] = seq

    def receive_kv(self, request_id: str, start: int, kv: KVExport) -> None:
        """Write KV for tokens [start, start + kv.num_tokens) into this group's cache."""
        seq = self.seqs[request_id]
        if seq.status is not SeqStatus.RECEIVING:
            raise EngineError(f"request {request_id!r} is not receiving KV")
        if not self.scheduler.grow(seq, start + kv.num_tokens + 1):
            raise EngineError("no free KV blocks to receive this request now")
        slots = self._slots(seq, start, start + kv.num_tokens)
        full = torch.stack((kv.k, kv.v), dim=1)
        if self.group is not None:
            self.group.broadcast_object(WriteKV(slots, tuple(full.shape)))
            self.group.broadcast(full.to(self.runner.dtype).contiguous())
        self.runner.write_kv(slots, full)

    def finish_receive(self, request_id: str, output_ids: list[int], num_computed: int) -> None:
        """All KV has landed: the request joins the running batch and decodes from here."""
        seq = self.seqs[request_id]
        seq.token_ids = seq.token_ids[: seq.prompt_len] + list(output_ids)
        if num_computed != len(seq.token_ids) - 1:
            raise EngineError(f"KV for {num_computed} tokens does not match {len(seq.token_ids)} tokens so far")
        if not self.scheduler.grow(seq, num_computed + 1):
            raise EngineError("no free KV blocks to receive this request now")
        seq.num_computed, seq.status = num_computed, SeqStatus.RUNNING
        self.scheduler.running.append(seq)

    def add_prefilled(self, request_id: str, prompt_ids: list[int], output_ids: list[int], kv: KVExport,
                      params: SamplingParams) -> None:
        """Resume a request whose first `kv.num_tokens` tokens were computed elsewhere."""
        self.begin_receive(request_id, prompt_ids, params)
        try:
            self.receive_kv(request_id, 0, kv)
            self.finish_receive(request_id, output_ids, kv.num_tokens)
        except Exception:
            self.abort(request_id)
            raise

    # ---- convenience and profiling -------------------------------------------------------------
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

    def shutdown(self) -> None:
        """Stop the group's other ranks (they return from `serve_rank`) and join spawned ones.

        The runner (weights and KV cache) stays usable: a slot re-cut at runtime keeps it."""
        if self.kv_agent is not None:  # followers close theirs on Shutdown
            self.kv_agent.close()
            self.kv_agent = None
        if self.group is not None:
            try:
                self.group.broadcast_object(Shutdown())
            except Exception:  # a worker already gone: fall through to terminate
                log.warning("could not tell workers to stop; terminating them")
        for p in self._procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
        self._procs.clear()
        self.group = None
