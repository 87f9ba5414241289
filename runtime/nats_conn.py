"""Connecting to NATS the way every jetrun process does: reconnect forever, log, carry on."""

from __future__ import annotations

import logging

import nats
from nats.aio.client import Client

log = logging.getLogger("jetrun.nats")


async def connect(url: str, name: str) -> Client:
    """Connect to ``url`` (comma-separated for a cluster); reconnects by itself for ever.

    Raises ``nats.errors.NoServersError`` if no server answers at first."""

    async def on_error(err: Exception) -> None:
        log.debug("%s: nats error: %r", name, err)

    async def on_disconnect() -> None:
        log.info("%s: disconnected from NATS", name)

    async def on_reconnect() -> None:
        log.info("%s: reconnected to NATS", name)

    return await nats.connect(
        servers=url.split(","),
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.25,
        connect_timeout=2,
        allow_reconnect=True,
        error_cb=on_error,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
        pending_size=16 * 1024 * 1024,
    )
