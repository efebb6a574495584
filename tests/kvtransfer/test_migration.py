"""A running request migrated mid-generation produces exactly the tokens of an unmigrated run."""

from __future__ import annotations

import pytest

from kvtransfer.migration import migrate
from services.engine import EngineArgs, LLMEngine, SamplingParams
from tests.engine.conftest import PROMPTS


@pytest.mark.parametrize(("tp_src", "tp_dst", "temperature"), [(1, 1, 0.0), (2, 1, 0.0), (1, 1, 0.8)])
def test_migrated_request_continues_without_losing_or_repeating_tokens(llama_dir, tp_src, tp_dst,
                                                                        temperature) -> None:
    params = SamplingParams(max_tokens=60, temperature=temperature, seed=5, ignore_eos=True)
    prompt = PROMPTS[1]
    src = LLMEngine(EngineArgs(model=str(llama_dir), tp=tp_src, block_size=4, dist_prefix="src/"))
    dst = LLMEngine(EngineArgs(model=str(llama_dir), tp=tp_dst, block_size=4, dist_prefix="dst/"))
    try:
        expected = src.generate([prompt], params)[0]
        # A neighbour keeps running on the source the whole time: migration must not disturb it.
        src.add_request("moving", prompt, params)
        src.add_request("neighbour", PROMPTS[0], params)
        stream: dict[str, list[int]] = {"moving": [], "neighbour": []}

        def step(engine: LLMEngine) -> None:
            for o in engine.step():
                stream[o.request_id].extend(o.new_token_ids)

        for _ in range(12):
            step(src)
        report = migrate(src, dst, "moving", keep_decoding=lambda: step(src))
        assert report.rounds >= 1 and report.tokens_in_pause < 4
        assert "moving" not in src.seqs
        while src.has_unfinished() or dst.has_unfinished():
            step(src)
            step(dst)
        assert stream["moving"] == expected
        assert stream["neighbour"] == src.generate([PROMPTS[0]], params)[0]
        assert src.kv_usage()[0] == 0 and dst.kv_usage()[0] == 0
    finally:
        src.shutdown()
        dst.shutdown()
