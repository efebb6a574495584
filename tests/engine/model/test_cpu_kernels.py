"""The CPU kernels compute what the model's PyTorch path computes, and the engine runs on either.

Each kernel is checked against the PyTorch ops it replaces on the same inputs: float32 to float32
rounding noise, bfloat16 to one bfloat16 step. The engine's greedy tokens equal transformers' on
the kernel path (tests/engine/test_reference.py runs with the kernels, the default); here the
PyTorch path, which CUDA and float16 use, must give the same tokens.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from services.engine import EngineArgs, LLMEngine, SamplingParams
from services.engine.model import cpu_kernels
from services.engine.model.layers import RMSNorm, apply_rotary
from services.engine.model.model import _gather
from tests.engine.conftest import NEW_TOKENS, PROMPTS

LIB = cpu_kernels.get()
pytestmark = pytest.mark.skipif(LIB is None, reason="the CPU kernels could not be built here (no g++?)")
TOL = {torch.float32: 1e-5, torch.bfloat16: 1 / 64}


def paged_cache(dtype: torch.dtype, blocks: int = 64, kv_heads: int = 2, block_size: int = 4,
                head_dim: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's K and V views of a block-major cache [blocks, layers, 2, kvh, bs, d]."""
    g = torch.Generator().manual_seed(seed)
    cache = torch.randn(blocks, 3, 2, kv_heads, block_size, head_dim, generator=g).to(dtype)
    return cache[:, 1, 0], cache[:, 1, 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
# 1, 3, 5 and 8 query heads per KV head; head sizes with (64, 128) and without (32) a register-held path
@pytest.mark.parametrize("heads", [2, 6, 10, 16], ids=lambda h: f"heads{h}")
@pytest.mark.parametrize("head_dim", [32, 64, 128], ids=lambda d: f"d{d}")
def test_decode_attention_equals_gathered_sdpa(dtype: torch.dtype, heads: int, head_dim: int) -> None:
    k_cache, v_cache = paged_cache(dtype, head_dim=head_dim)
    bs, d = k_cache.shape[2], k_cache.shape[3]
    lens = torch.tensor([1, 4, 5, 17, 31, 90])  # one key, a full block, one past it, ragged tails
    width = -(-int(lens.max()) // bs)
    g = torch.Generator().manual_seed(1)
    tables = torch.stack([torch.randperm(k_cache.shape[0], generator=g)[:width] for _ in lens])
    # q as the model hands it over: a strided view of the fused QKV output
    qkv = torch.randn(len(lens), heads + 4, d, generator=g).to(dtype)
    q = qkv[:, :heads]
    out = torch.full((len(lens), heads, d), float("nan"), dtype=dtype)
    cpu_kernels.decode_attention(LIB, q, k_cache, v_cache, tables, lens, d**-0.5, out)
    mask = (torch.arange(width * bs)[None, :] < lens[:, None]).view(len(lens), 1, 1, -1)
    expected = F.scaled_dot_product_attention(q.unsqueeze(2), _gather(k_cache, tables), _gather(v_cache, tables),
                                              attn_mask=mask, enable_gqa=True).squeeze(2)
    torch.testing.assert_close(out.float(), expected.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows", [1, 200], ids=lambda r: f"rows{r}")  # one thread, and split over threads
def test_add_rms_norm_equals_add_then_rmsnorm(dtype: torch.dtype, rows: int) -> None:
    g = torch.Generator().manual_seed(2)
    residual, h = (torch.randn(rows, 384, generator=g).to(dtype) for _ in range(2))
    norm = RMSNorm(384, 1e-6, dtype, torch.device("cpu"))
    norm.weight.data.copy_(torch.rand(384, generator=g) + 0.5)
    expected_residual = residual + h
    expected = norm(expected_residual)
    out = torch.empty_like(residual)
    cpu_kernels.add_rms_norm(LIB, residual, h, norm.weight.data, 1e-6, out)
    assert torch.equal(residual, expected_residual)  # the add rounds exactly as the reference's
    torch.testing.assert_close(out, expected, atol=TOL[dtype], rtol=TOL[dtype])
    cpu_kernels.add_rms_norm(LIB, residual, None, norm.weight.data, 1e-6, out)  # no add: norm only
    torch.testing.assert_close(out, expected, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rope_store_kv_equals_rotary_then_cache_write(dtype: torch.dtype) -> None:
    heads, kv_heads, d, rows = 4, 2, 32, 20
    k_cache, v_cache = paged_cache(dtype, kv_heads=kv_heads, head_dim=d)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * d + 8, generator=g).to(dtype)[:, 8:]  # strided rows
    positions = torch.randint(0, 500, (rows,), generator=g)
    blocks = torch.randperm(k_cache.shape[0], generator=g)[:rows]
    offsets = torch.randint(0, k_cache.shape[2], (rows,), generator=g)
    freqs = torch.outer(torch.arange(512).float(), 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d)))
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    q, k, v = qkv.clone().split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    q_ref, k_rot = apply_rotary((cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)),
                                q.reshape(rows, heads, d), k.reshape(rows, kv_heads, d))
    k_ref[blocks, :, offsets] = k_rot
    v_ref[blocks, :, offsets] = v.reshape(rows, kv_heads, d)
    cpu_kernels.rope_store_kv(LIB, qkv, heads, kv_heads, d, cos, sin, positions, k_cache, v_cache, blocks, offsets)
    # The kernel rounds each product and the sum as the reference does: equal, not just close.
    assert torch.equal(qkv[:, : heads * d].reshape(rows, heads, d), q_ref)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


