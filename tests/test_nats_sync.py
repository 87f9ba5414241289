"""``jetrun up --nats-sync``: the embedded nats-server's file-store sync interval, named."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from runtime.cli import main
from runtime.infra.eventlog import EventLog
from runtime.infra.natsserver import NatsServer, server_config
from tests.test_eventlog import history

pytestmark = pytest.mark.anyio


def config(sync: str | None) -> str:
    return server_config(name="n", host="127.0.0.1", port=4222, store_dir="/s", sync=sync)


def test_the_sync_interval_is_written_into_the_jetstream_block() -> None:
    assert 'jetstream { store_dir: "/s", sync_interval: always }' in config("always")
    assert "sync_interval: 1s" in config("1s")
    assert "sync_interval" not in config(None)  # nats-server's default (every 2 minutes)


@pytest.mark.parametrize("bad", ["", "soon", "1s }\nlisten: 0.0.0.0:1", "-1s"])
def test_a_bad_sync_interval_is_refused_not_written(bad: str) -> None:
    with pytest.raises(ValueError, match="sync interval"):
        config(bad)


def test_jetrun_up_refuses_a_bad_sync_interval_before_starting_anything(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["up", "--data-dir", str(tmp_path), "--port", "0", "--nats-sync", "soon"]
    )
    assert result.exit_code == 2
    assert "--nats-sync" in result.output and "always" in result.output
    assert not (tmp_path / "nats").exists()


async def test_a_server_that_syncs_every_write_stores_events(tmp_path: Path) -> None:
    server = NatsServer(store_dir=tmp_path / "nats", sync="always")
    async with server:
        assert "sync_interval: always" in server.config_path.read_text()
        nc = await server.connect("admin", "test")
        try:
            log = EventLog(nc)
            await log.ensure()
            for event in history("run_a"):
                await log.append(event)
            assert [s.event for s in await log.read("run_a")] == history("run_a")
        finally:
            await nc.close()
