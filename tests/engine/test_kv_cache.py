"""Paged KV cache and continuous batching: blocks are freed, reused, preempted and handed off."""

from __future__ import annotations

import pytest

from services.engine import BadRequestError, EngineArgs, LLMEngine, SamplingParams
from tests.engine.conftest import NEW_TOKENS, PROMPTS

GREEDY = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)


def test_preemption_under_a_small_cache_still_matches_reference(llama_dir, reference) -> None:
    # 12 blocks of 4 tokens cannot hold all four sequences at once: some are preempted and recomputed.
    engine = LLMEngine(EngineArgs(model=str(llama_dir), block_size=4, num_kv_blocks=24, max_num_batched_tokens=16))
    assert engine.generate(PROMPTS, GREEDY) == reference(llama_dir, PROMPTS, NEW_TOKENS)
    assert engine.kv_usage() == (0, 24)


def test_abort_frees_blocks_and_other_requests_continue(llama_dir, reference) -> None:
    engine = LLMEngine(EngineArgs(model=str(llama_dir), block_size=4))
    engine.add_request("keep", PROMPTS[0], GREEDY)
    engine.add_request("drop", PROMPTS[1], GREEDY)
    tokens: list[int] = []
    for _ in range(3):
        tokens += [t for o in engine.step() if o.request_id == "keep" for t in o.new_token_ids]
    used_before = engine.kv_usage()[0]
    engine.abort("drop")
    assert engine.kv_usage()[0] < used_before
    while engine.has_unfinished():
        tokens += [t for o in engine.step() for t in o.new_token_ids]
    assert tokens == reference(llama_dir, PROMPTS[:1], NEW_TOKENS)[0]
    assert engine.kv_usage()[0] == 0


def test_request_that_cannot_fit_gets_a_clear_error(llama_dir) -> None:
    engine = LLMEngine(EngineArgs(model=str(llama_dir), block_size=4, num_kv_blocks=8))
    with pytest.raises(BadRequestError, match="KV cache"):
        engine.add_request("big", list(range(1, 40)), GREEDY)
    with pytest.raises(BadRequestError, match="maximum context length is 512"):
        engine.add_request("long", [1] * 500, GREEDY)
    with pytest.raises(BadRequestError, match="top_p"):
        SamplingParams(top_p=0.0)


def test_stop_tokens_and_logprobs(llama_dir, reference) -> None:
    engine = LLMEngine(EngineArgs(model=str(llama_dir)))
    expected = reference(llama_dir, PROMPTS[:1], NEW_TOKENS)[0]
    stop_at = expected[5]
    engine.add_request("s", PROMPTS[0], SamplingParams(max_tokens=NEW_TOKENS, stop_token_ids=(stop_at,), logprobs=True))
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    tokens = [t for o in outs for t in o.new_token_ids]
    assert tokens == expected[: expected.index(stop_at) + 1]
    assert outs[-1].finish_reason == "stop"
    assert all(o.logprobs and o.logprobs[0] <= 0.0 for o in outs)


@pytest.mark.parametrize(("tp_prefill", "tp_decode"), [(1, 1), (2, 1), (1, 4), (4, 1), (2, 4)])
def test_prefill_only_hand_off_resumes_exactly(llama_dir, reference, tp_prefill, tp_decode) -> None:
    """Prefill on one engine, move the KV with export_kv/add_prefilled, decode on another."""
    prefill = LLMEngine(EngineArgs(model=str(llama_dir), tp=tp_prefill))
    decode = LLMEngine(EngineArgs(model=str(llama_dir), tp=tp_decode, dist_prefix="decode/"))
    try:
        results = {}
        for i, prompt in enumerate(PROMPTS[:2]):
            prefill.add_request(f"h{i}", prompt, GREEDY, prefill_only=True)
            first = [o for o in _drain(prefill)]
            assert first[-1].finish_reason == "prefilled"
            kv = prefill.export_kv(f"h{i}")
            prefill.release(f"h{i}")
            decode.add_prefilled(f"h{i}", prompt, first[-1].new_token_ids, kv, GREEDY)
            results[i] = first[-1].new_token_ids + [t for o in _drain(decode) for t in o.new_token_ids]
        assert [results[0], results[1]] == reference(llama_dir, PROMPTS[:2], NEW_TOKENS)
        assert prefill.kv_usage()[0] == 0 and decode.kv_usage()[0] == 0
    finally:
        prefill.shutdown()
        decode.shutdown()


def _drain(engine: LLMEngine):
    while engine.has_unfinished():
        yield from engine.step()
