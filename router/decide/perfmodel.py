"""Performance model: how long one forward pass takes for a model shape on a device at a TP degree.

A roofline: a forward pass moves the weight slice and the KV it reads through HBM, does its
FLOPs on the tensor cores, and (at TP > 1) runs two all-reduces per layer over the interconnect.
Time = max(memory time, compute time) + all-reduce time + a fixed per-forward overhead (kernel
launches, scheduling, sampling). On-chip cache enters through the small-batch effect the
research reported: when a rank's per-layer weight slice shrinks towards the L2 size, part of it
is served at cache speed, so higher TP lowers memory time by more than 1/TP.

The efficiency terms (achieved fraction of HBM bandwidth and of peak FLOP/s, per-forward
overhead, per-all-reduce latency, interconnect efficiency, cache gain) are what `nitsum profile`
fits to measurements (router/profile.py); the built-in defaults are calibrated to vLLM's public
H200 figures (see `DEFAULT_EFFICIENCY`). Built-in devices and models are `DEVICES` and
`MODELS`, each with its source.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    peak_flops: float  # dense BF16 FLOP/s per device
    hbm_bw: float  # bytes/s per device
    hbm_bytes: float  # device memory, bytes
    link_bw: float  # interconnect bytes/s per device per direction (what a ring all-reduce sees)
    link_latency_s: float  # one small all-reduce hop, seconds (NCCL/custom all-reduce floor)
    cache_bytes: float  # on-chip L2, bytes


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    dtype_bytes: int = 2

    @property
    def layer_params(self) -> int:
        attn = self.hidden_size * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        return attn + 3 * self.hidden_size * self.intermediate_size

    @property
    def num_params(self) -> int:
        # Untied embeddings and LM head (both Llama-3.1 sizes), norms are negligible.
        return self.num_layers * self.layer_params + 2 * self.vocab_size * self.hidden_size

    @property
    def weight_bytes(self) -> int:
        return self.num_params * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes


# Sources: NVIDIA H100 / H200 / A100 SXM datasheets (dense BF16 Tensor Core FLOP/s: the
# datasheets print the 2:4-sparse number, which is twice this; HBM bandwidth and capacity);
# NVLink 4 = 900 GB/s bidirectional per GPU (450 GB/s each way), NVLink 3 = 600 GB/s (300 each
# way); L2 = 50 MB on GH100 (Hopper architecture whitepaper), 40 MB on GA100 (Ampere
# whitepaper). The all-reduce latency floor (~10 us) is NCCL's small-message latency inside an
# NVSwitch node as reported in nccl-tests; the fitted `allreduce_latency_s` adds framework cost.
DEVICES: dict[str, DeviceSpec] = {
    "h100": DeviceSpec("h100", 989e12, 3.35e12, 80e9, 450e9, 10e-6, 50e6),
    "h200": DeviceSpec("h200", 989e12, 4.8e12, 141e9, 450e9, 10e-6, 50e6),
    "a100": DeviceSpec("a100", 312e12, 2.039e12, 80e9, 300e9, 10e-6, 40e6),
    # A CPU host standing in for slots: nominal numbers, meant to be replaced by a fitted profile.
    "cpu": DeviceSpec("cpu", 0.5e12, 20e9, 32e9, 5e9, 50e-6, 32e6),
}

# Sources: config.json of meta-llama/Llama-3.1-8B and meta-llama/Llama-3.1-70B on the Hugging
# Face hub (hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads,
# intermediate_size, vocab_size; head_dim = hidden/heads = 128). 8.03 B and 70.6 B parameters.
MODELS: dict[str, ModelSpec] = {
    "llama-3.1-8b": ModelSpec("llama-3.1-8b", 4096, 32, 32, 8, 128, 14336, 128256),
    "llama-3.1-70b": ModelSpec("llama-3.1-70b", 8192, 80, 64, 8, 128, 28672, 128256),
}


@dataclass(frozen=True)
class Efficiency:
    """The fitted terms; everything else in the model is a datasheet number."""

    mem_eff: float = 0.75  # achieved / peak HBM bandwidth
    flops_eff: float = 0.6  # achieved / peak dense FLOP/s
    overhead_s: float = 1.5e-3  # per forward: launches, scheduler, sampler
    allreduce_latency_s: float = 12e-6  # per all-reduce on top of the link latency floor
    link_eff: float = 0.7  # achieved / nominal interconnect bandwidth
    cache_gain: float = 0.5  # fraction of the L2-resident share of a weight slice that is free
    # Costs a roofline does not see, 0 on the built-in GPUs and fitted by `nitsum profile` (a CPU
    # host's engine pays them): per decode row per forward (sampling, gathering its blocks), and
    # per KV token a rank's decode attention reads (paged attention off the tensor units).
    row_s: float = 0.0
    kv_token_s: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {k: float(getattr(self, k)) for k in self.__dataclass_fields__}


# Calibrated against vLLM's public H200 serving figures (issue 6): ~6.5 ms per output token for
# Llama-3.1-8B at TP 1 and ~16.2 ms for Llama-3.1-70B at TP 4, batch 8, short contexts.
# With these terms the model gives 6.25 ms and 15.9 ms (see tests/router/test_perfmodel.py); the
# per-forward overhead grows with depth (launches per layer), hence a per-model value.
DEFAULT_EFFICIENCY: dict[str, Efficiency] = {
    "llama-3.1-8b": Efficiency(overhead_s=1.9e-3),
    "llama-3.1-70b": Efficiency(overhead_s=3.0e-3),
}


@dataclass(frozen=True)
class StepTerms:
    """The pieces of one forward's time, before the efficiency terms are applied."""

    mem_bytes: float  # HBM bytes read per rank
    flops: float  # FLOPs per rank
    allreduces: int  # all-reduce calls
    ring_bytes: float  # bytes each rank sends across all all-reduces (ring algorithm)
    rows: int = 0  # decode rows
    kv_tokens: float = 0.0  # KV tokens the decode rows read, per rank


