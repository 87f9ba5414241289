"""Webhook deliveries as stored: one per ended run with a callback URL, and the dead letters."""

from __future__ import annotations

import msgspec

from contracts.run import Run


class Delivery(msgspec.Struct, frozen=True, kw_only=True):
    """POST ``run`` (as JSON) to ``url``, signed with ``team``'s secret. ``delivery_id`` is the
    same on every attempt and replay: receivers deduplicate on it."""

    delivery_id: str
    team: str
    url: str
    run: Run


class DeadDelivery(msgspec.Struct, frozen=True, kw_only=True):
    """A delivery that failed for good: how often it was tried and the last error."""

    delivery: Delivery
    attempts: int
    error: str
    at: float


def delivery_id_for(run_id: str) -> str:
    """A run ends once, so it has one delivery; its id is derived from the run's."""
    return f"dlv_{run_id}"
