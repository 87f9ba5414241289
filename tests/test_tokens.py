"""Bearer tokens: stored hashed or plain, compared in constant time, never printed by a config
error, and limited per token (429 rate_limited with Retry-After)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from runtime.control.ratelimit import RateLimiter
from runtime.infra.config import ConfigError, parse, token_digest
from tests.harness import ROOT, Stack

SECRET = "jr_very_secret_token_value"


def test_a_team_may_store_the_hash_of_its_token() -> None:
    config = parse({"teams": {"a": {"tier": "basic", "tokens": [token_digest(SECRET)]}}})
    team = config.team_for_token(SECRET)
    assert team is not None and team.name == "a"
    assert config.team_for_token(token_digest(SECRET)) is None  # the hash is not a token
    assert config.team_for_token(SECRET + "x") is None
    assert SECRET not in repr(config.by_token)  # what is kept is the digest


def test_hashed_admin_tokens_and_plain_ones_mix() -> None:
    data = {
        "teams": {"a": {"tier": "basic", "tokens": ["plain_a", token_digest("hashed_a")]}},
        "admin": {"tokens": [token_digest("root")]},
    }
    config = parse(data)
    assert config.team_for_token("plain_a") == config.team_for_token("hashed_a")
    assert config.is_admin("root") and not config.is_admin("plain_a")


@pytest.mark.parametrize(
    "data",
    [
        {"teams": {"a": {"tier": "basic", "tokens": [SECRET]},
                   "b": {"tier": "basic", "tokens": [SECRET]}}},
        {"teams": {"a": {"tier": "basic", "tokens": [SECRET, token_digest(SECRET)]}}},
        {"teams": {"a": {"tier": "basic", "tokens": [SECRET]}}, "admin": {"tokens": [SECRET]}},
        {"teams": {"a": {"tier": "basic", "tokens": ["sha256:" + SECRET]}}},
    ],
)  # fmt: skip
def test_config_errors_never_print_a_token(data: dict[str, object]) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(data)
    assert SECRET not in str(caught.value) and token_digest(SECRET) not in str(caught.value)


def test_the_bucket_allows_its_burst_then_the_rate() -> None:
    limiter = RateLimiter(rate=2.0, burst=3.0)
    assert [limiter.check("k", 100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.check("k", 100.0) == pytest.approx(0.5)  # one request every 0.5 s
    assert limiter.check("other", 100.0) == 0.0  # buckets are per token
    assert limiter.check("k", 100.5) == 0.0
    assert limiter.check("k", 100.5) > 0
    assert all(RateLimiter(0, 1).check("k", 1.0) == 0.0 for _ in range(100))  # 0: off


def test_hash_token_reads_stdin_and_prints_the_digest() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "runtime.cli", "hash-token"],
        input=SECRET + "\n", capture_output=True, text=True, cwd=ROOT, timeout=60, check=True,
    )  # fmt: skip
    assert done.stdout.strip() == token_digest(SECRET)
    assert SECRET not in done.stdout + done.stderr


@pytest.mark.anyio
async def test_a_token_over_its_rate_gets_429_and_others_go_on(tmp_path: Path) -> None:
    async with Stack(tmp_path / "stack") as stack:
        stack.tmp.mkdir()
        await stack.start_nats()
        with stack.config_path.open("a") as config:  # [settings] is the file's last table
            config.write("rate_limit_per_s = 1\nrate_limit_burst = 3\n")
            config.write(f'\n[teams.hashed]\ntier = "basic"\ntokens = ["{token_digest(SECRET)}"]\n')
        stack.start_scheduler()
        url = await stack.start_gateway()
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:

            async def get(token: str) -> httpx.Response:
                auth = {"Authorization": f"Bearer {token}"}
                return await http.get("/v4/runs/run_missing", headers=auth)

            assert [(await get(SECRET)).status_code for _ in range(3)] == [404, 404, 404]
            limited = await get(SECRET)
            assert limited.status_code == 429
            assert limited.json()["detail"]["code"] == "rate_limited"
            assert int(limited.headers["retry-after"]) >= 1
            assert (await get("tok_acme")).status_code == 404  # another token: its own bucket
            assert (await get(token_digest(SECRET))).status_code == 401  # a hash is no token
