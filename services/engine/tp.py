"""Which tensor-parallel degrees a model's shape allows: what the engine refuses to load, checked
before anything starts (`nitsum up` checks every group of its plan, the planner only picks these)."""

from __future__ import annotations

import json
from pathlib import Path


def tp_error(tp: int, num_attention_heads: int, num_key_value_heads: int, intermediate_size: int) -> str | None:
    """Why a model of this shape cannot be split `tp` ways, or None if it can."""
    if tp < 1 or tp & (tp - 1):
        return f"--tp {tp}: the tensor-parallel degree must be a power of two (1, 2, 4, 8)"
    if num_attention_heads % tp:
        return f"--tp {tp} does not divide num_attention_heads={num_attention_heads}; choose a divisor"
    kv = num_key_value_heads
    if (kv >= tp and kv % tp) or (kv < tp and tp % kv):
        return f"--tp {tp} and num_key_value_heads={kv}: one must divide the other"
    if intermediate_size % tp:
        return f"--tp {tp} does not divide intermediate_size={intermediate_size}"
    return None


def checkpoint_tp_error(model: Path, tp: int) -> str | None:
    """`tp_error` for the checkpoint folder's config.json (None when it has no such file: the engine says so)."""
    try:
        cfg = json.loads((model / "config.json").read_text())
    except (OSError, ValueError):
        return None
    heads = int(cfg.get("num_attention_heads", 1))
    return tp_error(tp, heads, int(cfg.get("num_key_value_heads") or heads), int(cfg.get("intermediate_size", 0)))


def supported_tps(model: Path, candidates: tuple[int, ...] = (1, 2, 4, 8)) -> tuple[int, ...]:
    return tuple(t for t in candidates if checkpoint_tp_error(model, t) is None)
