"""Node providers with real processes: the local provider's agents register on a real NATS and
stop on removal; the command provider runs the operator's commands, one argument per
placeholder."""

from __future__ import annotations

import sys
from pathlib import Path

import anyio
import msgspec
import pytest
from nats.aio.client import Client

from contracts.agents import AgentHeartbeat
from runtime.control.providers import CommandProvider, LocalProvider, seed_env
from runtime.infra.config import demo_config
from runtime.infra.eventlog import LogSettings
from runtime.infra.fleet import HEARTBEAT_SUBJECT
from runtime.infra.lifetime import child_env
from runtime.infra.natsserver import NatsServer
from runtime.provision import provision

pytestmark = pytest.mark.anyio


async def first_beat(nc: Client, node_id: str, timeout: float = 60.0) -> AgentHeartbeat:
    sub = await nc.subscribe(f"{HEARTBEAT_SUBJECT}.{node_id}")
    try:
        msg = await sub.next_msg(timeout=timeout)
        return msgspec.json.decode(msg.data, type=AgentHeartbeat)
    finally:
        await sub.unsubscribe()


async def test_local_provider_starts_an_agent_that_registers_and_stops_it(
    nats_server: NatsServer, nc: Client, tmp_path: Path
) -> None:
    await provision(nc, demo_config(), LogSettings())  # the admin step: the streams exist
    nats_server.add_agent("node-1")  # minted ahead (jetrun keys DIR --agent node-1)
    assert nats_server.credentials_dir is not None
    provider = LocalProvider(
        nats_server.url,
        ["runtime.node.demo"],
        cpu_slots=3,
        heartbeat_s=0.2,
        log_dir=tmp_path,
        node_env=seed_env(nats_server.credentials_dir, child_env()),
    )
    try:
        await provider.add("node-1", "cpu")
        await provider.add("node-1", "cpu")  # idempotent: still one process
        assert provider.running() == ["node-1"]
        beat = await first_beat(nc, "node-1")
        assert beat.slots("cpu") == 3 and "demo/echo:v1" in beat.can_serve
        proc = provider.procs["node-1"]
        await provider.remove("node-1")
        assert proc.returncode is not None and provider.running() == []
        await provider.remove("node-1")  # idempotent
    finally:
        await provider.aclose()
    assert "node-1" in (tmp_path / "node-1.log").read_text()


async def test_local_provider_needs_a_seed_minted_for_the_node(tmp_path: Path) -> None:
    provider = LocalProvider(
        "nats://127.0.0.1:1", ["runtime.node.demo"], node_env=seed_env(tmp_path, {})
    )
    with pytest.raises(RuntimeError, match=r"jetrun keys .* --agent node-2"):
        await provider.add("node-2", "cpu")
    assert provider.running() == []


async def test_local_provider_boot_delay_and_removal_while_booting(tmp_path: Path) -> None:
    provider = LocalProvider("nats://127.0.0.1:1", ["runtime.node.demo"], boot_delay_s=0.5)
    async with anyio.create_task_group() as tg:
        tg.start_soon(provider.add, "node-7", "cpu")
        await anyio.sleep(0.1)
        assert provider.running() == []  # still "booting"
        await provider.remove("node-7")
    assert provider.running() == [] and provider.procs == {}
    await provider.aclose()


def recorder(path: Path) -> list[str]:
    script = "import sys; open(sys.argv[1], 'a').write(' | '.join(sys.argv[2:]) + '\\n')"
    return [sys.executable, "-c", script, str(path)]


async def test_command_provider_runs_commands_with_placeholders_as_single_arguments(
    tmp_path: Path,
) -> None:
    out = tmp_path / "calls.txt"
    provider = CommandProvider(
        add_command=[*recorder(out), "add", "{node_id}", "kind={accelerator}"],
        remove_command=[*recorder(out), "remove", "{node_id}"],
    )
    await provider.add("node-1; rm -rf /", "gpu")
    await provider.add("node-1; rm -rf /", "gpu")  # idempotent: not run twice
    await provider.remove("node-1; rm -rf /")
    assert out.read_text().splitlines() == [
        "add | node-1; rm -rf / | kind=gpu",
        "remove | node-1; rm -rf /",
    ]


async def test_command_provider_failure_raises_with_output() -> None:
    failing = [sys.executable, "-c", "import sys; print('quota exceeded'); sys.exit(2)"]
    provider = CommandProvider(add_command=failing, remove_command=failing, timeout_s=30)
    with pytest.raises(RuntimeError, match="exited 2: quota exceeded"):
        await provider.add("node-1", "cpu")
    assert provider.added == set()


async def test_command_provider_string_template_is_split_without_a_shell(tmp_path: Path) -> None:
    out = tmp_path / "calls.txt"
    template = " ".join([*recorder(out)[:1], "-c", repr(recorder(out)[2]), str(out)])
    provider = CommandProvider(add_command=f'{template} "{{node_id}}"', remove_command="true")
    await provider.add("a b", "cpu")
    assert out.read_text().splitlines() == ["a b"]


async def test_local_provider_lists_what_its_agents_serve_without_importing_it_here() -> None:
    from runtime.node import pipelines
    from tests.harness import FIXTURES

    provider = LocalProvider("nats://127.0.0.1:1", [str(FIXTURES / "deploy_only.py")])
    assert await provider.provides() == frozenset({"demo/elsewhere:v1"})
    assert all(s.pointer != "demo/elsewhere:v1" for s in pipelines.registered())
    broken = LocalProvider("nats://127.0.0.1:1", ["no_such_module_anywhere"])
    assert await broken.provides() == frozenset()


async def test_deploy_of_a_module_that_does_not_load_fails_with_its_error(tmp_path: Path) -> None:
    from runtime.control.providers import list_pipelines

    bad = tmp_path / "bad_pipelines.py"
    bad.write_text("raise RuntimeError('no such model')\n")
    with pytest.raises(RuntimeError, match="no such model"):
        await list_pipelines([str(bad)])
