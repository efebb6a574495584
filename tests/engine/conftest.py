"""Engine fixtures: tiny checkpoints of each supported architecture and the transformers reference."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from services.engine.make_model import make_model

# Prompts of different lengths, run together in one continuous batch.
PROMPTS = [[1, 17, 42, 99, 7], [1, 300, 200, 100, 50, 25, 12, 6, 3, 2, 400, 401, 402, 403, 404, 405, 406, 407, 408,
                                  409, 410, 411, 412, 413, 414, 415, 416, 417, 418, 419, 420, 421, 422, 423],
           [1, 9], [1, 250, 251, 252, 253, 254, 255, 256, 257, 258, 259, 260, 261, 262, 263, 264, 265]]
NEW_TOKENS = 40


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model("tiny", tmp_path_factory.mktemp("llama") / "m", "float32", seed=1)


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model("tiny", tmp_path_factory.mktemp("qwen2") / "m", "float32", seed=2, arch="qwen2")


@pytest.fixture(scope="session")
def llama3_rope_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Mistral architecture, sharded weights, llama3 rope scaling: the less common loader paths."""
    path = make_model("tiny", tmp_path_factory.mktemp("rope") / "m", "float32", seed=3, arch="mistral", shards=3)
    cfg = json.loads((path / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 64}
    cfg["rope_theta"] = 500.0
    (path / "config.json").write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="session")
def reference() -> Callable[[Path, list[list[int]], int], list[list[int]]]:
    """Greedy continuations from transformers' generate(do_sample=False), cached per (model, prompt)."""
    from transformers import AutoModelForCausalLM

    cache: dict[tuple[str, tuple[int, ...], int], list[int]] = {}

    def run(model_dir: Path, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        model = None
        out = []
        for p in prompts:
            key = (str(model_dir), tuple(p), new_tokens)
            if key not in cache:
                model = model or AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
                ids = model.generate(torch.tensor([p]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                     do_sample=False, pad_token_id=0)
                cache[key] = ids[0, len(p):].tolist()
            out.append(cache[key])
        return out

    return run
