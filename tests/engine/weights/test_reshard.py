"""Re-cutting weight shards between TP layouts: the pure plan, then real exchanges over gloo.

The plan tests check every transition among TP 1, 2, 4 and 8 tiles each slot's need exactly,
sourced as cheaply as possible; the exchange tests run slots as threads (many transitions) and as
processes (the real deployment shape) and compare each result with a fresh load of the new layout.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import queue
import socket
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from services.engine.config import EngineArgs, ModelConfig
from services.engine.model.model import checkpoint_names
from services.engine.runner import ModelRunner
from services.engine.weights.loader import CheckpointReader, iter_shards
from services.engine.weights.reshard import (
    Layout,
    Piece,
    checkpoint_shapes,
    extent,
    plan_pieces,
    reshard,
    split_dim,
)
from tests.engine.weights.reshard_slots import Scenario, SlotResult, run_slot, slot_main

# tiny's shape, but with 8 query heads so TP 8 is valid (2 KV heads: replicated from TP 4 on)
CFG8 = ModelConfig.from_dict({
    "architectures": ["Qwen2ForCausalLM"], "vocab_size": 96, "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2, "tie_word_embeddings": False,
})


def shapes_of(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    h, d, i = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    by_suffix = {"embed_tokens.weight": (cfg.vocab_size, h), "lm_head.weight": (cfg.vocab_size, h),
                 "norm.weight": (h,), "q_proj.weight": (q, h), "k_proj.weight": (kv, h), "v_proj.weight": (kv, h),
                 "q_proj.bias": (q,), "k_proj.bias": (kv,), "v_proj.bias": (kv,), "o_proj.weight": (h, q),
                 "gate_proj.weight": (i, h), "up_proj.weight": (i, h), "down_proj.weight": (h, i)}
    return {n: next(s for suf, s in by_suffix.items() if n.endswith(suf)) for n in checkpoint_names(cfg)}


def numel(shape: tuple[int, ...], p: Piece) -> int:
    n = p.stop - p.start
    for i, s in enumerate(shape):
        n *= s if i != p.dim else 1
    return n


def by_source(cfg: ModelConfig, plan: list[Piece]) -> dict[str, int]:
    shapes = shapes_of(cfg)
    totals = {"kept": 0, "peer": 0, "disk": 0}
    for p in plan:
        totals[p.source] += numel(shapes[p.name], p)
    return totals


def check_plan(cfg: ModelConfig, held: dict[int, Layout | None], need: dict[int, Layout]) -> dict[int, list[Piece]]:
    """Every needed interval tiled exactly; each piece from a source that really holds it; disk
    only for what no participant holds."""
    shapes = shapes_of(cfg)
    plan = plan_pieces(cfg, shapes, held, need)
    assert set(plan) == set(need)
    for slot, pieces in plan.items():
        for name, shape in shapes.items():
            want = extent(name, cfg, shape, need[slot])
            mine = sorted((p for p in pieces if p.name == name), key=lambda p: p.start)
            if want is None:
                assert not mine
                continue
            assert [(p.start, p.stop) for p in mine] == list(zip([want[0]] + [p.stop for p in mine[:-1]],
                                                              [p.start for p in mine[1:]] + [want[1]], strict=True))
            assert all(p.start < p.stop and p.dim == split_dim(name) for p in mine)
            for p in mine:
                owner = {"kept": slot, "peer": p.peer, "disk": None}[p.source]
                assert (p.peer is not None) == (p.source == "peer")
                if owner is not None:
                    assert owner in held and (owner != slot or p.source == "kept")
                    e = extent(name, cfg, shape, held[owner])
                    assert e is not None and e[0] <= p.start and p.stop <= e[1]
                else:  # nobody holds any of it
                    for s in held:
                        e = extent(name, cfg, shape, held[s])
                        assert e is None or e[1] <= p.start or p.stop <= e[0]
    return plan


TRANSITIONS = [(a, b) for a, b in itertools.product([1, 2, 4, 8], repeat=2)]


@pytest.mark.parametrize(("tp_old", "tp_new"), TRANSITIONS)
def test_plan_tiles_every_need_for_tp_transitions(tp_old: int, tp_new: int) -> None:
    slots = range(max(tp_old, tp_new))
    # slot s: rank s % tp of group s // tp; and a variant where the old group sits on the last slots
    check_plan(CFG8, {s: Layout(tp_old, s % tp_old) for s in slots}, {s: Layout(tp_new, s % tp_new) for s in slots})
    n = len(slots)
    held: dict[int, Layout | None] = {s: (Layout(tp_old, s - (n - tp_old)) if s >= n - tp_old else None)
                                      for s in slots}
    plan = check_plan(CFG8, held, {s: Layout(tp_new, s % tp_new) for s in slots})
    assert all(p.source != "disk" for pieces in plan.values() for p in pieces)


def test_plan_byte_accounting() -> None:
    total = sum(torch.Size(s).numel() for s in shapes_of(CFG8).values())
    head = CFG8.vocab_size * CFG8.hidden_size
    # TP 2 -> two TP-1 replicas: each slot keeps its half and gets the other half from its old peer
    plan = check_plan(CFG8, {0: Layout(2, 0), 1: Layout(2, 1)}, {0: Layout(1, 0), 1: Layout(1, 0)})
    s0, s1 = by_source(CFG8, plan[0]), by_source(CFG8, plan[1])
    assert s0["disk"] == s1["disk"] == 0 and s0["kept"] + s0["peer"] == s1["kept"] + s1["peer"] == total
    assert s0["peer"] + head == s1["peer"]  # the untied head lives on old rank 0 only
    assert {p.peer for p in plan[0] if p.source == "peer"} == {1}
    # TP 1 -> TP 2: everything kept
    plan = check_plan(CFG8, {0: Layout(1, 0), 1: Layout(1, 0)}, {0: Layout(2, 0), 1: Layout(2, 1)})
    assert all(p.source == "kept" for pieces in plan.values() for p in pieces)
    # a role switch: the same layout, nothing moves
    plan = check_plan(CFG8, {3: Layout(4, 2)}, {3: Layout(4, 2)})
    assert by_source(CFG8, plan[3])["kept"] > 0 and {p.source for p in plan[3]} == {"kept"}
    # nothing held by anyone: all disk
    plan = check_plan(CFG8, {0: None}, {0: Layout(2, 1)})
    assert {p.source for p in plan[0]} == {"disk"}


def test_plan_spreads_load_over_holders_and_is_deterministic() -> None:
    # two TP-1 replicas feed a new TP-2 group on two empty slots: both replicas send, evenly
    held: dict[int, Layout | None] = {7: Layout(1, 0), 3: Layout(1, 0), 10: None, 12: None}
    need = {12: Layout(2, 1), 10: Layout(2, 0)}
    plan = check_plan(CFG8, held, need)
    shapes = shapes_of(CFG8)
    sent = {3: 0, 7: 0}
    for pieces in plan.values():
        for p in pieces:
            assert p.source == "peer" and p.peer is not None
            sent[p.peer] += numel(shapes[p.name], p)
    biggest = max(torch.Size(s).numel() for s in shapes.values())
    assert sent[3] > 0 and sent[7] > 0 and abs(sent[3] - sent[7]) <= biggest
    reordered = plan_pieces(CFG8, dict(reversed(shapes.items())), dict(reversed(held.items())), need)
    assert reordered == plan


@pytest.mark.parametrize(("tp", "rank"), [(1, 0), (2, 1), (4, 2)])
def test_shard_views_are_what_load_was_given(qwen2_dir: Path, tp: int, rank: int) -> None:
    cfg = ModelConfig.from_dir(qwen2_dir)
    runner = ModelRunner(EngineArgs(model=str(qwen2_dir), tp=tp, num_kv_blocks=2), cfg, rank, None)
    views = runner.model.shard_views()
    loaded = dict(iter_shards(str(qwen2_dir), cfg, runner.model.checkpoint_names(), rank, tp))
    assert set(views) == set(loaded) and all(torch.equal(views[n], loaded[n]) for n in loaded)
    params = {p.untyped_storage().data_ptr() for p in runner.model.parameters()}
    assert all(v.untyped_storage().data_ptr() in params for n, v in views.items() if n != "lm_head.weight")


def test_rebuilt_runner_takes_over_the_old_kv_cache(llama_dir: Path) -> None:
    cfg = ModelConfig.from_dir(llama_dir)
    old = ModelRunner(EngineArgs(model=str(llama_dir), tp=2, num_kv_blocks=8), cfg, 1, None)
    views = old.model.shard_views()
    out, _ = reshard(str(llama_dir), cfg, checkpoint_shapes(str(llama_dir), cfg), 0, views, {0: Layout(2, 1)},
                     {0: Layout(1, 0)}, None, torch.float32)
    # TP 1 holds twice the KV heads of TP 2: 4 blocks fill the 8 old ones exactly, 5 do not fit
    new = ModelRunner(EngineArgs(model=str(llama_dir), num_kv_blocks=4), cfg, 0, None, out.items(), old.kv_cache)
    assert new.kv_cache.data_ptr() == old.kv_cache.data_ptr() and new.kv_cache.shape[:4] == (4, 2, 2, 2)
    bigger = ModelRunner(EngineArgs(model=str(llama_dir), num_kv_blocks=5), cfg, 0, None, out.items(), old.kv_cache)
    assert bigger.kv_cache.data_ptr() != old.kv_cache.data_ptr() and not bigger.kv_cache.any()


def free_addr() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def serve_store(addr: str) -> dist.TCPStore:
    host, port = addr.rsplit(":", 1)
    return dist.TCPStore(host, int(port), None, True, timedelta(seconds=30), wait_for_workers=False)


def run_threads(sc: Scenario, addr: str) -> dict[int, SlotResult]:
    results: dict[int, SlotResult] = {}

    def one(slot: int) -> None:
        try:
            results[slot] = run_slot(addr, sc, slot, timeout_s=10.0)
        except Exception as e:  # reported below with the slot it came from
            results[slot] = SlotResult(sc.name, slot, error=repr(e))

    threads = [threading.Thread(target=one, args=(s,), daemon=True) for s in sc.participants]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30.0)
    assert set(results) == set(sc.participants), f"{sc.name}: slots {set(sc.participants) - set(results)} hung"
    return results


def check_results(sc: Scenario, results: dict[int, SlotResult]) -> None:
    """Every slot got exactly a fresh load's tensors, none from disk, and peers sent what was received."""
    sent = received = 0
    for slot, r in results.items():
        assert r.error is None, f"{sc.name} slot {slot}: {r.error}"
        assert r.stats is not None
        if slot in sc.need:
            assert not r.mismatched and r.runner_matches, f"{sc.name} slot {slot}: {r.mismatched}"
        else:
            assert r.names == () and r.stats.kept_bytes == r.stats.peer_bytes == 0
        assert r.stats.disk_bytes == 0, f"{sc.name} slot {slot} read from disk what a peer holds"
        sent, received = sent + r.stats.sent_bytes, received + r.stats.peer_bytes
    assert sent == received


