"""``jetrun up --nats-monitor-port``: the embedded nats-server's monitoring endpoints, on
loopback, off unless asked for; what the benchmarks read to count NATS messages per run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from runtime.cli import main
from runtime.infra.eventlog import EventLog
from runtime.infra.natsserver import NatsServer, server_config
from tests.test_eventlog import history

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import nats_traffic

pytestmark = pytest.mark.anyio


def test_monitoring_is_off_unless_a_port_is_given() -> None:
    def config(monitor_port: int | None) -> str:
        return server_config(
            name="n", host="127.0.0.1", port=4222, store_dir="/s", monitor_port=monitor_port
        )

    assert "http" not in config(None)
    assert 'http: "127.0.0.1:8222"' in config(8222)


def test_jetrun_up_refuses_a_monitor_port_out_of_range(tmp_path: Path) -> None:
    argv = ["up", "--data-dir", str(tmp_path), "--port", "0", "--nats-monitor-port", "70000"]
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 2
    assert "--nats-monitor-port" in result.output
    assert not (tmp_path / "nats").exists()


async def test_the_counts_of_each_named_connection_are_read(tmp_path: Path) -> None:
    server = NatsServer(store_dir=tmp_path / "nats", monitor_port=0)
    async with server:
        assert server.monitor_url is not None
        assert server.monitor_url.startswith("http://127.0.0.1:")
        before = nats_traffic.snapshot(server.monitor_url)
        nc = await server.connect("admin", "jetrun-scheduler")  # (may append any kind)
        admin = await server.connect("admin", "jetrun-setup")
        try:
            await EventLog(admin).ensure()
            log = EventLog(nc)
            events = history("run_a")
            for event in events:
                await log.append(event)
            await nc.flush()
            after = nats_traffic.snapshot(server.monitor_url)
        finally:
            await nc.close()
            await admin.close()
    traffic = nats_traffic.per_run(before, after, runs=1)
    scheduler = traffic.groups["scheduler"]
    assert scheduler.sent >= len(events)  # one publish per append (and the connect's own)
    assert scheduler.received >= len(events)  # one acknowledgement per append
    assert traffic.server.sent >= scheduler.sent
    assert any("scheduler" in line for line in traffic.lines())
    assert NatsServer(store_dir=tmp_path / "other").monitor_url is None  # off by default
