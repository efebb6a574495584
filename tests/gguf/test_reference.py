"""An imported GGUF generates what transformers generates, token for token.

SmolLM2-135M-Instruct (Q4_1 + Q8_0, the file `make serve` imports): the imported float32 weights
equal, bit for bit, what transformers dequantizes when it loads the GGUF itself, and greedy
tokens from Nitsum's engine equal transformers' on the imported folder and on the GGUF. The
engine runs it at TP 1 only: its 9 attention heads and 3 KV heads split over no power of two
above 1. TP 2 is shown on the tiny preset exported to GGUF (Q8_0), as llama.cpp converts
it, for llama (q/k rows permuted) and qwen2 (QKV biases, not permuted).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from services.engine import EngineArgs, LLMEngine, SamplingParams
from services.engine.make_model import make_model
from services.gguf.importer import import_gguf
from tests.engine.conftest import PROMPTS
from tests.gguf.gguf_files import Q, export_gguf

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers needs it to load a GGUF file

NEW_TOKENS = 32
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
TEXTS = ["def fibonacci(n):"]


def hf_greedy(model: object, prompts: list[list[int]], new_tokens: int = NEW_TOKENS) -> list[list[int]]:
    """transformers' greedy tokens, not stopping at end-of-sequence (the engine's ignore_eos)."""
    model.generation_config.eos_token_id = None  # type: ignore[attr-defined]
    model.generation_config.pad_token_id = 0  # type: ignore[attr-defined]
    out = []
    for p in prompts:
        ids = model.generate(torch.tensor([p]), max_new_tokens=new_tokens, do_sample=False)  # type: ignore[attr-defined]
        out.append(ids[0, len(p):].tolist())
    return out


def engine_greedy(model_dir: Path, prompts: list[list[int]], tp: int = 1) -> list[list[int]]:
    engine = LLMEngine(EngineArgs(model=str(model_dir), tp=tp))
    try:
        return engine.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))
    finally:
        engine.shutdown()


def from_gguf(path: Path) -> object:
    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)


@pytest.fixture(scope="module")
def smollm2_dir(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return import_gguf(smollm2_gguf, tmp_path_factory.mktemp("smollm2") / "f32", "float32")


@pytest.fixture(scope="module")
def smollm2_prompts(smollm2_dir: Path) -> list[list[int]]:
    from services.engine.tokenizer import Tokenizer

    tok = Tokenizer(smollm2_dir)
    return [tok.apply_chat_template(QUESTION)] + [tok.encode(t) for t in TEXTS]


@pytest.fixture(scope="module")
def smollm2_from_gguf(smollm2_gguf: Path) -> Iterator[object]:
    yield from_gguf(smollm2_gguf)


def test_smollm2_weights_equal_transformers_own_dequantization(smollm2_dir, smollm2_from_gguf) -> None:
    ours = load_file(str(smollm2_dir / "model.safetensors"))
    theirs = smollm2_from_gguf.state_dict()  # type: ignore[attr-defined]
    assert set(ours) == {k for k in theirs if k != "lm_head.weight"}  # tied: transformers shares the embedding
    differ = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]} (q/k row order?)"


def test_smollm2_greedy_tokens_equal_transformers_on_the_folder_and_on_the_gguf(
        smollm2_dir, smollm2_prompts, smollm2_from_gguf) -> None:
    ours = engine_greedy(smollm2_dir, smollm2_prompts)
    on_folder = hf_greedy(transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32),
                          smollm2_prompts)
    assert ours == on_folder
    assert hf_greedy(smollm2_from_gguf, smollm2_prompts) == on_folder
    from services.engine.tokenizer import Tokenizer

    answer = Tokenizer(smollm2_dir).decode(ours[0])
    assert answer.startswith("The capital of France is Paris."), answer


def test_smollm2_tokenizer_and_chat_template_equal_transformers(smollm2_dir, smollm2_gguf, smollm2_prompts) -> None:
    theirs = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    on_folder = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    chat = theirs.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True)
    chat = chat["input_ids"] if isinstance(chat, dict) or hasattr(chat, "keys") else chat
    assert smollm2_prompts[0] == list(chat)
    texts = TEXTS + ["The history of the Roman Empire", "Hello, world! It's <|im_end|> time:\n\n  indented\tand ÜTF-8 — ok?", " leading space"]
    for text in texts:
        assert on_folder.encode(text) == theirs.encode(text), text
    # SmolLM's pre-tokenizer (tokenizer.ggml.pre = smollm) puts every digit on its own, as its own
    # tokenizer does; transformers' GGUF reader does not know that pre-tokenizer.
    digits = on_folder.encode("2025")
    assert len(digits) == 4 and on_folder.decode(digits) == "2025"


def test_llama_gguf_float32_round_trip_is_exact(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """checkpoint -> GGUF (q/k rows permuted as llama.cpp does) -> import: the same tensors, bit for bit."""
    path = export_gguf(tiny_llama_dir, tmp_path / "tiny-f32.gguf", Q.F32)
    out = import_gguf(path, tmp_path / "back")
    original, back = load_file(str(tiny_llama_dir / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert set(original) == set(back)
    assert all(torch.equal(original[k], back[k]) for k in original)


@pytest.mark.parametrize("tp", [1, 2])
def test_llama_q8_0_greedy_equals_transformers_on_the_gguf(tiny_gguf_q8: Path, tmp_path_factory, tp: int) -> None:
    out = tmp_path_factory.mktemp(f"q8-tp{tp}") / "m"
    import_gguf(tiny_gguf_q8, out)
    assert engine_greedy(out, PROMPTS, tp) == hf_greedy(from_gguf(tiny_gguf_q8), PROMPTS)


@pytest.mark.parametrize("rope", [{"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 64},
                                  {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 8.0,
                                   "original_max_position_embeddings": 128}], ids=["llama3.1", "wide-band"])
def test_llama3_rope_scaling_comes_back_from_the_rope_freqs_tensor(tmp_path: Path, rope: dict) -> None:
    """Llama 3.1 GGUFs carry rope scaling only as per-frequency factors; the import recovers it, and
    generates what transformers generates from the original checkpoint past the original context."""
    hf_dir = make_model("tiny", tmp_path / "hf", "float32", seed=13)
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg.update(rope_theta=500.0, rope_scaling={"rope_type": "llama3", **rope})
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    out = import_gguf(export_gguf(hf_dir, tmp_path / "l3.gguf", Q.F32), tmp_path / "m")
    assert json.loads((out / "config.json").read_text())["rope_scaling"] == cfg["rope_scaling"]
    prompts = [[1] + list(range(10, 130))]  # past original_max_position_embeddings
    original = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    assert engine_greedy(out, prompts) == hf_greedy(original, prompts)


def test_qwen2_q4_1_with_biases_greedy_equals_transformers_at_tp2(tmp_path: Path) -> None:
    hf_dir = make_model("tiny", tmp_path / "qwen2", "float32", seed=12, arch="qwen2")
    path = export_gguf(hf_dir, tmp_path / "qwen2.gguf", Q.Q4_1, arch="qwen2")
    out = import_gguf(path, tmp_path / "m")
    assert (out / "config.json").read_text().count("Qwen2ForCausalLM") == 1
    assert engine_greedy(out, PROMPTS, tp=2) == hf_greedy(from_gguf(path), PROMPTS)