@pytest.fixture(scope="module")
def store_addr() -> object:
    addr = free_addr()
    store = serve_store(addr)
    yield addr
    del store


@pytest.mark.parametrize(("tp_old", "tp_new"), [(a, b) for a, b in itertools.product([1, 2, 4], repeat=2) if a != b])
def test_threads_reshard_between_tp_degrees(llama_dir: Path, store_addr: str, tp_old: int, tp_new: int) -> None:
    slots = range(4)
    sc = Scenario(f"t{tp_old}-{tp_new}", str(llama_dir), {s: Layout(tp_old, s % tp_old) for s in slots},
                  {s: Layout(tp_new, s % tp_new) for s in slots}, in_place=tp_old > tp_new)
    check_results(sc, run_threads(sc, store_addr))


def test_single_slot_role_switch_and_cold_start(llama_dir: Path, llama3_rope_dir: Path) -> None:
    sc = Scenario("solo", str(llama_dir), {0: Layout(2, 1)}, {0: Layout(2, 1)})
    r = run_slot("unused:0", sc, 0)
    assert r.error is None and not r.mismatched and r.runner_matches and r.stats is not None
    assert r.stats.kept_bytes > 0 and r.stats.peer_bytes == r.stats.disk_bytes == r.stats.sent_bytes == 0
    # nothing held, nobody to ask: every byte from a checkpoint split over three files, as bfloat16
    model, cfg = str(llama3_rope_dir), ModelConfig.from_dir(llama3_rope_dir)
    shapes = checkpoint_shapes(model, cfg)
    assert shapes == {n: tuple(t.shape) for n, t in iter_shards(model, cfg, list(shapes), 0, 1)}
    out, stats = reshard(model, cfg, shapes, 5, None, {}, {5: Layout(4, 3)}, None, torch.bfloat16)
    assert stats.kept_bytes == stats.peer_bytes == 0
    assert stats.disk_bytes == sum(t.numel() * 2 for t in out.values()) > 0
    expected = dict(iter_shards(model, cfg, checkpoint_names(cfg, lm_head=False), 3, 4))
    assert set(out) == set(expected) and all(torch.equal(out[n], expected[n].bfloat16()) for n in out)
    args = EngineArgs(model=model, tp=4, dtype="bfloat16", num_kv_blocks=2)
    assert ModelRunner(args, cfg, 3, None, weights=out.items()).model.tp == 4
    with CheckpointReader(model) as reader:  # reads only the interval asked for
        part = reader.read("model.layers.1.mlp.down_proj.weight", 1, 32, 40)
        assert part.shape == (cfg.hidden_size, 8) and reader.bytes_read == cfg.hidden_size * 8 * 4


