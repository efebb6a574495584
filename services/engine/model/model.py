"""A Llama-family decoder (Llama 2/3, Mistral, Qwen2) running over a paged KV cache.

One forward pass takes a packed batch: decode tokens of many sequences first, then prefill
chunks. Linear layers see all tokens at once; attention reads keys and values from the paged
cache through each sequence's block table. Weights come from `loader.iter_shards`, already
sliced for this rank, or from a reshard; `CausalLM.shard_views` hands them back (the inverse of
`load`) so a reconfiguration can keep or send what this rank already holds.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from services.engine.batch import AttnMeta
from services.engine.config import ModelConfig
from services.engine.model import cpu_kernels
from services.engine.model.layers import (
    AllReduce,
    ColumnParallelLinear,
    RMSNorm,
    Rotary,
    RowParallelLinear,
    apply_rotary,
    linear,
    pack_weight,
)
from services.engine.model.sharding import kv_heads_per_rank


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: int, dtype: torch.dtype, device: torch.device,
                 group: AllReduce | None) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads // tp
        self.num_kv_heads = kv_heads_per_rank(cfg, tp)
        self.head_dim = d = cfg.head_dim
        sizes = [self.num_heads * d, self.num_kv_heads * d, self.num_kv_heads * d]
        self.qkv = ColumnParallelLinear(cfg.hidden_size, sizes, cfg.attention_bias, dtype, device)
        self.o_proj = RowParallelLinear(self.num_heads * d, cfg.hidden_size, dtype, device, group)

    def forward(self, x: torch.Tensor, meta: AttnMeta, rope: Rope, k_cache: torch.Tensor,
                v_cache: torch.Tensor) -> torch.Tensor:
        """Caches are [blocks, kv heads, block_size, d] views of this layer."""
        t, d, h, kvh = x.shape[0], self.head_dim, self.num_heads, self.num_kv_heads
        qkv = self.qkv(x)
        lib = rope.kernels
        if lib is not None:
            cpu_kernels.rope_store_kv(lib, qkv, h, kvh, d, rope.rotary.cos, rope.rotary.sin, meta.positions,
                                      k_cache, v_cache, meta.cache_blocks, meta.cache_offsets)
            q = qkv[:, : h * d].view(t, h, d)
            k = qkv[:, h * d : (h + kvh) * d].view(t, kvh, d)
            v = qkv[:, (h + kvh) * d : (h + 2 * kvh) * d].view(t, kvh, d)
        else:
            assert rope.cos_sin is not None
            q, k, v = qkv.split(self.qkv.part_sizes, dim=-1)
            q, k = apply_rotary(rope.cos_sin, q.view(t, h, d), k.view(t, kvh, d))
            v = v.view(t, kvh, d)
            k_cache[meta.cache_blocks, :, meta.cache_offsets] = k
            v_cache[meta.cache_blocks, :, meta.cache_offsets] = v
        out = torch.empty(t, h, d, dtype=x.dtype, device=x.device)
        b = meta.num_decode
        if b:
            assert meta.decode_tables is not None and meta.decode_lens is not None
            if lib is not None:
                cpu_kernels.decode_attention(lib, q[:b], k_cache, v_cache, meta.decode_tables, meta.decode_lens,
                                             d**-0.5, out[:b])
            else:
                keys, vals = _gather(k_cache, meta.decode_tables), _gather(v_cache, meta.decode_tables)
                o = F.scaled_dot_product_attention(q[:b].unsqueeze(2), keys, vals, attn_mask=meta.decode_mask,
                                                   enable_gqa=True)
                out[:b] = o.squeeze(2)
        for seg in meta.prefill:
            rows = slice(seg.start, seg.start + seg.length)
            qs = q[rows].transpose(0, 1).unsqueeze(0)  # [1, h, n, d]
            if seg.key_blocks is None:
                ks, vs = k[rows].transpose(0, 1).unsqueeze(0), v[rows].transpose(0, 1).unsqueeze(0)
                mask, causal = None, True
            else:
                span = seg.context + seg.length
                tables = seg.key_blocks.unsqueeze(0)
                ks, vs = _gather(k_cache, tables)[:, :, :span], _gather(v_cache, tables)[:, :, :span]
                qpos = torch.arange(seg.context, span, device=x.device)[:, None]
                mask, causal = torch.arange(span, device=x.device)[None, :] <= qpos, False
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, is_causal=causal, enable_gqa=True)
            out[rows] = o.squeeze(0).transpose(0, 1)
        return self.o_proj(out.view(t, h * d))


@dataclass
class Rope:
    """What a layer needs for rotary embeddings in one step: with the CPU kernels, the model's
    cos/sin tables (`rotary`; the kernel looks positions up); without, this step's cos/sin per
    token (`cos_sin`)."""

    rotary: Rotary
    kernels: ctypes.CDLL | None
    cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None


def _gather(cache: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """Keys or values of whole blocks: cache [blocks, kvh, bs, d], tables [B, n] -> [B, kvh, n * bs, d].

    Indexing a head-major view yields [kvh, B, n, bs, d] in one copy; merging n and bs and
    swapping the first two dims are then views (SDPA takes the strides), where gathering
    block-major first would need a second copy to bring the heads forward."""
    g = cache.transpose(0, 1)[:, tables]
    h, b, n, bs, d = g.shape
    return g.view(h, b, n * bs, d).transpose(0, 1)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: int, dtype: torch.dtype, device: torch.device,
                 group: AllReduce | None) -> None:
        super().__init__()
        inter = cfg.intermediate_size // tp
        self.gate_up = ColumnParallelLinear(cfg.hidden_size, [inter, inter], False, dtype, device)
        self.down = RowParallelLinear(inter, cfg.hidden_size, dtype, device, group)

    def forward(self, x: torch.Tensor, kernels: ctypes.CDLL | None = None) -> torch.Tensor:
        gate_up = self.gate_up(x)
        if kernels is not None:
            return self.down(cpu_kernels.silu_mul(kernels, gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: int, dtype: torch.dtype, device: torch.device,
                 group: AllReduce | None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.self_attn = Attention(cfg, tp, dtype, device, group)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.mlp = MLP(cfg, tp, dtype, device, group)


class CausalLM(nn.Module):
    """The whole decoder. Only rank 0 computes logits (`lm_head` is skipped elsewhere)."""

    def __init__(self, cfg: ModelConfig, tp: int, rank: int, max_len: int, dtype: torch.dtype,
                 device: torch.device, group: AllReduce | None) -> None:
        super().__init__()
        self.cfg, self.tp, self.rank = cfg, tp, rank
        # Given storage, not nn.Embedding's random init: drawing vocab x hidden normals costs
        # ~150 ms on the small model, on every (re)build, for values `load` overwrites.
        weight = torch.empty(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=weight, _freeze=True)
        self.decoder_layers = [DecoderLayer(cfg, tp, dtype, device, group) for _ in range(cfg.num_hidden_layers)]
        self.layers = nn.ModuleList(self.decoder_layers)  # registers their parameters
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.rotary = Rotary(cfg, max_len, dtype, device)
        self.lm_head: torch.Tensor | None = None
        if rank == 0 and not cfg.tie_word_embeddings:
            self.lm_head = torch.empty(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device)
        self.lm_head_packed: torch.Tensor | None = None
        self.head_gemv: ctypes.CDLL | None = None
        self.finalized = False
        # The CPU kernels (None: the PyTorch path, e.g. on CUDA or in float16).
        self.kernels = cpu_kernels.get() if cpu_kernels.supports(device, dtype, cfg.head_dim) else None
        # Every norm's weight in the order a forward applies them (the fused path indexes it).
        self.norm_weights = [w for layer in self.decoder_layers
                             for w in (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)]
        self.norm_weights.append(self.norm.weight)

    def finalize(self, head_packed: torch.Tensor | None = None) -> None:
        """Prepare kernels' weight layouts once every weight is loaded; `head_packed`: the output
        head's, made earlier from the same (never sharded) head weight."""
        for lin in self._linears():
            lin.finalize()
        if self.rank == 0:
            self.lm_head_packed = head_packed if head_packed is not None else pack_weight(self.head_weight)
            self.head_gemv = cpu_kernels.gemv_lib(self.head_weight)
        self.finalized = True

    def drop_packed(self) -> None:
        """Free the kernels' weight layouts (a reshard needs only the plain weights; `finalize` makes
        them again). On CPU in bfloat16 that halves what a slot holds while it builds the next shard."""
        for lin in self._linears():
            lin.packed, lin.gemv = None, None
        self.lm_head_packed, self.head_gemv = None, None
        self.finalized = False

    def _linears(self) -> list[ColumnParallelLinear | RowParallelLinear]:
        return [lin for layer in self.decoder_layers
                for lin in (layer.self_attn.qkv, layer.self_attn.o_proj, layer.mlp.gate_up, layer.mlp.down)]

    @property
    def head_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head

    @torch.inference_mode()
    def forward(self, meta: AttnMeta, kv_cache: torch.Tensor) -> torch.Tensor | None:
        """Run the packed batch; returns float32 logits for `meta.sample_rows` on rank 0, else None."""
        if self.kernels is not None:
            return self._forward_fused(meta, kv_cache, self.kernels)
        residual = self.embed_tokens(meta.input_ids)
        rope = Rope(self.rotary, None, self.rotary.at(meta.positions))
        for i, layer in enumerate(self.decoder_layers):
            h = layer.self_attn(layer.input_layernorm(residual), meta, rope, kv_cache[:, i, 0], kv_cache[:, i, 1])
            residual = residual + h
            residual = residual + layer.mlp(layer.post_attention_layernorm(residual))
        if self.rank != 0 or not len(meta.sample_rows):
            return None
        return self._logits(self.norm(residual[meta.sample_rows]))

    def _forward_fused(self, meta: AttnMeta, kv_cache: torch.Tensor, lib: ctypes.CDLL) -> torch.Tensor | None:
        """`forward` with the CPU kernels: each residual add runs fused with the norm after it,
        in place in `residual`, and every norm writes into one buffer `x`."""
        residual = self.embed_tokens(meta.input_ids)
        x = torch.empty_like(residual)
        rope = Rope(self.rotary, lib)
        norms = self.norm_weights
        eps = self.cfg.rms_norm_eps
        cpu_kernels.add_rms_norm(lib, residual, None, norms[0], eps, x)
        for i, layer in enumerate(self.decoder_layers):
            h = layer.self_attn(x, meta, rope, kv_cache[:, i, 0], kv_cache[:, i, 1])
            cpu_kernels.add_rms_norm(lib, residual, h, norms[2 * i + 1], eps, x)
            cpu_kernels.add_rms_norm(lib, residual, layer.mlp(x, lib), norms[2 * i + 2], eps, x)
        if self.rank != 0 or not len(meta.sample_rows):
            return None
        return self._logits(x[meta.sample_rows])

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return linear(h, self.head_weight, self.lm_head_packed, gemv=self.head_gemv).float()

    def checkpoint_names(self) -> list[str]:
        return checkpoint_names(self.cfg, lm_head=self.lm_head is not None)

    def load(self, name: str, tensor: torch.Tensor) -> None:
        """Place one checkpoint tensor (already this rank's slice) into its parameter."""
        self._target(name).copy_(tensor)

    def shard_views(self) -> dict[str, torch.Tensor]:
        """This rank's slice of every checkpoint tensor, as views into the parameters (no copy):
        the exact inverse of `load`, so a reshard can keep or send what this rank holds."""
        return {name: self._target(name) for name in self.checkpoint_names()}

    def _target(self, name: str) -> torch.Tensor:
        """The region of a parameter that checkpoint tensor `name` (this rank's slice) fills."""
        if name == "model.embed_tokens.weight":
            return self.embed_tokens.weight.data
        if name == "model.norm.weight":
            return self.norm.weight.data
        if name == "lm_head.weight":
            assert self.lm_head is not None
            return self.lm_head
        parts = name.split(".")  # model.layers.{i}.{module}[.{proj}].{weight|bias}
        if len(parts) < 5 or parts[:2] != ["model", "layers"] or not parts[2].isdigit():
            raise KeyError(name)
        return _layer_target(self.decoder_layers[int(parts[2])], parts[3:], name)


