"""Every JetStream stream jetrun uses, and the one rule for bringing an existing one up to date.

The configs of the event log, the admission streams and the pipeline catalogue are built here
and nowhere else. A service creates a stream that is missing with these settings. A stream that
exists belongs to its operator: a service only ever *raises* its replicas (a service started
with ``--replicas 1`` never downgrades a production stream), and never rewrites a setting such as
``max_age`` or ``duplicate_window``, so services started with different settings (two admission
lookbacks, say) cannot flip a stream back and forth. A setting that differs from what this
service would have chosen is logged once at WARNING; change it with ``nats stream edit``.
"""

from __future__ import annotations

import dataclasses
import logging

from nats.js import api

log = logging.getLogger("jetrun.streams")

EVENTS_STREAM = "JETRUN_EVENTS"
EVENTS_PREFIX = "jetrun.ev"
# the kinds that can end a run; a run with a callback URL appends them with one more token,
# CALLBACK_TOKEN (``jetrun.ev.<run_id>.<kind>.callback``: what the webhook outbox reads)
TERMINAL_KINDS = ("completed", "failed", "timed_out", "preempted", "no_resources", "cancelled")
CALLBACK_TOKEN = "callback"
CATALOG_STREAM = "JETRUN_PIPELINES"
CATALOG_PREFIX = "jetrun.pipelines"
ADMIT_PREFIX = "jetrun.admit"
PROBE_STREAM = "JETRUN_PROBE"
PROBE_PREFIX = "jetrun.probe"
SCALING_STREAM = "JETRUN_SCALING"
SCALING_PREFIX = "jetrun.scaling"
LOGS_STREAM = "JETRUN_LOGS"
LOGS_PREFIX = "jetrun.logs"
WEBHOOKS_STREAM = "JETRUN_WEBHOOKS"
WEBHOOKS_PREFIX = "jetrun.webhooks.pending"
DEAD_STREAM = "JETRUN_WEBHOOKS_DEAD"
DEAD_PREFIX = "jetrun.webhooks.dead"
RETRY_STREAM = "JETRUN_WEBHOOKS_RETRY"
RETRY_PREFIX = "jetrun.webhooks.retry"
STREAM_SLOTS_STREAM = "JETRUN_STREAM_SLOTS"
STREAM_SLOTS_PREFIX = "jetrun.streams"
STREAM_SLOT_TTL_S = 30.0  # a slot its gateway stopped renewing (it died) is free after this
LISTING_STREAM = "JETRUN_LISTING"
LISTING_PREFIX = "jetrun.listing"
VIEWS_BUCKET = "JETRUN_RUNS"
VIEWS_STREAM = f"KV_{VIEWS_BUCKET}"

#: Settings a service compares (and warns about) but never changes on an existing stream.
OPERATOR_SETTINGS = (
    "max_age",
    "duplicate_window",
    "max_msgs_per_subject",
    "max_msgs",
    "max_bytes",
    "discard",
    "discard_new_per_subject",
    "storage",
    "retention",
)


def events_config(
    *, replicas: int, duplicate_window_s: float, max_age_s: float
) -> api.StreamConfig:
    """``JETRUN_EVENTS``: every run event, the source of truth (``max_age_s`` 0: for ever)."""
    return api.StreamConfig(
        name=EVENTS_STREAM,
        subjects=[f"{EVENTS_PREFIX}.>"],
        retention=api.RetentionPolicy.LIMITS,
        storage=api.StorageType.FILE,
        num_replicas=replicas,
        duplicate_window=duplicate_window_s,
        max_age=max_age_s,
        allow_direct=True,
    )


def admission_stream(limit: int) -> str:
    return f"JETRUN_ADMIT_{limit}"


