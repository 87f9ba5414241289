"""The pipeline catalogue: every pipeline any agent has ever served, with its settings.

A stream keeping the last message per subject ``jetrun.pipelines.<key>``. Agents register what
they serve; gateways and the scheduler look pipelines up (cached; a miss asks the stream, so a
pipeline registered a moment ago by another process is found). A pipeline stays known after its
last replica went away: runs for it get ``no_resources_available``, not 404.
"""

from __future__ import annotations

import msgspec
from nats.js import JetStreamContext, api
from nats.js.errors import NotFoundError

from contracts.agents import PipelineInfo
from runtime.eventlog import ensure_stream, retrying
from runtime.streams import CATALOG_STREAM, catalog_config

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(PipelineInfo)


def pipeline_subject(pointer: str) -> str:
    """Pointers are ``user/name:tag`` with ``[A-Za-z0-9_.-]`` parts; '.' would split a subject
    token, so the key escapes it."""
    key = pointer.replace("~", "~~").replace(".", "~d").replace(":", "~c").replace("/", "~s")
    return f"jetrun.pipelines.{key}"


class Catalog:
    def __init__(self, js: JetStreamContext, *, replicas: int = 1) -> None:
        self.js = js
        self.replicas = replicas
        self._known: dict[str, PipelineInfo] = {}

    async def ensure(self) -> None:
        await ensure_stream(self.js, catalog_config(replicas=self.replicas), 120.0)

    async def register(self, info: PipelineInfo) -> None:
        """Record ``info`` (last one wins). Retries through outages."""
        subject = pipeline_subject(info.pointer)
        payload = _encoder.encode(info)

        async def publish() -> api.PubAck:
            return await self.js.publish(subject, payload)

        await retrying(f"register {info.pointer}", publish, 30.0)
        self._known[info.pointer] = info

    async def lookup(self, pointer: str) -> PipelineInfo | None:
        """The pipeline's settings, or None if no agent ever registered it."""
        info = self._known.get(pointer)
        if info is not None:
            return info
        try:
            msg = await self.js.get_last_msg(CATALOG_STREAM, pipeline_subject(pointer))
        except NotFoundError:
            return None
        if msg.data is None:
            return None
        info = _decoder.decode(msg.data)
        self._known[pointer] = info
        return info

    def cached(self, pointer: str) -> PipelineInfo | None:
        """The settings if this process has seen the pipeline; never blocks."""
        return self._known.get(pointer)
