"""Submitting a run: the one admission path, for HTTP requests and NATS submissions alike.

``Submitter.submit`` looks the pipeline up, takes the team's admission permit, and records the
run with ONE append: a ``submitted`` event that carries its admission (tier and permit), so the
run is admitted the moment it exists. What can go wrong, and what the caller hears:
- the pipeline is unknown: 404 ``pipeline_not_found``, nothing recorded;
- the team is at its limit: 429 ``concurrency_limit``, nothing recorded;
- the ``Idempotency-Key`` was used for a different request (also when two requests race with
  one key: the first ``submitted`` stored wins, the log deduplicates the rest): 422
  ``idempotency_key_reused``, nothing more recorded;
- the log refused the append: 503 ``event_log_unavailable``, nothing recorded, permit given back;
- the log stayed unreachable until the deadline: the append may or may not have been stored, so
  the permit is kept (the scheduler's sweep gives it back if no run ever appears) and the
  answer is 503 ``outcome_unknown`` naming the run id; a retry with the same key is safe.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

from nats.errors import MaxPayloadError
from nats.js.errors import APIError

from contracts.api import ConcurrencyLimitDetail, ErrorDetail, RunCreate
from contracts.events import AdmissionGrant, AdmissionSlot, RunSubmitted
from contracts.run import RunRecord
from runtime.control.admission import Admission, LimitReached
from runtime.infra.catalog import Catalog
from runtime.infra.clock import Clock
from runtime.infra.config import Config, Team
from runtime.infra.eventlog import EventLog
from runtime.infra.jsretry import RETRYABLE
from runtime.infra.projection import RunIndex

log = logging.getLogger("jetrun.submit")

VISIBLE_WITHIN_S = 10.0  # a recorded run shows up in this process's index within this
# what a caller waits for once the run is recorded, and how long: a plain function of the run
Until = tuple[Callable[[RunRecord], bool], float]


class Refused(Exception):
    """A submission (or a request) that gets an error answer: an HTTP status and its detail."""

    def __init__(self, status: int, detail: Any, headers: dict[str, str] | None = None) -> None:
        super().__init__(status, detail)
        self.status, self.detail, self.headers = status, detail, headers or {}


def refused(status: int, code: str, message: str, field: str | None = None) -> Refused:
    return Refused(status, ErrorDetail(code=code, message=message, field=field))


def run_id_for(team: str, idempotency_key: str | None) -> str:
    """A fresh id, or one derived from the team and its key so a retried POST finds its run."""
    if idempotency_key is None:  # 128 random bits (uuid4's object and version bits cost 1.5 us)
        return f"run_{os.urandom(16).hex()}"
    digest = hashlib.sha256(f"{team}\0{idempotency_key}".encode()).hexdigest()
    return f"run_{digest[:32]}"


def same_request(run: RunRecord, create: RunCreate) -> bool:
    """Whether a retried request asks for what the run was created with."""
    return (
        run.pipeline == create.pipeline
        and run.inputs == create.run_inputs()
        and run.async_run == create.async_run
        and run.wait_for_resources == create.waits_for_resources()
    )


def _or_other_body(
    done: Callable[[RunRecord], bool], create: RunCreate
) -> Callable[[RunRecord], bool]:
    """``done``, or the run was created by another request with the same key and a
    different body (asked once: what a run was created with never changes)."""
    other: list[bool] = []

    def answered(run: RunRecord) -> bool:
        if not other:
            other.append(not same_request(run, create))
        return other[0] or done(run)

    return answered


class Submitter:
    """Admits and records runs for one process (a gateway). Safe to share within it."""

    def __init__(
        self,
        log: EventLog,
        index: RunIndex,
        catalog: Catalog,
        admission: Admission,
        config: Config,
        clock: Clock,
        stored: Callable[[str], Awaitable[RunRecord | None]] | None = None,
    ) -> None:
        self.log, self.index, self.catalog = log, index, catalog
        self.admission, self.config, self.clock = admission, config, clock
        self.stored = stored  # a run the index no longer holds (it ended long ago)

    async def submit(
        self, team: Team, create: RunCreate, key: str | None, until: Until | None = None
    ) -> RunRecord:
        """The run for this request, recorded and admitted (or found again by its key).
        Blocks until this process's index shows it and, with ``until = (done, timeout)``,
        until ``done(run)`` or ``timeout`` seconds have passed (the run as it is then). Raises
        ``Refused``."""
        if await self.catalog.lookup(create.pipeline) is None:
            raise refused(404, "pipeline_not_found", f"pipeline {create.pipeline} not found")
        if create.callback_url is not None and not team.webhook_secret:
            message = f"team {team.name} has no webhook_secret in the config: no callbacks"
            raise refused(422, "webhook_secret_missing", message)
        run_id = run_id_for(team.name, key)
        existing = self.index.get(run_id)
        if existing is None and key is not None and self.stored is not None:
            existing = await self.stored(run_id)  # a key reused after its run left memory
        if existing is not None:
            return await self._until(self._same_or_refuse(existing, create, key), until)
        now = self.clock.now()
        slot = await self._admit(team, run_id, now)
        submitted = RunSubmitted(
            run_id=run_id,
            at=now,
            team=team.name,
            pipeline=create.pipeline,
            inputs=create.run_inputs(),
            async_run=create.async_run,
            wait_for_resources=create.waits_for_resources(),
            idempotency_key=key,
            admission=AdmissionGrant(tier=team.tier, slot=slot),
            callback_url=create.callback_url,
        )
        seq = await self._record(submitted, slot)
        began = self.clock.monotonic()
        if until is not None:  # one wait, woken once: the run shows up and is as asked
            done, timeout = until
            if key is not None:  # or another request's body won the key: a 422 at once
                done = _or_other_body(done, create)
            found = await self.index.wait_until(run_id, done, timeout)
            if found is not None:
                return self._same_or_refuse(found, create, key)
        await self.index.wait_for_seq(seq, timeout=VISIBLE_WITHIN_S)  # slower than ``until``
        run = self.index.get(run_id)
        if run is None:
            message = f"run {run_id} was recorded but is not visible here yet; GET it shortly"
            raise refused(503, "event_log_lagging", message)
        if until is not None:  # what is left of the request's wait, not a second one
            done, timeout = until
            until = (done, max(0.0, timeout - (self.clock.monotonic() - began)))
        return await self._until(self._same_or_refuse(run, create, key), until)

    async def _until(self, run: RunRecord, until: Until | None) -> RunRecord:
        """``run`` once ``until`` holds for it (or its time has passed)."""
        if until is None or until[0](run):
            return run
        found = await self.index.wait_until(run.id, *until)
        if found is None and self.stored is not None:  # it ended and left the index meanwhile
            found = await self.stored(run.id)
        if found is None:
            raise refused(503, "event_log_lagging", f"run {run.id} is not visible here yet")
        return found

    def _same_or_refuse(self, run: RunRecord, create: RunCreate, key: str | None) -> RunRecord:
        if not same_request(run, create):
            raise refused(
                422,
                "idempotency_key_reused",
                f"Idempotency-Key {key!r} was used for a different request (run {run.id})",
            )
        return run

    async def _admit(self, team: Team, run_id: str, now: float) -> AdmissionSlot | None:
        limit = self.config.limit(team.tier)
        try:
            return await self.admission.try_admit(
                team=team.name, tier=team.tier, limit=limit, run_id=run_id, now=now
            )
        except LimitReached as full:
            detail = ConcurrencyLimitDetail(
                tier=team.tier, limit=full.limit, active=full.active, message=str(full)
            )
            raise Refused(429, detail, {"Retry-After": "1"}) from None

    async def _record(self, submitted: RunSubmitted, slot: AdmissionSlot | None) -> int:
        """Append ``submitted``; its sequence. A permit is given back only when the log said
        no; while the outcome is unknown it stays (the sweep gives it back if no run appears)."""
        try:
            return (await self.log.record(submitted)).seq
        except MaxPayloadError:  # refused by the client itself: certainly not recorded
            if slot is not None:
                await self.admission.release(slot)
            message = "the run is over the event log's message size limit; nothing was recorded"
            raise refused(413, "body_too_large", message) from None
        except APIError as err:
            if isinstance(err, RETRYABLE):
                raise self._unknown(submitted, err) from err
            log.warning("the log refused run %s: %r", submitted.run_id, err)
            if slot is not None:
                await self.admission.release(slot)
            raise refused(
                503, "event_log_unavailable", "the event log refused the run; nothing was recorded"
            ) from err
        except Exception as err:
            raise self._unknown(submitted, err) from err

    def _unknown(self, submitted: RunSubmitted, err: Exception) -> Refused:
        run_id = submitted.run_id
        log.warning("run %s: the log did not confirm it (%r); outcome unknown", run_id, err)
        retry = (
            "retrying with the same Idempotency-Key is safe"
            if submitted.idempotency_key is not None
            else "send an Idempotency-Key next time so that a retry cannot create a second run"
        )
        return refused(
            503,
            "outcome_unknown",
            f"the event log did not confirm run {run_id} in time: it may or may not have been "
            f"recorded (GET /v4/runs/{run_id} tells once the log is back); {retry}",
        )
