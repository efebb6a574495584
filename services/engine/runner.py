"""One TP rank's share of a model replica: its weights, its KV cache, and how it runs a step.

Every rank of a group holds a `ModelRunner`. The leader (rank 0) also owns the scheduler and the
sampler; the other ranks only execute what the leader broadcasts (see `worker.py`).
KV cache layout, one contiguous tensor per rank, block-major:
    [num_blocks, layers, 2 (k, v), local KV heads, block_size, head_dim]
so one block of a request (all layers) is one contiguous region, and within it each
(layer, k|v, head range) is contiguous too: a KV transfer moves few, large descriptors, and a
TP-layout remap moves head ranges without a gather. A token at position p of a sequence lives in
block `block_table[p // block_size]` at offset `p % block_size`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

import torch

from services.engine.batch import StepBatch, build_meta
from services.engine.config import EngineArgs, ModelConfig
from services.engine.dist import TPGroup
from services.engine.errors import ModelLoadError
from services.engine.model.model import CausalLM
from services.engine.model.sharding import kv_head_range, kv_heads_per_rank
from services.engine.weights.loader import iter_shards

log = logging.getLogger(__name__)


def num_kv_blocks(args: EngineArgs, cfg: ModelConfig, elem_bytes: int) -> int:
    if args.num_kv_blocks:
        return args.num_kv_blocks
    per_block = cfg.num_hidden_layers * 2 * args.block_size * kv_heads_per_rank(cfg, args.tp) * cfg.head_dim * elem_bytes
    useful = args.max_num_seqs * -(-args.model_len(cfg) // args.block_size) + 1
    return max(2, min(args.kv_cache_bytes // per_block, useful))


Weights = Iterable[tuple[str, torch.Tensor]] | Callable[[dict[str, torch.Tensor]], object]


class ModelRunner:
    """`weights`: this rank's (name, slice) of every checkpoint tensor, e.g. from a reshard, or a
    function that fills the new model's `shard_views()` in place (`reshard(..., out=views)`),
    which saves a copy of every weight; None reads them from the checkpoint folder `args.model`.
    `reuse_kv`: a previous runner's `kv_cache` to take over instead of allocating (see `_kv_cache`).
    `head_packed`: a previous rank-0 runner's `model.lm_head_packed` on the same device and dtype;
    the output head is whole in every layout, so its kernel layout outlives any re-cut."""

    def __init__(self, args: EngineArgs, cfg: ModelConfig, rank: int, group: TPGroup | None,
                 weights: Weights | None = None, reuse_kv: torch.Tensor | None = None,
                 head_packed: torch.Tensor | None = None) -> None:
        self.args, self.cfg, self.rank = args, cfg, rank
        self.device = torch.device(args.device if args.device != "cuda" else f"cuda:{rank}")
        self.dtype = args.torch_dtype(cfg)
        self.max_len = args.model_len(cfg)
        self.group = group
        start = time.perf_counter()
        self.model = CausalLM(cfg, args.tp, rank, self.max_len, self.dtype, self.device, group)
        if callable(weights):
            weights(self.model.shard_views())
        else:
            self._load(weights)
        self.model.finalize(head_packed)
        self.num_blocks = num_kv_blocks(args, cfg, self.dtype.itemsize)
        self.kv_heads = kv_heads_per_rank(cfg, args.tp)
        self.kv_cache = self._kv_cache(reuse_kv)
        log.info("rank %d: loaded %s (tp=%d) in %.2fs, %d KV blocks", rank, args.model, args.tp,
                 time.perf_counter() - start, self.num_blocks)

    def _kv_cache(self, reuse: torch.Tensor | None) -> torch.Tensor:
        """Zeroed, not empty: padded decode rows read masked positions, and 0 * NaN would poison them.
        A reused cache (contiguous, same dtype and device, room for all `num_blocks`) is not
        zeroed: it holds only K/V values the model wrote, finite, and zeroing a large cache is
        the slowest part of a rebuild on CPU (hundreds of ms per GiB)."""
        cfg, bs = self.cfg, self.args.block_size
        shape = (self.num_blocks, cfg.num_hidden_layers, 2, self.kv_heads, bs, cfg.head_dim)
        n = self.num_blocks * cfg.num_hidden_layers * 2 * self.kv_heads * bs * cfg.head_dim
        if (reuse is not None and reuse.is_contiguous() and reuse.dtype == self.dtype
                and reuse.device == self.device and reuse.numel() >= n):
            return reuse.view(-1)[:n].view(shape)
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    def _load(self, weights: Iterable[tuple[str, torch.Tensor]] | None) -> None:
        names = self.model.checkpoint_names()
        if weights is None:
            weights = iter_shards(self.args.model, self.cfg, names, self.rank, self.args.tp)
        loaded = set()
        for name, tensor in weights:
            self.model.load(name, tensor.to(self.dtype))
            loaded.add(name)
        missing = [n for n in names if n not in loaded]
        if missing:
            raise ModelLoadError(f"rank {self.rank}: weights given without {missing[0]!r} ({len(missing)} missing)")

    @property
    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters()) + (
            0 if self.model.lm_head is None else self.model.lm_head.numel() * self.model.lm_head.element_size()
        )

    def execute(self, batch: StepBatch) -> torch.Tensor | None:
        meta = build_meta(batch, self.args.block_size, self.device)
        return self.model(meta, self.kv_cache)

    def _index(self, positions: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        blocks = torch.tensor([b for b, _ in positions], dtype=torch.long, device=self.device)
        offsets = torch.tensor([o for _, o in positions], dtype=torch.long, device=self.device)
        return blocks, offsets

    def read_kv(self, positions: list[tuple[int, int]]) -> torch.Tensor:
        """This rank's KV at (block, offset) cache positions: [layers, 2, len(positions), local KV
        heads, head_dim]."""
        blocks, offsets = self._index(positions)
        return self.kv_cache[blocks, :, :, :, offsets].permute(1, 2, 0, 3, 4).contiguous()

    def write_kv(self, positions: list[tuple[int, int]], full_kv: torch.Tensor) -> None:
        """Write this rank's heads of a full-head KV tensor [layers, 2, n, all KV heads, d] at
        (block, offset) cache `positions`."""
        h0, h1 = kv_head_range(self.cfg, self.rank, self.args.tp)
        blocks, offsets = self._index(positions)
        mine = full_kv[:, :, :, h0:h1].permute(2, 0, 1, 3, 4).to(self.device, self.dtype)
        self.kv_cache[blocks, :, :, :, offsets] = mine

    def assemble_heads(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """Join every rank's `read_kv` into full heads, taking each KV head from its first owner."""
        chunks, covered = [], -1
        for rank, part in enumerate(parts):
            h0, h1 = kv_head_range(self.cfg, rank, self.args.tp)
            if h0 > covered:
                chunks.append(part)
                covered = h1 - 1
        return torch.cat(chunks, dim=3)
