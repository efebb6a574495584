"""deploy/prometheus.yml scrapes every compose service that serves /metrics, once, on the port its
command line gives it, and nothing that is not in the compose file."""

from __future__ import annotations

from typing import Any

from .conftest import DEPLOY, has_option, nitsum_services, nitsum_subcommands, option_value, yaml

# Services whose subcommand has no flag for a metrics port; they are exempt only while
# their parser lacks `--metrics-port` (once it has one, the rules below apply to them too).
NO_METRICS_FLAG_YET: set[str] = set()


def _targets() -> dict[str, set[str]]:
    doc = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    out: dict[str, set[str]] = {}
    for job in doc["scrape_configs"]:
        assert job.get("metrics_path", "/metrics") == "/metrics"
        for sc in job.get("static_configs", []):
            out.setdefault(job["job_name"], set()).update(sc["targets"])
    return out


def metrics_endpoint(argv: list[str]) -> str | None:
    """host-less `:port` where this `nitsum` command serves /metrics, or None if it serves none."""
    sub = argv[0]
    parsers = nitsum_subcommands()
    if sub == "gateway":  # /metrics is a route of the gateway's HTTP app
        return option_value(argv, "--port") or "8000"
    if (sub in parsers and has_option(parsers[sub], "--metrics-port")) or "--metrics-port" in argv:
        port = option_value(argv, "--metrics-port")
        assert port and port != "0", f"`nitsum {sub}` can serve /metrics but compose gives it no --metrics-port"
        return port
    return None


def test_every_service_metrics_port_is_scraped(compose: dict[str, Any]) -> None:
    scraped = set().union(*_targets().values())
    parsers = nitsum_subcommands()
    for name, argv in nitsum_services(compose).items():
        port = metrics_endpoint(argv)
        if port is None:
            assert name in NO_METRICS_FLAG_YET, f"compose service {name!r} serves no /metrics"
            sub = parsers.get(argv[0])
            assert sub is None or not has_option(sub, "--metrics-port"), \
                f"`nitsum {argv[0]}` now takes --metrics-port: pass it in compose and scrape {name}"
            continue
        assert f"{name}:{port}" in scraped, f"prometheus.yml does not scrape {name}:{port} (/metrics of {name})"


def test_each_service_is_scraped_once(compose: dict[str, Any]) -> None:
    """The router serves one registry on --metrics-port and on the admin port: scraping both would
    count every reconfiguration twice in the dashboard's sums."""
    hosts = [t.rsplit(":", 1)[0] for targets in _targets().values() for t in targets]
    assert len(hosts) == len(set(hosts)), f"a service is scraped on two ports: {sorted(hosts)}"
    slots = _targets().get("slots", set())
    assert slots == {f"{n}:9100" for n in compose["services"] if n.startswith("slot")}, \
        "every slot serves /metrics on 9100, whatever group it is in"


def test_every_target_is_a_compose_service(compose: dict[str, Any]) -> None:
    services = set(compose["services"])
    for job, targets in _targets().items():
        for target in targets:
            host = target.rsplit(":", 1)[0]
            assert host in services or (job == "prometheus" and host == "localhost"), \
                f"job {job}: target {target} is not a compose service"


def test_prometheus_and_grafana_get_their_config(compose: dict[str, Any]) -> None:
    prom = compose["services"]["prometheus"]
    assert any(v.startswith("./prometheus.yml:") for v in prom["volumes"])
    graf = compose["services"]["grafana"]
    mounts = {v.split(":")[0]: v.split(":")[1] for v in graf["volumes"]}
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/nitsum.yml").read_text())
    assert mounts["./grafana/dashboards"] == provider["providers"][0]["options"]["path"]
