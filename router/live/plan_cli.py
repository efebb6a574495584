"""`nitsum plan apply` and `nitsum plan show`: the router's admin API from the command line.

    nitsum plan show  [--router URL] [--admin-key KEY] [--json]
    nitsum plan apply PLAN [--router URL] [--admin-key KEY] [--json]
    nitsum plan history [--limit N] [--router URL] [--admin-key KEY] [--json]
    nitsum plan autopilot [on|off] [--interval S] [--pin PLAN | --unpin] [--router URL] [--json]
    nitsum plan explain --router URL        (the live loop's view; see router/cli.py for --load)

PLAN is a file holding a plan as JSON (the schema in docs/plan.schema.json), `-` for standard
input, or the compact form itself (`p2,d1,d1`). --router takes several URLs, comma-separated (a
router and its standbys): only the leading router serves the admin API, and the first that
answers is used. The key comes from --admin-key, else
$NITSUM_ADMIN_KEY, else .nitsum/admin-key (what `nitsum up` made). A plan the cluster cannot take
is refused before anything changes, with the router's reason; exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

DEFAULT_ROUTER = "http://127.0.0.1:8001"


def register(plan_subparsers: Any) -> None:
    show = plan_subparsers.add_parser("show", help="the plan the cluster runs, its groups and slots")
    _common(show)
    show.set_defaults(func=_show)
    apply = plan_subparsers.add_parser("apply", help="re-cut the running cluster into a new plan")
    apply.add_argument("plan", help="a plan JSON file, - for stdin, or the compact form like p2,d1,d1")
    _common(apply)
    apply.set_defaults(func=_apply)
    hist = plan_subparsers.add_parser("history", help="the autopilot's last decisions, oldest first")
    hist.add_argument("--limit", type=int, default=50, help="how many (1-500, default 50)")
    _common(hist)
    hist.set_defaults(func=_history)
    pilot = plan_subparsers.add_parser("autopilot", help="turn the autopilot on or off, pin a plan, or show its state")
    pilot.add_argument("state", nargs="?", choices=("on", "off"), help="turn it on or off (default: only show)")
    pilot.add_argument("--interval", type=float, default=None, help="seconds between decisions")
    pilot.add_argument("--pin", default=None, help="apply this plan and hold it until --unpin")
    pilot.add_argument("--unpin", action="store_true", help="let the autopilot choose again")
    _common(pilot)
    pilot.set_defaults(func=_autopilot)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--router", default=os.environ.get("NITSUM_ROUTER_URL", DEFAULT_ROUTER),
                   help=f"the router's admin URL, or several comma-separated: the leading one answers "
                        f"(default: $NITSUM_ROUTER_URL or {DEFAULT_ROUTER})")
    p.add_argument("--admin-key", default=None, help="admin key (default: $NITSUM_ADMIN_KEY or .nitsum/admin-key)")
    p.add_argument("--json", action="store_true", help="print the router's JSON answer")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the router")


def _key(args: argparse.Namespace) -> str:
    if args.admin_key:
        return str(args.admin_key)
    if os.environ.get("NITSUM_ADMIN_KEY"):
        return os.environ["NITSUM_ADMIN_KEY"]
    path = Path(".nitsum/admin-key")
    return path.read_text().strip() if path.is_file() else ""


def _call(args: argparse.Namespace, method: str, body: dict[str, Any] | None = None,
          path: str = "/admin/plan") -> tuple[int, dict[str, Any]]:
    """The first router of --router that answers (a standby does not serve the admin API)."""
    urls = [u.strip() for u in args.router.split(",") if u.strip()]
    for url in urls[:-1]:
        try:
            return _call_one(args, url, method, body, path)
        except ConnectionError:
            continue
    return _call_one(args, urls[-1] if urls else DEFAULT_ROUTER, method, body, path)


def _call_one(args: argparse.Namespace, url: str, method: str,
              body: dict[str, Any] | None, path: str = "/admin/plan") -> tuple[int, dict[str, Any]]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"{url.rstrip('/')}{path}", data=data, method=method,
                                 headers={"Authorization": f"Bearer {_key(args)}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=args.timeout) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.loads(e.read() or b"{}")
        except json.JSONDecodeError:
            return e.code, {"error": {"message": f"HTTP {e.code} {e.reason}"}}
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ConnectionError(f"cannot reach the router admin API at {url}: {reason} "
                              "(is `nitsum up` running? pass --router URL)") from e


def _fail(status: int, doc: dict[str, Any]) -> int:
    message = doc.get("error", {}).get("message", f"HTTP {status}")
    print(f"nitsum plan: error: {message}", file=sys.stderr)
    return 2 if status < 500 else 1


def _show(args: argparse.Namespace) -> int:
    try:
        status, doc = _call(args, "GET")
    except ConnectionError as e:
        print(f"nitsum plan: error: {e}", file=sys.stderr)
        return 2
    if status != 200:
        return _fail(status, doc)
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    state = " (reconfiguring)" if doc.get("reconfiguring") else ""
    print(f"epoch {doc['epoch']}: {doc['plan'] or '(none)'}{state}")
    for g in doc["groups"]:
        print(f"  {g['group_id']:<10} {g['role']:<8} tp {g['tp']}  slots {','.join(map(str, g['slots']))}"
              f"  (since epoch {g['epoch']})")
    idle = [s["index"] for s in doc["slots"] if not s["group"]]
    if idle:
        print(f"  idle slots: {','.join(map(str, idle))}")
    return 0


def _read_plan(text: str) -> dict[str, Any]:
    if text == "-":
        text = sys.stdin.read()
    elif Path(text).is_file():
        text = Path(text).read_text()
    text = text.strip()
    if text.startswith("{"):
        try:
            doc: dict[str, Any] = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"the plan file is not valid JSON: {e}") from e
        return doc
    if not text or "/" in text or text.endswith(".json"):
        raise ValueError(f"{text or 'PLAN'}: no such plan file (or write the plan itself, like p2,d1,d1)")
    return {"plan": text}


def _apply(args: argparse.Namespace) -> int:
    try:
        body = _read_plan(args.plan)
        status, doc = _call(args, "POST", body)
    except (ValueError, ConnectionError) as e:
        print(f"nitsum plan: error: {e}", file=sys.stderr)
        return 2
    report = doc.get("report", doc)
    if args.json:
        print(json.dumps(doc, indent=2))
    elif "result" in report:
        mib = 1 << 20
        print(f"epoch {report['from_epoch']} -> {report['to_epoch']}: {report['plan']} {report['result']} in "
              f"{report['seconds']:.2f}s; weights kept {report['kept_bytes'] / mib:.1f} MiB, from peers "
              f"{report['peer_bytes'] / mib:.1f} MiB, from disk {report['disk_bytes'] / mib:.1f} MiB; requests "
              f"finished in place {report['finished_in_place']}, migrated {report['migrated']}, "
              f"parked {report['parked']}")
        for g in report["groups"]:
            what = "kept serving" if g["kept"] else f"pause {g['pause_s'] * 1000:.0f} ms"
            print(f"  {g['group_id']:<10} {g['role']:<8} tp {g['tp']}  slots {','.join(map(str, g['slots']))}  {what}")
    if status != 200:
        return _fail(status, doc)
    return 0


def _get(args: argparse.Namespace, path: str, method: str = "GET",
         body: dict[str, Any] | None = None) -> dict[str, Any] | int:
    """The router's answer, or the exit status after printing a one-line error."""
    try:
        status, doc = _call(args, method, body, path)
    except ConnectionError as e:
        print(f"nitsum plan: error: {e}", file=sys.stderr)
        return 2
    if status != 200:
        return _fail(status, doc)
    return doc


