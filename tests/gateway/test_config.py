"""The tiers file: defaults, JSON and TOML, and errors that say what to change."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from services.config import NodeConfig, RedisSettings, TierPolicy
from services.gateway.resolve import resolve_tier
from services.tiers import DEFAULT_TIERS


def test_defaults_serve_the_default_tiers_and_openai_names() -> None:
    p = TierPolicy.load(None)
    assert p.tiers == DEFAULT_TIERS and p.default_tier == "standard"
    assert resolve_tier(p, None, None, "priority") == "interactive"
    assert resolve_tier(p, None, None, "auto") == "standard"
    assert resolve_tier(p, None, None, "flex") == "batch"
    assert resolve_tier(p, "Bearer anything", None, None) == "standard"  # no keys configured: any key


def test_toml_tiers_file(tmp_path: Path) -> None:
    path = tmp_path / "tiers.toml"
    path.write_text('default_tier = "gold"\n[[tiers]]\nname = "gold"\nttft_s = 0.2\ntpot_s = 0.02\n'
                    '[[tiers]]\nname = "bulk"\nttft_s = 60\ntpot_s = 1\nqueue_limit = 5\n'
                    '[service_tiers]\npriority = "gold"\nflex = "bulk"\n'
                    '[api_keys.sk-1]\ntiers = ["bulk"]\n')
    p = TierPolicy.load(path)
    assert p.names == ("gold", "bulk") and p.tier("bulk").queue_limit == 5
    assert resolve_tier(p, "Bearer sk-1", None, None) == "bulk"  # the key's only tier is its default


@pytest.mark.parametrize("doc, words", [
    ('{"default_tier": "nope"}', "default_tier"),
    ('{"api_keys": {"sk": {"tiers": ["platinum"]}}}', "platinum"),
    ('{"service_tiers": {"priority": "gold"}}', "gold"),
    ('{"tiers": [{"name": "a", "ttft_s": -1, "tpot_s": 1}]}', "ttft_s"),
    ("{not json", "not valid JSON"),
])
def test_bad_tiers_files_say_what_is_wrong(tmp_path: Path, doc: str, words: str) -> None:
    path = tmp_path / "tiers.json"
    path.write_text(doc)
    with pytest.raises((ValueError, ValidationError)) as e:
        TierPolicy.load(path)
    assert words in str(e.value)


def test_node_config_checks_the_group_shape() -> None:
    redis = RedisSettings(url="redis://127.0.0.1:1")
    with pytest.raises(ValidationError, match="rank 2 is outside"):
        NodeConfig(role="decode", model=Path("m"), group_id="d0", rank=2, tp=2, dist_addr="h:1", redis=redis)
    with pytest.raises(ValidationError, match="dist-addr"):
        NodeConfig(role="decode", model=Path("m"), group_id="d0", tp=2, redis=redis)
    c = NodeConfig(role="prefill", model=Path("m"), group_id="p0", rank=1, tp=2, dist_addr="h:1", redis=redis)
    assert not c.is_leader and c.dist_prefix == "epoch0/group-p0/"
