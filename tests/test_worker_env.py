"""Tenant code holds no keys: a worker gets an allow-listed environment, never the agent's NATS
address, credentials or jetrun's settings. A hostile pipeline looks everywhere it can (its
environment, its own /proc entries, files under the stack's dirs) and reports what it found."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from runtime.worker_env import check_declared, worker_env
from tests.harness import FIXTURES, Stack, client, wait_replicas

HOSTILE = str(FIXTURES / "hostile_pipelines.py")
SECRETS = {
    "NATS_TOKEN": "s3cret",
    "AWS_SECRET_ACCESS_KEY": "k3y",
    "JETRUN_TOKEN": "jr_x",
    "JETRUN_NATS": "nats://127.0.0.1:4222",
    "NATS_URL": "nats://127.0.0.1:4222",
}


def test_the_environment_is_an_allow_list_plus_what_is_declared() -> None:
    parent = {
        "PATH": "/usr/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C",
        "CUDA_VISIBLE_DEVICES": "0",
        "JETRUN_NATS_SEED": "/etc/jetrun/agent.nk",
        "HF_HOME": "/models",
        **SECRETS,
    }
    env = worker_env(
        parent,
        declared={"MODEL_SIZE": "7b", "JETRUN_NATS": "stolen"},
        passed=["HF_HOME", "NATS_TOKEN"],
        package_root="/opt/jetrun",
        home="/home/worker",
    )
    assert env == {
        "PATH": "/usr/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C",
        "CUDA_VISIBLE_DEVICES": "0",
        "HF_HOME": "/models",  # the operator passed it
        "MODEL_SIZE": "7b",  # declared
        "HOME": "/home/worker",
        "PYTHONPATH": "/opt/jetrun",
    }


def test_jetrun_and_nats_variables_can_never_be_declared() -> None:
    for name in ("JETRUN_NATS_SEED", "NATS_URL", "nats_creds"):
        with pytest.raises(ValueError, match="reserved"):
            check_declared({name: "x"})
    with pytest.raises(ValueError, match="not a valid"):
        check_declared({"A=B": "x"})


@pytest.fixture
async def hostile_stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Stack]:
    async with Stack(tmp_path / "stack") as stack:
        stack.tmp.mkdir()
        await stack.start_nats()
        stack.start_scheduler()
        await stack.start_gateway()
        for name, value in SECRETS.items():  # what an operator's agent environment may hold
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("JETRUN_WORKER_ENV", "HF_HOME,NATS_TOKEN")  # NATS_*: never passed
        monkeypatch.setenv("HF_HOME", "/models")
        stack.start_agent("hostile", HOSTILE, slots=1)
        yield stack


@pytest.mark.anyio
async def test_a_hostile_pipeline_finds_no_credentials(hostile_stack: Stack) -> None:
    await wait_replicas(hostile_stack.url, "tok_big", "test/snoop:v1")
    roots = json.dumps([str(hostile_stack.tmp), os.getcwd()])
    body = {"pipeline": "test/snoop:v1", "inputs": [{"type": "string", "value": roots}]}
    async with client(hostile_stack, "tok_big") as c:
        done = await c.post("/v4/runs", json=body)
    assert done.status_code == 200 and done.json()["state"] == "completed", done.text
    findings = json.loads(done.json()["outputs"][0]["value"])
    own = [f for f in findings if f.startswith(("env ", "/proc/self/"))]
    assert own == [], findings


@pytest.mark.anyio
async def test_the_agents_seed_is_its_owners_only(hostile_stack: Stack) -> None:
    """What a worker under another OS user cannot read (docs/security.md): the agent's seed
    file is mode 0600 and owned by the user the agent runs as, its directory 0700."""
    seed = hostile_stack.credentials("agent").seed_file
    assert seed is not None and seed.is_file()
    assert seed.stat().st_mode & 0o777 == 0o600
    assert seed.parent.stat().st_mode & 0o777 == 0o700
    assert seed.stat().st_uid == os.getuid()
