"""Every tensor type the importer reads: a hand-made GGUF of that type comes back within its
quantization step (float types: within their rounding), and the imported checkpoint holds it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from services.gguf.importer import import_gguf
from services.gguf.reader import open_gguf
from services.gguf.tensors import SUPPORTED_TYPES, dequantize
from tests.gguf.gguf_files import Q, quantize_k, write

ROWS, COLS = 16, 256


def values(seed: int = 0) -> np.ndarray:
    # Rows of different scales and offsets, so that blocks differ in range and sign.
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.05, 2.0, size=(ROWS, 1))
    return (rng.standard_normal((ROWS, COLS)) * scale + rng.uniform(-0.5, 0.5, size=(ROWS, 1))).astype(np.float32)


def block_steps(x: np.ndarray, qtype: Q) -> np.ndarray:
    """Each value's quantization step, from its 32-value block's range (ggml's formulas)."""
    blocks = x.reshape(-1, 32)
    amax = np.abs(blocks).max(axis=1, keepdims=True)
    span = blocks.max(axis=1, keepdims=True) - blocks.min(axis=1, keepdims=True)
    step = {Q.Q8_0: amax / 127, Q.Q4_0: amax / 8, Q.Q5_0: amax / 16, Q.Q4_1: span / 15, Q.Q5_1: span / 31}[qtype]
    return np.broadcast_to(step, blocks.shape).reshape(x.shape)


def tensor_file(tmp_path: Path, qtype: Q) -> tuple[Path, np.ndarray, np.ndarray, np.ndarray | None]:
    """(file, the values written, how far each may come back, each value's step; None for float types)."""
    x = values()
    path = tmp_path / f"{qtype.name}.gguf"
    if qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
        blocks, decoded, step = quantize_k(x, qtype)
        assert np.abs(decoded - x).max() > 0  # a real quantization, not a copy
        return write(path, "llama", {}, [("t.weight", blocks, qtype)]), x, step * 0.5 + 1e-6, step
    rounding = {Q.F32: 0.0, Q.F16: 2.0 ** -11, Q.BF16: 2.0 ** -8}.get(qtype)
    if rounding is not None:
        return write(path, "llama", {}, [("t.weight", x, qtype)]), x, np.abs(x) * rounding, None
    # Within one step (the level nearest the block's extreme can be a step away), plus the fp16
    # rounding of the block's scale.
    step = block_steps(x, qtype)
    return write(path, "llama", {}, [("t.weight", x, qtype)]), x, step + np.abs(x).max() * 2.0 ** -9, step


@pytest.mark.parametrize("type_name", SUPPORTED_TYPES)
def test_each_supported_type_round_trips_within_its_step(tmp_path: Path, type_name: str) -> None:
    path, x, tol, step = tensor_file(tmp_path, Q[type_name])
    t = open_gguf(path).tensors["t.weight"]
    assert t.type_name == type_name and t.shape == (ROWS, COLS)
    back = dequantize(t).numpy()
    assert back.shape == x.shape and back.dtype == np.float32
    err = np.abs(back - x)
    assert (err <= tol).all(), f"{type_name}: worst error {err.max():.3g} at {np.unravel_index(err.argmax(), err.shape)}"
    if step is not None:
        assert err.mean() < 0.35 * step.mean(), "rounds to the nearest level, not just within the step"


def test_k_quant_blocks_decode_to_the_values_they_were_built_from(tmp_path: Path) -> None:
    """The hand-packed blocks (scales, high bits, nibble order) decode to exactly what was packed."""
    for qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
        blocks, decoded, _ = quantize_k(values(seed=3), qtype)
        path = write(tmp_path / f"{qtype.name}.gguf", "llama", {}, [("t.weight", blocks, qtype)])
        back = dequantize(open_gguf(path).tensors["t.weight"]).numpy()
        np.testing.assert_allclose(back, decoded, rtol=1e-6, atol=1e-7, err_msg=qtype.name)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_checkpoint_holds_the_dequantized_values_in_the_dtype_asked(tiny_gguf_q8: Path, tmp_path: Path,
                                                                       dtype: str) -> None:
    out = import_gguf(tiny_gguf_q8, tmp_path / "m", dtype)
    weights = load_file(str(out / "model.safetensors"))
    gguf = open_gguf(tiny_gguf_q8)
    embed = dequantize(gguf.tensors["token_embd.weight"])
    assert weights["model.embed_tokens.weight"].dtype == getattr(torch, dtype)
    assert torch.equal(weights["model.embed_tokens.weight"], embed.to(getattr(torch, dtype)))
