"""Reading a Hugging Face checkpoint folder: each rank reads only its own shard bytes.

Safetensors files are memory-mapped (`safe_open`), and `get_slice` reads just the rows or columns
a rank owns, so a TP-4 rank touches a quarter of each sharded tensor. `CheckpointReader` reads any
interval of one tensor the same way (what a reshard takes from disk when no peer holds it), and
`tensor_shapes` reads only the files' headers.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from services.engine.config import ModelConfig
from services.engine.errors import ModelLoadError
from services.engine.model.sharding import shard_slice


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


def _missing_error(model_dir: str | Path, missing: list[str]) -> ModelLoadError:
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    return ModelLoadError(f"{model_dir}: weight {missing[0]!r} is missing from the checkpoint{more}")


def _read(view: Any, dim: int, start: int, stop: int) -> torch.Tensor:
    """[start, stop) along `dim` (0 or 1) of a safetensors slice: only those bytes are read."""
    return view[start:stop] if dim == 0 else view[:, start:stop]


def tensor_shapes(model_dir: str | Path, names: list[str]) -> dict[str, tuple[int, ...]]:
    """The shape of every named tensor, from the safetensors headers (no tensor data is read)."""
    files = weight_files(model_dir)
    missing = [n for n in names if n not in files]
    if missing:
        raise _missing_error(model_dir, missing)
    shapes: dict[str, tuple[int, ...]] = {}
    for f in sorted(set(files[n] for n in names)):
        with safe_open(str(f), framework="pt") as sf:
            for n in names:
                if files[n] == f:
                    shapes[n] = tuple(sf.get_slice(n).get_shape())
    return {n: shapes[n] for n in names}


class CheckpointReader:
    """Reads intervals of checkpoint tensors, keeping each file open; counts the bytes it read."""

    def __init__(self, model_dir: str | Path) -> None:
        self.model_dir = model_dir
        self.files = weight_files(model_dir)
        self.bytes_read = 0
        self._stack = ExitStack()
        self._open: dict[Path, Any] = {}

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()
        self._open.clear()

    def read(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """[start, stop) of tensor `name` along `dim` (0: rows, 1: columns), as stored."""
        if name not in self.files:
            raise _missing_error(self.model_dir, [name])
        f = self.files[name]
        if f not in self._open:
            self._open[f] = self._stack.enter_context(safe_open(str(f), framework="pt"))
        t = _read(self._open[f].get_slice(name), dim, start, stop)
        self.bytes_read += t.numel() * t.element_size()
        return t


def iter_shards(
    model_dir: str | Path, cfg: ModelConfig, names: list[str], rank: int, tp: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, this rank's slice) for every requested tensor; missing ones are an error."""
    files = weight_files(model_dir)
    missing = [n for n in names if n not in files]
    if missing:
        raise _missing_error(model_dir, missing)
    by_file: dict[Path, list[str]] = {}
    for n in names:
        by_file.setdefault(files[n], []).append(n)
    for f, group in by_file.items():
        with safe_open(str(f), framework="pt") as sf:
            for name in group:
                sl = shard_slice(name, cfg, rank, tp)
                view = sf.get_slice(name)
                yield name, view[:] if sl is None else _read(view, sl.dim, sl.start, sl.stop)
