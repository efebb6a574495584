"""Nitsum's CPU kernels (`csrc/cpu_kernels.cpp`): paged decode attention, fused residual add +
RMSNorm, rotary embedding fused with the KV-cache write, SiLU(gate) * up, and the one-row
matrix-vector product of a batch-1 decode step (bfloat16, AVX512-BF16 CPUs).

Eager PyTorch runs a decode step as hundreds of small ops, and its decode attention first copies
every sequence's keys and values out of the paged cache (a gather) before attending: at 64
sequences that copy and the attention over it were 80% of a step. These kernels read the cache in
place and do each job in one pass.

Built on first use with the host's C++ compiler (`$CXX`, else `g++`; a couple of seconds, no
PyTorch headers) into a cache folder (`$NITSUM_KERNEL_CACHE`, else `~/.cache/nitsum/kernels`),
keyed by the source, the flags and this CPU, and loaded through ctypes. Where no compiler works,
or with `NITSUM_CPU_KERNELS=0`, `get()` returns None and the model uses its PyTorch path, which
computes the same thing (the tests compare the two).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "cpu_kernels.cpp"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c++20", "-fno-math-errno",
         "-ffp-contract=off"]  # no fused multiply-adds: round where the reference rounds
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}
MAX_HEAD_DIM = 512  # kMaxHeadDim in the source

_lib: ctypes.CDLL | None = None
_tried = False
_threads = 0  # what the library was last told

i64, f32, i32, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_void_p
_SIGNATURES: dict[str, list[type]] = {  # every function returns void but the two in _RETURNS_INT
    "nitsum_decode_attention": [i32, ptr, i64, i64, ptr, ptr, i64, i64, i64, ptr, i64, ptr,
                                i32, i32, i32, i32, i32, f32, ptr, i64, i64],
    "nitsum_add_rms_norm": [i32, ptr, ptr, ptr, ptr, i64, i64, f32],
    "nitsum_rope_store_kv": [i32, ptr, i64, i64, i32, i32, i32, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, ptr, ptr],
    "nitsum_silu_mul": [i32, ptr, i64, i64, ptr],
    "nitsum_set_threads": [i32],
    "nitsum_gemv_bf16": [ptr, ptr, ptr, i64, i64, ptr],
    "nitsum_has_avx512_bf16": [],
}
_RETURNS_INT = ("nitsum_gemv_bf16", "nitsum_has_avx512_bf16")


def enabled() -> bool:
    return os.environ.get("NITSUM_CPU_KERNELS", "1").lower() not in ("0", "false", "no", "off")


def _cpu_signature() -> str:
    """What -march=native compiles for: the machine and its CPU flags."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    return platform.machine() + flags


def _cache_dir() -> Path:
    root = os.environ.get("NITSUM_KERNEL_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "nitsum" / "kernels"


def build(cxx: str | None = None) -> Path:
    """Compile the kernels (or find them already built) and return the shared library's path.
    Raises RuntimeError saying why when the compiler is missing or fails."""
    cxx = cxx or os.environ.get("CXX") or "g++"
    if shutil.which(cxx) is None:
        raise RuntimeError(f"no C++ compiler {cxx!r} on PATH (set CXX, or install g++)")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join([cxx, *FLAGS, _cpu_signature()]).encode()).hexdigest()[:16]
    out = _cache_dir() / f"cpu_kernels-{key}.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: processes starting together never load half a file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        done = subprocess.run([cxx, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{cxx} failed on {SOURCE.name}: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def get() -> ctypes.CDLL | None:
    """The loaded kernels, or None (disabled, or they could not be built: logged once)."""
    global _lib, _tried
    if not enabled():
        return None
    if not _tried:
        _tried = True
        try:
            lib = ctypes.CDLL(str(build()))
            for name, argtypes in _SIGNATURES.items():
                fn = getattr(lib, name)
                fn.argtypes, fn.restype = argtypes, (i32 if name in _RETURNS_INT else None)
            _lib = lib
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            log.warning("CPU kernels unavailable, using the PyTorch path (slower): %s", e)
    return _lib


def _sync_threads(lib: ctypes.CDLL) -> None:
    """The kernels use as many threads as torch (`torch.set_num_threads`, e.g. one per slot)."""
    global _threads
    n = torch.get_num_threads()
    if n != _threads:
        lib.nitsum_set_threads(n)
        _threads = n


