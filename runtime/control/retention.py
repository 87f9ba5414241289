"""Retention: how long run events, pipelines' logs, ended runs' views and the run history
(the listing index, kept like the views) are kept.

Set in the config (``[settings] events_max_age_s``, ``views_max_age_s``; 0 keeps for ever) and
applied by an operator with ``jetrun admin apply-retention``: services never rewrite an existing
stream's settings (``runtime.infra.streams``), so what this step sets survives every restart.
``plan`` is pure: the updates to send, given the streams as they are.
"""

from __future__ import annotations

import dataclasses

from nats.js import JetStreamContext, api
from nats.js.errors import NotFoundError

from runtime.infra.config import Settings
from runtime.infra.streams import EVENTS_STREAM, LISTING_STREAM, LOGS_STREAM, VIEWS_STREAM


class RetentionRefused(ValueError):
    """The settings would lose what a service still needs; the message says what."""


def wanted(settings: Settings) -> dict[str, float]:
    """Stream name -> the ``max_age`` (seconds, 0: for ever) the settings ask for."""
    events, views = settings.events_max_age_s, settings.views_max_age_s
    for name, value in (("events_max_age_s", events), ("views_max_age_s", views)):
        if value < 0:
            raise RetentionRefused(f"settings.{name} must be 0 (for ever) or positive")
    if 0 < events < settings.keep_ended_s:
        raise RetentionRefused(
            "settings.events_max_age_s must be at least keep_ended_s: a service starting from"
            " the checkpoint reads the events of runs ended within that window"
        )
    return {EVENTS_STREAM: events, LOGS_STREAM: events, VIEWS_STREAM: views, LISTING_STREAM: views}


def plan(existing: dict[str, api.StreamConfig], settings: Settings) -> list[api.StreamConfig]:
    """The stream updates that make ``existing`` keep what ``settings`` say; a stream that does
    not exist yet is left to the service that creates it (then run this step again)."""
    updates = []
    for name, max_age in wanted(settings).items():
        config = existing.get(name)
        if config is None or (config.max_age or 0.0) == max_age:
            continue
        dedup = config.duplicate_window or 0.0
        if max_age and dedup > max_age:
            dedup = max_age  # the server refuses a dedup window longer than max_age
        updates.append(dataclasses.replace(config, max_age=max_age, duplicate_window=dedup))
    return updates


async def apply_retention(js: JetStreamContext, settings: Settings) -> list[tuple[str, float]]:
    """Apply ``settings``' retention to the streams; returns (stream, max_age) changed."""
    existing: dict[str, api.StreamConfig] = {}
    for name in wanted(settings):
        try:
            existing[name] = (await js.stream_info(name)).config
        except NotFoundError:
            continue
    changed = []
    for update in plan(existing, settings):
        await js.update_stream(update)
        assert update.name is not None
        changed.append((update.name, float(update.max_age or 0.0)))
    return changed
