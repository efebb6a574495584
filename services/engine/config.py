"""Model and engine configuration, parsed and validated once.

`ModelConfig` reads a Hugging Face `config.json` (both the classic `rope_theta`/`rope_scaling`
fields and the newer `rope_parameters` form). `EngineArgs` holds what the user chooses when
starting an engine; `EngineArgs.validate_for` checks the pair and says what to change.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from services.engine.errors import ModelLoadError
from services.engine.tp import tp_error

# architecture name -> whether its attention projections carry a bias by default
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": False,
    "MistralForCausalLM": False,
    "Qwen2ForCausalLM": True,
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    torch_dtype: str
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    sliding_window: int | None = None

    @property
    def max_model_len(self) -> int:
        return self.max_position_embeddings

    @property
    def num_params(self) -> int:
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * d * (self.num_attention_heads * 2 + self.num_key_value_heads * 2)
        if self.attention_bias:
            attn += d * (self.num_attention_heads + 2 * self.num_key_value_heads)
        layer = attn + 3 * h * i + 2 * h
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * layer + emb + h

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike[str]) -> ModelConfig:
        path = Path(model_dir)
        if not path.is_dir():
            raise ModelLoadError(f"model folder {str(path)!r} does not exist")
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise ModelLoadError(f"{cfg_path}: missing (a Hugging Face checkpoint folder needs config.json)")
        try:
            raw = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise ModelLoadError(f"{cfg_path}: not valid JSON ({e})") from None
        return cls.from_dict(raw, source=str(cfg_path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
        archs = raw.get("architectures") or []
        arch = archs[0] if archs else None
        if arch not in SUPPORTED_ARCHITECTURES:
            supported = ", ".join(SUPPORTED_ARCHITECTURES)
            raise ModelLoadError(f"{source}: field 'architectures' is {archs!r}; supported: {supported}")

        def need(name: str) -> Any:
            if name not in raw:
                raise ModelLoadError(f"{source}: required field {name!r} is missing")
            return raw[name]

        heads = int(need("num_attention_heads"))
        hidden = int(need("hidden_size"))
        rope = raw.get("rope_parameters") or {}
        rope_theta = float(raw.get("rope_theta", rope.get("rope_theta", 10000.0)))
        scaling = raw.get("rope_scaling")
        if scaling is None and rope and rope.get("rope_type", "default") != "default":
            scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        cfg = cls(
            architecture=arch,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_hidden_layers=int(need("num_hidden_layers")),
            num_attention_heads=heads,
            num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or hidden // heads),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=bool(raw.get("attention_bias", SUPPORTED_ARCHITECTURES[arch])),
            torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "float32"),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
            sliding_window=raw.get("sliding_window") if raw.get("use_sliding_window", True) else None,
        )
        cfg._check(source)
        return cfg

    def _check(self, source: str) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelLoadError(
                f"{source}: num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type") or self.rope_scaling.get("type")
            if kind not in ("default", "linear", "llama3"):
                raise ModelLoadError(f"{source}: field 'rope_scaling.rope_type' is {kind!r}; supported: linear, llama3")
        if self.torch_dtype not in DTYPES:
            raise ModelLoadError(f"{source}: field 'torch_dtype' is {self.torch_dtype!r}; supported: {', '.join(DTYPES)}")


@dataclass(frozen=True)
class EngineArgs:
    """What a user picks when starting an engine. Validated against the model by `validate_for`."""

    model: str
    tp: int = 1
    device: str = "cpu"
    dtype: str = "auto"  # "auto": the checkpoint's torch_dtype
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: sized from kv_cache_bytes
    kv_cache_bytes: int = 1 << 30
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    # The scheduler's policy (policy.py): "tier" orders prompts by TTFT deadline and guards TPOT;
    # "fcfs" is first come, first served (the baseline, vLLM's way).
    schedule: str = "tier"
    tpot_guard: float = 0.9  # a step that also decodes fits this share of the tightest TPOT target
    min_chunk_tokens: int = 32  # the guard never cuts a step's prompt tokens below this
    max_step_s: float = 0.0  # > 0: a step carrying prompt tokens fits this (policy.step_cap_s); 0: no cap
    seed: int = 0
    # Multi-process groups: where the group's TCPStore lives and the key prefix of this group.
    dist_addr: str | None = None
    dist_prefix: str = "nitsum/"
    spawn_workers: bool = True
    dist_timeout_s: float = 120.0
    extra: dict[str, Any] = field(default_factory=dict)

    def torch_dtype(self, model_cfg: ModelConfig) -> torch.dtype:
        name = model_cfg.torch_dtype if self.dtype == "auto" else self.dtype
        if name not in DTYPES:
            raise ModelLoadError(f"--dtype {name!r} is not supported; use one of: auto, {', '.join(DTYPES)}")
        return DTYPES[name]

    def validate_for(self, cfg: ModelConfig) -> None:
        bad_tp = tp_error(self.tp, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size)
        if bad_tp is not None:
            raise ModelLoadError(bad_tp)
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ModelLoadError(f"--device {self.device!r}: use cpu or cuda")
        if self.block_size < 1 or self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ModelLoadError("block_size, max_num_seqs and max_num_batched_tokens must be >= 1")
        if self.schedule not in ("tier", "fcfs"):
            raise ModelLoadError(f"schedule {self.schedule!r}: use tier (by deadline and tier) or fcfs")
        self.torch_dtype(cfg)

    def model_len(self, cfg: ModelConfig) -> int:
        return min(self.max_model_len or cfg.max_model_len, cfg.max_model_len)


def context_error(prompt_tokens: int, max_tokens: int, max_model_len: int) -> str | None:
    """Why a request does not fit the model's context, or None: the one rule the gateway (400 to the
    client, before anything is queued) and the engine (for any caller) both apply."""
    total = prompt_tokens + max(max_tokens, 1)
    if total <= max_model_len:
        return None
    return (f"this model's maximum context length is {max_model_len} tokens, but {total} were requested "
            f"({prompt_tokens} in the prompt, {max_tokens} for the completion); shorten the prompt or lower "
            "max_tokens")