def test_pytorch_path_gives_the_kernels_tokens(llama_dir: Path, reference) -> None:
    engine = LLMEngine(EngineArgs(model=str(llama_dir), max_num_batched_tokens=12))
    try:
        params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
        assert engine.runner.model.kernels is not None
        with_kernels = engine.generate(PROMPTS, params)
        engine.runner.model.kernels = None
        assert engine.generate(PROMPTS, params) == with_kernels == reference(llama_dir, PROMPTS, NEW_TOKENS)
    finally:
        engine.shutdown()


def test_bfloat16_decode_follows_the_pytorch_path(llama_dir: Path) -> None:
    """Greedy bfloat16 decoding: random weights leave near-ties between logits, and a bfloat16
    rounding step can flip one late in a run (after which the runs part), so only each prompt's
    first token must agree."""
    engine = LLMEngine(EngineArgs(model=str(llama_dir), dtype="bfloat16"))
    try:
        params = SamplingParams(max_tokens=16, ignore_eos=True)
        fast = engine.generate(PROMPTS, params)
        engine.runner.model.kernels = None
        slow = engine.generate(PROMPTS, params)
        firsts = sum(a[0] == b[0] for a, b in zip(fast, slow, strict=True))
        assert firsts == len(PROMPTS), (fast, slow)
    finally:
        engine.shutdown()


def test_a_missing_compiler_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NITSUM_KERNEL_CACHE", str(tmp_path))
    with pytest.raises(RuntimeError, match="no C.. compiler 'no-such-cxx'"):
        cpu_kernels.build(cxx="no-such-cxx")
    assert not list(tmp_path.iterdir())


def test_the_build_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NITSUM_KERNEL_CACHE", str(tmp_path))
    first = cpu_kernels.build()
    mtime = first.stat().st_mtime_ns
    assert cpu_kernels.build() == first and first.stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary file left behind


