"""GGUF metadata -> the `config.json` and `generation_config.json` of a Hugging Face checkpoint.

GGUF keys are `<arch>.<name>` (`llama.embedding_length`, `qwen2.block_count`, ...); Mistral and
SmolLM files say `llama`. Llama 3.1's rope scaling is not in the metadata at all: the converter
stores its per-frequency factors as a tensor (`rope_freqs.weight`), from which the four numbers of
`rope_scaling` are recovered by matching the formula that produced it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from services.gguf.reader import GGUFFile, GGUFImportError


@dataclass(frozen=True)
class Arch:
    hf_class: str
    model_type: str
    permuted_qk: bool  # convert_hf_to_gguf reorders llama's q/k rows for ggml's rotary layout


ARCHITECTURES = {
    "llama": Arch("LlamaForCausalLM", "llama", True),
    "qwen2": Arch("Qwen2ForCausalLM", "qwen2", False),
}

# Control tokens that end a turn for the chat formats in the wild (llama.cpp stops on them too).
END_OF_TURN_TEXTS = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<|endoftext|>", "<|end_of_text|>",
                     "<end_of_turn>", "<EOT>")


def arch_of(gguf: GGUFFile) -> Arch:
    arch = ARCHITECTURES.get(gguf.architecture)
    if arch is None:
        raise GGUFImportError(f"{gguf.path}: architecture {gguf.architecture!r} is not supported; supported: "
                              f"{', '.join(ARCHITECTURES)} (llama covers Llama 2/3, Mistral and SmolLM)")
    return arch


def _f32(value: Any) -> float:
    """A float32 from the metadata as the decimal it was written from (9.99999974e-06 -> 1e-05)."""
    return float(str(np.float32(value)))


def model_config(gguf: GGUFFile, dtype: str) -> dict[str, Any]:
    arch = arch_of(gguf)
    a = gguf.architecture
    hidden = int(gguf.need(f"{a}.embedding_length"))
    heads = int(gguf.need(f"{a}.attention.head_count"))
    kv_heads = int(gguf.get(f"{a}.attention.head_count_kv", heads))
    head_dim = int(gguf.get(f"{a}.attention.key_length", hidden // heads))
    rotary = int(gguf.get(f"{a}.rope.dimension_count", head_dim))
    if rotary != head_dim:
        raise GGUFImportError(f"{gguf.path}: rotary embedding over {rotary} of {head_dim} head dimensions "
                              "(partial rotary) is not supported")
    embed = gguf.tensors.get("token_embd.weight")
    if embed is None:
        raise GGUFImportError(f"{gguf.path}: tensor 'token_embd.weight' is missing")
    theta = _f32(gguf.get(f"{a}.rope.freq_base", 10000.0))
    cfg: dict[str, Any] = {
        "architectures": [arch.hf_class], "model_type": arch.model_type,
        "hidden_size": hidden, "intermediate_size": int(gguf.need(f"{a}.feed_forward_length")),
        "num_hidden_layers": int(gguf.need(f"{a}.block_count")), "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": head_dim, "hidden_act": "silu",
        "rms_norm_eps": _f32(gguf.get(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": theta, "rope_scaling": rope_scaling(gguf, theta, head_dim),
        "max_position_embeddings": int(gguf.get(f"{a}.context_length", 2048)),
        "vocab_size": embed.shape[0], "tie_word_embeddings": "output.weight" not in gguf.tensors,
        "attention_bias": "blk.0.attn_q.bias" in gguf.tensors, "attention_dropout": 0.0, "mlp_bias": False,
        "initializer_range": 0.02, "use_cache": True, "torch_dtype": dtype,
        **special_ids(gguf),
    }
    if arch.model_type == "qwen2":
        cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg["num_hidden_layers"])
    return cfg


def special_ids(gguf: GGUFFile) -> dict[str, Any]:
    """bos, eos (every stop token, as a list when there are several) and pad ids."""
    out: dict[str, Any] = {}
    bos = gguf.get("tokenizer.ggml.bos_token_id")
    if bos is not None:
        out["bos_token_id"] = int(bos)
    stops = stop_ids(gguf)
    if stops:
        out["eos_token_id"] = stops[0] if len(stops) == 1 else stops
    pad = gguf.get("tokenizer.ggml.padding_token_id")
    if pad is not None:
        out["pad_token_id"] = int(pad)
    return out


def stop_ids(gguf: GGUFFile) -> list[int]:
    """The eos token first, then end-of-turn / end-of-message tokens the file names or the vocabulary has."""
    ids = [int(v) for k in ("eos", "eot", "eom") if (v := gguf.get(f"tokenizer.ggml.{k}_token_id")) is not None]
    tokens = gguf.get("tokenizer.ggml.tokens") or []
    types = gguf.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    ids += [i for i, (t, kind) in enumerate(zip(tokens, types, strict=False)) if kind == 3 and t in END_OF_TURN_TEXTS]
    return list(dict.fromkeys(ids))


def rope_scaling(gguf: GGUFFile, theta: float, head_dim: int) -> dict[str, Any] | None:
    a = gguf.architecture
    kind = gguf.get(f"{a}.rope.scaling.type", "none")
    factor = gguf.get(f"{a}.rope.scaling.factor")
    if kind in ("linear", "yarn") and factor:
        scaling: dict[str, Any] = {"rope_type": kind, "factor": _f32(factor)}
        original = gguf.get(f"{a}.rope.scaling.original_context_length")
        if kind == "yarn" and original:
            scaling["original_max_position_embeddings"] = int(original)
        return scaling
    if kind not in ("none", "linear", "yarn"):
        raise GGUFImportError(f"{gguf.path}: rope scaling {kind!r} is not supported (linear, yarn, llama 3's are)")
    freqs = gguf.tensors.get("rope_freqs.weight")
    return None if freqs is None else llama3_scaling(gguf, np.asarray(freqs.data, np.float32), theta, head_dim)


def llama3_factors(theta: float, head_dim: int, factor: float, low: float, high: float, original: int) -> np.ndarray:
    """What convert_hf_to_gguf stores as rope_freqs for Llama 3's rope_scaling (one per frequency)."""
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, np.float32)


