"""`nitsum import-gguf` on files it cannot import: one line on stderr, exit status 2, no folder."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from services.cli import main
from tests.gguf.gguf_files import Q, export_gguf, write


def run(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    rc = main(["import-gguf", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("nitsum import-gguf: error: "), err
    return err[0]


def test_a_file_that_is_not_gguf(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_text("not a model\n")
    assert "not a GGUF file" in run(capsys, str(bad), "--out", str(tmp_path / "out"))
    assert "no such file" in run(capsys, str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("keep", [6, 300, 0.6])
def test_a_truncated_file(tiny_gguf_q8: Path, tmp_path: Path, capsys, keep: float) -> None:
    data = tiny_gguf_q8.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(keep * len(data)) if keep < 1 else int(keep)])
    assert "truncated" in run(capsys, str(cut), "--out", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_an_architecture_that_is_not_llama_family(tmp_path: Path, capsys) -> None:
    path = write(tmp_path / "phi.gguf", "phi3", {"phi3.embedding_length": 64}, [("token_embd.weight",
                                                                                 np.zeros((8, 64), np.float32), Q.F32)])
    line = run(capsys, str(path), "--out", str(tmp_path / "out"))
    assert "architecture 'phi3' is not supported" in line and "llama" in line


def test_a_quantization_type_it_does_not_read(tiny_llama_dir: Path, tmp_path: Path, capsys) -> None:
    path = export_gguf(tiny_llama_dir, tmp_path / "q8.gguf", Q.Q8_0)
    q2k = write(tmp_path / "q2k.gguf", "llama", {}, [("blk.0.attn_q.weight", np.zeros((4, 84), np.uint8), Q.Q2_K)])
    line = run(capsys, str(q2k), "--out", str(tmp_path / "out"))
    assert "is Q2_K, a type this importer does not read" in line and "Q4_1" in line
    _retype(path, "blk.0.attn_q.weight", 99)  # not a ggml type at all
    assert "tensor type this importer does not know" in run(capsys, str(path), "--out", str(tmp_path / "out"))


def test_a_tokenizer_it_does_not_know(tiny_llama_dir: Path, tmp_path: Path, capsys) -> None:
    path = export_gguf(tiny_llama_dir, tmp_path / "t.gguf", tokenizer__ggml__pre="mystery-bpe")
    assert "pre-tokenizer 'mystery-bpe'" in run(capsys, str(path), "--out", str(tmp_path / "out"))
    path = export_gguf(tiny_llama_dir, tmp_path / "t.gguf", tokenizer__ggml__model="bert")
    assert "tokenizer 'bert' is not supported" in run(capsys, str(path), "--out", str(tmp_path / "out"))


def test_an_output_folder_that_is_not_empty(tiny_gguf_q8: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert "not empty" in run(capsys, str(tiny_gguf_q8), "--out", str(out))
    assert "not a checkpoint folder" in run(capsys, str(tiny_gguf_q8), "--out", str(out), "--force")
    assert (out / "notes.txt").read_text() == "mine"


def _retype(path: Path, tensor: str, type_id: int) -> None:
    """Rewrite one tensor's type id in the file's tensor index, in place."""
    data = bytearray(path.read_bytes())
    name = tensor.encode()
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    (n_dims,) = struct.unpack_from("<I", data, at)
    struct.pack_into("<I", data, at + 4 + 8 * n_dims, int(type_id))
    path.write_bytes(bytes(data))