class PerfModel:
    """Forward-pass time for one model on one device type, for any TP degree."""

    def __init__(self, device: DeviceSpec, model: ModelSpec, eff: Efficiency | None = None,
                 mem_util: float = 0.9) -> None:
        self.device = device
        self.model = model
        self.eff = eff or DEFAULT_EFFICIENCY.get(model.name, Efficiency())
        self.mem_util = mem_util  # share of HBM the engine may use (weights + KV), like vLLM's
        # The simulator calls `terms` millions of times: the model's sizes, computed once.
        self._layer_bytes = model.layer_params * model.dtype_bytes
        self._weight_bytes = model.weight_bytes
        self._params = model.num_params
        self._kv_token = model.kv_bytes_per_token
        self._attn_width = model.num_layers * model.num_heads * model.head_dim

    @classmethod
    def builtin(cls, device: str, model: str) -> PerfModel:
        if device not in DEVICES:
            raise ValueError(f"unknown device {device!r}; built in: {', '.join(DEVICES)}")
        if model not in MODELS:
            raise ValueError(f"unknown model {model!r}; built in: {', '.join(MODELS)}")
        return cls(DEVICES[device], MODELS[model])

    def with_efficiency(self, eff: Efficiency) -> PerfModel:
        return PerfModel(self.device, self.model, eff, self.mem_util)

    def terms(self, prefill_tokens: int, decode_batch: int, decode_context: int, tp: int,
              prefill_sq: float | None = None) -> StepTerms:
        """Bytes, FLOPs and all-reduces of one forward mixing a prefill chunk and a decode batch.

        `decode_context` is the KV tokens summed over the decode batch; `prefill_sq` the sum of
        squared prompt lengths (attention is quadratic per prompt), default one prompt.
        """
        m = self.model
        tokens = prefill_tokens + decode_batch
        sq = float(prefill_tokens) ** 2 if prefill_sq is None else prefill_sq
        slice_bytes = self._layer_bytes / tp
        cached = min(1.0, self.device.cache_bytes / slice_bytes) * self.eff.cache_gain
        weights = self._weight_bytes / tp * (1.0 - cached)
        kv = (decode_context + prefill_tokens) * self._kv_token / tp
        flops = 2.0 * self._params * tokens + 4.0 * self._attn_width * (decode_context + sq / 2)
        allreduces = 2 * m.num_layers if tp > 1 else 0
        ring = allreduces * 2.0 * (tp - 1) / tp * tokens * m.hidden_size * m.dtype_bytes
        return StepTerms(weights + kv, flops / tp, allreduces, ring, decode_batch, decode_context / tp)

    def time_terms(self, t: StepTerms) -> float:
        d, e = self.device, self.eff
        mem = t.mem_bytes / (d.hbm_bw * e.mem_eff)
        compute = t.flops / (d.peak_flops * e.flops_eff)
        comm = t.allreduces * (d.link_latency_s + e.allreduce_latency_s) + t.ring_bytes / (d.link_bw * e.link_eff)
        return max(mem, compute) + comm + e.overhead_s + e.row_s * t.rows + e.kv_token_s * t.kv_tokens

    def step_time(self, prefill_tokens: int, decode_batch: int, decode_context: int, tp: int,
                  prefill_sq: float | None = None) -> float:
        """Seconds for one forward (a prefill chunk, a decode step, or both mixed)."""
        if prefill_tokens <= 0 and decode_batch <= 0:
            return 0.0
        return self.time_terms(self.terms(prefill_tokens, decode_batch, decode_context, tp, prefill_sq))

    def prefill_time(self, tokens: int, tp: int) -> float:
        return self.step_time(tokens, 0, 0, tp)

    def prefill_times(self, tokens: np.ndarray, tp: int) -> np.ndarray:
        """`prefill_time` for many prompt lengths at once (the planner's hot loop)."""
        m, d, e = self.model, self.device, self.eff
        n = np.asarray(tokens, dtype=float)
        slice_bytes = m.layer_params * m.dtype_bytes / tp
        cached = min(1.0, d.cache_bytes / slice_bytes) * e.cache_gain
        mem = (m.weight_bytes / tp * (1.0 - cached) + n * m.kv_bytes_per_token / tp) / (d.hbm_bw * e.mem_eff)
        attn_width = m.num_layers * m.num_heads * m.head_dim
        flops = (2.0 * m.num_params * n + 2.0 * attn_width * n * n) / tp
        allreduces = 2 * m.num_layers if tp > 1 else 0
        ring = allreduces * 2.0 * (tp - 1) / tp * n * m.hidden_size * m.dtype_bytes
        comm = allreduces * (d.link_latency_s + e.allreduce_latency_s) + ring / (d.link_bw * e.link_eff)
        return np.maximum(mem, flops / (d.peak_flops * e.flops_eff)) + comm + e.overhead_s

    def decode_step_time(self, batch: int, context: int, tp: int) -> float:
        """One decode step of `batch` sequences holding `context` KV tokens in total."""
        return self.step_time(0, batch, context, tp)

    def kv_capacity_tokens(self, tp: int) -> int:
        """KV tokens a TP group can hold after its weights (0: the model does not fit)."""
        free = self.device.hbm_bytes * tp * self.mem_util - self.model.weight_bytes
        return max(0, int(free / self.model.kv_bytes_per_token))

    def fits(self, tp: int) -> bool:
        # Below a few thousand KV tokens a group cannot hold even one long request.
        return self.kv_capacity_tokens(tp) >= 16384

    def kv_transfer_time(self, tokens: int, src_tp: int, dst_tp: int) -> float:
        """Prefill -> decode KV hand-off: every source rank sends its share in parallel."""
        nbytes = tokens * self.model.kv_bytes_per_token / min(src_tp, dst_tp)
        return self.device.link_latency_s * 10 + nbytes / (self.device.link_bw * self.eff.link_eff)

    def weight_fetch_time(self, nbytes: float) -> float:
        """A slot pulling `nbytes` of weights it lacks from a peer over the interconnect."""
        return nbytes / (self.device.link_bw * self.eff.link_eff)

    def scaled(self, **changes: float) -> PerfModel:
        return self.with_efficiency(replace(self.eff, **changes))