def test_processes_reshard(llama_dir: Path, qwen2_dir: Path, store_addr: str) -> None:
    """Four slot processes over one TCPStore, moving through several plans in turn."""
    llama, qwen = str(llama_dir), str(qwen2_dir)
    scenarios = [
        # TP 2 -> two TP-1 replicas, on two processes
        Scenario("p-2to1", llama, {0: Layout(2, 0), 1: Layout(2, 1)}, {0: Layout(1, 0), 1: Layout(1, 0)}),
        # mixed: {0,1} TP 2 -> two TP 1 while {2,3} two TP 1 -> one TP 2
        Scenario("p-mixed", llama, {0: Layout(2, 0), 1: Layout(2, 1), 2: Layout(1, 0), 3: Layout(1, 0)},
                 {0: Layout(1, 0), 1: Layout(1, 0), 2: Layout(2, 0), 3: Layout(2, 1)}, in_place=True),
        # TP 4 (KV heads replicated) -> TP 2 on two of its slots; the other two only send
        Scenario("p-4to2", llama, {s: Layout(4, s) for s in range(4)}, {1: Layout(2, 0), 3: Layout(2, 1)}),
        # one TP-1 replica -> TP 2 with an empty slot, attention biases, in bfloat16
        Scenario("p-qwen", qwen, {0: Layout(1, 0), 2: None}, {0: Layout(2, 0), 2: Layout(2, 1)}, "bfloat16"),
    ]
    ctx = mp.get_context("spawn")
    results_q = ctx.Queue()
    procs = [ctx.Process(target=slot_main, args=(store_addr, s, scenarios, results_q), daemon=True) for s in range(4)]
    for p in procs:
        p.start()
    try:
        expected = {(sc.name, s) for sc in scenarios for s in sc.participants}
        got: dict[tuple[str, int], SlotResult] = {}
        deadline = time.monotonic() + 60.0
        while set(got) != expected and time.monotonic() < deadline:
            try:
                r = results_q.get(timeout=0.5)
            except queue.Empty:
                continue
            got[(r.scenario, r.slot)] = r
            assert r.error is None, f"{r.scenario} slot {r.slot}: {r.error}"
        assert set(got) == expected, f"no result from {sorted(expected - set(got))}"
    finally:
        for p in procs:
            p.join(10.0)
            if p.is_alive():
                p.kill()
                p.join(5.0)
    for sc in scenarios:
        check_results(sc, {s: got[(sc.name, s)] for s in sc.participants})
    mixed = {s: got[("p-mixed", s)].stats for s in range(4)}
    assert mixed[2] and mixed[3] and mixed[2].peer_bytes == mixed[3].peer_bytes == 0  # TP 1 -> 2 keeps all


