"""``free_port`` picks below the OS's range for outgoing connections, whose ports any
process's next ``connect`` may take before the port is bound (a test's agent then could not
serve its /metrics: "Address already in use")."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from runtime.infra import natsserver
from runtime.infra.natsserver import free_port


def test_a_free_port_is_below_the_ephemeral_range_and_can_be_bound() -> None:
    low = natsserver._ephemeral_low()
    for _ in range(20):
        port = free_port()
        assert 1024 <= port < low
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", port))


def test_without_room_below_the_range_any_free_port_is_taken(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake = tmp_path / "ip_local_port_range"
    fake.write_text("1500\t60999\n")
    monkeypatch.setattr(natsserver, "EPHEMERAL_PORTS", fake)
    assert natsserver._ephemeral_low() == 1500
    assert 0 < free_port() < 65536
    fake.write_text("garbage")
    assert natsserver._ephemeral_low() == 32768
