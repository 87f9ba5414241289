"""The pipeline catalogue: every pipeline any agent has ever served, with its settings.

A stream keeping the last message per subject ``jetrun.pipelines.<key>``. Agents register what
they serve; gateways and the scheduler look pipelines up (cached; a miss asks the stream, so a
pipeline registered a moment ago by another process is found). A pipeline stays known after its
last replica went away: runs for it get ``no_resources_available``, not 404.

Settings change when an agent registers a pipeline again (a new timeout, retry count or
accelerator). Inside ``following()`` the cache follows the stream (an ordered consumer from the
last message of every subject on), so a change is seen within a message's delivery; outside it
a cached entry is trusted for ``max_age_s`` at most, then read again.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable

import anyio
import msgspec
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.errors import NotFoundError

from contracts.agents import PipelineInfo
from contracts.names import check_pointer, is_pointer
from runtime.infra.jsretry import retrying
from runtime.infra.streams import CATALOG_STREAM, catalog_config
from runtime.infra.streamsetup import ensure_stream, require_stream

log = logging.getLogger("jetrun.catalog")

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(PipelineInfo)


def pipeline_subject(pointer: str) -> str:
    """Pointers are ``user/name:tag`` with ``[A-Za-z0-9_.-]`` parts; '.' would split a subject
    token, so the key escapes it. Raises ``ValueError`` for anything that is not a pointer, so
    no wildcard (``*``, ``>``) or stray token can reach a subject."""
    check_pointer(pointer)
    key = pointer.replace("~", "~~").replace(".", "~d").replace(":", "~c").replace("/", "~s")
    return f"jetrun.pipelines.{key}"


class Catalog:
    def __init__(
        self,
        js: JetStreamContext,
        *,
        replicas: int = 1,
        max_age_s: float = 5.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.js = js
        self.replicas = replicas
        self.max_age_s = max_age_s
        self.monotonic = monotonic
        self._known: dict[str, tuple[PipelineInfo, float]] = {}  # pointer -> (info, read at)
        self._following = False

    async def ensure(self) -> None:
        await ensure_stream(self.js, catalog_config(replicas=self.replicas), 120.0)

    async def require(self) -> None:
        await require_stream(self.js, CATALOG_STREAM, 120.0)

    async def register(self, info: PipelineInfo) -> None:
        """Record ``info`` (last one wins). Retries through outages."""
        subject = pipeline_subject(info.pointer)
        payload = _encoder.encode(info)

        async def publish() -> api.PubAck:
            return await self.js.publish(subject, payload)

        await retrying(f"register {info.pointer}", publish, 30.0)
        self._remember(info)

    async def lookup(self, pointer: str) -> PipelineInfo | None:
        """The pipeline's settings, or None if no agent ever registered it. Blocks for a read
        of the stream when the cached entry may be stale; raises NATS errors as they come.
        None, without touching NATS, for anything that is not a pointer."""
        if not is_pointer(pointer):
            return None
        known = self.current(pointer)
        if known is not None:
            return known
        try:
            msg = await self.js.get_last_msg(CATALOG_STREAM, pipeline_subject(pointer))
        except NotFoundError:
            return None
        if msg.data is None:
            return None
        info = _decoder.decode(msg.data)
        self._remember(info)
        return info

    def current(self, pointer: str) -> PipelineInfo | None:
        """What ``lookup`` would answer without reading the stream: the cached settings while
        they are current (followed, or younger than ``max_age_s``); None when it must read."""
        entry = self._known.get(pointer)
        if entry is not None and (self._following or self.monotonic() - entry[1] < self.max_age_s):
            return entry[0]
        return None

    def cached(self, pointer: str) -> PipelineInfo | None:
        """The settings if this process has seen the pipeline, however long ago; never
        blocks."""
        entry = self._known.get(pointer)
        return entry[0] if entry is not None else None

    def _remember(self, info: PipelineInfo) -> None:
        self._known[info.pointer] = (info, self.monotonic())

    @contextlib.asynccontextmanager
    async def following(self) -> AsyncIterator[None]:
        """Inside: every registration is applied to the cache as it is stored (the last one of
        each pipeline first), and cached entries do not expire."""

        async def on_msg(msg: Msg) -> None:
            try:
                self._remember(_decoder.decode(msg.data))
            except msgspec.MsgspecError as err:
                log.warning("skipping undecodable catalogue entry on %s: %s", msg.subject, err)

        sub = await self.js.subscribe(
            "jetrun.pipelines.>",
            stream=CATALOG_STREAM,
            cb=on_msg,
            ordered_consumer=True,
            idle_heartbeat=1.0,
            deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT,
        )
        self._following = True
        try:
            yield
        finally:
            self._following = False
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await sub.unsubscribe()  # the connection may be gone

    def entries(self) -> list[PipelineInfo]:
        """Every pipeline this process has seen (all of them while ``following``)."""
        return [info for info, _ in self._known.values()]
