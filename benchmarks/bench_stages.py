"""Where a benchmark phase's run time goes, stage by stage, from the events' own timestamps.

Every event carries ``at``, the wall clock of the process that appended it (in a benchmark all
of them run on one machine). For the runs submitted in one phase's range of the log:

- ``submitted -> dispatched``: admission and the scheduler's decision (the first dispatch);
  a run that waited in a queue also has ``submitted -> queued`` and ``queued -> dispatched``;
- ``dispatched -> started``: only attempts still running after 50 ms append ``started``;
- ``dispatched -> end``: the agent, its worker and the append of the end (completed, failed,
  timed_out, ...), from the dispatch of the attempt that ended;
- ``submitted -> end``: the whole run as the log saw it;
- ``HTTP + gateway``: sync runs only, the client's observed latency minus
  (end.at - submitted.at): the request's way in and the answer's way out;
- ``client -> submitted`` and ``end -> client``: the same two ways apart, when the client's
  wall clock at sending and at receiving is known (``client_at``): the request's way in until
  the gateway stamps ``submitted`` (HTTP, the body, the catalogue), and from the moment the
  agent stamps the end (its worker just answered) until the client has the answer (the end's
  append, the gateway's tail, the answer's way out).

``stage_durations`` and ``stage_lines`` are pure (tests/test_bench_stages.py);
``read_events`` reads a phase's range of the log once the phase's measurement is over.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import anyio
import nats.errors
import nats.js.errors
from nats.js import api

from contracts.events import BATCHES, AnyEvent, AttemptEvent, decode_event
from runtime.clients.client import RunEvents
from runtime.infra.eventlog import kind_filters
from runtime.infra.nats_auth import Credentials
from runtime.infra.streams import EVENTS_STREAM, TERMINAL_KINDS

#: what the stages are read from: no outputs, no queue or fence events
SUBJECTS = [
    f
    for kind in (
        "submitted",
        "queued",
        "queued_runs",
        "started",
        "dispatched",
        *TERMINAL_KINDS,
        "ended_runs",
    )
    for f in kind_filters(kind)
]
SUBMITTED_TO_QUEUED = "submitted -> queued"
QUEUED_TO_DISPATCHED = "queued -> dispatched"
SUBMITTED_TO_DISPATCHED = "submitted -> dispatched"
DISPATCHED_TO_STARTED = "dispatched -> started"
DISPATCHED_TO_END = "dispatched -> end"
SUBMITTED_TO_END = "submitted -> end"
HTTP_AND_GATEWAY = "HTTP + gateway"
CLIENT_TO_SUBMITTED = "client -> submitted"
END_TO_CLIENT = "end -> client"
#: printing order
STAGES = (
    SUBMITTED_TO_DISPATCHED,
    SUBMITTED_TO_QUEUED,
    QUEUED_TO_DISPATCHED,
    DISPATCHED_TO_STARTED,
    DISPATCHED_TO_END,
    SUBMITTED_TO_END,
    HTTP_AND_GATEWAY,
    CLIENT_TO_SUBMITTED,
    END_TO_CLIENT,
)


@dataclass
class _Run:
    submitted: float
    queued: dict[int, float] = field(default_factory=dict)
    dispatched: dict[int, float] = field(default_factory=dict)
    started: dict[int, float] = field(default_factory=dict)
    end: AnyEvent | None = None


@dataclass
class Stages:
    """Milliseconds by stage, one value per run that had the stage."""

    runs: int = 0
    ended: int = 0
    ms: dict[str, list[float]] = field(default_factory=dict)

    def add(self, stage: str, seconds: float) -> None:
        self.ms.setdefault(stage, []).append(seconds * 1000)


def stage_durations(
    events: Iterable[AnyEvent],
    client_s: Mapping[str, float] | None = None,
    client_at: Mapping[str, tuple[float, float]] | None = None,
) -> Stages:
    """The stages of the runs whose ``submitted`` is among ``events`` (in log order; events of
    other runs are ignored). ``client_s``: the client's observed latency (seconds) by run id,
    for sync runs; when given, only those runs are counted (a warm-up's are not).
    ``client_at``: the client's wall clock when it sent each run's request and when it had
    the answer, for the runs it knows them of."""
    runs: dict[str, _Run] = {}
    for event in _each_run(events):
        if event.kind == "submitted":
            if client_s is None or event.run_id in client_s:
                runs.setdefault(event.run_id, _Run(submitted=event.at))
            continue
        run = runs.get(event.run_id)
        if run is None:
            continue
        if event.kind in TERMINAL_KINDS:
            run.end = run.end or event
        elif isinstance(event, AttemptEvent):
            by_attempt = {"queued": run.queued, "dispatched": run.dispatched}.get(event.kind)
            if event.kind == "started":
                by_attempt = run.started
            if by_attempt is not None:
                by_attempt.setdefault(event.attempt, event.at)
    stages = Stages(runs=len(runs))
    for run_id, run in runs.items():
        _add_run(stages, run, None if client_s is None else client_s[run_id])
        at = None if client_at is None else client_at.get(run_id)
        if at is not None:
            stages.add(CLIENT_TO_SUBMITTED, run.submitted - at[0])
            if run.end is not None:
                stages.add(END_TO_CLIENT, at[1] - run.end.at)
    return stages


def _each_run(events: Iterable[AnyEvent]) -> Iterable[AnyEvent]:
    """``events``, a batch (``queued_runs``, ``dispatched_runs``, ``ended_runs``) as each of its
    runs' own event (``dispatched_runs`` is read with ``dispatched``: it is on that kind's
    subjects)."""
    for event in events:
        if isinstance(event, BATCHES):
            yield from event.each()
        else:
            yield event


def _add_run(stages: Stages, run: _Run, client: float | None) -> None:
    if run.dispatched:
        first = min(run.dispatched)
        stages.add(SUBMITTED_TO_DISPATCHED, run.dispatched[first] - run.submitted)
        if first in run.queued:
            stages.add(SUBMITTED_TO_QUEUED, run.queued[first] - run.submitted)
            stages.add(QUEUED_TO_DISPATCHED, run.dispatched[first] - run.queued[first])
    if run.end is None:
        return
    stages.ended += 1
    # the attempt that ended (a cancelled run names none: its last dispatch)
    last = max(run.dispatched, default=0)
    attempt = run.end.attempt if isinstance(run.end, AttemptEvent) else last
    dispatched = run.dispatched.get(attempt)
    if dispatched is not None:
        if attempt in run.started:
            stages.add(DISPATCHED_TO_STARTED, run.started[attempt] - dispatched)
        stages.add(DISPATCHED_TO_END, run.end.at - dispatched)
    stages.add(SUBMITTED_TO_END, run.end.at - run.submitted)
    if client is not None:
        stages.add(HTTP_AND_GATEWAY, client - (run.end.at - run.submitted))


def percentile(values: list[float], p: float) -> float:
    """Nearest rank, as ``bench_runs.percentile``."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def stage_lines(phase: str, stages: Stages, note: str = "") -> list[str]:
    """One header line, then one line per stage that some run had: p50 / p99 in ms and how
    many runs had it."""
    lines = [
        f"stages of the {phase} runs ({stages.runs} runs, {stages.ended} ended{note}; "
        f"ms from the events' own timestamps):"
    ]
    for stage in STAGES:
        values = stages.ms.get(stage)
        if values:
            lines.append(
                f"  {stage + ':':26} p50 {percentile(values, 50):8.2f} ms  "
                f"p99 {percentile(values, 99):8.2f} ms  ({len(values)} runs)"
            )
    return lines


