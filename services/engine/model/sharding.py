"""Tensor-parallel shard rules: one table saying which slice of each checkpoint tensor a rank owns.

Column-parallel weights (q/k/v, gate/up) are split along their output rows, row-parallel ones
(o, down) along their input columns; everything else is replicated. Attention heads split evenly;
KV heads split with them, or are replicated when a model has fewer KV heads than ranks (rank r then
holds KV head r // (tp / num_kv_heads), the one its query heads attend to).

`shard_slice` is also what weight reuse at reconfiguration time reasons with: the byte range a
rank needs is a pure function of (tensor name, config, rank, tp).
"""

from __future__ import annotations

from dataclasses import dataclass

from services.engine.config import ModelConfig

# suffix of the checkpoint tensor name -> (how it is split, what unit it is split in)
SHARD_RULES: dict[str, tuple[str, str]] = {
    "self_attn.q_proj.weight": ("column", "q_heads"),
    "self_attn.q_proj.bias": ("column", "q_heads"),
    "self_attn.k_proj.weight": ("column", "kv_heads"),
    "self_attn.k_proj.bias": ("column", "kv_heads"),
    "self_attn.v_proj.weight": ("column", "kv_heads"),
    "self_attn.v_proj.bias": ("column", "kv_heads"),
    "self_attn.o_proj.weight": ("row", "q_heads"),
    "mlp.gate_proj.weight": ("column", "intermediate"),
    "mlp.up_proj.weight": ("column", "intermediate"),
    "mlp.down_proj.weight": ("row", "intermediate"),
}


@dataclass(frozen=True)
class ShardSlice:
    dim: int  # 0 = rows (column-parallel), 1 = columns (row-parallel)
    start: int
    stop: int


def kv_heads_per_rank(cfg: ModelConfig, tp: int) -> int:
    return max(1, cfg.num_key_value_heads // tp)


def kv_head_range(cfg: ModelConfig, rank: int, tp: int) -> tuple[int, int]:
    """The global KV heads rank `rank` holds: [start, stop)."""
    kv = cfg.num_key_value_heads
    if kv >= tp:
        per = kv // tp
        return rank * per, (rank + 1) * per
    head = rank // (tp // kv)
    return head, head + 1


def rule_for(name: str) -> tuple[str, str] | None:
    for suffix, rule in SHARD_RULES.items():
        if name.endswith(suffix):
            return rule
    return None


def shard_slice(name: str, cfg: ModelConfig, rank: int, tp: int) -> ShardSlice | None:
    """The slice of tensor `name` that `rank` of a TP-`tp` group loads; None: the whole tensor."""
    rule = rule_for(name)
    if rule is None or tp == 1:
        return None
    kind, unit = rule
    d = cfg.head_dim
    if unit == "q_heads":
        per = cfg.num_attention_heads // tp * d
        start, stop = rank * per, (rank + 1) * per
    elif unit == "kv_heads":
        h0, h1 = kv_head_range(cfg, rank, tp)
        start, stop = h0 * d, h1 * d
    else:
        per = cfg.intermediate_size // tp
        start, stop = rank * per, (rank + 1) * per
    return ShardSlice(0 if kind == "column" else 1, start, stop)
