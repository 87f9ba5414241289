"""The TOML config: teams, tokens, tiers; bad files name the bad key."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.infra.config import ConfigError, demo_config, load, parse

ROOT = Path(__file__).resolve().parent.parent


def test_the_example_config_loads() -> None:
    config = load(ROOT / "examples" / "jetrun.toml")
    team = config.team_for_token("jr_acme_ci")
    assert team is not None and team.name == "acme" and team.tier == "basic"
    assert config.limit("basic") == 3 and config.limit("pro") == 12
    assert config.limit("startup") is None and config.limit("byoc") is None
    assert config.team_for_token("nope") is None


def test_demo_config_has_the_demo_token() -> None:
    assert demo_config().team_for_token("jr_demo_token") is not None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"tiers": {"basic": 0}}, "tiers.basic"),
        ({"tiers": {"basic": "lots"}}, "tiers.basic"),
        ({"teams": {"a": {"tier": "gold", "tokens": ["t"]}}}, "teams.a.tier"),
        ({"teams": {"a": {"tier": "basic", "tokens": []}}}, "teams.a.tokens"),
        ({"teams": {"a b": {"tier": "basic", "tokens": ["t"]}}}, "teams.a b"),
        (
            {
                "teams": {
                    "a": {"tier": "basic", "tokens": ["t"]},
                    "b": {"tier": "basic", "tokens": ["t"]},
                }
            },
            "teams.b.tokens",
        ),
        ({"settings": {"lookback_s": "long"}}, "settings"),
    ],
)
def test_bad_configs_name_the_key(data: dict, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ConfigError, match=message):
        parse(data)


def test_unreadable_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[teams\n")
    with pytest.raises(ConfigError, match="cannot read config"):
        load(bad)
