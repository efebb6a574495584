"""Reading a Hugging Face checkpoint folder: each rank reads only its own shard bytes.

Safetensors files are memory-mapped (`safe_open`), and `get_slice` reads just the rows or columns
a rank owns, so a TP-4 rank touches a quarter of each sharded tensor.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from services.engine.config import ModelConfig
from services.engine.errors import ModelLoadError
from services.engine.sharding import shard_slice


def weight_files(model_dir: str | Path) -> dict[str, Path]:
    """Map every tensor name to the file that holds it (single file or sharded with an index)."""
    path = Path(model_dir)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = {name: path / fname for name, fname in weight_map.items()}
        for f in set(files.values()):
            if not f.is_file():
                raise ModelLoadError(f"{index}: lists {f.name}, which is missing from {path}")
        return files
    singles = sorted(path.glob("*.safetensors"))
    if not singles:
        raise ModelLoadError(f"{path}: no *.safetensors weight files found")
    files = {}
    for f in singles:
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():
                files[name] = f
    return files


def iter_shards(
    model_dir: str | Path, cfg: ModelConfig, names: list[str], rank: int, tp: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, this rank's slice) for every requested tensor; missing ones are an error."""
    files = weight_files(model_dir)
    missing = [n for n in names if n not in files]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelLoadError(f"{model_dir}: weight {missing[0]!r} is missing from the checkpoint{more}")
    by_file: dict[Path, list[str]] = {}
    for n in names:
        by_file.setdefault(files[n], []).append(n)
    for f, group in by_file.items():
        with safe_open(str(f), framework="pt") as sf:
            for name in group:
                sl = shard_slice(name, cfg, rank, tp)
                view = sf.get_slice(name)
                if sl is None:
                    yield name, view[:]
                elif sl.dim == 0:
                    yield name, view[sl.start : sl.stop]
                else:
                    yield name, view[:, sl.start : sl.stop]