def admission_config(limit: int, *, lookback_s: float, replicas: int) -> api.StreamConfig:
    """``JETRUN_ADMIT_<limit>``: at most ``limit`` permits per team subject; a permit expires
    after the admission lookback."""
    return api.StreamConfig(
        name=admission_stream(limit),
        subjects=[f"{ADMIT_PREFIX}.{limit}.>"],
        storage=api.StorageType.FILE,
        num_replicas=replicas,
        max_msgs_per_subject=limit,
        discard=api.DiscardPolicy.NEW,
        discard_new_per_subject=True,
        max_age=lookback_s,
        duplicate_window=min(600.0, lookback_s),
    )


def stream_slots_config(*, replicas: int, ttl_s: float = STREAM_SLOT_TTL_S) -> api.StreamConfig:
    """``JETRUN_STREAM_SLOTS``: a team's open streaming responses, across gateways. One subject
    per slot (``jetrun.streams.<team>.<n>``, n < max_streams_per_team) holding at most one
    message: a gateway takes a slot by publishing on it when it is empty, renews it within
    ``ttl_s`` and gives it back by deleting its message."""
    return api.StreamConfig(
        name=STREAM_SLOTS_STREAM,
        subjects=[f"{STREAM_SLOTS_PREFIX}.>"],
        storage=api.StorageType.FILE,
        num_replicas=replicas,
        max_msgs_per_subject=1,
        max_age=ttl_s,
        duplicate_window=min(120.0, ttl_s),
    )


def catalog_config(*, replicas: int) -> api.StreamConfig:
    """``JETRUN_PIPELINES``: the last registration of each pipeline."""
    return api.StreamConfig(
        name=CATALOG_STREAM,
        subjects=[f"{CATALOG_PREFIX}.>"],
        storage=api.StorageType.FILE,
        num_replicas=replicas,
        max_msgs_per_subject=1,
        allow_direct=True,
    )


def probe_config(*, replicas: int) -> api.StreamConfig:
    """``JETRUN_PROBE``: readiness probes, the last one per gateway, kept an hour."""
    return api.StreamConfig(
        name=PROBE_STREAM,
        subjects=[f"{PROBE_PREFIX}.>"],
        storage=api.StorageType.FILE,
        num_replicas=replicas,
        max_msgs_per_subject=1,
        max_age=3600.0,
    )


def scaling_config(*, replicas: int, max_age_s: float = 30 * 86_400.0) -> api.StreamConfig:
    """``JETRUN_SCALING``: every scaling decision, one subject per pipeline (kept 30 days)."""
    return api.StreamConfig(
        name=SCALING_STREAM,
        subjects=[f"{SCALING_PREFIX}.>"],
        storage=api.StorageType.FILE,
        num_replicas=replicas,
        duplicate_window=600.0,
        max_age=max_age_s,
        allow_direct=True,
    )


def logs_config(
    *, replicas: int, duplicate_window_s: float, max_age_s: float, max_msg_size: int
) -> api.StreamConfig:
    """``JETRUN_LOGS``: what pipelines printed, ``jetrun.logs.<run_id>.<attempt>``; kept as long
    as the events (the same ``max_age``; 0: for ever)."""
    return api.StreamConfig(
        name=LOGS_STREAM,
        subjects=[f"{LOGS_PREFIX}.>"],
        retention=api.RetentionPolicy.LIMITS,
        storage=api.StorageType.FILE,
        num_replicas=replicas,
        duplicate_window=duplicate_window_s,
        max_age=max_age_s,
        max_msg_size=max_msg_size,
    )


def webhooks_config(*, replicas: int) -> api.StreamConfig:
    """``JETRUN_WEBHOOKS``: one delivery per ended run with a callback, ``.pending.<run_id>``;
    kept a week; a day's dedup window (a delivery re-queued after a restart is stored once)."""
    return api.StreamConfig(
        name=WEBHOOKS_STREAM,
        subjects=[f"{WEBHOOKS_PREFIX}.>"],
        storage=api.StorageType.FILE,
        num_replicas=replicas,
        duplicate_window=86_400.0,
        max_age=7 * 86_400.0,
    )


