"""Tenant code holds no keys: a worker gets an allow-listed environment, never the agent's NATS
address, credentials or jetrun's settings. A hostile pipeline looks everywhere it can (its
environment, its own /proc entries, files under the stack's dirs) and reports what it found."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from runtime.infra.nats_auth import agent_role
from runtime.node.pipelines import pipeline
from runtime.node.worker_env import check_declared, worker_env
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
async def test_a_pipeline_gets_the_variables_it_declares_and_still_no_credentials(
    hostile_stack: Stack,
) -> None:
    """``@pipeline(env=...)`` reaches its workers, over what the operator passed; jetrun's and
    NATS variables still do not."""
    await wait_replicas(hostile_stack.url, "tok_big", "test/declared:v1")
    names = json.dumps(["MODEL_SIZE", "HF_HOME", "NATS_TOKEN", "JETRUN_NATS", "NATS_URL"])
    body = {"pipeline": "test/declared:v1", "inputs": [{"type": "string", "value": names}]}
    async with client(hostile_stack, "tok_big") as c:
        done = await c.post("/v4/runs", json=body)
    assert done.status_code == 200 and done.json()["state"] == "completed", done.text
    seen = json.loads(done.json()["outputs"][0]["value"])
    assert seen == {
        "MODEL_SIZE": "7b",
        "HF_HOME": "/declared",  # the pipeline's value wins over the operator's /models
        "NATS_TOKEN": None,
        "JETRUN_NATS": None,
        "NATS_URL": None,
    }


def test_a_pipeline_declaring_reserved_variables_is_refused_when_defined() -> None:
    for name in ("JETRUN_NATS", "NATS_URL", "CUDA_VISIBLE_DEVICES", "HOME"):
        with pytest.raises(ValueError, match=name):
            pipeline("test/greedy:v1", env={name: "x"})(lambda: None)
    with pytest.raises(ValueError, match="string"):
        pipeline("test/greedy:v1", env={"N": 1})(lambda: None)  # type: ignore[dict-item]


@pytest.mark.anyio
async def test_the_agents_seed_is_its_owners_only(hostile_stack: Stack) -> None:
    """What a worker under another OS user cannot read (docs/security.md): the agent's seed
    file is mode 0600 and owned by the user the agent runs as, its directory 0700."""
    seed = hostile_stack.credentials(agent_role("hostile")).seed_file
    assert seed is not None and seed.is_file()
    assert seed.stat().st_mode & 0o777 == 0o600
    assert seed.parent.stat().st_mode & 0o777 == 0o700
    assert seed.stat().st_uid == os.getuid()


SYSTEM_PYTHON = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"


def _why_workers_cannot_run_as_nobody() -> str | None:
    """Why this machine cannot run a worker as another user (None: it can)."""
    if os.geteuid() != 0:
        return "switching a worker's user needs root"
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        return "no user 'nobody'"
    if not os.path.exists(SYSTEM_PYTHON):
        return f"{SYSTEM_PYTHON} (an interpreter 'nobody' can run) is missing"
    probe = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import msgspec, anyio"],
        user="nobody",
        env={"PYTHONPATH": sysconfig.get_path("purelib")},
        capture_output=True,
        timeout=30,
        check=False,
    )
    return None if probe.returncode == 0 else "'nobody' cannot import this venv's packages"


@pytest.fixture
async def other_user_stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Stack]:
    reason = _why_workers_cannot_run_as_nobody()
    if reason is not None:
        pytest.skip(reason)
    async with Stack(tmp_path / "stack") as stack:
        stack.tmp.mkdir()
        await stack.start_nats()
        stack.start_scheduler()
        await stack.start_gateway()
        # the system interpreter with this venv's packages, somewhere 'nobody' can read
        bin_dir = Path(tempfile.mkdtemp(prefix="jetrun-worker-python-"))
        python = bin_dir / "python"
        site = sysconfig.get_path("purelib")
        python.write_text(f'#!/bin/sh\nPYTHONPATH="$PYTHONPATH:{site}" exec {SYSTEM_PYTHON} "$@"\n')
        python.chmod(0o755)
        bin_dir.chmod(0o755)
        monkeypatch.setenv("JETRUN_WORKER_USER", "nobody")
        monkeypatch.setenv("JETRUN_WORKER_PYTHON", str(python))
        stack.start_agent("hostile-other-user", HOSTILE, slots=1)
        try:
            yield stack
        finally:
            shutil.rmtree(bin_dir, ignore_errors=True)


@pytest.mark.anyio
async def test_a_worker_under_its_own_user_cannot_read_the_agents_credentials(
    other_user_stack: Stack,
) -> None:
    """The operator step docs/security.md asks for: workers as another OS user. The hostile
    pipeline then finds nothing anywhere it looks: not the agent's seed (named on the agent's
    command line, mode 0600), not the agent's /proc environ, not the stack's files."""
    stack = other_user_stack
    await wait_replicas(stack.url, "tok_big", "test/snoop:v1")
    roots = json.dumps([str(stack.tmp)])  # the stack's files: seeds, configs, logs
    body = {"pipeline": "test/snoop:v1", "inputs": [{"type": "string", "value": roots}]}
    async with client(stack, "tok_big") as c:
        done = await c.post("/v4/runs", json=body)
    assert done.status_code == 200 and done.json()["state"] == "completed", done.text
    assert json.loads(done.json()["outputs"][0]["value"]) == []
