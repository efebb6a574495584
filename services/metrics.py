"""Prometheus metrics (prometheus-client), `nitsum_` prefix, base units.

Each service builds its own set on its own registry (so tests can run several in one process)
and serves it at `/metrics`. Per-tier series come from the gateway, which sees every request
from arrival to last token; per-group series come from the group leaders and, for a one-stop
view, from the gateway mirroring the group records it reads from Redis.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from services.cluster.schema import GroupRecord

CONTENT_TYPE = CONTENT_TYPE_LATEST
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)

# Outcomes of a request as the gateway saw it (label `outcome` of nitsum_requests_total).
OUTCOMES = ("ok", "bad_request", "unauthorized", "forbidden", "shed", "unavailable", "cancelled", "error")
KV_BACKENDS = ("grpc", "nixl", "local")  # label values of nitsum_kv_transfer_backend


class GroupMetrics:
    """Role, TP degree, running batch and KV usage of groups."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ("group", "role")
        self.tp = Gauge("nitsum_group_tp_degree", "TP degree of the group", labels, registry=registry)
        self.running = Gauge("nitsum_group_running_requests", "Requests in the group's running batch",
                             labels, registry=registry)
        self.kv_used = Gauge("nitsum_group_kv_blocks_used", "KV cache blocks in use", labels, registry=registry)
        self.kv_free = Gauge("nitsum_group_kv_blocks_free", "KV cache blocks free", labels, registry=registry)
        self._known: set[tuple[str, str]] = set()

    def observe(self, g: GroupRecord) -> None:
        key = (g.group_id, g.role)
        self._known.add(key)
        self.tp.labels(*key).set(g.tp)
        self.running.labels(*key).set(g.running)
        self.kv_used.labels(*key).set(g.used_kv_blocks)
        self.kv_free.labels(*key).set(g.free_kv_blocks)

    def replace_all(self, groups: list[GroupRecord]) -> None:
        """Show exactly these groups (ones whose lease expired disappear)."""
        live = {(g.group_id, g.role) for g in groups}
        for key in self._known - live:
            for gauge in (self.tp, self.running, self.kv_used, self.kv_free):
                gauge.remove(*key)
        self._known &= live
        for g in groups:
            self.observe(g)