def dead_config(*, replicas: int) -> api.StreamConfig:
    """``JETRUN_WEBHOOKS_DEAD``: deliveries that failed for good, ``.dead.<run_id>``, kept 30
    days for an operator to inspect and replay."""
    return api.StreamConfig(
        name=DEAD_STREAM,
        subjects=[f"{DEAD_PREFIX}.>"],
        storage=api.StorageType.FILE,
        num_replicas=replicas,
        max_age=30 * 86_400.0,
        allow_direct=True,
    )


def retry_config(*, replicas: int) -> api.StreamConfig:
    """``JETRUN_WEBHOOKS_RETRY``: the outbox's events it failed to handle once, ``.retry.<run_id>``,
    each parked here until it is handled or in the dead letters (a work queue: gone once acked);
    a day's dedup window (an event parked again after a restart is stored once)."""
    return api.StreamConfig(
        name=RETRY_STREAM,
        subjects=[f"{RETRY_PREFIX}.>"],
        retention=api.RetentionPolicy.WORK_QUEUE,
        storage=api.StorageType.FILE,
        num_replicas=replicas,
        duplicate_window=86_400.0,
        max_age=7 * 86_400.0,
    )


def views_config(*, replicas: int, max_age_s: float = 0.0) -> api.StreamConfig:
    """``KV_JETRUN_RUNS``: the KV bucket of ended runs' views (key ``run.<run_id>``) and the
    scheduler's replay checkpoint (key ``checkpoint``); ``max_age_s`` 0: kept for ever."""
    return api.StreamConfig(
        name=VIEWS_STREAM,
        subjects=[f"$KV.{VIEWS_BUCKET}.>"],
        storage=api.StorageType.FILE,
        num_replicas=replicas,
        max_msgs_per_subject=1,
        max_age=max_age_s,
        discard=api.DiscardPolicy.NEW,
        allow_rollup_hdrs=True,
        deny_delete=True,
        allow_direct=True,
        duplicate_window=min(120.0, max_age_s) if max_age_s else 120.0,
    )


def listing_config(*, replicas: int, max_age_s: float = 0.0) -> api.StreamConfig:
    """``JETRUN_LISTING``: one entry per run, ``jetrun.listing.<team>.<n>`` (the team's n-th
    run); kept like the run views (``max_age_s`` 0: for ever)."""
    return api.StreamConfig(
        name=LISTING_STREAM,
        subjects=[f"{LISTING_PREFIX}.>"],
        storage=api.StorageType.FILE,
        num_replicas=replicas,
        max_msgs_per_subject=1,
        max_age=max_age_s,
        allow_direct=True,
        duplicate_window=min(3600.0, max_age_s) if max_age_s else 3600.0,
    )


def reconcile(existing: api.StreamConfig, wanted: api.StreamConfig) -> api.StreamConfig | None:
    """The update to send for a stream that exists, or None to leave it alone. Pure.

    Only the replica count may change, and only upwards; every other setting of ``existing``
    is kept as the operator (or the first service) left it."""
    have = existing.num_replicas or 1
    want = wanted.num_replicas or 1
    if want <= have:
        return None
    return dataclasses.replace(existing, num_replicas=want)


def differences(
    existing: api.StreamConfig, wanted: api.StreamConfig
) -> dict[str, tuple[object, object]]:
    """Operator settings where ``existing`` differs from ``wanted``: name -> (kept, wanted)."""
    found: dict[str, tuple[object, object]] = {}
    for name in OPERATOR_SETTINGS:
        kept, mine = getattr(existing, name), getattr(wanted, name)
        if mine is None or (name == "duplicate_window" and not mine):
            continue  # no preference: the server's default is as good
        if kept != mine and not (_unset(kept) and _unset(mine)):
            found[name] = (kept, mine)
    return found


def _unset(value: object) -> bool:
    return value in (None, 0, -1)


def warn_differences(existing: api.StreamConfig, wanted: api.StreamConfig) -> None:
    for name, (kept, mine) in differences(existing, wanted).items():
        log.warning(
            "stream %s keeps %s=%r (this service would have created it with %r); "
            "change it with `nats stream edit` if that is wanted",
            existing.name,
            name,
            kept,
            mine,
        )
