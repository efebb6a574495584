"""`nitsum make-model`: write a random-weight checkpoint in the Hugging Face format.

The folder holds exactly what a real checkpoint does (config.json, safetensors weights,
tokenizer.json, tokenizer_config.json with a chat template, generation_config.json), so
`transformers.AutoModelForCausalLM`/`AutoTokenizer` load it unchanged and the engine loads it the
same way it loads a downloaded model. The tokenizer is a byte-level BPE trained, deterministically,
on a built-in synthetic corpus.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

PRESETS: dict[str, dict[str, Any]] = {
    # For tests: builds and runs in well under a second. 4 heads, 2 KV heads: at TP 4 the KV
    # heads are fewer than the ranks.
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=512, tie_word_embeddings=False),
    # For benchmarks: ~110M parameters.
    "small": dict(hidden_size=768, intermediate_size=2560, num_hidden_layers=12, num_attention_heads=12,
                  num_key_value_heads=4, vocab_size=32000, max_position_embeddings=16384, tie_word_embeddings=True),
}

ARCHS = {"llama": ("LlamaForCausalLM", "llama"), "qwen2": ("Qwen2ForCausalLM", "qwen2"),
         "mistral": ("MistralForCausalLM", "mistral")}

SPECIAL = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _corpus(seed: int, words: int = 60000) -> list[str]:
    """Pseudo-English: syllable words with Zipf-like frequencies, so BPE finds many merges."""
    rng = random.Random(seed)
    onsets = ["", "b", "c", "d", "f", "g", "h", "l", "m", "n", "p", "r", "s", "t", "v", "w", "st", "tr", "ch", "th"]
    vowels = ["a", "e", "i", "o", "u", "ai", "ea", "ou"]
    codas = ["", "n", "r", "s", "t", "l", "nd", "ng", "st"]
    lexicon = ["".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas) for _ in range(rng.randint(1, 3)))
               for _ in range(40000)]
    weights = [1.0 / (i + 1) for i in range(len(lexicon))]
    lines, line = [], []
    for w in rng.choices(lexicon, weights=weights, k=words):
        line.append(w)
        if len(line) >= rng.randint(6, 16):
            lines.append(" ".join(line).capitalize() + rng.choice([".", ",", "?", "!", ". 42", ": x = 1"]))
            line = []
    return lines


def build_tokenizer(vocab_size: int, seed: int) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return tok


def model_config(preset: str, arch: str, dtype: str, tok: Tokenizer) -> dict[str, Any]:
    shape = dict(PRESETS[preset])
    arch_name, model_type = ARCHS[arch]
    heads = shape["num_attention_heads"]
    cfg: dict[str, Any] = {
        "architectures": [arch_name], "model_type": model_type, **shape,
        "head_dim": shape["hidden_size"] // heads, "hidden_act": "silu", "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "rope_scaling": None, "initializer_range": 0.02,
        "attention_bias": arch == "qwen2", "attention_dropout": 0.0, "mlp_bias": False,
        "bos_token_id": tok.token_to_id("<s>"), "eos_token_id": tok.token_to_id("</s>"),
        "torch_dtype": dtype, "use_cache": True,
    }
    if arch in ("qwen2", "mistral"):
        cfg.update(sliding_window=None, use_sliding_window=False, max_window_layers=shape["num_hidden_layers"])
    return cfg


def random_weights(cfg: dict[str, Any], dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, inter, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d

    def rand(*shape: int, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * std).to(dtype)

    def norm() -> torch.Tensor:
        return (1.0 + torch.randn(h, generator=g) * 0.1).to(dtype)

    w = {"model.embed_tokens.weight": rand(cfg["vocab_size"], h, std=0.5), "model.norm.weight": norm()}
    if not cfg["tie_word_embeddings"]:
        w["lm_head.weight"] = rand(cfg["vocab_size"], h, std=0.5)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w.update({p + "input_layernorm.weight": norm(), p + "post_attention_layernorm.weight": norm(),
                  p + "self_attn.q_proj.weight": rand(q, h, std=h ** -0.5),
                  p + "self_attn.k_proj.weight": rand(kv, h, std=h ** -0.5),
                  p + "self_attn.v_proj.weight": rand(kv, h, std=h ** -0.5),
                  p + "self_attn.o_proj.weight": rand(h, q, std=q ** -0.5),
                  p + "mlp.gate_proj.weight": rand(inter, h, std=h ** -0.5),
                  p + "mlp.up_proj.weight": rand(inter, h, std=h ** -0.5),
                  p + "mlp.down_proj.weight": rand(h, inter, std=inter ** -0.5)})
        if cfg["attention_bias"]:
            w.update({p + "self_attn.q_proj.bias": rand(q, std=0.1), p + "self_attn.k_proj.bias": rand(kv, std=0.1),
                      p + "self_attn.v_proj.bias": rand(kv, std=0.1)})
    return w


def _save_weights(weights: dict[str, torch.Tensor], out: Path, shards: int) -> None:
    if shards <= 1:
        save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    names = list(weights)
    weight_map, size = {}, 0
    for k in range(shards):
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: weights[n] for n in names[k::shards]}
        save_file(part, str(out / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
        size += sum(t.numel() * t.element_size() for t in part.values())
    index = {"metadata": {"total_size": size}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def make_model(preset: str = "tiny", out: str | Path = "model", dtype: str = "float32", seed: int = 0,
               arch: str = "llama", shards: int = 1) -> Path:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of: {', '.join(ARCHS)}")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"unknown dtype {dtype!r}; choose float32, bfloat16 or float16")
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(min(PRESETS[preset]["vocab_size"], 32000), seed)
    cfg = model_config(preset, arch, dtype, tok)
    _save_weights(random_weights(cfg, getattr(torch, dtype), seed), path, shards)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    tok.save(str(path / "tokenizer.json"))
    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
               "unk_token": "<unk>", "pad_token": "</s>", "add_bos_token": True, "clean_up_tokenization_spaces": False,
               "model_max_length": cfg["max_position_embeddings"], "chat_template": CHAT_TEMPLATE}
    (path / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    gen = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"], "do_sample": False}
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return path
