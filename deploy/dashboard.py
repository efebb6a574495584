"""The Grafana dashboard's queries as Prometheus evaluates them: each panel target's `expr`, and each
template variable's query, with Grafana's variables filled in.

Grafana sends a panel's query with `$__rate_interval` (at least four scrape intervals, more on a
wide time range), `$__interval` (the time range over the panel's width) and `$__range` expanded,
and a template variable set to "All" as its `allValue` (here `.*`); `label_values(metric, label)`
is a Grafana function, asked of Prometheus as the label's values on that metric's series, which
`group by (label) (metric)` returns as an instant query.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DASHBOARD = Path(__file__).resolve().parent / "grafana" / "dashboards" / "nitsum.json"
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*([^,]+?)\s*,\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)\s*$")


@dataclass(frozen=True)
class Query:
    where: str  # "panel 'Title' A" or "variable tier"
    expr: str  # as written in the dashboard


def dashboard_queries(path: Path = DASHBOARD) -> list[Query]:
    doc: dict[str, Any] = json.loads(path.read_text())
    found: list[Query] = []
    for panel in doc["panels"]:
        for target in panel.get("targets", []):
            found.append(Query(f"panel {panel['title']!r} {target.get('refId', '')}".strip(), target["expr"]))
    for var in doc.get("templating", {}).get("list", []):
        q = var.get("query")
        found.append(Query(f"variable {var['name']}", q["query"] if isinstance(q, dict) else str(q or "")))
    return found


def variables(path: Path = DASHBOARD) -> dict[str, str]:
    """Each template variable at "All": its allValue (`.*` where none is set)."""
    doc: dict[str, Any] = json.loads(path.read_text())
    return {v["name"]: v.get("allValue") or ".*" for v in doc.get("templating", {}).get("list", [])}


def expand(expr: str, rate_interval_s: int, interval_s: int, range_s: int, values: dict[str, str]) -> str:
    """The PromQL Grafana would send for `expr`."""
    m = _LABEL_VALUES.match(expr)
    if m:
        return f"group by ({m.group(2)}) ({m.group(1)})"
    out = (expr.replace("$__rate_interval", f"{rate_interval_s}s").replace("$__interval", f"{interval_s}s")
           .replace("$__range", f"{range_s}s"))
    for name in sorted(values, key=len, reverse=True):  # $tier before $t
        out = out.replace(f"${{{name}}}", values[name]).replace(f"${name}", values[name])
    if "$" in out:
        raise ValueError(f"a Grafana variable is left in {out!r}")
    return out
