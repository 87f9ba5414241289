"""Where run events are appended in the event log, and the subject filters that read them.
Pure: names only, no I/O.

Subjects are ``jetrun.ev.<run_id>.<kind>``, except dispatches, which name their agent:
``jetrun.ev.<run_id>.dispatched.<agent_id>``, so an agent's consumer receives only its own
(``jetrun.ev.*.dispatched.<agent_id>``), and the terminal events of a run submitted with a
callback URL, which say so: ``jetrun.ev.<run_id>.<kind>.callback``, so the webhook outbox reads
only those (``callback_ends``) and no event of any other run. Whoever appends a run's end says
whether the run has one (``EventLog.append(..., callback=True)``): the scheduler from its
record, the agent from the dispatch (``RunDispatched.callback``), ``RunEvents.publish`` from
the run's submission in the log. One run's events are ``jetrun.ev.<run_id>.>``; readers of a
terminal kind read both forms (``kind_filters``). The dispatches one pass makes to one agent,
batched (``dispatched_runs``), go where that agent's dispatches go, under a run id no run has:
``jetrun.ev._dispatched.dispatched.<agent_id>`` (so the agent's filter and its permissions are
unchanged, and every reader of ``dispatched`` reads the batches too). The ends of attempts
one agent has ready at once, batched (``ended_runs``), go where only that agent may append:
``jetrun.ev._ended.ended_runs.<agent_id>``.
"""

from __future__ import annotations

from contracts.events import (
    DISPATCHED_RUNS_ID,
    ENDED_RUNS_ID,
    Event,
    RunDispatched,
    RunsDispatched,
    RunsEnded,
)
from contracts.names import check_token
from runtime.infra.streams import CALLBACK_TOKEN, EVENTS_PREFIX, TERMINAL_KINDS

ALL_EVENTS = f"{EVENTS_PREFIX}.>"


def event_subject(run_id: str, kind: str) -> str:
    """Raises ``ValueError`` for a run id that is not one subject token."""
    check_token(run_id, "run id")
    return f"{EVENTS_PREFIX}.{run_id}.{kind}"


def dispatch_subject(run_id: str, agent_id: str) -> str:
    """Where a dispatch of ``run_id`` to ``agent_id`` is appended. Raises ``ValueError`` for an
    id that is not one subject token."""
    check_token(agent_id, "agent id")
    return f"{event_subject(run_id, 'dispatched')}.{agent_id}"


def ended_subject(agent_id: str) -> str:
    """Where ``agent_id``'s ``ended_runs`` batches are appended (only it may publish there).
    Raises ``ValueError`` for an id that is not one subject token."""
    check_token(agent_id, "agent id")
    return f"{EVENTS_PREFIX}.{ENDED_RUNS_ID}.{RunsEnded.kind}.{agent_id}"


def subject_of(event: Event, callback: bool = False) -> str:
    """Where ``event`` is appended; ``callback``: its run has a callback URL (only a terminal
    kind's subject says so)."""
    if isinstance(event, RunDispatched | RunsDispatched):
        return dispatch_subject(event.run_id, event.agent_id)
    if isinstance(event, RunsEnded):
        return ended_subject(event.agent_id)
    subject = event_subject(event.run_id, event.kind)
    if callback and event.kind in TERMINAL_KINDS:
        return f"{subject}.{CALLBACK_TOKEN}"
    return subject


_TERMINAL = frozenset(TERMINAL_KINDS)


def on_its_subject(event: Event, subject: str) -> bool:
    """Whether ``subject`` is where ``event`` belongs: its run's, its kind's (a dispatch's
    agent's, or none as a release before agents were named wrote them; a terminal kind's with
    or without the callback token). A role may append only the kinds its NATS permissions
    name by subject, so a body unlike its subject (an agent's ``started`` subject carrying a
    ``cancelled`` or a ``queued_runs`` batch) is no event: every reader drops it."""
    if isinstance(event, RunsDispatched):  # where its agent's dispatches go
        return subject == f"{EVENTS_PREFIX}.{event.run_id}.dispatched.{event.agent_id}"
    if isinstance(event, RunsEnded):  # where only its agent may append
        return event.run_id == ENDED_RUNS_ID and subject == (
            f"{EVENTS_PREFIX}.{ENDED_RUNS_ID}.{RunsEnded.kind}.{event.agent_id}"
        )
    head = f"{EVENTS_PREFIX}.{event.run_id}.{event.kind}"
    if subject == head:
        return True
    if len(subject) <= len(head) or subject[len(head)] != "." or not subject.startswith(head):
        return False
    rest = subject[len(head) + 1 :]
    if isinstance(event, RunDispatched):
        return rest == event.agent_id
    return rest == CALLBACK_TOKEN and event.kind in _TERMINAL


def run_subjects(run_id: str) -> str:
    """Raises ``ValueError`` for a run id that is not one subject token."""
    check_token(run_id, "run id")
    return f"{EVENTS_PREFIX}.{run_id}.>"


def kind_subjects(kind: str) -> str:
    """Every event of ``kind``; dispatches: every agent's; a terminal kind: the runs without
    a callback only (``kind_filters`` has both forms)."""
    if kind == "dispatched":  # batches included
        return f"{EVENTS_PREFIX}.*.dispatched.*"
    if kind == RunsDispatched.kind:
        return f"{EVENTS_PREFIX}.{DISPATCHED_RUNS_ID}.dispatched.*"
    if kind == RunsEnded.kind:
        return f"{EVENTS_PREFIX}.{ENDED_RUNS_ID}.{RunsEnded.kind}.*"
    return f"{EVENTS_PREFIX}.*.{kind}"


def kind_filters(kind: str) -> list[str]:
    """Every event of ``kind``, as one filter per subject form (a terminal kind has two)."""
    if kind in TERMINAL_KINDS:
        return [kind_subjects(kind), f"{EVENTS_PREFIX}.*.{kind}.{CALLBACK_TOKEN}"]
    return [kind_subjects(kind)]


def callback_ends() -> list[str]:
    """The terminal events of the runs that have a callback URL (what the webhook outbox
    reads)."""
    return [f"{EVENTS_PREFIX}.*.{kind}.{CALLBACK_TOKEN}" for kind in TERMINAL_KINDS]


def agent_dispatches(agent_id: str) -> str:
    """The dispatches addressed to ``agent_id``."""
    check_token(agent_id, "agent id")
    return f"{EVENTS_PREFIX}.*.dispatched.{agent_id}"
