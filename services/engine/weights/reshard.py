"""Re-cutting weight shards at a plan change: keep what a slot holds, fetch the rest from peers.

When slots move from one TP layout to another (plan epoch e -> e+1), each slot needs, for every
checkpoint tensor, an interval of the full tensor along its split dimension (`sharding.py`). That
interval is tiled from three sources, in order of preference: what the slot already holds (kept),
what another participating slot holds (peer, point-to-point over the group), and the checkpoint
(disk) for what nobody holds. A role switch with an unchanged shard therefore moves no bytes.

Lifecycle, run by every participant slot with the same `held` and `need`:
1. `plan_pieces` (pure) says where each interval of each tensor every slot needs comes from;
   every participant computes the same plan, so the message tags are the peer pieces' positions
   in it and no negotiation is needed.
2. `reshard` posts a receive for each peer piece this slot needs and a send for each piece peers
   need from it, copies the kept pieces and reads the disk pieces meanwhile, then waits for all.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from services.engine.config import ModelConfig
from services.engine.model.model import checkpoint_names
from services.engine.model.sharding import rule_for, shard_slice
from services.engine.weights.loader import CheckpointReader, tensor_shapes

Shapes = dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class Layout:
    """The shard a slot holds or needs: rank `rank` of a TP-`tp` group."""

    tp: int
    rank: int

    def __post_init__(self) -> None:
        if self.tp < 1 or not 0 <= self.rank < self.tp:
            raise ValueError(f"layout tp={self.tp} rank={self.rank}: need tp >= 1 and 0 <= rank < tp")


@dataclass(frozen=True)
class Piece:
    """[start, stop) of the FULL tensor `name` along `dim`, and where the slot gets it from."""

    name: str
    dim: int
    start: int
    stop: int
    source: str  # "kept" | "peer" | "disk"
    peer: int | None = None  # the slot that sends it, for "peer"


@dataclass
class ReshardStats:
    kept_bytes: int = 0
    peer_bytes: int = 0  # received from peers
    disk_bytes: int = 0
    sent_bytes: int = 0  # sent to peers
    sends: int = 0
    receives: int = 0
    seconds: float = 0.0  # the whole call
    exchange_seconds: float = 0.0  # from the first posted message to the last one completed

    @property
    def exchange_gbps(self) -> float:
        moved = self.peer_bytes + self.sent_bytes
        return moved / self.exchange_seconds / 1e9 if self.exchange_seconds > 0 else 0.0


def checkpoint_shapes(model_dir: str | Path, cfg: ModelConfig) -> Shapes:
    """The shapes of every tensor any layout may need (the untied lm_head included)."""
    return tensor_shapes(model_dir, checkpoint_names(cfg))


def split_dim(name: str) -> int:
    """The dimension along which intervals of `name` are expressed: its TP split dim, else 0."""
    rule = rule_for(name)
    return 1 if rule is not None and rule[0] == "row" else 0


def extent(name: str, cfg: ModelConfig, shape: tuple[int, ...], layout: Layout | None) -> tuple[int, int] | None:
    """The interval of `name` along `split_dim(name)` that `layout` holds; None: none of it."""
    if layout is None or (name == "lm_head.weight" and layout.rank != 0):
        return None  # only rank 0 computes logits, so only it loads an untied head
    sl = shard_slice(name, cfg, layout.rank, layout.tp)
    return (0, shape[split_dim(name)]) if sl is None else (sl.start, sl.stop)


def plan_pieces(cfg: ModelConfig, shapes: Shapes, held: dict[int, Layout | None],
                need: dict[int, Layout]) -> dict[int, list[Piece]]:
    """For each slot in `need`, the pieces tiling exactly what it needs of every tensor in `shapes`.

    Kept where the slot holds it, else from a peer in `held` (of several holders, the one asked
    for the fewest elements so far, then the lowest slot), else from disk. Pure and deterministic:
    every participant computes the same plan."""
    asked = {s: 0 for s in held}
    plan: dict[int, list[Piece]] = {}
    names = sorted(shapes)
    for slot in sorted(need):
        pieces: list[Piece] = []
        for name in names:
            want = extent(name, cfg, shapes[name], need[slot])
            if want is None:
                continue
            holds = {s: e for s in sorted(held) if (e := extent(name, cfg, shapes[name], held[s])) is not None}
            pieces += _cover(name, shapes[name], want, slot, holds, asked)
        plan[slot] = pieces
    return plan


def _cover(name: str, shape: tuple[int, ...], want: tuple[int, int], slot: int,
           holds: dict[int, tuple[int, int]], asked: dict[int, int]) -> list[Piece]:
    dim = split_dim(name)
    row = 1
    for i, n in enumerate(shape):
        row *= n if i != dim else 1
    a, b = want
    cuts = sorted({a, b} | {x for e in holds.values() for x in e if a < x < b})
    own = holds.get(slot)
    pieces: list[Piece] = []
    for x, y in zip(cuts, cuts[1:], strict=False):
        if own is not None and own[0] <= x and y <= own[1]:
            source, peer = "kept", None
        else:
            peers = [s for s, (h0, h1) in holds.items() if s != slot and h0 <= x and y <= h1]
            peer = min(peers, key=lambda s: (asked[s], s)) if peers else None
            source = "disk" if peer is None else "peer"
            if peer is not None:
                asked[peer] += (y - x) * row
        last = pieces[-1] if pieces else None
        if last is not None and (last.source, last.peer, last.stop) == (source, peer, x):
            pieces[-1] = Piece(name, dim, last.start, y, source, peer)
        else:
            pieces.append(Piece(name, dim, x, y, source, peer))
    return pieces


def _local(view: torch.Tensor, dim: int, offset: int, p: Piece) -> torch.Tensor:
    """The part of a shard tensor (starting at `offset` of the full tensor along `dim`) covering `p`."""
    if not (offset <= p.start and p.stop - offset <= view.shape[dim]):
        raise ValueError(f"{p.name}: the held view (from {offset}, {view.shape[dim]} long along dim {dim}) "
                         f"does not cover [{p.start}, {p.stop})")
    return view.narrow(dim, p.start - offset, p.stop - p.start)


def reshard(model_dir: str | Path, cfg: ModelConfig, shapes: Shapes, slot: int,
            held_views: dict[str, torch.Tensor] | None, held: dict[int, Layout | None],
            need: dict[int, Layout], group: Any, dtype: torch.dtype, device: torch.device | str = "cpu",
            out: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor], ReshardStats]:
    """Build this slot's shard for `need[slot]` ({} when it is only a sender).

    Run on every participant (sorted(set(held) | set(need))) with the same arguments but `slot`,
    `held_views` (this slot's `CausalLM.shard_views()`, None if it holds nothing) and `out`.
    `group`: a `TPGroup` or process group over exactly the participants, rank = index in that
    order (None for a single participant). `out`: where to write the new shard (e.g. a new
    model's `shard_views()`, which saves a copy); None allocates contiguous tensors. Bytes are
    counted in `dtype`. If a participant fails midway, its peers' waits end at the group timeout."""
    start = time.perf_counter()
    participants = sorted(set(held) | set(need))
    if slot not in participants:
        raise ValueError(f"slot {slot} is not a participant ({participants})")
    pg = getattr(group, "pg", group)
    if pg is None and len(participants) > 1:
        raise ValueError(f"{len(participants)} participants need a process group")
    if pg is not None and (pg.size(), pg.rank()) != (len(participants), participants.index(slot)):
        raise ValueError(f"slot {slot}: group rank {pg.rank()}/{pg.size()} does not match "
                         f"participant {participants.index(slot)}/{len(participants)}")
    wanted = _allocate(cfg, shapes, need.get(slot), dtype, device, empty=out is not None)
    if out is None:
        out = wanted
    else:
        _check_out(out, wanted)
    plan = plan_pieces(cfg, shapes, held, need)
    ex = _Exchange(cfg, shapes, slot, held_views or {}, held.get(slot), need.get(slot), out, dtype)
    ex.post(plan, pg, participants)
    ex.fill_local(plan.get(slot, []), model_dir)
    ex.wait()
    ex.stats.seconds = time.perf_counter() - start
    return out, ex.stats


class _Exchange:
    """One slot's side of a reshard: its posted messages, its local copies, its byte counts."""

    def __init__(self, cfg: ModelConfig, shapes: Shapes, slot: int, views: dict[str, torch.Tensor],
                 held: Layout | None, need: Layout | None, out: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
        self.cfg, self.shapes, self.slot, self.views = cfg, shapes, slot, views
        self.held, self.need, self.out, self.dtype = held, need, out, dtype
        self.item = torch.empty((), dtype=dtype).element_size()
        self.stats = ReshardStats()
        self.works: list[Any] = []
        self.keep_alive: list[torch.Tensor] = []  # send buffers must outlive their sends
        self.copy_after: list[tuple[torch.Tensor, torch.Tensor]] = []  # (strided target, receive buffer)
        self.started = 0.0

    def held_part(self, p: Piece) -> torch.Tensor:
        if p.name not in self.views:
            raise ValueError(f"slot {self.slot} is asked for {p.name!r} but holds no view of it")
        h = extent(p.name, self.cfg, self.shapes[p.name], self.held)
        return _local(self.views[p.name], p.dim, 0 if h is None else h[0], p)

    def new_part(self, p: Piece) -> torch.Tensor:
        w = extent(p.name, self.cfg, self.shapes[p.name], self.need)
        assert w is not None
        return _local(self.out[p.name], p.dim, w[0], p)

    def post(self, plan: dict[int, list[Piece]], pg: Any, participants: list[int]) -> None:
        """A receive for every peer piece this slot needs, a send for every one it gives; the tag
        of a peer piece is its position among all peer pieces of the plan, known to both ends."""
        self.started = time.perf_counter()
        tag = 0
        for dst in sorted(plan):
            for p in plan[dst]:
                if p.source != "peer":
                    continue
                assert p.peer is not None
                if dst == self.slot:
                    target = self.new_part(p)
                    buf = target
                    if not target.is_contiguous():  # a column range: receive, then copy into place
                        buf = torch.empty_like(target, memory_format=torch.contiguous_format)
                        self.copy_after.append((target, buf))
                    self.works.append(pg.recv([buf], participants.index(p.peer), tag))
                    self.stats.receives += 1
                    self.stats.peer_bytes += buf.numel() * self.item
                elif p.peer == self.slot:
                    src = self.held_part(p).to(self.dtype).contiguous()  # gloo sends a dense tensor's bytes
                    self.keep_alive.append(src)
                    self.works.append(pg.send([src], participants.index(dst), tag))
                    self.stats.sends += 1
                    self.stats.sent_bytes += src.numel() * self.item
                tag += 1

    def fill_local(self, pieces: list[Piece], model_dir: str | Path) -> None:
        """Kept and disk pieces, copied while the messages are in flight."""
        with CheckpointReader(model_dir) if any(p.source == "disk" for p in pieces) else nullcontext() as reader:
            for p in pieces:
                if p.source == "kept":
                    part = self.new_part(p)
                    part.copy_(self.held_part(p))
                    self.stats.kept_bytes += part.numel() * self.item
                elif p.source == "disk":
                    assert reader is not None
                    part = self.new_part(p)
                    part.copy_(reader.read(p.name, p.dim, p.start, p.stop))
                    self.stats.disk_bytes += part.numel() * self.item

    def wait(self) -> None:
        for w in self.works:
            w.wait()
        if self.works:
            self.stats.exchange_seconds = time.perf_counter() - self.started
        for target, buf in self.copy_after:
            target.copy_(buf)
        self.keep_alive.clear()


def _allocate(cfg: ModelConfig, shapes: Shapes, layout: Layout | None, dtype: torch.dtype,
              device: torch.device | str, empty: bool = False) -> dict[str, torch.Tensor]:
    """A tensor of the right shape for every tensor `layout` needs; `empty`: shape-only stand-ins."""
    out: dict[str, torch.Tensor] = {}
    for name in sorted(shapes):
        e = extent(name, cfg, shapes[name], layout)
        if e is not None:
            shape = list(shapes[name])
            shape[split_dim(name)] = e[1] - e[0]
            out[name] = torch.empty(shape, dtype=dtype, device="meta" if empty else device)
    return out


def _check_out(out: dict[str, torch.Tensor], wanted: dict[str, torch.Tensor]) -> None:
    if set(out) != set(wanted):
        extra, missing = sorted(set(out) - set(wanted)), sorted(set(wanted) - set(out))
        raise ValueError(f"reshard out= does not match the new layout: extra {extra[:3]}, missing {missing[:3]}")
    for name, t in out.items():
        w = wanted[name]
        if t.shape != w.shape or t.dtype != w.dtype:
            raise ValueError(f"reshard out[{name!r}] is {tuple(t.shape)} {t.dtype}; the layout needs "
                             f"{tuple(w.shape)} {w.dtype}")
