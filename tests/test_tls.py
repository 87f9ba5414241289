"""TLS: a TLS-only nats-server (and a TLS cluster) on loopback, with certificates made by
``jetrun certs``; every jetrun process connects through it, and plaintext clients cannot."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import nats
import nats.errors
import pytest
from cryptography import x509
from nats.aio.client import Client

from runtime.infra import certs
from runtime.infra.eventlog import EventLog
from runtime.infra.nats_auth import Credentials
from runtime.infra.nats_conn import NatsUnreachable, connect
from tests.harness import Stack, client, wait_replicas

pytestmark = pytest.mark.anyio
JETRUN = str(Path(sys.executable).parent / "jetrun")
ECHO = {
    "pipeline": "demo/echo:v1",
    "inputs": [{"type": "string", "value": "over tls"}, {"type": "integer", "value": 2}],
}


@pytest.fixture(scope="module")
def anyio_backend() -> tuple[str, dict[str, bool]]:
    return ("asyncio", {"use_uvloop": True})


@pytest.fixture(scope="module")
async def tls_stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    async with Stack(tmp_path_factory.mktemp("tls"), tls=True) as stack:
        await stack.start_nats()
        stack.start_scheduler()
        await stack.start_gateway()
        stack.start_agent("agent-tls", "runtime.node.demo", slots=2)
        await wait_replicas(stack.url, "tok_big", "demo/echo:v1")
        yield stack


async def test_every_process_runs_over_tls_only(tls_stack: Stack) -> None:
    async with client(tls_stack, "tok_acme") as c:
        done = await c.post("/v4/runs", json=ECHO)
    assert done.status_code == 200, done.text
    assert done.json()["state"] == "completed"
    assert done.json()["outputs"][0]["value"] == "over tls" * 2
    config = tls_stack.nats.config_path.read_text() if tls_stack.nats else ""
    assert "tls {" in config and "cert_file" in config
    nc = await tls_stack.connect()
    try:
        kinds = [s.event.kind for s in await EventLog(nc).read(done.json()["id"])]
        assert kinds[0] == "submitted" and kinds[-1] == "completed"
    finally:
        await nc.close()


async def test_plaintext_and_unverified_clients_cannot_connect(
    tls_stack: Stack, tmp_path: Path
) -> None:
    assert tls_stack.nats is not None
    seed = tls_stack.credentials("admin").seed_file
    plain = Client()  # no CA: the client cannot verify the server, so never connects
    with pytest.raises((nats.errors.Error, OSError, TimeoutError)), anyio.fail_after(10):
        await plain.connect(
            tls_stack.nats_url, nkeys_seed=str(seed), allow_reconnect=False, connect_timeout=2
        )
    assert not plain.is_connected  # (no close(): nats-py's close after a refused TLS handshake
    # waits for a reader task that was never started)
    # a client that trusts another CA refuses the server's certificate
    other = certs.create(tmp_path / "other", ["127.0.0.1"])
    wrong = Credentials(role="admin", seed_file=seed, ca_file=other.ca_file)
    with pytest.raises(NatsUnreachable), anyio.fail_after(20):
        await connect(tls_stack.nats_url, "untrusting", wrong, first_connect_s=3)


def test_jetrun_certs_makes_a_ca_and_a_certificate_for_every_host(tmp_path: Path) -> None:
    hosts = ["nats-1", "nats-2", "127.0.0.1"]
    argv = [JETRUN, "certs", str(tmp_path / "certs"), *(f"--host={h}" for h in hosts)]
    subprocess.run(argv, check=True, capture_output=True)
    cert = x509.load_pem_x509_certificate((tmp_path / "certs" / "server.pem").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    found = [str(n.value) for n in names]
    assert found == hosts
    assert (tmp_path / "certs" / "server-key.pem").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "certs" / "ca-key.pem").stat().st_mode & 0o777 == 0o600
    ca = x509.load_pem_x509_certificate((tmp_path / "certs" / "ca.pem").read_bytes())
    assert cert.issuer == ca.subject
    cert.verify_directly_issued_by(ca)


@pytest.mark.slow
async def test_a_cluster_routes_over_tls(tmp_path: Path) -> None:
    async with Stack(tmp_path / "stack", tls=True) as stack:
        stack.tmp.mkdir()
        await stack.start_cluster(3)  # the streams at R3 need every route up
        for node in stack.cluster:
            assert "routes" in node.config_text() and node.config_text().count("tls {") == 2
        nc = await stack.connect()
        try:
            info = await nc.jetstream().stream_info("JETRUN_EVENTS")
            assert info.config.num_replicas == 3 and info.cluster is not None
            assert len(info.cluster.replicas or []) == 2
        finally:
            await nc.close()
