"""What the autopilot (router/live/autopilot.py) builds its model from: the measured pauses of
past reconfigurations (by kind of move), a checkpoint's shape, and the groups' measured step
times turned into profile points."""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from router.decide.perfmodel import ModelSpec
from router.decide.planner import PlannerConfig
from router.decide.plans import Plan
from router.profile import ProfilePoint
from services.cluster import GroupRecord


@dataclass
class MoveCosts:
    """Measured pauses of past reconfigurations, by kind: "role" (a group keeps its slots and TP and
    only changes role) and "retp" (a group is re-cut to other slots or another TP degree)."""

    samples: dict[str, deque[float]] = field(default_factory=lambda: {"role": deque(maxlen=20),
                                                                      "retp": deque(maxlen=20)})

    def observe(self, old: Plan | None, report: Any) -> None:
        if report.result not in ("committed", "rolled_forward") or old is None:
            return
        before = {g.slots: g for g in old.groups}
        for g in report.groups:
            if g.kept:
                continue
            kind = "role" if tuple(g.slots) in before and before[tuple(g.slots)].tp == g.tp else "retp"
            self.samples[kind].append(float(g.pause_s))

    def mean(self, kind: str) -> float | None:
        s = self.samples[kind]
        return sum(s) / len(s) if s else None

    def planner_config(self, base: PlannerConfig) -> PlannerConfig:
        role, retp = self.mean("role"), self.mean("retp")
        return replace(base, role_switch_s=base.role_switch_s if role is None else role,
                       group_setup_s=base.group_setup_s if retp is None else retp)


def model_spec(model_dir: Path) -> ModelSpec:
    """The perf model's shape of a Hugging Face checkpoint (its config.json; CPU slots run float32)."""
    c = json.loads((model_dir / "config.json").read_text())
    heads = int(c["num_attention_heads"])
    return ModelSpec(name=model_dir.name, hidden_size=int(c["hidden_size"]), num_layers=int(c["num_hidden_layers"]),
                     num_heads=heads, num_kv_heads=int(c.get("num_key_value_heads") or heads),
                     head_dim=int(c.get("head_dim") or int(c["hidden_size"]) // heads),
                     intermediate_size=int(c["intermediate_size"]), vocab_size=int(c["vocab_size"]), dtype_bytes=4)


def telemetry_points(groups: list[GroupRecord]) -> list[ProfilePoint]:
    """Profile points read off the groups' measured step-time models (0 = not measured yet)."""
    points: list[ProfilePoint] = []
    for g in groups:
        if g.step_per_token_s > 0:
            points += [ProfilePoint("prefill", g.tp, n, 0, g.step_base_s + g.step_per_token_s * n)
                       for n in (64, 256, 1024)]
        if g.step_per_decode_s > 0 or g.step_per_context_s > 0:
            points += [ProfilePoint("decode", g.tp, b, ctx, g.step_base_s + g.step_per_decode_s * b
                                    + g.step_per_context_s * b * ctx) for b in (1, 4, 16) for ctx in (128, 512)]
    return points
