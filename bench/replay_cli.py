"""`nitsum bench replay`: replay a request trace against a live gateway and write what it measured.

    nitsum bench replay --trace ../shared/traces/AzureLLMInferenceTrace_conv.csv --url http://127.0.0.1:8000 \\
        --tier-map conv=standard:0.8/batch:0.2 --rate-scale 0.5 --duration 60 --max-requests 200 \\
        --token-scale 0.1 --context 512 --out out/replay

Writes under --out: requests.jsonl (one line per request), plan_samples.jsonl (the gateway's
/health over time), summary.json, and latency_cdf.png, goodput.png, plan.png, overview.png.
Progress (per-tier SLO attainment) goes to stderr; the last stdout line is one JSON object.
`register(subparsers)` adds `bench` with its `replay` subcommand to the `nitsum` console script;
`python -m bench.replay_cli bench replay ...` runs it on its own.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from router.sim.trace import DEFAULT_TIER_MAP
from services.cliutil import explain, fail
from services.config import TierPolicy

if TYPE_CHECKING:  # openai and matplotlib are heavy: imported only when the command runs
    from bench.replay import ReplayConfig


def _id_range(text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition(":")
    try:
        return int(lo), int(hi)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO:HI token ids, got {text!r}") from None


def add_replay_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", required=True, help="trace CSV file(s) (Azure LLM inference format), comma-separated")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the gateway (loopback only; default %(default)s)")
    p.add_argument("--tier-map", default=DEFAULT_TIER_MAP,
                   help="SOURCE=TIER[:SHARE][/TIER:SHARE],... where SOURCE is the file name's part after the last "
                        "'_' (default %(default)s)")
    p.add_argument("--tiers", default=None, help="tiers file (the gateway's), for the targets; default: built-in tiers")
    p.add_argument("--rate-scale", type=float, default=1.0, help="multiply the trace's arrival rate (default 1)")
    p.add_argument("--start", type=float, default=0.0, help="start this many trace seconds in (default 0)")
    p.add_argument("--duration", type=float, default=60.0, help="send arrivals of this many seconds (default 60)")
    p.add_argument("--max-requests", type=int, default=200, help="send at most this many requests (default 200)")
    p.add_argument("--max-concurrency", type=int, default=64, help="requests in flight at most (default 64)")
    p.add_argument("--token-scale", type=float, default=1.0,
                   help="multiply the trace's prompt and output token counts before clamping (default 1)")
    p.add_argument("--context", type=int, default=512,
                   help="the served model's context: prompt + output are clamped to it (default 512, the tiny model)")
    p.add_argument("--max-output-tokens", type=int, default=None, help="output cap (default: a quarter of --context)")
    p.add_argument("--token-ids", type=_id_range, default=(16, 500),
                   help="prompts are random token ids in [LO, HI) (default 16:500; keep below the vocabulary size "
                        "and above the special tokens)")
    p.add_argument("--model", default=None, help="model id to ask for (default: the first of /v1/models)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "none"), help="bearer key (default $OPENAI_API_KEY)")
    p.add_argument("--seed", type=int, default=0, help="seed of the tier split and of the prompts")
    p.add_argument("--request-timeout", type=float, default=120.0, help="seconds per request (default 120)")
    p.add_argument("--drain-timeout", type=float, default=60.0,
                   help="after the last arrival, wait this long for requests in flight (default 60)")
    p.add_argument("--out", default=None, help="output folder (default .nitsum/replay/<time>)")


def register(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks against a running mesh")
    sub = bench.add_subparsers(dest="bench_command", metavar="BENCH", required=True)
    p = sub.add_parser("replay", help="replay a request trace against a live gateway; write results and plots")
    add_replay_arguments(p)
    p.set_defaults(func=run)


def build_config(args: argparse.Namespace) -> ReplayConfig:
    from bench.replay import ReplayConfig

    policy = TierPolicy.load(args.tiers)
    out = Path(args.out) if args.out else Path(".nitsum") / "replay" / time.strftime("%Y%m%d-%H%M%S")
    config = ReplayConfig(
        traces=tuple(t for t in args.trace.split(",") if t), url=args.url.rstrip("/"), tiers=policy.tiers,
        tier_map=args.tier_map, out_dir=out, rate_scale=args.rate_scale, duration_s=args.duration,
        max_requests=args.max_requests, max_concurrency=args.max_concurrency, start_s=args.start,
        token_scale=args.token_scale, context_len=args.context, max_output_tokens=args.max_output_tokens,
        token_ids=args.token_ids, model=args.model, api_key=args.api_key, seed=args.seed,
        request_timeout_s=args.request_timeout, drain_timeout_s=args.drain_timeout)
    config.validate()
    for path in config.traces:
        if not Path(path).is_file():
            raise ValueError(f"--trace {path}: no such file")
    return config


async def _run(config: ReplayConfig) -> dict[str, Any]:
    from bench.replay import plan_requests, replay
    from bench.replay_plots import write_plots
    from bench.replay_summary import read_gateway_counts, settled_gateway_delta, summarize, write_outputs

    requests = plan_requests(config)
    if not requests:
        raise ValueError("no trace requests in that window; check --start, --duration and --rate-scale")
    before = await read_gateway_counts(config.url)
    print(f"replaying {len(requests)} requests over {requests[-1].arrival_s:.1f}s against {config.url}",
          file=sys.stderr)
    model = {"name": config.model or ""}
    results, samples, wall_s = await replay(config, requests, on_start=lambda m: model.update(name=m))
    delta = await settled_gateway_delta(config.url, before, results)
    summary = summarize(config, model["name"], requests, results, samples, wall_s, delta)
    paths = write_outputs(config.out_dir, summary, results, samples)
    title = f"{', '.join(Path(t).name for t in config.traces)} x{config.rate_scale:g} rate, {model['name']}"
    paths += write_plots(config.out_dir, results, samples, config.tiers, wall_s, title)
    summary["files"] = [str(p) for p in paths]
    return summary


def run(args: argparse.Namespace) -> int:
    import httpx
    import openai

    try:
        config = build_config(args)
        summary = asyncio.run(_run(config))
    except ValidationError as e:
        return fail("bench replay", explain(e))
    except (ValueError, OSError) as e:
        return fail("bench replay", str(e))
    except (httpx.HTTPError, openai.APIError) as e:
        return fail("bench replay", f"cannot reach the gateway at {args.url}: {e}")
    for tier, t in summary["tiers"].items():
        att = t["slo_attainment"]
        print(f"{tier:>12}: {t['requests']} requests, {t['ok']} ok, SLO attainment "
              f"{'-' if att is None else f'{100 * att:.0f}%'}, TTFT p50 {_ms(t['ttft_s']['p50'])}, "
              f"TPOT p50 {_ms(t['tpot_s']['p50'])}")
    print(f"results and plots in {config.out_dir}")
    brief = {k: summary[k] for k in ("sent", "outcomes", "met", "slo_attainment", "goodput_rps", "wall_s")}
    print(json.dumps({**brief, "counts_match": summary["gateway"]["counts_match"], "out": str(config.out_dir)}))
    return 0


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f} ms"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nitsum")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
