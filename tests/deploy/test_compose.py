"""deploy/docker-compose.yml: parses, runs only real `nitsum` subcommands with flags they accept,
runs one `nitsum slot` per GPU with its own GPU reserved and nothing told about groups, gives the
router the plan, the GPU count and the admin API, and starts exactly NITSUM_GPUS slots."""

from __future__ import annotations

import contextlib
import io
from typing import Any

import pytest

from router.decide.plans import parse_plan

from .conftest import env_example, load_compose, nitsum_services, nitsum_subcommands, option_value

MAX_SLOTS = 8  # slot services in docker-compose.yml: one per GPU of an 8-GPU host


def parse(argv: list[str], service: str) -> Any:
    """`nitsum ARGV` through the real parser; fails the test with the parser's own message."""
    subcommands = nitsum_subcommands()
    sub = argv[0]
    assert sub in subcommands, (
        f"compose service {service!r} runs `nitsum {sub}`, which is not a subcommand of `nitsum` "
        f"(services/cli.py build_parser knows: {', '.join(sorted(subcommands)) or 'none'})")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            return subcommands[sub].parse_args(argv[1:])
        except SystemExit:
            pytest.fail(f"compose service {service!r}: `nitsum {' '.join(argv)}` is refused: {err.getvalue().strip()}")


def slot_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in compose["services"].items() if name.startswith("slot")}


def test_compose_parses_and_has_every_part(compose: dict[str, Any]) -> None:
    raw = load_compose()
    assert isinstance(raw, dict) and "services" in raw
    services = compose["services"]
    for name in ("redis", "router", "gateway", "prometheus", "grafana"):
        assert name in services, f"docker-compose.yml has no {name} service"
    assert sorted(slot_services(compose)) == [f"slot{k}" for k in range(MAX_SLOTS)], "one slot service per GPU"


def test_every_nitsum_service_runs_a_real_subcommand_with_valid_flags(compose: dict[str, Any]) -> None:
    services = nitsum_services(compose)
    assert {"router", "gateway", *slot_services(compose)} <= set(services)
    for name, argv in services.items():
        assert not any("${" in a for a in argv), f"{name}: a variable is left in `nitsum {' '.join(argv)}`"
        args = parse(argv, name)
        assert callable(getattr(args, "func", None)), f"`nitsum {argv[0]}` has no function to run"


def test_each_slot_runs_nitsum_slot_on_its_own_gpu(compose: dict[str, Any]) -> None:
    seen: dict[str, str] = {}
    for name, svc in slot_services(compose).items():
        index = int(name.removeprefix("slot"))
        args = parse(svc["command"], name)
        assert svc["command"][0] == "slot", f"{name} runs `nitsum {svc['command'][0]}`, not `nitsum slot`"
        assert args.index == index and args.host == name, f"{name}: --index {args.index} --host {args.host}"
        assert args.device == "cuda" and args.port == 50051 and args.metrics_port == 9100
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1 and devices[0]["capabilities"] == ["gpu"] and devices[0]["driver"] == "nvidia"
        (gpu,) = devices[0]["device_ids"]
        assert gpu == str(index), f"{name} reserves GPU {gpu} by default, not GPU {index}"
        assert gpu not in seen, f"{name} and {seen.get(gpu)} both reserve GPU {gpu}"
        seen[gpu] = name


def test_slots_differ_only_in_index_and_gpu(compose: dict[str, Any]) -> None:
    """The orchestrator gives slots their role, group, rank and TP degree: compose tells them none."""
    def normal(name: str, svc: dict[str, Any]) -> dict[str, Any]:
        k = name.removeprefix("slot")
        argv = ["K" if a in (k, name) else a for a in svc["command"]]
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        return {**svc, "command": argv, "profiles": None,
                "deploy": {"resources": {"reservations": {"devices": [{**devices[0], "device_ids": None}]}}}}

    slots = slot_services(compose)
    first = normal("slot0", slots["slot0"])
    for name, svc in slots.items():
        assert normal(name, svc) == first, f"{name} differs from slot0 in more than its index and GPU"
    per_slot = sorted(k for k in env_example() if k.startswith("SLOT"))
    assert not per_slot, f".env.example sets per-slot settings {per_slot}; the orchestrator decides those"


def test_router_gets_the_plan_the_gpu_count_and_the_admin_api(compose: dict[str, Any]) -> None:
    env = env_example()
    router = compose["services"]["router"]
    args = parse(router["command"], "router")
    assert router["command"][0] == "router"
    assert args.plan == env["NITSUM_PLAN"] and args.slots == int(env["NITSUM_GPUS"])
    assert args.admin_port == 8001 and args.metrics_port == 9100 and args.host == "0.0.0.0"
    assert not args.no_orchestrate
    assert f"{env['NITSUM_BIND']}:{env['NITSUM_ADMIN_PORT']}:8001" in router["ports"], \
        "the admin API must be published on NITSUM_BIND like the gateway"
    raw_env = load_compose()["services"]["router"]["environment"]
    assert "${NITSUM_ADMIN_KEY" in raw_env["NITSUM_ADMIN_KEY"], "the router must take NITSUM_ADMIN_KEY from .env"
    gateway_port = compose["services"]["gateway"]["ports"][0]
    assert gateway_port.startswith(f"{env['NITSUM_BIND']}:")


def test_env_example_plan_fits_the_gpus() -> None:
    env = env_example()
    for key in ("NITSUM_MODEL_DIR", "NITSUM_GPUS", "NITSUM_PLAN"):
        assert env.get(key), f".env.example must set {key}"
    assert "NITSUM_ADMIN_KEY" in env, ".env.example must name NITSUM_ADMIN_KEY (empty: admin API off)"
    gpus = int(env["NITSUM_GPUS"])
    plan = parse_plan(env["NITSUM_PLAN"], slots=gpus)  # what `nitsum router --plan --slots` checks at start
    assert {g.role for g in plan.groups} == {"prefill", "decode"}, "slots serve prefill and decode groups"
    assert 2 <= gpus <= MAX_SLOTS
    with pytest.raises(ValueError, match="only 4 are available"):
        parse_plan(env["NITSUM_PLAN"], slots=4)


def test_compose_profiles_start_one_slot_per_gpu() -> None:
    env = env_example()
    assert env["COMPOSE_PROFILES"] == f"slots{env['NITSUM_GPUS']}", ".env.example's profile must follow NITSUM_GPUS"
    raw = load_compose()["services"]
    for gpus in range(2, MAX_SLOTS + 1):
        profile = f"slots{gpus}"
        started = [k for k in range(MAX_SLOTS)
                   if not raw[f"slot{k}"].get("profiles") or profile in raw[f"slot{k}"]["profiles"]]
        assert started == list(range(gpus)), f"COMPOSE_PROFILES={profile} starts slots {started}"
    for name, svc in raw.items():
        if not name.startswith("slot"):
            assert not svc.get("profiles"), f"{name} must run whatever the GPU count"


def test_router_and_slots_agree_on_redis(compose: dict[str, Any]) -> None:
    services = nitsum_services(compose)
    urls = {name: option_value(argv, "--redis-url") for name, argv in services.items()}
    assert set(urls.values()) == {"redis://redis:6379/0"}, urls