def _layer_target(layer: DecoderLayer, parts: list[str], name: str) -> torch.Tensor:
    leaf = ".".join(parts)
    qkv_index = {"q_proj": 0, "k_proj": 1, "v_proj": 2}
    if leaf == "input_layernorm.weight":
        return layer.input_layernorm.weight.data
    if leaf == "post_attention_layernorm.weight":
        return layer.post_attention_layernorm.weight.data
    if len(parts) == 3 and parts[0] == "self_attn" and parts[1] in qkv_index:
        return _part(layer.self_attn.qkv, qkv_index[parts[1]], is_bias=parts[2] == "bias")
    if leaf == "self_attn.o_proj.weight":
        return layer.self_attn.o_proj.weight.data
    if leaf in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
        return _part(layer.mlp.gate_up, 0 if parts[1] == "gate_proj" else 1)
    if leaf == "mlp.down_proj.weight":
        return layer.mlp.down.weight.data
    raise KeyError(name)


def _part(lin: ColumnParallelLinear, index: int, is_bias: bool = False) -> torch.Tensor:
    """Rows of a fused projection that one checkpoint tensor fills (as `load_part` places them)."""
    target = lin.bias if is_bias else lin.weight
    if target is None:
        raise KeyError(f"part {index} bias of a projection without bias")
    start = sum(lin.part_sizes[:index])
    return target.data[start : start + lin.part_sizes[index]]


def checkpoint_names(cfg: ModelConfig, lm_head: bool = True) -> list[str]:
    """Every checkpoint tensor a rank loads; `lm_head`: include the untied output head (rank 0 only)."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if lm_head and not cfg.tie_word_embeddings:
        names.append("lm_head.weight")
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        names += [p + f"self_attn.{x}_proj.weight" for x in "qkvo"]
        names += [p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
        if cfg.attention_bias:
            names += [p + f"self_attn.{x}_proj.bias" for x in "qkv"]
    return names
