"""Reconfiguration cost: switching TP degrees and roles at runtime against a cold restart.

    python -m bench.reconfig [--model DIR] [--repeats 3] [--out FILE]

In one run, on one checkpoint (default: the `small` preset in bfloat16, made once under
`.nitsum/models/small-bf16`) and a local mesh of 4 slots (`nitsum up`'s Mesh: Redis, router,
gateway, one process per slot):

- switches, each timed by the orchestrator from freezing the groups that change to routing to the
  new ones (`ReconfigReport.seconds`), with the bytes kept / fetched from peer slots / read from
  disk: TP 2 -> 1 (`p2,d2` -> `p1,p1,d2`), TP 1 -> 2 (back), prefill -> decode (`p1,p1,d2` ->
  `p1,d1,d2`) and decode -> prefill (back), each `--repeats` times (median);
- a cold restart of the same groups: the 4 slot processes stopped, started again (Python, torch,
  the engine, each CPU slot faulting in its host memory reserve), their weights read from disk
  and their process groups formed (`p2,d2`), timed from spawning the processes to the
  orchestrator's report.

Final line: one JSON object with `switch_vs_restart` (the slowest median switch over the cold
restart time; target <= 1/20) and `disk_bytes_with_peers` (disk bytes summed over the switches,
in all of which every needed shard exists on a peer slot; target 0).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from bench.engine import DEFAULT_MODEL, ensure_model
from services.launch import LaunchConfig, Mesh

SWITCHES = [  # (name, plan before, plan after)
    ("tp2->1", "p2,d2", "p1,p1,d2"),
    ("prefill->decode", "p1,p1,d2", "p1,d1,d2"),
    ("decode->prefill", "p1,d1,d2", "p1,p1,d2"),
    ("tp1->2", "p1,p1,d2", "p2,d2"),
]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def apply(mesh: Mesh, plan: str) -> dict[str, Any]:
    req = urllib.request.Request(f"{mesh.admin_url}/admin/plan", method="POST",
                                 data=json.dumps({"plan": plan}).encode(),
                                 headers={"Authorization": f"Bearer {mesh.admin_key}"})
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            report: dict[str, Any] = json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"applying {plan}: HTTP {e.code}: {e.read()[:500]!r}") from e
    if report["result"] != "committed":
        raise RuntimeError(f"applying {plan}: {report['result']}: {report.get('error')}")
    return report


def _reports(mesh: Mesh) -> list[dict[str, Any]]:
    req = urllib.request.Request(f"{mesh.admin_url}/admin/reconfigurations",
                                 headers={"Authorization": f"Bearer {mesh.admin_key}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return list(json.loads(r.read())["reconfigurations"])


def cold_restart(mesh: Mesh, plan: str, slots: int) -> tuple[float, dict[str, Any]]:
    """New slot processes, timed from their spawn until the orchestrator has brought them to `plan`
    (the plan it serves, which it restores by itself once every slot of it answers again)."""
    seen = len(_reports(mesh))
    mesh.stop_slots()
    time.sleep(3.5)  # the old slots' leases lapse, so the orchestrator sees only the new ones
    started = time.perf_counter()
    mesh.start_slots(slots)
    deadline = time.monotonic() + 600
    while True:
        try:
            done = [r for r in _reports(mesh)[seen:] if r["result"] == "restored" and r["plan"] == plan]
            if done:
                return time.perf_counter() - started, done[0]
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the restarted slots were not brought back to {plan} within 600 s")
        time.sleep(0.02)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.reconfig", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help=f"checkpoint folder (default: the small preset in {DEFAULT_MODEL})")
    p.add_argument("--repeats", type=int, default=3, help="times each switch is made (median reported)")
    p.add_argument("--out", default=None, help="also write the final JSON object here")
    args = p.parse_args(argv)
    model = ensure_model(args.model)
    slots = 4
    with tempfile.TemporaryDirectory(prefix="nitsum-bench-reconfig-") as tmp:
        config = LaunchConfig(model=Path(model), plan=SWITCHES[0][1], slots=slots, port=0,
                              log_dir=Path(tmp) / "logs", startup_timeout_s=600)
        log(f"starting a mesh of {slots} slots on {model} (plan {SWITCHES[0][1]})")
        with Mesh(config) as mesh:
            times: dict[str, list[float]] = {name: [] for name, _, _ in SWITCHES}
            pauses: dict[str, list[float]] = {name: [] for name, _, _ in SWITCHES}
            bytes_of: dict[str, dict[str, int]] = {}
            for _ in range(args.repeats):
                for name, before, after in SWITCHES:
                    report = apply(mesh, after)
                    times[name].append(report["seconds"])
                    pauses[name].append(max((g["pause_s"] for g in report["groups"] if not g["kept"]), default=0.0))
                    bytes_of[name] = {k: report[f"{k}_bytes"] for k in ("kept", "peer", "disk")}
                    log(f"  {name:<16} {before:>9} -> {after:<9} {report['seconds'] * 1000:7.1f} ms  "
                        f"kept {report['kept_bytes'] / 2**20:7.1f} MiB  peers {report['peer_bytes'] / 2**20:6.1f} MiB"
                        f"  disk {report['disk_bytes'] / 2**20:6.1f} MiB")
            log("cold restart of the same groups (processes, weights from disk, process groups)")
            cold_s, cold_report = cold_restart(mesh, SWITCHES[0][1], slots)
            log(f"  cold restart {SWITCHES[0][1]}: {cold_s:.2f} s (of which the orchestrator's apply "
                f"{cold_report['seconds']:.2f} s; disk {cold_report['disk_bytes'] / 2**20:.1f} MiB)")
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    log("")
    log(f"{'switch':<17}{'median ms':>10}{'max pause ms':>14}{'vs restart':>12}{'kept MiB':>10}{'peers MiB':>10}"
        f"{'disk MiB':>10}")
    for name, _, _ in SWITCHES:
        b = bytes_of[name]
        log(f"{name:<17}{medians[name] * 1000:>10.1f}{max(pauses[name]) * 1000:>14.1f}"
            f"{medians[name] / cold_s:>12.4f}{b['kept'] / 2**20:>10.1f}{b['peer'] / 2**20:>10.1f}"
            f"{b['disk'] / 2**20:>10.1f}")
    log(f"{'cold restart':<17}{cold_s * 1000:>10.1f}")
    result = {
        "bench": "reconfig", "model_dir": str(model), "slots": slots, "repeats": args.repeats,
        "cold_restart_s": round(cold_s, 3),
        "switch_s": {k: round(v, 4) for k, v in medians.items()},
        "switch_pause_s": {k: round(max(v), 4) for k, v in pauses.items()},
        "bytes": bytes_of,
        "switch_vs_restart": round(max(medians.values()) / cold_s, 4),
        "disk_bytes_with_peers": sum(b["disk"] for b in bytes_of.values()),
    }
    line = json.dumps(result)
    if args.out:
        Path(args.out).write_text(line + "\n")
    print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
