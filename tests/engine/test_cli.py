"""`nitsum make-model` / `nitsum generate` as a user runs them, including every bad-input case."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file


def nitsum(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "services.cli", *args], capture_output=True, text=True, timeout=120)


def test_make_model_then_generate_json_matches_transformers_tokenizer(tmp_path: Path, reference) -> None:
    out = tmp_path / "tiny"
    assert nitsum("make-model", "--preset", "tiny", "--out", str(out)).returncode == 0
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    run = nitsum("generate", "--model", str(out), "--prompt", "Hello there", "--prompt-ids", "1,5,9",
                 "--max-tokens", "8", "--ignore-eos", "--json")
    assert run.returncode == 0, run.stderr
    rows = [json.loads(line) for line in run.stdout.splitlines()]
    assert rows[0]["prompt_token_ids"] == tok.encode("Hello there")
    assert rows[0]["token_ids"] == reference(out, [tok.encode("Hello there")], 8)[0]
    assert rows[1]["prompt_token_ids"] == [1, 5, 9] and len(rows[1]["token_ids"]) == 8
    assert rows[0]["text"] == tok.decode(rows[0]["token_ids"], skip_special_tokens=True)
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, return_dict=True)["input_ids"]
    from services.engine.tokenizer import Tokenizer

    assert Tokenizer(out).apply_chat_template([{"role": "user", "content": "hi"}]) == list(chat)


def _broken(tmp_path: Path, src: Path, how: str) -> Path:
    d = tmp_path / how
    shutil.copytree(src, d)
    if how == "no-config":
        (d / "config.json").unlink()
    elif how == "no-weight":
        weights = load_file(str(d / "model.safetensors"))
        weights.pop("model.layers.1.mlp.down_proj.weight")
        save_file(weights, str(d / "model.safetensors"))
    elif how == "arch":
        cfg = json.loads((d / "config.json").read_text())
        cfg["architectures"] = ["GPT2LMHeadModel"]
        (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize(("how", "extra", "message"), [
    ("no-config", [], "config.json"),
    ("no-weight", [], "model.layers.1.mlp.down_proj.weight"),
    ("arch", [], "architectures"),
    ("ok", ["--tp", "8"], "does not divide num_attention_heads=4"),
    ("ok", ["--prompt-ids", ",".join(["7"] * 600)], "maximum context length is 512"),
])
def test_bad_input_is_one_line_and_nonzero(tmp_path: Path, llama_dir: Path, how: str, extra: list[str],
                                           message: str) -> None:
    model = llama_dir if how == "ok" else _broken(tmp_path, llama_dir, how)
    args = ["generate", "--model", str(model), "--max-tokens", "4", *extra]
    if "--prompt-ids" not in extra:
        args += ["--prompt", "hi"]
    run = nitsum(*args)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nitsum: error: ") and message in lines[0], run.stderr
