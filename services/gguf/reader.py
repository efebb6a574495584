"""Opening a GGUF file: its metadata as Python values and its tensors, or one clear error.

`gguf.GGUFReader` (ggml's own reader) memory-maps the file and parses the header; a file that is
not GGUF, is cut short or holds a tensor type this version of `gguf` does not know makes it raise
assorted low-level errors, which `open_gguf` turns into one `GGUFImportError` naming the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GGUF_MAGIC = b"GGUF"


class GGUFImportError(ValueError):
    """A GGUF file that cannot be imported, with what is wrong in one line."""


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    type_name: str  # ggml's name for the type: F32, Q4_1, ...
    type_id: int
    shape: tuple[int, ...]  # PyTorch order (rows first), as the Hugging Face checkpoint holds it
    data: Any  # the reader's numpy view of the bytes (or values, for float types)


class GGUFFile:
    """One parsed file: `architecture`, `get(key)` for metadata, `tensors` by name."""

    def __init__(self, path: Path, reader: Any) -> None:
        self.path = path
        self._reader = reader
        self._values: dict[str, Any] = {}
        self.tensors: dict[str, GGUFTensor] = {}
        for t in reader.tensors:
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            self.tensors[t.name] = GGUFTensor(t.name, t.tensor_type.name, int(t.tensor_type), shape, t.data)
        arch = self.get("general.architecture")
        if not isinstance(arch, str):
            raise GGUFImportError(f"{path}: metadata 'general.architecture' is missing")
        self.architecture = arch

    def has(self, key: str) -> bool:
        return key in self._reader.fields

    def get(self, key: str, default: Any = None) -> Any:
        """A metadata value: str, int, float, bool, or a list of them for arrays (read once: a
        vocabulary is 50-150k strings, and config, tokenizer and stop tokens all need it)."""
        field = self._reader.fields.get(key)
        if field is None:
            return default
        if key not in self._values:
            try:
                self._values[key] = field.contents()
            except (UnicodeDecodeError, IndexError, ValueError) as e:
                raise GGUFImportError(f"{self.path}: metadata {key!r} is unreadable ({e})") from None
        return self._values[key]

    def need(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise GGUFImportError(f"{self.path}: metadata {key!r} is missing (a {self.architecture} model needs it)")
        return value


def open_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Parse `path`'s header and tensor index (the tensor data stays memory-mapped)."""
    file = Path(path)
    if not file.exists():
        raise GGUFImportError(f"{file}: no such file")
    if not file.is_file():
        raise GGUFImportError(f"{file}: not a file")
    with open(file, "rb") as f:
        head = f.read(8)
    if head[:4] != GGUF_MAGIC:
        raise GGUFImportError(f"{file}: not a GGUF file (it does not start with the bytes 'GGUF')")
    if len(head) < 8:
        raise GGUFImportError(f"{file}: truncated (the file ends inside its header)")
    from gguf import GGUFReader

    try:
        reader = GGUFReader(file, "r")
    except ValueError as e:
        if "GGMLQuantizationType" in str(e):
            raise GGUFImportError(f"{file}: holds a tensor type this importer does not know ({e})") from None
        raise GGUFImportError(f"{file}: truncated or corrupt GGUF ({_short(e)})") from None
    except (IndexError, KeyError, OverflowError, UnicodeDecodeError, MemoryError) as e:
        raise GGUFImportError(f"{file}: truncated or corrupt GGUF ({_short(e)})") from None
    size = file.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise GGUFImportError(f"{file}: truncated (tensor {t.name!r} runs past the end of the file)")
    return GGUFFile(file, reader)


def _short(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".splitlines()[0]
    return text if len(text) <= 160 else text[:157] + "..."
