"""deploy/docker-compose.yml: parses, runs only real `nitsum` subcommands with flags they accept,
reserves one GPU per slot, and its per-slot settings are exactly what deploy/plan_env.py makes
of the plan in .env.example."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
from typing import Any

import pytest

from .conftest import DEPLOY, env_example, load_compose, nitsum_services, nitsum_subcommands

SLOT_ROLES = ("prefill", "decode")


def test_compose_parses_and_has_every_part(compose: dict[str, Any]) -> None:
    raw = load_compose()
    assert isinstance(raw, dict) and "services" in raw
    services = compose["services"]
    for name in ("redis", "router", "gateway", "prometheus", "grafana"):
        assert name in services, f"docker-compose.yml has no {name} service"
    slots = [n for n in services if n.startswith("slot")]
    assert len(slots) == 8, "one service per GPU slot of an 8-GPU host"


def test_every_nitsum_service_runs_a_real_subcommand_with_valid_flags(compose: dict[str, Any]) -> None:
    subcommands = nitsum_subcommands()
    services = nitsum_services(compose)
    assert {"router", "gateway", "slot0"} <= set(services)
    for name, argv in services.items():
        sub = argv[0]
        assert sub in subcommands, (
            f"compose service {name!r} runs `nitsum {sub}`, which is not a subcommand of `nitsum` "
            f"(services/cli.py build_parser knows: {', '.join(sorted(subcommands)) or 'none'})")
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                args = subcommands[sub].parse_args(argv[1:])
            except SystemExit:
                pytest.fail(f"compose service {name!r}: `nitsum {' '.join(argv)}` is refused: {err.getvalue().strip()}")
        assert callable(getattr(args, "func", None)), f"`nitsum {sub}` has no function to run"


def test_each_slot_reserves_its_own_gpu(compose: dict[str, Any]) -> None:
    seen: dict[str, str] = {}
    for name, svc in compose["services"].items():
        if not name.startswith("slot"):
            continue
        assert svc["command"][0] in SLOT_ROLES, f"{name} runs {svc['command'][0]!r}, not prefill or decode"
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1 and devices[0]["capabilities"] == ["gpu"]
        (gpu,) = devices[0]["device_ids"]
        assert gpu not in seen, f"{name} and {seen.get(gpu)} both reserve GPU {gpu}"
        seen[gpu] = name
        assert "--device" in svc["command"] and svc["command"][svc["command"].index("--device") + 1] == "cuda"


def test_env_example_plan_block_is_what_plan_env_writes() -> None:
    env = env_example()
    for key in ("NITSUM_MODEL_DIR", "NITSUM_GPUS", "NITSUM_PLAN"):
        assert env.get(key), f".env.example must set {key}"
    r = subprocess.run([sys.executable, str(DEPLOY / "plan_env.py"), "--plan", env["NITSUM_PLAN"], "--gpus",
                        env["NITSUM_GPUS"]], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout in (DEPLOY / ".env.example").read_text(), "rerun deploy/plan_env.py for .env.example's plan"


def test_plan_env_refuses_a_bad_plan_with_one_line() -> None:
    r = subprocess.run([sys.executable, str(DEPLOY / "plan_env.py"), "--plan", "p3,d1", "--gpus", "8"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "power of two" in r.stderr


def test_compose_profiles_start_only_the_slots_a_plan_uses(tmp_path: Any) -> None:
    from importlib import util

    spec = util.spec_from_file_location("plan_env", DEPLOY / "plan_env.py")
    assert spec is not None and spec.loader is not None
    plan_env = util.module_from_spec(spec)
    spec.loader.exec_module(plan_env)
    raw = load_compose()["services"]
    for plan, used in (("p1,d1", 2), ("p1,d2", 3), ("p2,d2", 4), ("p2,p2,d4", 8)):
        block = plan_env.render(plan, 8)
        profile = next(line.split("=", 1)[1] for line in block.splitlines() if line.startswith("COMPOSE_PROFILES="))
        started = [k for k in range(8) if not raw[f"slot{k}"].get("profiles") or profile in raw[f"slot{k}"]["profiles"]]
        assert started == list(range(used)), f"plan {plan}: profile {profile} starts slots {started}"
    env = tmp_path / ".env"
    env.write_text("NITSUM_MODEL_DIR=/m\n")
    plan_env.write(env, plan_env.render("p1,d1", 2))
    plan_env.write(env, plan_env.render("p1,d2", 3))  # replaces the block, keeps the rest
    text = env.read_text()
    assert text.startswith("NITSUM_MODEL_DIR=/m\n") and text.count("NITSUM_PLAN=") == 1 and "NITSUM_PLAN=p1,d2" in text
