"""deploy/grafana: the dashboard JSON is valid, uses the provisioned datasource, covers what an
operator watches, and every metric its queries name is a series the services export (a counter
as _total, a histogram as _bucket/_sum/_count), read from the prometheus-client registries that
services.metrics builds."""

from __future__ import annotations

import inspect
import json
import re
from typing import Any

from prometheus_client import CollectorRegistry

from .conftest import DEPLOY, yaml

DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
METRIC = re.compile(r"\bnitsum_[a-z0-9_]+\b")
SERIES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def exported_series() -> set[str]:
    """Every sample name (with _total, _bucket, ...) of every metrics class in services.metrics."""
    import services.metrics as m

    names: set[str] = set()
    for _, cls in inspect.getmembers(m, inspect.isclass):
        if cls.__module__ != m.__name__ or not cls.__name__.endswith("Metrics"):
            continue
        kwargs: dict[str, Any] = {}
        for p in inspect.signature(cls).parameters.values():
            if p.name == "registry":
                kwargs[p.name] = CollectorRegistry()
            elif p.name == "tiers":
                kwargs[p.name] = ("interactive",)
        obj = cls(**kwargs)
        registry: CollectorRegistry = getattr(obj, "registry", None) or kwargs["registry"]
        for family in registry.collect():  # a labelled family has no samples yet: name its series by type
            names.update(s.name for s in family.samples)
            names.update(family.name + suffix for suffix in SERIES.get(family.type, ("",)))
    return names


def queries(dashboard: dict[str, Any]) -> list[str]:
    found = []
    for panel in dashboard["panels"]:
        found += [t["expr"] for t in panel.get("targets", [])]
    for var in dashboard.get("templating", {}).get("list", []):
        q = var.get("query")
        found.append(q["query"] if isinstance(q, dict) else str(q or ""))
    return found


def test_dashboards_are_valid_json_on_the_provisioned_datasource() -> None:
    assert DASHBOARDS, "no dashboard JSON under deploy/grafana/dashboards"
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"][0]
    for path in DASHBOARDS:
        dash = json.loads(path.read_text())
        assert dash["uid"] and dash["title"] and dash["panels"]
        ids = [p["id"] for p in dash["panels"]]
        assert len(ids) == len(set(ids)), f"{path.name}: panel ids repeat"
        for panel in dash["panels"]:
            if panel["type"] != "row":
                assert panel["datasource"]["uid"] == ds["uid"], f"{path.name}: {panel['title']} uses another datasource"
                assert panel["targets"], f"{path.name}: {panel['title']} has no query"
        for q in queries(dash):
            assert q.count("(") == q.count(")") and q.count("{") == q.count("}"), f"unbalanced query: {q}"


def test_every_queried_metric_is_exported() -> None:
    exported = exported_series()
    assert "nitsum_ttft_seconds_bucket" in exported and "nitsum_reconfigurations_total" in exported
    assert "nitsum_reconfig_pause_seconds" not in exported, "a histogram is queried by its series, not its name"
    for path in DASHBOARDS:
        for q in queries(json.loads(path.read_text())):
            for name in METRIC.findall(q):
                assert name in exported, (
                    f"{path.name}: query names {name}, which no service exports "
                    f"(exported: {', '.join(sorted(n for n in exported if not n.endswith('_created')))})")


def test_dashboard_covers_what_an_operator_watches() -> None:
    dash = json.loads((DEPLOY / "grafana/dashboards/nitsum.json").read_text())
    text = " ".join(queries(dash))
    for needle in ("histogram_quantile(0.99, sum by (tier, le) (rate(nitsum_ttft_seconds_bucket",
                   "histogram_quantile(0.99, sum by (tier, le) (rate(nitsum_tpot_seconds_bucket",
                   "rate(nitsum_goodput_requests_total", "nitsum_queue_depth", "nitsum_group_tp_degree",
                   "rate(nitsum_kv_transfer_bytes_total", "increase(nitsum_reconfigurations_total",
                   "nitsum_reconfig_pause_seconds_sum", "nitsum_reconfig_pause_seconds_count",
                   "nitsum_reconfig_seconds_bucket", "sum by (source) (increase(nitsum_reconfig_weight_bytes_total",
                   "sum by (outcome) (increase(nitsum_reconfig_requests_total", "nitsum_plan_epoch"):
        assert needle in text, f"the dashboard has no query with {needle!r}"
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for word in ("ttft", "tpot", "attainment", "goodput", "queue depth", "plan timeline", "plan epoch",
                 "reconfiguration pause", "kept / peer / disk", "migrated / parked", "kv transfer bandwidth"):
        assert word in titles, f"no panel about {word}"
