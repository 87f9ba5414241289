"""Connecting to NATS the way every jetrun process does: reconnect forever, log, carry on."""

from __future__ import annotations

import logging
from typing import Any

import anyio
import nats
import nats.errors
from nats.aio.client import Client

from runtime.infra import natsread
from runtime.infra.nats_auth import Credentials

log = logging.getLogger("jetrun.nats")


class NatsUnreachable(Exception):
    """No NATS server answered at first (nothing listens there, or something that is not
    NATS does)."""


class NatsRefused(ConnectionError):
    """The server refused this process's credentials (or their absence)."""


async def connect(
    url: str,
    name: str,
    credentials: Credentials | None = None,
    *,
    first_connect_s: float = 30.0,
) -> Client:
    """Connect to ``url`` (comma-separated for a cluster) as ``credentials`` (its nkey seed,
    per-role inbox and TLS CA; ``None``: anonymous, for a server without authorization); once
    connected, reconnects by itself for ever.

    Raises ``NatsUnreachable`` if no server answers within ``first_connect_s``, ``NatsRefused``
    if the server refuses the credentials, and ``CredentialsError`` if a credential file is
    missing or invalid (its content is never part of a message)."""
    options: dict[str, Any] = {}
    if credentials is not None:
        credentials.check()
        options = credentials.connect_options()
    if await _refused(url, options):
        role = credentials.role if credentials is not None else "anonymous"
        raise NatsRefused(
            f"{name}: NATS refused the {role} credentials (authorization violation): check "
            "the nkey seed file (--nats-seed / $JETRUN_NATS_SEED)"
        )

    async def on_error(err: Exception) -> None:
        if "permissions violation" in str(err).lower():
            log.warning("%s: NATS refused: %s", name, err)  # a subject this role may not use
        elif isinstance(err, nats.errors.Error | OSError | TimeoutError):
            log.debug("%s: nats error: %r", name, err)  # the connection's own weather
        else:  # a subscription callback raised: the message it carried is gone
            log.error("%s: a NATS callback raised", name, exc_info=err)

    async def on_disconnect() -> None:
        log.info("%s: disconnected from NATS", name)

    async def on_reconnect() -> None:
        log.info("%s: reconnected to NATS", name)

    nc = Client()
    natsread.install(nc)  # messages parsed where they arrive
    with anyio.move_on_after(first_connect_s):
        await nc.connect(
            servers=url.split(","),
            name=name,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.25,  # type: ignore[arg-type]  # nats-py takes a float
            connect_timeout=2,
            allow_reconnect=True,
            error_cb=on_error,
            disconnected_cb=on_disconnect,
            reconnected_cb=on_reconnect,
            pending_size=16 * 1024 * 1024,
            **options,
        )
        return nc
    raise NatsUnreachable(
        f"no NATS server answered at {url} within {first_connect_s:g} s "
        "(nothing listens there, or something that is not NATS)"
    )


async def _refused(url: str, options: dict[str, Any]) -> bool:
    """One connection attempt: True if the server refused the credentials (a client that
    keeps retrying would hang on them for ever). Unreachable servers are not a refusal."""

    async def quiet(err: Exception) -> None:
        pass

    probe = Client()
    try:
        with anyio.fail_after(5):
            await probe.connect(
                servers=url.split(","),
                allow_reconnect=False,
                max_reconnect_attempts=0,
                connect_timeout=2,
                error_cb=quiet,
                **options,
            )
    except Exception as err:
        # nats-py's close after a failed TLS handshake (a plaintext server, a certificate
        # the CA did not sign) waits for a transport that never closes: bound it
        with anyio.move_on_after(1):
            await probe.close()
        return "authorization violation" in str(err).lower()
    await probe.close()
    return False


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
