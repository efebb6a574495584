"""`import_gguf`: one GGUF file -> one Hugging Face checkpoint folder.

The folder is written next to its destination under a temporary name and renamed into place
only once every file is in it, so an interrupted import never leaves a folder that looks whole
(`nitsum up` treats a folder with a config.json as a finished import).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from services.gguf.hparams import arch_of, model_config, stop_ids
from services.gguf.reader import GGUFImportError, open_gguf
from services.gguf.tensors import check_types, converted, write_weights
from services.gguf.tokenizer import build_tokenizer, tokenizer_config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def import_gguf(file: str | os.PathLike[str], out: str | os.PathLike[str], dtype: str = "float32",
                replace: bool = False) -> Path:
    """Write config.json, model.safetensors, tokenizer files and generation_config.json to `out`."""
    if dtype not in DTYPES:
        raise GGUFImportError(f"dtype {dtype!r} is not supported; choose {' or '.join(DTYPES)}")
    dest = Path(out)
    if dest.exists() and not dest.is_dir():
        raise GGUFImportError(f"--out {dest}: exists and is not a folder")
    if dest.is_dir() and any(dest.iterdir()):
        if not replace:
            raise GGUFImportError(f"--out {dest}: the folder is not empty (choose a new one, or --force to replace "
                                  "a checkpoint folder)")
        if not (dest / "config.json").is_file():
            raise GGUFImportError(f"--out {dest}: not empty and not a checkpoint folder (no config.json); "
                                  "--force replaces only checkpoint folders")
    gguf = open_gguf(file)
    arch = arch_of(gguf)
    check_types(gguf)
    config = model_config(gguf, dtype)
    tokenizer = build_tokenizer(gguf)  # before the weights: a vocabulary problem fails fast
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        weights = converted(gguf, config["num_attention_heads"], config["num_key_value_heads"], arch.permuted_qk,
                            DTYPES[dtype])
        names = write_weights(weights, work)
        _check_complete(names, config, gguf.path)
        tokenizer.save(str(work / "tokenizer.json"))
        _write_json(work / "tokenizer_config.json", tokenizer_config(gguf, config["max_position_embeddings"]))
        _write_json(work / "generation_config.json", _generation_config(config, stop_ids(gguf)))
        _write_json(work / "config.json", config)  # last: its presence marks a finished folder
        _share(work)
        if dest.exists():
            shutil.rmtree(dest)
        work.rename(dest)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return dest


def _check_complete(names: list[str], config: dict, source: Path) -> None:
    """Every weight a llama-family model of this shape loads must be in the file."""
    per_layer = ["input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
                 "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    needed = ["model.embed_tokens.weight", "model.norm.weight"]
    needed += [f"model.layers.{i}.{p}.weight" for i in range(config["num_hidden_layers"]) for p in per_layer]
    if not config["tie_word_embeddings"]:
        needed.append("lm_head.weight")
    missing = sorted(set(needed) - set(names))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise GGUFImportError(f"{source}: weight {missing[0]!r} is missing from the file{more}")


def _generation_config(config: dict, stops: list[int]) -> dict:
    gen: dict = {"bos_token_id": config.get("bos_token_id")}
    if stops:
        gen["eos_token_id"] = stops[0] if len(stops) == 1 else stops
    if "pad_token_id" in config:
        gen["pad_token_id"] = config["pad_token_id"]
    return {k: v for k, v in gen.items() if v is not None}


def _share(folder: Path) -> None:
    """mkdtemp makes the folder private; give it (and the files) the modes a plain mkdir would."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.iterdir():
        f.chmod(0o666 & ~umask)


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n")
