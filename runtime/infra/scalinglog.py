"""The scaling log: every scaling decision and observation, one stream, one subject per pipeline.

Subjects are ``jetrun.scaling.<pipeline key>.<kind>`` (``_node`` for node-only events), so one
pipeline's history is ``jetrun.scaling.<key>.>`` and agents follow only
``jetrun.scaling.*.replica_load`` / ``replica_unload``. Appends carry ``Nats-Msg-Id`` =
``event.message_id()``: a retried append is stored once.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable

import msgspec
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext, api

from contracts.scaling import (
    AnyScalingEvent,
    NodeReleased,
    NodeRequested,
    ScalingEvent,
    decode_scaling,
    encode_scaling,
)
from runtime.infra.catalog import pipeline_subject
from runtime.infra.jsretry import retrying
from runtime.infra.streams import SCALING_PREFIX, SCALING_STREAM, scaling_config
from runtime.infra.streamsetup import ensure_stream, require_stream

log = logging.getLogger("jetrun.scalinglog")

ScalingHandler = Callable[[int, AnyScalingEvent], Awaitable[None]]


def scaling_key(pipeline: str) -> str:
    if not pipeline:
        return "_node"
    return pipeline_subject(pipeline).removeprefix("jetrun.pipelines.")


def scaling_subject(event: ScalingEvent) -> str:
    return f"{SCALING_PREFIX}.{scaling_key(event.pipeline)}.{event.kind}"


def kind_filter(kind: str) -> str:
    return f"{SCALING_PREFIX}.*.{kind}"


class ScalingLog:
    def __init__(
        self,
        js: JetStreamContext,
        *,
        replicas: int = 1,
        max_age_s: float = 30 * 86_400.0,
        append_deadline_s: float = 30.0,
    ) -> None:
        self.js = js
        self.replicas = replicas
        self.max_age_s = max_age_s
        self.append_deadline_s = append_deadline_s

    async def ensure(self) -> None:
        await ensure_stream(
            self.js, scaling_config(replicas=self.replicas, max_age_s=self.max_age_s), 120.0
        )

    async def require(self) -> None:
        """Wait until the stream exists (``jetrun setup`` creates it)."""
        await require_stream(self.js, SCALING_STREAM, 120.0)

    async def append(self, event: ScalingEvent) -> int:
        """Store ``event``; returns its sequence. Retries outages, then raises."""
        subject, payload = scaling_subject(event), encode_scaling(event)
        headers = {"Nats-Msg-Id": event.message_id()}

        async def publish() -> api.PubAck:
            return await self.js.publish(subject, payload, headers=headers)

        ack = await retrying(f"append {subject}", publish, self.append_deadline_s)
        return int(ack.seq)

    async def last_seq(self) -> int:
        info = await self.js.stream_info(SCALING_STREAM)
        return int(info.state.last_seq)

    async def tail(
        self, handler: ScalingHandler, *, from_seq: int = 1, kinds: list[str] | None = None
    ) -> Subscription:
        """Call ``handler(seq, event)`` for each event from ``from_seq`` on, in order (an
        ordered consumer, recreated after a reconnect: a sequence may repeat). Undecodable
        messages are logged and skipped."""

        async def on_msg(msg: Msg) -> None:
            event = _decode(msg)
            if event is not None:
                await handler(msg.metadata.sequence.stream, event)

        subjects = [kind_filter(k) for k in kinds] if kinds else [f"{SCALING_PREFIX}.>"]
        config = api.ConsumerConfig(opt_start_seq=max(from_seq, 1), filter_subjects=subjects)
        return await self.js.subscribe(
            subjects[0],
            stream=SCALING_STREAM,
            cb=on_msg,
            ordered_consumer=True,
            idle_heartbeat=1.0,
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
            config=config,
        )

    async def history(self, pipeline: str, limit: int = 1000) -> list[AnyScalingEvent]:
        """The last ``limit`` scaling events of ``pipeline``, oldest first, with the releases
        of the nodes that were requested for it."""
        own = await self._read(f"{SCALING_PREFIX}.{scaling_key(pipeline)}.>")
        nodes = {e.node_id for _, e in own if isinstance(e, NodeRequested)}
        released: list[tuple[int, AnyScalingEvent]] = []
        if nodes:
            subject = f"{SCALING_PREFIX}.{scaling_key('')}.node_released"
            for seq, e in await self._read(subject):
                if isinstance(e, NodeReleased) and e.node_id in nodes:
                    released.append((seq, e))
        return [e for _, e in sorted(own + released, key=lambda item: item[0])][-limit:]

    async def _read(self, subject: str) -> list[tuple[int, AnyScalingEvent]]:
        """Every event on ``subject`` with its sequence, oldest first."""
        config = api.ConsumerConfig(
            ack_policy=api.AckPolicy.NONE,
            deliver_policy=api.DeliverPolicy.ALL,
            inactive_threshold=30.0,
            mem_storage=True,
        )
        psub = await self.js.pull_subscribe(subject, stream=SCALING_STREAM, config=config)
        events: list[tuple[int, AnyScalingEvent]] = []
        info = await psub.consumer_info()
        try:
            pending = info.num_pending or 0
            seen = 0
            while seen < pending:
                batch = await psub.fetch(min(pending - seen, 512), timeout=5.0)
                seen += len(batch)
                for msg in batch:
                    event = _decode(msg)
                    if event is not None:
                        events.append((msg.metadata.sequence.stream, event))
        finally:
            await psub.unsubscribe()
            with contextlib.suppress(Exception):
                await self.js.delete_consumer(SCALING_STREAM, info.name)
        return events


def _decode(msg: Msg) -> AnyScalingEvent | None:
    try:
        return decode_scaling(msg.data)
    except msgspec.MsgspecError as err:
        log.warning("skipping undecodable scaling event on %s: %r", msg.subject, err)
        return None