def test_keys_with_equal_scores_average_their_values() -> None:
    k_cache, v_cache = paged_cache(torch.float32, blocks=2, kv_heads=1, block_size=2, head_dim=4)
    k_cache.zero_()
    q = torch.ones(1, 1, 4)
    out = torch.empty_like(q)
    cpu_kernels.decode_attention(LIB, q, k_cache, v_cache, torch.tensor([[1]]), torch.tensor([2]),
                                 1 / math.sqrt(4), out)
    torch.testing.assert_close(out[0, 0], v_cache[1, 0, :2].mean(0))


def test_kernels_use_as_many_threads_as_torch() -> None:
    """A slot sets one thread (torch.set_num_threads); a kernel called from another Python thread,
    whose OpenMP default would be every core, must not start a team of its own."""
    def os_threads() -> int:
        status = Path("/proc/self/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("Threads:")))

    k_cache, v_cache = paged_cache(torch.float32)
    q = torch.randn(8, 2, k_cache.shape[3])
    tables = torch.zeros(8, 1, dtype=torch.long)
    counts: list[int] = []

    def decode() -> None:
        counts.append(os_threads())
        cpu_kernels.decode_attention(LIB, q, k_cache, v_cache, tables, torch.full((8,), 3), 0.5, torch.empty_like(q))
        counts.append(os_threads())

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        worker = threading.Thread(target=decode)
        worker.start()
        worker.join()
    finally:
        torch.set_num_threads(before)
    assert counts[1] == counts[0]


def test_models_the_kernels_do_not_cover_take_the_pytorch_path() -> None:
    cpu = torch.device("cpu")
    assert cpu_kernels.supports(cpu, torch.bfloat16, 128) and cpu_kernels.supports(cpu, torch.float32, 64)
    assert not cpu_kernels.supports(cpu, torch.float16, 128)
    assert not cpu_kernels.supports(torch.device("cuda", 0), torch.bfloat16, 128)
    assert not cpu_kernels.supports(cpu, torch.bfloat16, cpu_kernels.MAX_HEAD_DIM * 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows", [1, 64], ids=lambda r: f"rows{r}")
def test_silu_mul_equals_silu_then_mul(dtype: torch.dtype, rows: int) -> None:
    g = torch.Generator().manual_seed(4)
    gate_up = (torch.randn(rows, 2 * 1280, generator=g) * 4).to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    # float32 to its rounding noise; bfloat16 within one step (the exp differs from libm's in its
    # last bits, which can move a product across a bfloat16 rounding boundary)
    torch.testing.assert_close(cpu_kernels.silu_mul(LIB, gate_up), F.silu(gate) * up, atol=TOL[dtype],
                               rtol=TOL[dtype])


# (rows, cols): whole 16-row runs; a tail of 3 rows; a width that is 32 past a multiple of 64
@pytest.mark.parametrize("shape", [(64, 128), (35, 96), (1000, 768)], ids=str)
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_one_row_products_equal_linear(shape: tuple[int, int], bias: bool) -> None:
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(*shape, generator=g).bfloat16()
    b = torch.randn(shape[0], generator=g).bfloat16() if bias else None
    lib = cpu_kernels.gemv_lib(weight)
    if lib is None:
        pytest.skip("this CPU has no AVX512-BF16: one-row products stay with oneDNN")
    x = torch.randn(1, shape[1], generator=g).bfloat16()
    expected = F.linear(x.float(), weight.float(), None if b is None else b.float())
    # float32 sums in another order, then one bfloat16 rounding (and the bias's, as F.linear's)
    torch.testing.assert_close(cpu_kernels.gemv(lib, x, weight, b).float(), expected, atol=0.1, rtol=1 / 64)


def test_one_row_products_need_a_bfloat16_weight_of_whole_32_columns() -> None:
    assert cpu_kernels.gemv_lib(torch.zeros(16, 48, dtype=torch.bfloat16)) is None
    assert cpu_kernels.gemv_lib(torch.zeros(16, 64, dtype=torch.float32)) is None
    assert cpu_kernels.gemv_lib(torch.zeros(64, 16, dtype=torch.bfloat16).t()) is None  # not row-major