class RestartCounts(Collector):
    """`nitsum_process_restarts_total{process}`: restarts `nitsum up` made, as counted in Redis."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily("nitsum_process_restarts", "Processes of the mesh that died and were "
                                     "restarted by `nitsum up`", labels=("process",))
        for name, n in sorted(self.counts.items()):
            family.add_metric((name,), n)
        yield family


class GatewayMetrics:
    def __init__(self, tiers: tuple[str, ...], registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("nitsum_ttft_seconds", "Time to first token, at the gateway", ("tier",),
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("nitsum_tpot_seconds", "Mean time per output token after the first", ("tier",),
                              buckets=_TPOT_BUCKETS, registry=r)
        self.requests = Counter("nitsum_requests", "Requests by tier and outcome", ("tier", "outcome"), registry=r)
        self.goodput = Counter("nitsum_goodput_requests", "Finished requests that met both targets of their tier",
                               ("tier",), registry=r)
        self.queue_depth = Gauge("nitsum_queue_depth", "Requests waiting in the tier's queue", ("tier",), registry=r)
        self.prompt_tokens = Counter("nitsum_prompt_tokens", "Prompt tokens admitted", ("tier",), registry=r)
        self.generated_tokens = Counter("nitsum_generated_tokens", "Tokens generated", ("tier",), registry=r)
        self.groups = GroupMetrics(r)
        self.restarts = RestartCounts()
        r.register(self.restarts)
        for tier in tiers:  # every tier's series exists from the start, at zero
            self.ttft.labels(tier)
            self.tpot.labels(tier)
            self.goodput.labels(tier)
            self.queue_depth.labels(tier).set(0)
            self.prompt_tokens.labels(tier)
            self.generated_tokens.labels(tier)
            for outcome in OUTCOMES:
                self.requests.labels(tier, outcome)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RouterMetrics:
    """The router-coordinator's decisions: what it dispatched, what it shed, how long it took."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.dispatched = Counter("nitsum_router_dispatched", "Requests dispatched to a prefill and a decode group",
                                  ("tier",), registry=r)
        self.shed = Counter("nitsum_router_shed", "Requests shed by admission control (answered 429)", ("tier",),
                            registry=r)
        self.schedule_seconds = Histogram("nitsum_router_schedule_seconds", "Time of one scheduling decision",
                                          buckets=_TPOT_BUCKETS, registry=r)
        self.leading = Gauge("nitsum_router_leading", "1 while this router holds the leader lock", registry=r)
        # Reconfigurations (router/reconfig/orchestrator.py), exported by the router that ran them.
        self.reconfigurations = Counter("nitsum_reconfigurations", "Plan changes applied by the orchestrator "
                                        "(epoch e -> e+1); result = committed | unchanged | rolled_forward | "
                                        "rolled_back | healed | restored | failed", ("result",), registry=r)
        self.reconfig_pause = Histogram("nitsum_reconfig_pause_seconds", "Pause each group saw during a "
                                        "reconfiguration (0 for groups that kept serving)", ("group",),
                                        buckets=_LATENCY_BUCKETS, registry=r)
        self.reconfig_seconds = Histogram("nitsum_reconfig_seconds", "Wall time of a whole reconfiguration",
                                          buckets=_LATENCY_BUCKETS, registry=r)
        self.reconfig_bytes = Counter("nitsum_reconfig_weight_bytes", "Weight bytes of re-cut slots by where they "
                                      "came from: kept in place, fetched from a peer slot, read from disk",
                                      ("source",), registry=r)
        self.reconfig_requests = Counter("nitsum_reconfig_requests", "Requests on re-cut decode groups by what "
                                         "happened to them: finished in place, migrated, parked", ("outcome",),
                                         registry=r)
        self.plan_epoch = Gauge("nitsum_plan_epoch", "The plan epoch the router routes to", registry=r)
        # The autopilot (router/live/autopilot.py), exported by the leading router.
        self.autopilot_decisions = Counter("nitsum_autopilot_decisions", "Plan-loop decisions by action: keep | "
                                           "switch | pin | hold | skip | failed", ("action",), registry=r)
        self.autopilot_on = Gauge("nitsum_autopilot_enabled", "1 while the autopilot may change the plan", registry=r)
        self.predicted_goodput = Gauge("nitsum_autopilot_predicted_goodput", "Requests/s meeting both targets the "
                                       "planner predicts for the plan it keeps or picks, per tier", ("tier",),
                                       registry=r)
        self.measured_goodput = Gauge("nitsum_autopilot_measured_goodput", "Requests/s that met both targets over "
                                      "the estimate's window, as the gateways saw them, per tier", ("tier",),
                                      registry=r)
        self.offered_rate = Gauge("nitsum_autopilot_offered_rate", "Arrivals/s over the estimate's window (shed "
                                  "ones included), per tier", ("tier",), registry=r)
        self.since_change = Gauge("nitsum_autopilot_seconds_since_change", "Seconds since the plan last changed",
                                  registry=r)

    def observe_reconfig(self, report: Any) -> None:
        """Count one router.reconfig.orchestrator.ReconfigReport."""
        self.reconfigurations.labels(report.result).inc()
        self.reconfig_seconds.observe(report.seconds)
        for g in report.groups:
            self.reconfig_pause.labels(g.group_id).observe(g.pause_s)
        for source in ("kept", "peer", "disk"):
            self.reconfig_bytes.labels(source).inc(getattr(report, f"{source}_bytes"))
        for outcome in ("finished_in_place", "migrated", "parked"):
            self.reconfig_requests.labels(outcome).inc(getattr(report, outcome))
        self.plan_epoch.set(report.to_epoch if report.result != "failed" else report.from_epoch)


class NodeMetrics:
    """A group leader's own view: its group gauges plus engine and KV-transfer timings."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.groups = GroupMetrics(r)
        self.steps = Counter("nitsum_engine_steps", "Engine steps run", registry=r)
        self.step_seconds = Histogram("nitsum_engine_step_seconds", "Engine step time", buckets=_TPOT_BUCKETS,
                                      registry=r)
        self.kv_transfer_bytes = Counter("nitsum_kv_transfer_bytes", "KV bytes handed between groups",
                                         ("direction",), registry=r)
        self.kv_transfer_seconds = Histogram("nitsum_kv_transfer_seconds", "Time to hand one request's KV over",
                                             buckets=_LATENCY_BUCKETS, registry=r)
        self.aborted = Counter("nitsum_aborted_requests", "Requests aborted (client gone or error)", registry=r)
        self.kv_backend = Gauge("nitsum_kv_transfer_backend", "KV hand-off backend in use (1) and known (0)",
                                ("backend",), registry=r)
        self.kv_transfer_failures = Counter("nitsum_kv_transfer_failures", "KV transfers that failed, by error "
                                            "kind (unavailable: the peer died or was unreachable)", ("reason",),
                                            registry=r)
        self.kv_handoff_failovers = Counter("nitsum_kv_handoff_failovers", "KV hand-offs sent to another decode "
                                            "group after the chosen one failed", registry=r)

    def set_kv_backend(self, name: str) -> None:
        """Show `name` as the backend in use (a slot may serve several groups over its life)."""
        for known in KV_BACKENDS:
            self.kv_backend.labels(known).set(1 if known == name else 0)
        if name not in KV_BACKENDS:
            self.kv_backend.labels(name).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)
