"""GGUF tensors -> Hugging Face weights: names, dequantization, llama.cpp's Q/K row order, safetensors.

Each tensor is dequantized to float32 with `gguf.quants.dequantize` (ggml's own reference code,
the same `transformers` uses), so a float32 import holds exactly the values llama.cpp computes with;
a bfloat16 import rounds those once. Tensors are written as they are converted, into files of at
most `SHARD_BYTES` (an index when there is more than one), so a large model never sits in memory
twice.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from services.gguf.reader import GGUFFile, GGUFImportError, GGUFTensor

# The types this importer reads, each with the test that pins it (tests/gguf/test_quant_types.py).
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
SHARD_BYTES = 2 << 30

# GGUF block tensor -> Hugging Face module, for the llama family (llama, mistral, qwen2 alike).
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# Not weights: llama 3.1's rope frequency factors become config.json's rope_scaling (hparams.py).
IGNORED = ("rope_freqs.weight",)


def hf_name(gguf_name: str) -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; None if not a llama tensor."""
    m = _BLOCK.fullmatch(gguf_name)
    if m:
        layer, part, kind = m.groups()
        module = _LAYER_NAMES.get(part)
        return f"model.layers.{layer}.{module}.{kind}" if module else None
    stem, _, kind = gguf_name.rpartition(".")
    module = _TOP_NAMES.get(stem)
    return f"{module}.{kind}" if module and kind in ("weight", "bias") else None


def check_types(gguf: GGUFFile) -> None:
    for t in gguf.tensors.values():
        if t.name not in IGNORED and t.type_name not in SUPPORTED_TYPES:
            raise GGUFImportError(f"{gguf.path}: tensor {t.name!r} is {t.type_name}, a type this importer does not "
                                  f"read; supported: {', '.join(SUPPORTED_TYPES)}")


def dequantize(t: GGUFTensor) -> torch.Tensor:
    """The tensor's values as float32, shaped as PyTorch holds the weight (out_features, in_features)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    values = gguf_dequantize(np.asarray(t.data), GGMLQuantizationType(t.type_id))
    out = torch.from_numpy(np.array(values, dtype=np.float32))  # a copy: the file's map is read-only
    return out.reshape(t.shape)


def unpermute_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo convert_hf_to_gguf's llama permutation of q_proj / k_proj rows.

    Hugging Face's rotary embedding pairs dimension i with i + head_dim/2 ("rotate half"); ggml
    pairs 2i with 2i+1, so the converter interleaves each head's two halves. This puts them back.
    """
    rows = w.shape[0]
    half = rows // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def converted(gguf: GGUFFile, heads: int, kv_heads: int, permuted: bool,
              dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, weight in `dtype`) for every tensor, one at a time."""
    for t in gguf.tensors.values():
        if t.name in IGNORED:
            continue
        name = hf_name(t.name)
        if name is None:
            raise GGUFImportError(f"{gguf.path}: tensor {t.name!r} has no place in a llama-family checkpoint")
        w = dequantize(t)
        if permuted and ".self_attn.q_proj." in name:
            w = unpermute_rows(w, heads)
        elif permuted and ".self_attn.k_proj." in name:
            w = unpermute_rows(w, kv_heads)
        yield name, w.to(dtype).contiguous()


def write_weights(weights: Iterator[tuple[str, torch.Tensor]], out: Path, shard_bytes: int = SHARD_BYTES) -> list[str]:
    """Save to `model.safetensors`, or `model-0000i-of-0000n.safetensors` plus an index when larger."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    names: list[str] = []
    written: list[Path] = []
    for name, w in weights:
        nbytes = w.numel() * w.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            written.append(_save(shards[-1], out, len(written)))
            shards[-1], size = {}, 0
        shards[-1][name] = w
        size += nbytes
        names.append(name)
    written.append(_save(shards[-1], out, len(written)))
    _name_shards(out, written)
    return names


def _save(tensors: dict[str, torch.Tensor], out: Path, index: int) -> Path:
    path = out / f"shard-{index}.safetensors.tmp"
    save_file(tensors, str(path), metadata={"format": "pt"})
    tensors.clear()
    return path


def _name_shards(out: Path, written: list[Path]) -> None:
    """Give the shards their final names (the count is known only at the end) and write the index."""
    if len(written) == 1:
        written[0].rename(out / "model.safetensors")
        return
    from safetensors import safe_open

    weight_map: dict[str, str] = {}
    total = 0
    for i, path in enumerate(written):
        final = out / f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
        path.rename(final)
        with safe_open(str(final), framework="pt") as f:
            for name in f.keys():
                weight_map[name] = final.name
                sl = f.get_slice(name)
                total += int(np.prod(sl.get_shape())) * torch.finfo(_DTYPES[sl.get_dtype()]).bits // 8
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
