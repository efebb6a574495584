"""What a replay measured, as one JSON document, and the gateway's own counters to check it by.

The gateway counts every request in `nitsum_requests_total{tier, outcome}` and the ones that met
both targets in `nitsum_goodput_requests_total{tier}`. The replay reads both before and after the
run; the difference is what the gateway saw of this replay (the mesh must not serve anyone else
meanwhile), and `gateway.counts_match` says whether it equals the client's own count per tier.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from bench.replay import ReplayConfig, ReplayRequest, RequestResult

GatewayCounts = dict[str, dict[str, float]]  # tier -> {outcome or "goodput": count}


def parse_gateway_counts(metrics_text: str) -> GatewayCounts:
    """Per tier: requests by outcome, and "goodput", from the gateway's /metrics text."""
    out: GatewayCounts = {}
    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            if s.name == "nitsum_requests_total":
                out.setdefault(s.labels["tier"], {})[s.labels["outcome"]] = s.value
            elif s.name == "nitsum_goodput_requests_total":
                out.setdefault(s.labels["tier"], {})["goodput"] = s.value
    return out


async def read_gateway_counts(url: str) -> GatewayCounts:
    async with httpx.AsyncClient(timeout=5.0) as http:
        r = await http.get(f"{url}/metrics")
        r.raise_for_status()
        return parse_gateway_counts(r.text)


def counts_delta(before: GatewayCounts, after: GatewayCounts) -> GatewayCounts:
    return {tier: {k: v - before.get(tier, {}).get(k, 0.0) for k, v in vals.items()} for tier, vals in after.items()}


def _client_counts(results: Sequence[RequestResult]) -> dict[str, dict[str, int]]:
    by_tier: dict[str, Counter[str]] = {}
    for r in results:
        by_tier.setdefault(r.tier, Counter())[r.outcome] += 1
    return {tier: dict(c) for tier, c in by_tier.items()}


def counts_match(results: Sequence[RequestResult], delta: GatewayCounts) -> bool:
    """Per tier: the client's requests and ok answers equal the gateway's."""
    mine = _client_counts(results)
    for tier in set(mine) | {t for t, v in delta.items() if any(k != "goodput" and n for k, n in v.items())}:
        seen = {k: n for k, n in delta.get(tier, {}).items() if k != "goodput"}
        if sum(mine.get(tier, {}).values()) != sum(seen.values()):
            return False
        if mine.get(tier, {}).get("ok", 0) != seen.get("ok", 0):
            return False
    return True


async def settled_gateway_delta(url: str, before: GatewayCounts, results: Sequence[RequestResult],
                                tries: int = 20) -> GatewayCounts:
    """The gateway records a request just after its last chunk; give it a moment to catch up."""
    delta: GatewayCounts = {}
    for _ in range(tries):
        delta = counts_delta(before, await read_gateway_counts(url))
        if counts_match(results, delta):
            break
        await asyncio.sleep(0.25)
    return delta


def _pcts(values: Sequence[float | None]) -> dict[str, float | None]:
    xs = np.array([v for v in values if v is not None], dtype=float)
    if xs.size == 0:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    return {"p50": float(np.percentile(xs, 50)), "p90": float(np.percentile(xs, 90)),
            "p99": float(np.percentile(xs, 99)), "mean": float(xs.mean())}


def _tier_block(config: ReplayConfig, tier: str, results: Sequence[RequestResult], wall_s: float) -> dict[str, Any]:
    target = next(t for t in config.tiers if t.name == tier)
    ok = [r for r in results if r.outcome == "ok"]
    met = sum(r.met for r in results)
    return {"requests": len(results), "outcomes": dict(Counter(r.outcome for r in results)), "ok": len(ok),
            "met": met, "slo_attainment": met / len(results) if results else None,
            "goodput_rps": met / wall_s if wall_s > 0 else 0.0,
            "targets": {"ttft_s": target.ttft_s, "tpot_s": target.tpot_s},
            "ttft_s": _pcts([r.ttft_s for r in ok]), "tpot_s": _pcts([r.tpot_s for r in ok]),
            "e2e_s": _pcts([r.e2e_s for r in ok])}


def plan_changes(samples: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The samples at which the set of groups (id, role, TP degree, epoch) differed from the one before."""
    changes: list[dict[str, Any]] = []
    prev: Any = None
    for s in samples:
        key = sorted((g["group_id"], g["role"], g["tp"], g["epoch"]) for g in s["groups"])
        if key != prev:
            changes.append({"t_s": s["t_s"], "groups": s["groups"]})
            prev = key
    return changes


def summarize(config: ReplayConfig, model: str, requests: Sequence[ReplayRequest], results: Sequence[RequestResult],
              samples: Sequence[dict[str, Any]], wall_s: float, gateway: GatewayCounts) -> dict[str, Any]:
    tiers = [t.name for t in config.tiers if any(r.tier == t.name for r in results)]
    met = sum(r.met for r in results)
    late = [r.sent_s - r.arrival_s for r in results if r.outcome != "cancelled"]
    return {
        "traces": list(config.traces), "url": config.url, "model": model, "tier_map": config.tier_map,
        "rate_scale": config.rate_scale, "start_s": config.start_s, "token_scale": config.token_scale,
        "context_len": config.context_len, "output_cap": config.output_cap, "seed": config.seed,
        "planned": len(requests), "sent": len(results), "wall_s": wall_s,
        "offered_rps": len(results) / requests[-1].arrival_s if len(requests) > 1 and requests[-1].arrival_s else None,
        "outcomes": dict(Counter(r.outcome for r in results)), "met": met,
        "slo_attainment": met / len(results) if results else None,
        "goodput_rps": met / wall_s if wall_s > 0 else 0.0,
        "max_send_lateness_s": max(late) if late else 0.0,
        "tokens": {"prompt_sent": sum(r.prompt_tokens for r in results),
                   "prompt_in_trace": sum(r.trace_prompt_tokens for r in results),
                   "completion": sum(r.completion_tokens for r in results)},
        "tiers": {t: _tier_block(config, t, [r for r in results if r.tier == t], wall_s) for t in tiers},
        "plan_changes": plan_changes(samples),
        "gateway": {"requests": {t: {k: v for k, v in d.items() if k != "goodput"} for t, d in gateway.items()},
                    "goodput": {t: d.get("goodput", 0.0) for t, d in gateway.items()},
                    "counts_match": counts_match(results, gateway)},
    }


def write_outputs(out_dir: Path, summary: dict[str, Any], results: Sequence[RequestResult],
                  samples: Sequence[dict[str, Any]]) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "requests.jsonl", out_dir / "plan_samples.jsonl", out_dir / "summary.json"]
    paths[0].write_text("".join(json.dumps(asdict(r)) + "\n" for r in results))
    paths[1].write_text("".join(json.dumps(s) + "\n" for s in samples))
    paths[2].write_text(json.dumps(summary, indent=2) + "\n")
    return paths
