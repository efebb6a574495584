"""Hand-made GGUF files for the tests, written with the `gguf` package's own writer.

`export_gguf` turns a Hugging Face checkpoint folder (the `tiny` preset) into a GGUF file the
way llama.cpp's convert_hf_to_gguf does (names, metadata, q/k rows permuted for llama, byte-level
vocabulary and merges), quantized to the types asked for. `quantize_k` builds Q4_K / Q5_K / Q6_K
blocks by hand (`gguf.quants` only decodes those), returning the values the blocks stand for.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.torch import load_file

Q = gguf.GGMLQuantizationType
LAYER_PARTS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}
TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def gguf_name(hf: str) -> str:
    module, _, kind = hf.rpartition(".")
    if module in TOP:
        return f"{TOP[module]}.{kind}"
    _, _, layer, part = module.split(".", 3)
    return f"blk.{layer}.{LAYER_PARTS[part]}.{kind}"


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf's reordering of llama's q/k rows (what the importer undoes)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def add_tensor(writer: gguf.GGUFWriter, name: str, values: np.ndarray, qtype: Q) -> None:
    values = np.ascontiguousarray(values, dtype=np.float32)
    if qtype == Q.F32:
        writer.add_tensor(name, values)
    elif qtype == Q.F16:
        writer.add_tensor(name, values.astype(np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)


def write(path: Path, arch: str, meta: dict, tensors: list[tuple[str, np.ndarray, Q]]) -> Path:
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in meta.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)
    for name, values, qtype in tensors:
        if values.dtype == np.uint8:
            writer.add_tensor(name, values, raw_dtype=qtype)  # already blocks (quantize_k, or made up)
        else:
            add_tensor(writer, name, values, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def vocab_meta(hf_dir: Path) -> dict:
    """The checkpoint's byte-level BPE as tokenizer.ggml.* metadata (as convert_hf_to_gguf writes it)."""
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {a["content"] for a in tok["added_tokens"] if a["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    cfg = json.loads((hf_dir / "tokenizer_config.json").read_text())
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt2", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [3 if t in special else 1 for t in tokens],
            "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.bos_token_id": vocab[cfg["bos_token"]], "tokenizer.ggml.eos_token_id": vocab[cfg["eos_token"]],
            "tokenizer.ggml.add_bos_token": True, "tokenizer.chat_template": cfg["chat_template"]}


def export_gguf(hf_dir: Path, path: Path, quant: Q = Q.F32, arch: str = "llama", **meta_changes: object) -> Path:
    """`hf_dir` as a GGUF file: 2-D weights in `quant`, norms and biases in F32; `meta_changes`
    (dots written as __) replace or add metadata."""
    cfg = json.loads((hf_dir / "config.json").read_text())
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    meta = {f"{arch}.context_length": cfg["max_position_embeddings"], f"{arch}.embedding_length": cfg["hidden_size"],
            f"{arch}.feed_forward_length": cfg["intermediate_size"], f"{arch}.block_count": cfg["num_hidden_layers"],
            f"{arch}.attention.head_count": heads, f"{arch}.attention.head_count_kv": kv_heads,
            f"{arch}.rope.freq_base": float(cfg["rope_theta"]), f"{arch}.rope.dimension_count": cfg["head_dim"],
            f"{arch}.attention.layer_norm_rms_epsilon": float(cfg["rms_norm_eps"]), "general.name": "tiny",
            **vocab_meta(hf_dir)}
    meta.update({k.replace("__", "."): v for k, v in meta_changes.items()})
    tensors = []
    for name, w in load_file(str(hf_dir / "model.safetensors")).items():
        values = w.to(torch.float32).numpy()
        if arch == "llama" and "q_proj" in name:
            values = permute(values, heads)
        elif arch == "llama" and "k_proj" in name:
            values = permute(values, kv_heads)
        tensors.append((gguf_name(name), values, quant if values.ndim == 2 else Q.F32))
    if (cfg.get("rope_scaling") or {}).get("rope_type") == "llama3":
        tensors.append(("rope_freqs.weight", rope_freqs(cfg), Q.F32))
    return write(path, arch, meta, tensors)


def rope_freqs(cfg: dict) -> np.ndarray:
    """Llama 3's rope scaling as convert_hf_to_gguf stores it: one factor per rotary frequency."""
    rs, dim = cfg["rope_scaling"], cfg["head_dim"]
    low_wavelen = rs["original_max_position_embeddings"] / rs["low_freq_factor"]
    high_wavelen = rs["original_max_position_embeddings"] / rs["high_freq_factor"]
    out = []
    for freq in 1.0 / (cfg["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float64) / dim)):
        wavelen = 2 * np.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(rs["factor"])
        else:
            smooth = (rs["original_max_position_embeddings"] / wavelen - rs["low_freq_factor"]) / (
                rs["high_freq_factor"] - rs["low_freq_factor"])
            out.append(1 / ((1 - smooth) / rs["factor"] + smooth))
    return np.array(out, np.float32)


# --- K-quant blocks by hand: 256 values a block, split in sub-blocks that each get a scale ---


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)


def quantize_k(values: np.ndarray, qtype: Q) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(block bytes shaped (rows, bytes), the values they decode to, each value's quantization step)."""
    rows = values.reshape(-1, 256).astype(np.float32)
    blocks, decoded, steps = zip(*(_K_BLOCK[qtype](r) for r in rows), strict=True)
    shape = values.shape
    return (np.stack(blocks).reshape(shape[0], -1), np.stack(decoded).reshape(shape), np.stack(steps).reshape(shape))


def _affine_codes(x: np.ndarray, levels: int) -> tuple[np.ndarray, ...]:
    """8 sub-blocks of 32: value = d*sc*q - dmin*m with 6-bit sc, m (Q4_K, Q5_K)."""
    sub = x.reshape(8, 32)
    offset = np.maximum(-sub.min(axis=1), 0)
    dmin = _f16(np.array(offset.max() / 63 or 1.0))
    m = np.ceil(offset / np.float32(dmin)).clip(0, 63)
    lo = np.float32(dmin) * m
    span = (sub.max(axis=1) + lo) / (levels - 1)
    d = _f16(np.array(span.max() / 63 or 1.0))
    sc = np.ceil(span / np.float32(d)).clip(1, 63)
    step = np.float32(d) * sc
    q = np.rint((sub + lo[:, None]) / step[:, None]).clip(0, levels - 1).astype(np.uint8)
    decoded = step[:, None] * q - lo[:, None]
    return d, dmin, sc.astype(np.uint8), m.astype(np.uint8), q, decoded.reshape(-1), np.repeat(step, 32)


def _pack_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """ggml's 12-byte packing of eight 6-bit scales and mins (the inverse of get_scale_min_k4)."""
    out = np.zeros(12, np.uint8)
    out[0:4] = (sc[0:4] & 63) | ((sc[4:8] >> 4) << 6)
    out[4:8] = (m[0:4] & 63) | ((m[4:8] >> 4) << 6)
    out[8:12] = (sc[4:8] & 0xF) | ((m[4:8] & 0xF) << 4)
    return out


def _nibbles(q: np.ndarray) -> np.ndarray:
    """Sub-blocks (2c, 2c+1) share 32 bytes: low nibble from the first, high nibble from the second."""
    pairs = q.reshape(4, 2, 32) & 0xF
    return (pairs[:, 0] | (pairs[:, 1] << 4)).reshape(-1).astype(np.uint8)


def _q4_k(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d, dmin, sc, m, q, decoded, step = _affine_codes(x, 16)
    head = np.concatenate([d.reshape(1).view(np.uint8), dmin.reshape(1).view(np.uint8), _pack_scales(sc, m)])
    return np.concatenate([head, _nibbles(q)]), decoded, step


def _q5_k(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d, dmin, sc, m, q, decoded, step = _affine_codes(x, 32)
    high = ((q >> 4) & 1).astype(np.uint8)  # bit s of qh[l]: the fifth bit of value l of sub-block s
    qh = np.zeros(32, np.uint8)
    for s in range(8):
        qh |= high[s] << s
    head = np.concatenate([d.reshape(1).view(np.uint8), dmin.reshape(1).view(np.uint8), _pack_scales(sc, m)])
    return np.concatenate([head, qh, _nibbles(q)]), decoded, step


def _q6_k(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """16 sub-blocks of 16: value = d * scale * (q - 32), int8 scales, 6-bit q."""
    sub = x.reshape(16, 16)
    span = np.abs(sub).max(axis=1) / 31
    d = _f16(np.array(span.max() / 127 or 1.0))
    sc = np.ceil(span / np.float32(d)).clip(1, 127)
    step = np.float32(d) * sc
    q = (np.rint(sub / step[:, None]).clip(-32, 31) + 32).astype(np.uint8).reshape(-1)
    decoded = (step[:, None] * (q.reshape(16, 16).astype(np.float32) - 32)).reshape(-1)
    ql = np.zeros(128, np.uint8)
    qh = np.zeros(64, np.uint8)
    for half in range(2):
        v = q[128 * half:128 * (half + 1)].reshape(4, 32)  # group g holds values 32g .. 32g+31
        ql[64 * half:64 * half + 32] = (v[0] & 0xF) | ((v[2] & 0xF) << 4)
        ql[64 * half + 32:64 * half + 64] = (v[1] & 0xF) | ((v[3] & 0xF) << 4)
        qh[32 * half:32 * half + 32] = (v[0] >> 4) | ((v[1] >> 4) << 2) | ((v[2] >> 4) << 4) | ((v[3] >> 4) << 6)
    tail = np.concatenate([sc.astype(np.int8).view(np.uint8), d.reshape(1).view(np.uint8)])
    return np.concatenate([ql, qh, tail]), decoded, np.repeat(step, 16)


_K_BLOCK = {Q.Q4_K: _q4_k, Q.Q5_K: _q5_k, Q.Q6_K: _q6_k}