async def next_seq(nats_url: str, creds: Credentials) -> int:
    """The sequence the log's next event will have: where a phase begins."""
    async with RunEvents.connect(nats_url, creds) as events:
        return await events.log.last_seq() + 1


async def read_events(
    nats_url: str, creds: Credentials, start: int, stop: int, deadline_s: float = 60.0
) -> tuple[list[AnyEvent], bool]:
    """The stage events stored at sequences ``start`` to ``stop - 1``, in log order, through
    one pull consumer, within ``deadline_s``; and whether all of them were read in time."""
    found: list[AnyEvent] = []
    if start >= stop:
        return found, True
    config = api.ConsumerConfig(
        ack_policy=api.AckPolicy.NONE,
        deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=start,
        filter_subjects=SUBJECTS,
        inactive_threshold=30.0,
        mem_storage=True,
    )
    async with RunEvents.connect(nats_url, creds) as events:
        js = events.log.js
        sub = await js.pull_subscribe("", stream=EVENTS_STREAM, config=config)
        name = (await sub.consumer_info()).name  # nats-py names it
        try:
            with anyio.move_on_after(deadline_s):
                while True:
                    try:
                        msgs = await sub.fetch(1024, timeout=1.0)
                    except TimeoutError:  # nats-py raises its own or asyncio's (both TimeoutError)
                        return found, True  # nothing more stored
                    for msg in msgs:
                        if msg.metadata.sequence.stream >= stop:
                            return found, True
                        found.append(decode_event(msg.data))
                        if msg.metadata.num_pending == 0:
                            return found, True
            return found, False
        finally:
            await sub.unsubscribe()
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.delete_consumer(EVENTS_STREAM, name)


async def phase_lines(
    nats_url: str,
    creds: Credentials,
    phase: str,
    start: int,
    stop: int,
    client_s: Mapping[str, float] | None = None,
    client_at: Mapping[str, tuple[float, float]] | None = None,
) -> list[str]:
    """Reads the phase's events and returns its stage lines (call it once the phase's
    measurement is over: the reading is not part of it)."""
    events, complete = await read_events(nats_url, creds, start, stop)
    note = "" if complete else "; the log was not read to the end within the deadline"
    return stage_lines(phase, stage_durations(events, client_s, client_at), note)
