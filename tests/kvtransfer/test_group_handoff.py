"""A prefill -> decode hand-off between two TP groups' engines through the block layer (every rank
sends its own heads; nothing gathered through a leader): for every (a, b) in {1, 2, 4}^2 the
greedy output equals that of one group doing prefill and decode itself, and no block stays in use.
A receiver whose sender never comes fails in its timeout and frees what it had reserved."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from kvtransfer.group_transfer import BlockTarget, open_agents, receive_blocks, reserve_blocks, send_blocks
from kvtransfer.nixl_backend import nixl_works
from services.engine import EngineArgs, LLMEngine, SamplingParams
from tests.engine.conftest import PROMPTS

PARAMS = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
Engines = dict[tuple[int, int], tuple[LLMEngine, list[bytes]]]


@pytest.fixture(scope="module")
def engines(llama_dir: Path) -> Iterator[Engines]:
    """Two groups of each TP degree (a hand-off from a group to itself is not a hand-off)."""
    out: Engines = {}
    try:
        for tp, copy in itertools.product((1, 2, 4), (0, 1)):
            engine = LLMEngine(EngineArgs(model=str(llama_dir), tp=tp, block_size=4, dist_prefix=f"g{tp}{copy}/"))
            out[(tp, copy)] = engine, open_agents(engine, "local", f"g{tp}{copy}")
        yield out
    finally:
        for engine, _ in out.values():
            engine.shutdown()


def _prefill(engine: LLMEngine, rid: str, prompt: list[int]) -> int:
    engine.add_request(rid, prompt, PARAMS, prefill_only=True)
    while True:
        for o in engine.step():
            if o.request_id == rid:
                assert o.finish_reason == "prefilled"
                return o.new_token_ids[0]


def _hand_off(src: LLMEngine, dst: LLMEngine, dst_meta: list[bytes], a: int, b: int) -> None:
    prompt = PROMPTS[1]
    want = src.generate([prompt], PARAMS)[0]
    rid = f"h{a}{b}"
    first = _prefill(src, rid, prompt)
    computed = src.computed_tokens(rid)
    blocks = reserve_blocks(dst, rid, prompt, PARAMS, computed)
    with ThreadPoolExecutor(2) as pool:
        received = pool.submit(receive_blocks, dst, rid, a, rid, 10.0)
        sent = pool.submit(send_blocks, src, rid, BlockTarget(b, tuple(dst_meta), tuple(blocks)), rid, 10.0)
        assert sent.result() and received.result()
    src.release(rid)
    dst.finish_receive(rid, [first], computed)
    got = [first]
    while dst.has_unfinished():
        got += [t for o in dst.step() for t in o.new_token_ids]
    assert got == want
    assert src.kv_usage()[0] == 0 and dst.kv_usage()[0] == 0


@pytest.mark.parametrize(("a", "b"), list(itertools.product((1, 2, 4), repeat=2)))
def test_block_handoff_gives_the_same_greedy_output(engines: Engines, a: int, b: int) -> None:
    (src, _), (dst, dst_meta) = engines[(a, 0)], engines[(b, 1)]
    _hand_off(src, dst, dst_meta, a, b)


@pytest.mark.skipif(not nixl_works(), reason="NIXL unusable here")
def test_block_handoff_over_nixl(llama_dir: Path) -> None:
    src = LLMEngine(EngineArgs(model=str(llama_dir), tp=2, block_size=4, dist_prefix="nx-src/"))
    dst = LLMEngine(EngineArgs(model=str(llama_dir), tp=1, block_size=4, dist_prefix="nx-dst/"))
    try:
        open_agents(src, "nixl", "nx-src")
        assert src.kv_agent.agent.backend_name == "nixl"
        _hand_off(src, dst, open_agents(dst, "nixl", "nx-dst"), 2, 1)
    finally:
        src.shutdown()
        dst.shutdown()


def test_receiver_without_sender_times_out_and_frees_its_blocks(engines: Engines) -> None:
    dst, _ = engines[(2, 1)]
    reserve_blocks(dst, "orphan", PROMPTS[1], PARAMS, len(PROMPTS[1]))
    assert dst.kv_usage()[0] > 0
    started = time.monotonic()
    assert not receive_blocks(dst, "orphan", 1, "orphan", 0.5)
    assert time.monotonic() - started < 5
    assert dst.kv_usage()[0] == 0 and "orphan" not in dst.seqs