def _clock(at: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(at))


def _history(args: argparse.Namespace) -> int:
    if not 1 <= args.limit <= 500:
        print(f"nitsum plan: error: --limit {args.limit}: give 1 to 500", file=sys.stderr)
        return 2
    doc = _get(args, f"/admin/decisions?limit={args.limit}")
    if isinstance(doc, int):
        return doc
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    if not doc["decisions"]:
        print("no decisions yet (the autopilot decides every few seconds once the router leads)")
    for d in doc["decisions"]:
        move = f"{d['plan']} -> {d['to']}" if d.get("to") else d["plan"]
        result = f" [{d['report']['result']} in {d['report']['seconds']:.1f}s]" if d.get("report") else ""
        offered = ", ".join(f"{k} {v:.2f}/s" for k, v in d.get("offered", {}).items() if v > 0) or "idle"
        good = ", ".join(f"{k} {v:.2f}/s" for k, v in d.get("measured_goodput", {}).items() if v > 0)
        print(f"{_clock(d['at'])} {d['action']:<6} {move}{result}: {d['reason']} | offered {offered}"
              + (f" | met {good}" if good else ""))
    return 0


def _autopilot(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {}
    if args.state:
        body["enabled"] = args.state == "on"
    if args.interval is not None:
        body["interval_s"] = args.interval
    if args.pin:
        body["pin"] = args.pin
    if args.unpin:
        body["unpin"] = True
    doc = _get(args, "/admin/autopilot", "POST" if body else "GET", body or None)
    if isinstance(doc, int):
        return doc
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(f"autopilot {'on' if doc['enabled'] else 'off'}, every {doc['interval_s']:g} s, hold {doc['min_hold_s']:g} s, "
          f"margin {doc['margin']:.0%}, {doc['moves_last_hour']}/{doc['max_moves_per_hour']} moves in the last hour"
          + (f"; pinned to {doc['pinned']}" if doc.get("pinned") else ""))
    print(f"perf model: {doc['perf_model']}; measured move pauses: "
          + ", ".join(f"{k} {v:.2f}s" if v is not None else f"{k} (none yet)" for k, v in doc["move_costs_s"].items()))
    if doc.get("last_decision"):
        print(f"last decision ({_clock(doc['last_decision']['at'])}): {doc['last_decision']['explanation']}")
    return 0


def explain_live(args: argparse.Namespace) -> int:
    """`nitsum plan explain --router URL`: the live estimate, the candidates, the last decision."""
    doc = _get(args, "/admin/autopilot?explain=1")
    if isinstance(doc, int):
        return doc
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    st = doc["status"]
    print(f"autopilot {'on' if st['enabled'] else 'off'}" + (f", pinned to {st['pinned']}" if st.get("pinned") else "")
          + f"; perf model: {st['perf_model']}")
    print(f"live workload (last {st['window_s']:g} s): {doc['workload']}")
    met = ", ".join(f"{k} {v:.2f}/s" for k, v in doc["measured_goodput"].items())
    print(f"measured goodput: {met or 'none yet'}")
    if doc["candidates"]:
        print("candidates (predicted goodput per tier, req/s; the current plan first):")
    for c in doc["candidates"]:
        tiers = ", ".join(f"{k} {v['goodput']:.2f}/{v['rate']:.2f}" for k, v in c["tiers"].items())
        print(f"  {'*' if c['current'] else ' '} {c['plan']:<14} score {c['score']:.2f}  {tiers or 'no load'}")
    if st.get("last_decision"):
        print(f"last decision ({_clock(st['last_decision']['at'])}, {st['last_decision']['action']}):")
        print("  " + st["last_decision"]["explanation"].replace("\n", "\n  "))
    return 0
