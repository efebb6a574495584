"""A slot's weights across epochs: the shard it holds, re-cut in place (`reshard`), and the memory it
keeps for the next epoch's model (the KV cache, allocated once; the output head's packed copy).

`reshard` keeps the bytes the slot holds, fetches the rest from peer slots over a gloo group formed
for the transition, and reads from the checkpoint only what no peer holds
(services/engine/weights/reshard.py). The new model is built right away and the bytes land in
its parameters; `runner_for` hands it to the next group the slot serves in."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import torch

from services.config import SlotConfig
from services.engine.config import EngineArgs, ModelConfig
from services.engine.dist import TPGroup
from services.engine.runner import ModelRunner
from services.engine.tokenizer import Tokenizer
from services.engine.weights.reshard import Layout, checkpoint_shapes, plan_pieces, reshard
from services.rpc import pb


class WeightsError(Exception):
    """The slot cannot do this with what it holds (the orchestrator's mistake, answered as an error)."""


class SlotWeights:
    def __init__(self, config: SlotConfig) -> None:
        self.config = config
        self.cfg = ModelConfig.from_dir(config.model)
        self.device = torch.device(config.device)
        self.runner: ModelRunner | None = None
        self.held: Layout | None = None
        self.prepared: tuple[Layout, ModelRunner] | None = None  # built by the last reshard
        self._shapes: dict[str, tuple[int, ...]] | None = None
        self._kv: torch.Tensor | None = None
        self._tok: Tokenizer | None = None
        self._head_packed: torch.Tensor | None = None  # kept across epochs: the head is never re-cut

    @property
    def held_bytes(self) -> int:
        return self.runner.weight_bytes if self.runner is not None else 0

    def engine_args(self, tp: int) -> EngineArgs:
        c = self.config
        return EngineArgs(str(c.model), tp=tp, device=c.device, dtype=c.dtype, block_size=c.block_size,
                          max_num_seqs=c.max_num_seqs, kv_cache_bytes=c.kv_cache_bytes, spawn_workers=False,
                          dist_timeout_s=c.dist_timeout_s, schedule=c.schedule,
                          max_step_s=c.max_step_s)

    def tokenizer(self) -> Tokenizer:
        """Read once: every epoch's engine serves the same checkpoint."""
        if self._tok is None:
            self._tok = Tokenizer(self.config.model, extra_eos_ids=self.cfg.eos_token_ids)
        return self._tok

    def kv_memory(self) -> torch.Tensor:
        """The slot's KV cache memory, allocated (and zeroed) once and lent to each epoch's model:
        every layout's cache fits in `kv_cache_bytes`."""
        if self._kv is None:
            dtype = self.engine_args(1).torch_dtype(self.cfg)
            self._kv = torch.zeros(self.config.kv_cache_bytes // dtype.itemsize, dtype=dtype, device=self.device)
        return self._kv

    async def reshard(self, cmd: pb.ReshardCommand, store: torch.distributed.Store) -> pb.ReshardResult:
        """Take part in a transition's weight exchange (every slot named in `held` or `need`)."""
        held: dict[int, Layout | None] = {s.slot: Layout(s.layout.tp, s.layout.rank) for s in cmd.held}
        need = {s.slot: Layout(s.layout.tp, s.layout.rank) for s in cmd.need}
        me = self.config.index
        if held.get(me, self.held) != self.held:
            raise WeightsError(f"told it holds {held.get(me)} but it holds {self.held}")
        started = time.perf_counter()
        if self._shapes is None:
            self._shapes = checkpoint_shapes(self.config.model, self.cfg)
        if not any(p.source == "peer" for pieces in plan_pieces(self.cfg, self._shapes, held, need).values()
                   for p in pieces):
            # Nothing moves between slots (a cold start, or only kept bytes): no exchange group.
            held = {me: held[me]} if me in held else {}
            need = {me: need[me]} if me in need else {}
        participants = sorted(set(held) | set(need))
        group = None
        if len(participants) > 1:
            group = await asyncio.to_thread(TPGroup, store, cmd.prefix, participants.index(me), len(participants),
                                            self.device, self.config.dist_timeout_s, self.config.host)
        stats = await self._rebuild(held, need, group)
        if group is not None:
            # Every rank is past the group's set-up and its transfers before any drops the group:
            # a rank that closes its connections early breaks a slower peer's connect.
            await asyncio.to_thread(group.all_reduce, torch.zeros(1, device=self.device))
        return pb.ReshardResult(kept_bytes=stats.kept_bytes, peer_bytes=stats.peer_bytes, disk_bytes=stats.disk_bytes,
                                sent_bytes=stats.sent_bytes, seconds=time.perf_counter() - started)

    async def _rebuild(self, held: dict[int, Layout | None], need: dict[int, Layout], group: TPGroup | None) -> Any:
        me = self.config.index
        if self.runner is not None:
            self.runner.model.drop_packed()  # the shard is re-cut; only its plain bytes are read
        views = self.runner.model.shard_views() if self.runner is not None else None
        wanted, shapes = need.get(me), self._shapes
        assert shapes is not None
        dtype = self.engine_args(wanted.tp if wanted else 1).torch_dtype(self.cfg)
        got: list[Any] = []

        def fill(out: dict[str, torch.Tensor] | None) -> None:
            got.append(reshard(self.config.model, self.cfg, shapes, me, views, held, need, group, dtype,
                               self.device, out))

        if wanted is None:  # only a sender
            await asyncio.to_thread(fill, None)
        else:
            # The new model is built now and the reshard writes straight into its parameters;
            # it takes over the slot's KV cache memory (no new allocation, no zeroing).
            runner = await asyncio.to_thread(ModelRunner, self.engine_args(wanted.tp), self.cfg, wanted.rank, None,
                                             fill, self.kv_memory(), self._head_packed)
            if runner.model.lm_head_packed is not None:
                self._head_packed = runner.model.lm_head_packed
            self.prepared = (wanted, runner)
        return got[0][1]

    async def runner_for(self, layout: Layout) -> ModelRunner:
        """The model to serve shard `layout` with: the one the last reshard built, or the one held."""
        prepared, self.prepared = self.prepared, None  # one from an abandoned attempt is dropped too
        if prepared is not None and prepared[0] == layout:
            self.runner = prepared[1]  # the old shard is no longer needed
        elif self.runner is None or self.held != layout:
            raise WeightsError(f"holds {self.held}, not the shard tp {layout.tp} rank {layout.rank}; reshard first")
        self.held = layout
        assert self.runner is not None
        if not self.runner.model.finalized:  # a reshard that came to nothing dropped its packed weights
            await asyncio.to_thread(self.runner.model.finalize, self._head_packed)
        return self.runner

