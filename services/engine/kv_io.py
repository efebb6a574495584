"""KV import and export: a request's KV copied out of one group's paged cache and into another's
(hand-off and migration), and the small KV API that moving KV block by block between groups
(`kvtransfer.group_transfer`) uses instead of the engine's requests, block tables or group.

Mixed into `LLMEngine`. Lifecycles:
- Copy out: `export_kv` gathers any computed range with all heads over the TP ranks. KV of
  computed tokens never changes, so it can be copied while the request keeps decoding (the
  pre-copy of a migration); `detach` stops it for the final copy of what is left; `take_out` is
  that stop-and-copy in one call.
- Copy in, in pieces: `begin_receive` (reserved, not scheduled) -> `receive_kv` per piece (blocks
  grow as the KV lands) -> `finish_receive` (joins the running batch). `add_prefilled` is the
  three in one.
- Copy in, block by block: `reserve_kv` (blocks for all the tokens at once, which each rank's
  agent writes into) -> `finish_receive`, or `abort` when the KV does not come.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from services.engine.config import EngineArgs
from services.engine.dist import TPGroup
from services.engine.errors import EngineError
from services.engine.model.sampling import SamplingParams
from services.engine.policy import NO_SLO, SLO
from services.engine.runner import ModelRunner
from services.engine.scheduler import Scheduler, SeqStatus, Sequence
from services.engine.worker import ReadKV, WriteKV


@dataclass
class KVExport:
    """A request's KV with all heads: k and v are [layers, tokens, KV heads, head_dim]."""

    num_tokens: int
    k: torch.Tensor
    v: torch.Tensor


