"""Connecting to NATS the way every jetrun process does: reconnect forever, log, carry on."""

from __future__ import annotations

import logging

import anyio
import nats
import nats.errors
from nats.aio.client import Client

log = logging.getLogger("jetrun.nats")


class NatsUnreachable(Exception):
    """No NATS server answered at first (nothing listens there, or something that is not
    NATS does)."""


async def connect(url: str, name: str, *, first_connect_s: float = 30.0) -> Client:
    """Connect to ``url`` (comma-separated for a cluster); once connected, reconnects by itself
    for ever. Raises ``NatsUnreachable`` if no server answers within ``first_connect_s``."""

    async def on_error(err: Exception) -> None:
        if isinstance(err, nats.errors.Error | OSError | TimeoutError):
            log.debug("%s: nats error: %r", name, err)  # the connection's own weather
        else:  # a subscription callback raised: the message it carried is gone
            log.error("%s: a NATS callback raised", name, exc_info=err)

    async def on_disconnect() -> None:
        log.info("%s: disconnected from NATS", name)

    async def on_reconnect() -> None:
        log.info("%s: reconnected to NATS", name)

    with anyio.move_on_after(first_connect_s):
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
    raise NatsUnreachable(
        f"no NATS server answered at {url} within {first_connect_s:g} s "
        "(nothing listens there, or something that is not NATS)"
    )


async def close(nc: Client, grace_s: float = 5.0) -> None:
    """Close ``nc``, flushing what is pending for at most ``grace_s``. Never raises: NATS may
    be gone, and then there is nothing left to flush to."""
    with anyio.move_on_after(grace_s) as scope:
        try:
            await nc.close()
        except Exception as err:
            log.info("NATS connection closed uncleanly: %r", err)
    if scope.cancelled_caught:
        log.warning("NATS connection not closed cleanly within %g s", grace_s)