def supports(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether a model on `device` in `dtype` with heads of `head_dim` can run on the kernels."""
    return device.type == "cpu" and dtype in DTYPE_CODES and head_dim <= MAX_HEAD_DIM


def decode_attention(lib: ctypes.CDLL, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     tables: torch.Tensor, lens: torch.Tensor, scale: float, out: torch.Tensor) -> None:
    """out[b, h] = softmax(q[b, h] . K_b^T * scale) V_b over the first lens[b] keys of sequence b,
    whose keys sit in blocks tables[b] of the caches [blocks, KV heads, block_size, d].
    q and out: [B, H, d] with d contiguous; H a multiple of the KV heads."""
    b, h, d = q.shape
    _, kvh, bs, _ = k_cache.shape
    assert q.stride(2) == 1 and out.stride(2) == 1 and k_cache.stride() == v_cache.stride()
    assert k_cache.stride(3) == 1 and tables.dtype == lens.dtype == torch.int64 and tables.stride(1) == 1
    _sync_threads(lib)
    lib.nitsum_decode_attention(
        DTYPE_CODES[q.dtype], q.data_ptr(), q.stride(0), q.stride(1), k_cache.data_ptr(), v_cache.data_ptr(),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), tables.data_ptr(), tables.stride(0),
        lens.data_ptr(), b, h, kvh, bs, d, scale, out.data_ptr(), out.stride(0), out.stride(1))


def add_rms_norm(lib: ctypes.CDLL, residual: torch.Tensor, h: torch.Tensor | None, weight: torch.Tensor,
                 eps: float, out: torch.Tensor) -> None:
    """residual += h (when given), then out = RMSNorm(residual) * weight; all [rows, D] contiguous."""
    assert residual.is_contiguous() and out.is_contiguous() and (h is None or h.is_contiguous())
    rows, dim = residual.shape
    _sync_threads(lib)
    lib.nitsum_add_rms_norm(DTYPE_CODES[residual.dtype], residual.data_ptr(), None if h is None else h.data_ptr(),
                            weight.data_ptr(), out.data_ptr(), rows, dim, eps)


def rope_store_kv(lib: ctypes.CDLL, qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
                  cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, cache_blocks: torch.Tensor, cache_offsets: torch.Tensor) -> None:
    """Rotate q and k of the fused QKV rows [T, (H + 2 KVH) d] in place at `positions` (cos, sin:
    [max_len, d]), then write each row's k and v into the caches at (cache_blocks, cache_offsets)."""
    assert qkv.stride(1) == 1 and cos.is_contiguous() and sin.is_contiguous()
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1
    _sync_threads(lib)
    lib.nitsum_rope_store_kv(
        DTYPE_CODES[qkv.dtype], qkv.data_ptr(), qkv.shape[0], qkv.stride(0), num_heads, num_kv_heads, head_dim,
        cos.data_ptr(), sin.data_ptr(), positions.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), cache_blocks.data_ptr(), cache_offsets.data_ptr())


def silu_mul(lib: ctypes.CDLL, gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up of the fused gate+up projection [rows, 2 * inter] (gate first)."""
    assert gate_up.is_contiguous()
    rows, width = gate_up.shape
    out = torch.empty(rows, width // 2, dtype=gate_up.dtype, device=gate_up.device)
    _sync_threads(lib)
    lib.nitsum_silu_mul(DTYPE_CODES[gate_up.dtype], gate_up.data_ptr(), rows, width // 2, out.data_ptr())
    return out


def gemv_lib(weight: torch.Tensor) -> ctypes.CDLL | None:
    """The kernels, when they can do one-row products with `weight` [N, K]: a bfloat16 CPU weight,
    K a multiple of 32, and a CPU with AVX512-BF16 (else oneDNN does them)."""
    lib = get() if weight.device.type == "cpu" and weight.dtype == torch.bfloat16 else None
    if lib is None or weight.dim() != 2 or weight.shape[1] % 32 or not weight.is_contiguous():
        return None
    return lib if lib.nitsum_has_avx512_bf16() else None


def gemv(lib: ctypes.CDLL, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [1, K] @ weight [N, K]^T (+ bias) -> [1, N], reading the weight once, row-major."""
    assert x.shape == (1, weight.shape[1]) and x.is_contiguous() and x.dtype == weight.dtype
    y = torch.empty(1, weight.shape[0], dtype=x.dtype, device=x.device)
    _sync_threads(lib)
    lib.nitsum_gemv_bf16(x.data_ptr(), weight.data_ptr(), None if bias is None else bias.data_ptr(),
                         weight.shape[0], weight.shape[1], y.data_ptr())
    return y
