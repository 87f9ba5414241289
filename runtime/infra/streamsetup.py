"""Making sure streams exist: the admin step creates (or raises the replicas of) a stream,
a service only waits, bounded, until it is there."""

from __future__ import annotations

import logging
import time
from typing import Any, Protocol

import anyio
from nats.js import api
from nats.js.errors import NotFoundError

from runtime.infra import streams
from runtime.infra.jsretry import retrying

log = logging.getLogger("jetrun.streamsetup")


async def ensure_stream(js: Any, config: api.StreamConfig, deadline_s: float = 30.0) -> None:
    """Create ``config``'s stream if it is missing. An existing stream keeps its settings; its
    replicas are only ever raised (``streams.reconcile``). Idempotent, retries outages."""

    async def attempt() -> None:
        try:
            info = await js.stream_info(config.name)
        except NotFoundError:
            await js.add_stream(config)
            return
        streams.warn_differences(info.config, config)
        update = streams.reconcile(info.config, config)
        if update is not None:
            log.info("stream %s: raising replicas to %s", config.name, update.num_replicas)
            await js.update_stream(update)

    await retrying(f"ensure stream {config.name}", attempt, deadline_s)


class StreamMissing(RuntimeError):
    """A stream that only the admin role may create does not exist."""


async def require_stream(js: Any, name: str, deadline_s: float = 30.0) -> None:
    """Wait (bounded by ``deadline_s``) until stream ``name`` exists; services never create or
    change streams. Raises ``StreamMissing`` naming the step that creates it."""
    deadline = time.monotonic() + deadline_s
    logged = False
    while True:
        try:
            await retrying(f"stream info {name}", lambda: js.stream_info(name), deadline_s)
            return
        except NotFoundError:
            if time.monotonic() >= deadline:
                raise StreamMissing(
                    f"stream {name} does not exist: run `jetrun setup` with the admin "
                    "credentials first"
                ) from None
            if not logged:
                log.warning("waiting for stream %s: `jetrun setup` creates it", name)
                logged = True
            await anyio.sleep(0.2)


class Ensurable(Protocol):
    async def ensure(self) -> None: ...

    async def require(self) -> None: ...


async def ensure_all(*parts: Ensurable) -> None:
    """Create or update every part's streams at once (on a cluster each new replicated stream
    waits for its leader election, so doing them one by one adds up)."""
    async with anyio.create_task_group() as tg:
        for part in parts:
            tg.start_soon(part.ensure)


async def require_all(*parts: Ensurable) -> None:
    """Wait until every part's streams exist (created by the admin step, ``jetrun setup``)."""
    async with anyio.create_task_group() as tg:
        for part in parts:
            tg.start_soon(part.require)
