"""Connecting to something that is not NATS fails in bounded time with a clear error."""

from __future__ import annotations

import socket
import time

import pytest

from runtime.infra.nats_conn import NatsUnreachable, connect

pytestmark = pytest.mark.anyio


async def test_a_listener_that_is_not_nats_fails_the_first_connect() -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"nats://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(NatsUnreachable, match="no NATS server answered at"):
            await connect(url, "test", first_connect_s=1.0)
    assert time.monotonic() - started < 10
