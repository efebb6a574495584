"""`nitsum sim` / `nitsum plan explain` through the argparse wiring the `nitsum` command uses."""

from __future__ import annotations

import argparse
import json

import pytest

import router.cli as cli


def run(argv: list[str]) -> int:
    return cli.main(argv)


def test_sim_json_final_line_has_every_policy(make_trace, capsys, tmp_path) -> None:  # type: ignore[no-untyped-def]
    code = make_trace("code", 200, 4.0, (500, 3000), (5, 30))
    conv = make_trace("conv", 200, 4.0, (200, 1500), (20, 200), seed=2)
    png = tmp_path / "sweep.png"
    rc = run(["sim", "--trace", f"{code},{conv}", "--sweep", "0.5,1", "--json", "--plot", str(png),
              "--policy", "nitsum,static-colocated,priority-only"])
    out = capsys.readouterr()
    assert rc == 0 and png.stat().st_size > 0
    doc = json.loads(out.out.strip().splitlines()[-1])
    assert [p["rate_scale"] for p in doc["loads"]] == [0.5, 1.0]
    pols = doc["loads"][0]["policies"]
    assert set(pols) == {"nitsum", "static-colocated", "priority-only"}
    assert all(0 <= p["slo_attainment"] <= 1 and p["goodput"] >= 0 for p in pols.values())
    assert "static-colocated tp8" in doc["loads"][1]["variants"]
    assert "| policy |" in out.out and "%" in out.err  # README table on stdout, progress on stderr


@pytest.mark.parametrize("argv, message", [
    (["sim", "--trace", "/no/such.csv"], "No such file"),
    (["sim", "--trace", "x.csv", "--policy", "fastest"], "unknown policy"),
    (["sim", "--trace", "x.csv", "--device", "tpu9"], "unknown device"),
    (["plan", "explain", "--load", "gold=1:2:3"], "unknown tier"),
])
def test_user_errors_are_one_line_and_exit_2(argv: list[str], message: str, capsys, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.csv").write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n")
    assert run(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_plan_explain_prints_the_decision(capsys) -> None:  # type: ignore[no-untyped-def]
    assert run(["plan", "explain", "--load", "interactive=4:4000:20"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("switch c2,c2,c2,c2 -> ") and "interactive" in out


def test_register_adds_subcommands_with_func() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    cli.register(sub)
    args = parser.parse_args(["profile", "--model", "m", "--out", "o.json"])
    assert callable(args.func) and args.tp == [1]


def test_sim_tiers_file_sets_the_slos_of_every_policy_and_oracle_prints_bounds(make_trace, capsys, tmp_path) -> None:  # type: ignore[no-untyped-def]
    code = make_trace("code", 60, 2.0, (500, 3000), (5, 30))
    conv = make_trace("conv", 60, 2.0, (200, 1500), (20, 200), seed=2)
    tiers = tmp_path / "tiers.json"
    tiers.write_text(json.dumps({"tiers": [{"name": "interactive", "ttft_s": 5.0, "tpot_s": 0.2},
                                           {"name": "standard", "ttft_s": 10.0, "tpot_s": 0.3},
                                           {"name": "batch", "ttft_s": 60.0, "tpot_s": 1.0}]}))
    rc = run(["sim", "--trace", f"{code},{conv}", "--json", "--tiers", str(tiers), "--oracle", "10",
              "--policy", "static-colocated,vllm-like"])
    out = capsys.readouterr().out
    assert rc == 0
    doc = json.loads(out.strip().splitlines()[-1])
    assert doc["tiers"]["interactive"] == {"ttft_s": 5.0, "tpot_s": 0.2, "weight": 1.0}
    load = doc["loads"][0]
    assert {"static-colocated", "vllm-like", "static-any"} <= set(load["policies"])
    assert load["oracle"][0]["clairvoyant"] >= load["oracle"][0]["best_static_attainment"]
    assert "switching bounds, 10 s segments" in out
