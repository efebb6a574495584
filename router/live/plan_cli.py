"""`nitsum plan apply` and `nitsum plan show`: the router's admin API from the command line.

    nitsum plan show  [--router URL] [--admin-key KEY] [--json]
    nitsum plan apply PLAN [--router URL] [--admin-key KEY] [--json]

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


def _call(args: argparse.Namespace, method: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    """The first router of --router that answers (a standby does not serve the admin API)."""
    urls = [u.strip() for u in args.router.split(",") if u.strip()]
    for url in urls[:-1]:
        try:
            return _call_one(args, url, method, body)
        except ConnectionError:
            continue
    return _call_one(args, urls[-1] if urls else DEFAULT_ROUTER, method, body)


def _call_one(args: argparse.Namespace, url: str, method: str,
              body: dict[str, Any] | None) -> tuple[int, dict[str, Any]]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"{url.rstrip('/')}/admin/plan", data=data, method=method,
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