def test_packed_weights_are_dropped_for_a_reshard_and_the_head_outlives_it(llama_dir: Path) -> None:
    """A slot frees its kernel layouts before re-cutting (rebuilt on activation) and hands the output
    head's to the next epoch's model: greedy tokens stay those of a fresh engine."""
    from services.engine.engine import LLMEngine
    from services.engine.model.layers import pack_weight
    from services.engine.model.sampling import SamplingParams

    cfg = ModelConfig.from_dir(llama_dir)
    args = EngineArgs(model=str(llama_dir), dtype="bfloat16", num_kv_blocks=16, spawn_workers=False)
    if pack_weight(torch.zeros(4, 4, dtype=torch.bfloat16)) is None:
        pytest.skip("no oneDNN on this host: nothing is packed")
    prompts, params = [[1, 5, 9, 22, 7], [3, 3, 40]], SamplingParams(max_tokens=12)
    expected = LLMEngine(args).generate(prompts, params)
    old = ModelRunner(args, cfg, 0, None)
    head = old.model.lm_head_packed
    assert head is not None and old.model.finalized
    old.model.drop_packed()
    assert not old.model.finalized and old.model.lm_head_packed is None
    assert all(lin.packed is None for lin in old.model._linears())
    new = ModelRunner(args, cfg, 0, None, old.model.shard_views().items(), head_packed=head)
    assert new.model.lm_head_packed is head
    assert LLMEngine(args, new).generate(prompts, params) == expected
    old.model.finalize()  # a reshard that came to nothing: the old shard serves again
    assert LLMEngine(args, old).generate(prompts, params) == expected
