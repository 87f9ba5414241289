"""The admin step: create or update every stream jetrun uses (``jetrun setup``).

Only the admin role may manage streams; the gateway, scheduler and agents check that their
streams exist and wait for them (``require_all``). ``jetrun up`` and the test harness run this
step as admin before they start any service.
"""

from __future__ import annotations

import time

from nats.aio.client import Client

from runtime.control.admission import Admission, stream_name
from runtime.control.views import RunViews
from runtime.infra.catalog import Catalog
from runtime.infra.config import Config
from runtime.infra.eventlog import EventLog, LogSettings
from runtime.infra.lease import LEASE_BUCKET, Lease
from runtime.infra.runlogs import LogStore
from runtime.infra.scalinglog import ScalingLog
from runtime.infra.streams import (
    CATALOG_STREAM,
    DEAD_STREAM,
    EVENTS_STREAM,
    LOGS_STREAM,
    PROBE_STREAM,
    RETRY_STREAM,
    SCALING_STREAM,
    STREAM_SLOTS_STREAM,
    VIEWS_STREAM,
    WEBHOOKS_STREAM,
    dead_config,
    probe_config,
    retry_config,
    stream_slots_config,
    webhooks_config,
)
from runtime.infra.streamsetup import ensure_all, ensure_stream


async def provision(nc: Client, config: Config, settings: LogSettings) -> list[str]:
    """Create or update the event log, the catalogue and one permit stream per tier limit of
    ``config``. Idempotent; needs the admin role. Returns the stream names."""
    log = EventLog(nc, settings)
    catalog = Catalog(log.js, replicas=settings.replicas)
    admission = Admission.for_config(log.js, config, replicas=settings.replicas, lookup=None)
    await ensure_all(log, catalog, admission)
    await ensure_stream(log.js, probe_config(replicas=settings.replicas), settings.setup_deadline_s)
    await ScalingLog(log.js, replicas=settings.replicas).ensure()
    await LogStore(log.js, settings).ensure()
    await Lease(log.js, "setup", monotonic=time.monotonic, replicas=settings.replicas).ensure()
    await RunViews(log.js, replicas=settings.replicas).ensure()
    for stream in (
        webhooks_config(replicas=settings.replicas),
        dead_config(replicas=settings.replicas),
        retry_config(replicas=settings.replicas),
        stream_slots_config(replicas=settings.replicas),
    ):
        await ensure_stream(log.js, stream, settings.setup_deadline_s)
    return [
        f"KV_{LEASE_BUCKET}",
        VIEWS_STREAM,
        WEBHOOKS_STREAM,
        DEAD_STREAM,
        RETRY_STREAM,
        STREAM_SLOTS_STREAM,
        LOGS_STREAM,
        PROBE_STREAM,
        SCALING_STREAM,
        EVENTS_STREAM,
        CATALOG_STREAM,
        *(stream_name(limit) for limit in sorted(admission.limits)),
    ]