def llama3_scaling(gguf: GGUFFile, freqs: np.ndarray, theta: float, head_dim: int) -> dict[str, Any] | None:
    """The rope_scaling that yields these factors: only the two wavelengths where the scaling starts
    and ends matter (original/high_freq_factor and original/low_freq_factor), so low_freq_factor is
    taken as 1, as Llama 3 has it, and the boundaries are read off the factors in between."""
    factor = round(float(freqs.max()), 4)
    if factor == 1.0:
        return None
    candidates = [(float(original), 1.0, 4.0) for original in (2 ** k for k in range(6, 18))]
    fitted = _fit_boundaries(freqs, theta, head_dim, factor)
    for original, low, high in ([fitted] if fitted else []) + candidates:
        expected = llama3_factors(theta, head_dim, factor, low, high, int(original))
        if expected.shape == freqs.shape and np.allclose(expected, freqs, rtol=1e-4, atol=1e-6):
            return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                    "original_max_position_embeddings": int(original)}
    raise GGUFImportError(f"{gguf.path}: tensor 'rope_freqs.weight' matches no llama 3 rope scaling")


def _fit_boundaries(freqs: np.ndarray, theta: float, head_dim: int, factor: float) -> tuple[float, float, float] | None:
    """In the smooth band, s = (1/f - 1/factor) / (1 - 1/factor) = original/(w (high-low)) - low/(high-low)
    is linear in 1/w: two or more factors there give (original, 1, high)."""
    inv_w = np.array([1 / (2 * math.pi * theta ** (i / head_dim)) for i in range(0, head_dim, 2)])
    band = (freqs > 1 + 1e-4) & (freqs < factor - 1e-4)
    if band.sum() < 2 or inv_w.shape != freqs.shape:
        return None
    s = (1 / freqs[band] - 1 / factor) / (1 - 1 / factor)
    a, b = np.polyfit(inv_w[band], s, 1)
    if b >= 0 or a <= 0:
        return None
    high = round(float(1 - 1 / b), 4)
    return float(round(-a / b)), 1.0, high
