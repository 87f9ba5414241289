"""compose.yaml stays consistent with the code: its commands parse as ``jetrun`` commands and
its NATS configs are exactly what ``server_config`` (used by the cluster test) generates."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from runtime.cli import main
from runtime.infra import certs
from runtime.infra.config import load
from runtime.infra.nats_auth import ROLES, authorization_block, generate_keys, mint_agent
from runtime.infra.natsserver import ClusterSpec, ServerTls, find_binary, server_config

ROOT = Path(__file__).resolve().parent.parent
COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
JETRUN = {name: s for name, s in SERVICES.items() if s.get("image") == "jetrun:latest"}
NATS = {name: s for name, s in SERVICES.items() if name.startswith("nats-")}


def parse(argv: list[str]) -> click.Context:
    command = main.get_command(click.Context(main), argv[0])
    if command is None:
        raise click.UsageError(f"no such command: jetrun {argv[0]}")
    return command.make_context(argv[0], list(argv[1:]))


def test_topology_has_three_nats_nodes_gateways_a_scheduler_and_agents() -> None:
    assert sorted(NATS) == ["nats-1", "nats-2", "nats-3"]
    commands = sorted(s["command"][0] for s in JETRUN.values())
    assert commands == ["agent", "agent", "gateway", "gateway", "scheduler", "setup"]


def on_host(service: dict[str, Any], argv: list[str]) -> list[str]:
    """The command with mounted container paths replaced by the files they mount."""
    mounts = {}
    for volume in service.get("volumes", []):
        host, container = volume.split(":")[:2]
        mounts[container] = str(ROOT / host)
    return [mounts.get(arg, arg) for arg in argv]


@pytest.mark.parametrize("name", sorted(JETRUN))
def test_every_service_command_parses_as_a_jetrun_command(name: str) -> None:
    ctx = parse(on_host(JETRUN[name], JETRUN[name]["command"]))
    if ctx.params.get("config_path"):
        load(ctx.params["config_path"])  # the mounted config is valid
    assert ctx.params["replicas"] == 3  # streams replicated on the 3-node cluster


def test_a_wrong_command_would_be_caught() -> None:
    with pytest.raises(click.UsageError):
        parse(["gateway", "--no-such-option"])
    with pytest.raises(click.UsageError):
        parse(["gatewy"])


def test_services_reach_every_nats_node() -> None:
    for service in JETRUN.values():
        urls = service["environment"]["JETRUN_NATS"].split(",")
        assert urls == [f"nats://{n}:4222" for n in sorted(NATS)]


ROLE_OF = {"setup": "admin", "gateway": "gateway", "scheduler": "scheduler"}


@pytest.mark.parametrize("name", sorted(JETRUN))
def test_each_service_gets_only_its_own_seed_and_the_ca(name: str) -> None:
    """Roles: their role's seed; agents: a seed of their own, minted for their --id (by
    ``jetrun keys deploy/secrets --agent ID``)."""
    service = JETRUN[name]
    command = service["command"]
    if command[0] == "agent":
        agent_id = command[command.index("--id") + 1]
        assert agent_id == name
        secret, path = f"{agent_id}.nk", f"./deploy/secrets/agents/{agent_id}.nk"
    else:
        role = ROLE_OF[command[0]]
        assert role in ROLES
        secret, path = f"{role}.nk", f"./deploy/secrets/{role}.nk"
    assert service["secrets"] == [secret]
    assert service["environment"]["JETRUN_NATS_SEED"] == f"/run/secrets/{secret}"
    assert COMPOSE["secrets"][secret] == {"file": path}
    ca = service["environment"]["JETRUN_NATS_CA"]
    assert any(v.split(":")[1] == ca for v in service["volumes"])


@pytest.mark.parametrize("name", ["nats-1", "nats-2", "nats-3"])
def test_nats_configs_are_the_generated_ones(name: str) -> None:
    mounted = NATS[name]["volumes"][0].split(":")[0]
    routes = [f"nats-route://{n}:6222" for n in sorted(NATS)]
    expected = server_config(
        name=name,
        host="0.0.0.0",
        port=4222,
        store_dir="/data/jetstream",
        cluster=ClusterSpec(name="jetrun", port=6222, routes=routes),
        auth_include="auth.conf",  # beside nats.conf (includes are relative to it)
        tls=ServerTls(  # jetrun certs deploy/certs --host nats-1 --host nats-2 --host nats-3
            cert_file="/etc/nats/certs/server.pem",
            key_file="/etc/nats/certs/server-key.pem",
            ca_file="/etc/nats/certs/ca.pem",
        ),
    )
    assert (ROOT / mounted).read_text() == expected
    mounts = {v.split(":")[1]: v.split(":")[0] for v in NATS[name]["volumes"]}
    assert mounts["/etc/nats/auth.conf"] == "./deploy/secrets/auth.conf"
    assert mounts["/etc/nats/certs"] == "./deploy/certs"


def test_a_nats_server_accepts_the_config_with_keys_and_certificates_made_as_documented(
    tmp_path: Path,
) -> None:
    """What compose mounts, made by `jetrun keys` and `jetrun certs`, in a copy of nats-1's
    config whose container paths point at them: nats-server checks it (``-t``)."""
    for agent_id in ("agent-gpu-1", "agent-gpu-2"):  # jetrun keys DIR --agent ...
        mint_agent(tmp_path / "secrets", agent_id)
    public = generate_keys(tmp_path / "secrets")
    assert "agent:agent-gpu-2" in public
    (tmp_path / "auth.conf").write_text(authorization_block(public))  # beside the config
    made = certs.create(tmp_path / "certs", ["nats-1", "nats-2", "nats-3"])
    text = (ROOT / "deploy" / "nats" / "nats-1.conf").read_text()
    text = text.replace("/etc/nats/certs", str(made.ca_file.parent))
    text = text.replace("/data/jetstream", str(tmp_path / "js")).replace("0.0.0.0", "127.0.0.1")
    (tmp_path / "nats.conf").write_text(text)
    check = subprocess.run(
        [find_binary(), "-c", str(tmp_path / "nats.conf"), "-t"],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert check.returncode == 0, check.stderr.decode()
    assert 'include "auth.conf"' in text and text.count("tls {") == 2
