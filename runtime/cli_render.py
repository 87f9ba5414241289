"""How the CLI shows runs, events and logs (rich renderables; no I/O here)."""

from __future__ import annotations

import datetime
import json
import time
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from contracts.logs import RunLogLine, RunLogs
from contracts.run import Run
from contracts.states import RunState
from contracts.values import to_python

STATE_STYLE = {
    RunState.completed: "green",
    RunState.failed: "red",
    RunState.no_resources_available: "red",
    RunState.node_preempted: "red",
    RunState.cancelled: "yellow",
    RunState.running: "cyan",
    RunState.queued: "blue",
}
LOG_TAIL = 20


def state_text(state: RunState) -> Text:
    return Text(str(state), style=STATE_STYLE.get(state, "white"))


def elapsed(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def status_line(run: Run, since: float, now: float | None = None) -> str:
    """``queued · position 2 · waiting for capacity · 3.2s``: what a waiting run is doing."""
    parts = [str(run.state)]
    if run.queue_position is not None:
        parts.append(f"position {run.queue_position}")
    if run.waiting_for is not None:
        parts.append(f"waiting for {run.waiting_for}".replace("_", " "))
    if run.attempt > 1:
        parts.append(f"attempt {run.attempt}")
    parts.append(elapsed((now if now is not None else time.time()) - since))
    return " · ".join(parts)


def value_text(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= 2000 else text[:2000] + f"… ({len(text)} chars)"


def run_summary(run: Run) -> RenderableType:
    """The ended (or current) run: state, outputs, or error with its traceback."""
    took = elapsed(max(run.updated_at - run.created_at, 0.0))
    head = Text.assemble("run ", (run.id, "bold"), " ", state_text(run.state), f" in {took}")
    head.append(f"  ({run.pipeline})", style="dim")
    parts: list[RenderableType] = [head]
    if run.outputs:
        table = Table(show_header=True, box=None, padding=(0, 2))
        table.add_column("#", style="dim")
        table.add_column("type", style="dim")
        table.add_column("value", overflow="fold")
        for i, out in enumerate(run.outputs):
            table.add_row(str(i), str(out.type), value_text(to_python(out)))
        parts.append(table)
    if run.error is not None:
        parts.append(Text(f"error: {run.error.type}: {run.error.message}", style="red"))
        if run.error.traceback:
            parts.append(Text(run.error.traceback.rstrip(), style="dim"))
    return Group(*parts)


def log_pieces(lines: list[RunLogLine], *, timestamps: bool = False) -> list[tuple[str, str]]:
    """``(stream, text)`` per line to print, with a header line where the attempt changes
    (when there are several); stderr lines stay on ``"stderr"``."""
    pieces: list[tuple[str, str]] = []
    attempt = 0
    many = len({line.attempt for line in lines}) > 1
    for line in lines:
        if many and line.attempt != attempt:
            attempt = line.attempt
            pieces.append(("stdout", f"--- attempt {attempt} ---\n"))
        stamp = f"{_clock(line.at)} " if timestamps else ""
        pieces.append((line.stream, f"{stamp}{line.text}\n"))
    return pieces


def log_lines(lines: list[RunLogLine], *, timestamps: bool = False) -> Text:
    """The lines for a terminal: attempt headers dim, stderr lines red."""
    text = Text()
    for stream, piece in log_pieces(lines, timestamps=timestamps):
        style = "red" if stream == "stderr" else ("dim" if piece.startswith("--- ") else "")
        text.append(piece, style=style)
    return text


def log_tail(logs: RunLogs, limit: int = LOG_TAIL) -> RenderableType:
    if not logs.lines:
        return Text("logs: (nothing printed)", style="dim")
    shown = logs.lines[-limit:]
    more = len(logs.lines) - len(shown)
    title = f"logs (last {len(shown)} of {len(logs.lines)} lines):" if more else "logs:"
    lines = log_lines(shown)
    lines.rstrip()
    return Group(Text(title, style="bold"), lines)


def runs_table(runs: list[Run], now: float | None = None) -> Table:
    now = now if now is not None else time.time()
    table = Table(box=None, padding=(0, 1), header_style="bold")
    for column in ("ID", "PIPELINE", "STATE", "WAITING", "CREATED", "TOOK"):
        table.add_column(column, no_wrap=column in ("ID", "PIPELINE", "STATE"))
    for run in runs:
        waiting = ""
        if run.queue_position is not None:
            waiting = f"#{run.queue_position} "
        if run.waiting_for is not None:
            waiting += str(run.waiting_for)
        took = (run.updated_at if run.state.is_terminal else now) - run.created_at
        table.add_row(
            run.id,
            run.pipeline,
            state_text(run.state),
            waiting,
            elapsed(max(now - run.created_at, 0.0)) + " ago",
            elapsed(max(took, 0.0)),
        )
    return table


def events_table(rows: list[tuple[int, dict[str, Any]]]) -> Table:
    table = Table(box=None, padding=(0, 1), header_style="bold")
    for column in ("SEQ", "TIME", "EVENT", "ATTEMPT", "DETAILS"):
        table.add_column(column, overflow="fold", no_wrap=column != "DETAILS")
    for seq, event in rows:
        skip = ("event", "run_id", "at", "attempt")
        details = {k: v for k, v in event.items() if k not in skip and v is not None}
        table.add_row(
            str(seq),
            _clock(event["at"]),
            event["event"],
            str(event.get("attempt", "")),
            ", ".join(f"{k}={_short(v)}" for k, v in details.items()),
        )
    return table


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return text if len(text) <= 120 else text[:117] + "..."


def _clock(at: float) -> str:
    moment = datetime.datetime.fromtimestamp(at, datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