class KVImportExport(ABC):
    """LLMEngine's KV import/export and its KV API; the engine provides the state below."""

    args: EngineArgs
    runner: ModelRunner
    group: TPGroup | None
    scheduler: Scheduler
    seqs: dict[str, Sequence]

    @abstractmethod
    def _check_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None: ...

    @abstractmethod
    def _seeded(self, params: SamplingParams) -> SamplingParams: ...

    @abstractmethod
    def abort(self, request_id: str) -> None: ...

    # ---- the KV API: the group ------------------------------------------------------------------
    @property
    def kv_cache(self) -> torch.Tensor:
        """Rank 0's whole KV cache tensor (layout: `runner.py`); every rank holds one like it."""
        return self.runner.kv_cache

    def send_to_ranks(self, msg: object) -> None:
        """Broadcast `msg` to the group's other ranks, which run its registered handler
        (`worker.register_handler`); a no-op without other ranks."""
        if self.group is not None:
            self.group.broadcast_object(msg)

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's `t`, in rank order (the other ranks' handlers gather theirs)."""
        return [t] if self.group is None else self.group.all_gather(t)

    # ---- the KV API: requests -------------------------------------------------------------------
    def has_request(self, request_id: str) -> bool:
        return request_id in self.seqs

    def computed_tokens(self, request_id: str) -> int:
        return self.seqs[request_id].num_computed

    def generated_ids(self, request_id: str) -> list[int]:
        """The tokens the request generated so far."""
        seq = self.seqs[request_id]
        return seq.token_ids[seq.prompt_len :]

    def prompt_of(self, request_id: str) -> tuple[list[int], SamplingParams]:
        """The request's prompt ids and sampling parameters (its seed set): what another group
        needs to reserve it (`begin_receive`, `reserve_kv`)."""
        seq = self.seqs[request_id]
        return seq.token_ids[: seq.prompt_len], seq.params

    def slo_of(self, request_id: str) -> SLO:
        """The request's tier as the scheduler sees it, to travel with it (policy.py)."""
        return self.seqs[request_id].slo

    def block_ids(self, request_id: str) -> list[int]:
        """The blocks holding the request's computed tokens, in order."""
        seq = self.seqs.get(request_id)
        if seq is None:
            raise EngineError(f"request {request_id!r} holds no KV here")
        return seq.block_table[: -(-seq.num_computed // self.args.block_size)]

    def reserve_kv(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                   num_tokens: int, slo: SLO = NO_SLO) -> list[int]:
        """Reserve a request that will receive KV for `num_tokens` tokens straight into its blocks,
        all allocated now; returns its block ids in order. Nothing stays reserved on failure."""
        self.begin_receive(request_id, prompt_ids, params, slo)
        seq = self.seqs[request_id]
        try:
            self._grow(seq, num_tokens + 1)
        except EngineError:
            self.abort(request_id)
            raise
        return list(seq.block_table)

    # ---- copy out --------------------------------------------------------------------------------
    def _positions(self, seq: Sequence, start: int, stop: int) -> list[tuple[int, int]]:
        """The (block, offset) cache positions of the sequence's tokens [start, stop)."""
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
        positions = self._positions(seq, start, stop)
        local = self.runner.read_kv(positions)
        if self.group is not None:
            self.send_to_ranks(ReadKV(positions))
            local = self.runner.assemble_heads(self.group.all_gather(local))
        return KVExport(len(positions), local[:, 0], local[:, 1])

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
        """The engine's stop-and-copy step of migrating a request to another group, in one call:
        detach a running request, copy out all its KV and its sampler state, and free it here.
        Returns its generated ids and the KV."""
        seq = self.detach(request_id)
        try:
            kv = self.export_kv(request_id)
        finally:
            self.release(request_id)
        return seq.token_ids[seq.prompt_len:], kv

    # ---- copy in ---------------------------------------------------------------------------------
    def _grow(self, seq: Sequence, num_tokens: int) -> None:
        if not self.scheduler.grow(seq, num_tokens):
            raise EngineError("no free KV blocks to receive this request now")

    def begin_receive(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                      slo: SLO = NO_SLO) -> None:
        """Reserve a request whose KV will arrive in pieces (`receive_kv`), then `finish_receive`."""
        self._check_request(request_id, prompt_ids, params)
        seq = Sequence(request_id, list(prompt_ids), len(prompt_ids), self._seeded(params), slo=slo)
        seq.status = SeqStatus.RECEIVING
        self.seqs[request_id] = seq

    def receive_kv(self, request_id: str, start: int, kv: KVExport) -> None:
        """Write KV for tokens [start, start + kv.num_tokens) into this group's cache."""
        seq = self.seqs[request_id]
        if seq.status is not SeqStatus.RECEIVING:
            raise EngineError(f"request {request_id!r} is not receiving KV")
        self._grow(seq, start + kv.num_tokens + 1)
        positions = self._positions(seq, start, start + kv.num_tokens)
        full = torch.stack((kv.k, kv.v), dim=1)
        if self.group is not None:
            self.send_to_ranks(WriteKV(positions, tuple(full.shape)))
            self.group.broadcast(full.to(self.runner.dtype).contiguous())
        self.runner.write_kv(positions, full)

    def finish_receive(self, request_id: str, output_ids: list[int], num_computed: int) -> None:
        """All KV has landed: the request joins the running batch and decodes from here."""
        seq = self.seqs[request_id]
        seq.token_ids = seq.token_ids[: seq.prompt_len] + list(output_ids)
        if num_computed != len(seq.token_ids) - 1:
            raise EngineError(f"KV for {num_computed} tokens does not match {len(seq.token_ids)} tokens so far")
        self._grow(seq, num_computed + 1)
        seq.num_computed, seq.status = num_computed, SeqStatus.RUNNING
        self.scheduler.running.append(seq)

    def add_prefilled(self, request_id: str, prompt_ids: list[int], output_ids: list[int], kv: KVExport,
                      params: SamplingParams, slo: SLO = NO_SLO) -> None:
        """Resume a request whose first `kv.num_tokens` tokens were computed elsewhere."""
        self.begin_receive(request_id, prompt_ids, params, slo)
        try:
            self.receive_kv(request_id, 0, kv)
            self.finish_receive(request_id, output_ids, kv.num_tokens)
        except Exception:
            self.abort(request_id)
            raise
