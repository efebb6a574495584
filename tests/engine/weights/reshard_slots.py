"""Slots for the reshard tests: each builds a runner for its old layout, reshards to its new one
over a gloo group on a shared TCPStore, and reports whether what it got equals a fresh load.

`run_slot` is one slot in one scenario (threads of the test process call it directly);
`slot_main` is a slot process running every scenario it takes part in, in order.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from typing import Any

import torch

from services.engine.config import DTYPES, EngineArgs, ModelConfig
from services.engine.dist import TPGroup, make_store
from services.engine.runner import ModelRunner
from services.engine.weights.loader import iter_shards
from services.engine.weights.reshard import Layout, ReshardStats, checkpoint_shapes, reshard


@dataclass(frozen=True)
class Scenario:
    name: str
    model: str
    held: dict[int, Layout | None]
    need: dict[int, Layout]
    dtype: str = "float32"
    in_place: bool = False  # reshard straight into the new runner's parameters (`weights=` a function)

    @property
    def participants(self) -> list[int]:
        return sorted(set(self.held) | set(self.need))


@dataclass(frozen=True)
class SlotResult:
    scenario: str
    slot: int
    stats: ReshardStats | None = None
    names: tuple[str, ...] = ()
    mismatched: tuple[str, ...] = ()  # tensors that differ from a fresh load of the new layout
    runner_matches: bool = False  # a runner built from the result holds exactly the result
    error: str | None = None


def _runner(sc: Scenario, cfg: ModelConfig, layout: Layout,
            weights: Any = None) -> ModelRunner:
    args = EngineArgs(model=sc.model, tp=layout.tp, dtype=sc.dtype, num_kv_blocks=2)
    return ModelRunner(args, cfg, layout.rank, None, weights=weights)


def run_slot(addr: str, sc: Scenario, slot: int, timeout_s: float = 20.0) -> SlotResult:
    cfg = ModelConfig.from_dir(sc.model)
    dtype = DTYPES[sc.dtype]
    old = sc.held.get(slot)
    views = None if old is None else _runner(sc, cfg, old).model.shard_views()
    parts = sc.participants
    group = None
    if len(parts) > 1:
        store = make_store(addr, False, timeout_s)
        group = TPGroup(store, f"reshard/{sc.name}/", parts.index(slot), len(parts), torch.device("cpu"), timeout_s)
    shapes = checkpoint_shapes(sc.model, cfg)
    new = sc.need.get(slot)
    if new is None:
        out, stats = reshard(sc.model, cfg, shapes, slot, views, sc.held, sc.need, group, dtype)
        return SlotResult(sc.name, slot, stats, tuple(out))
    got: list[tuple[dict[str, torch.Tensor], ReshardStats]] = []
    if sc.in_place:
        rebuilt = _runner(sc, cfg, new, weights=lambda new_views: got.append(
            reshard(sc.model, cfg, shapes, slot, views, sc.held, sc.need, group, dtype, out=new_views)))
        out, stats = got[0]
    else:
        out, stats = reshard(sc.model, cfg, shapes, slot, views, sc.held, sc.need, group, dtype)
        rebuilt = _runner(sc, cfg, new, weights=out.items())
    names = rebuilt.model.checkpoint_names()
    expected = dict(iter_shards(sc.model, cfg, names, new.rank, new.tp))
    mismatched = [n for n in names if n not in out or not torch.equal(out[n], expected[n].to(dtype))]
    mismatched += [n for n in out if n not in expected]
    views = rebuilt.model.shard_views()
    runner_matches = set(views) == set(out) and all(torch.equal(views[n], out[n]) for n in out)
    return SlotResult(sc.name, slot, stats, tuple(sorted(out)), tuple(mismatched), runner_matches)


def slot_main(addr: str, slot: int, scenarios: list[Scenario], results: Any) -> None:
    torch.set_num_threads(1)
    for sc in scenarios:
        if slot not in sc.participants:
            continue
        try:
            results.put(run_slot(addr, sc, slot))
        except Exception:
            results.put(SlotResult(sc.name, slot, error=traceback.format_exc()))
            return  # the peers of this scenario time out; later ones would wait on this slot
