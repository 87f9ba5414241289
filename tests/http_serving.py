"""An ASGI app served on loopback by a real uvicorn server with the gateway's HTTP protocol,
for the tests of that protocol; and a transport that records what goes through it."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import anyio
import uvicorn


class Recorded:
    """A transport that records what is written through it."""

    def __init__(self, transport: asyncio.Transport, writes: list[bytes]) -> None:
        self._transport, self._writes = transport, writes

    def write(self, data: bytes) -> None:
        self._writes.append(bytes(data))
        self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def recording(protocol: type[asyncio.Protocol], writes: list[bytes]) -> type[asyncio.Protocol]:
    """``protocol`` with every write of its connections appended to ``writes``."""

    class Protocol(protocol):  # type: ignore[misc,valid-type]
        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(Recorded(transport, writes))

    return Protocol


@contextlib.asynccontextmanager
async def serving(app: Any, protocol: type[asyncio.Protocol], **config: Any) -> AsyncIterator[int]:
    """``app`` served by ``protocol`` (and uvicorn ``config``) on a free loopback port, as
    ``jetrun`` serves its gateway: yields the port; the server stops on the way out, also when
    the test failed."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            lifespan="off",
            log_config=None,
            loop="none",
            http=protocol,
            log_level="critical",
            **config,
        )
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve, [sock])
        with anyio.fail_after(10):
            while not server.started:
                await anyio.sleep(0.01)
        try:
            yield sock.getsockname()[1]
        finally:
            server.should_exit = True
