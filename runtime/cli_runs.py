"""The user-facing commands: ``jetrun run``, ``jetrun runs ls|get|cancel|watch``,
``jetrun logs`` (over the HTTP API, as a team) and ``jetrun events`` (over NATS, for operators).

Exit codes: 0 when the command did what was asked (``run``: the run completed), 1 when a run
ended otherwise or the API said no, 2 for bad usage, 130 when interrupted.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import anyio
import click
import httpx
import msgspec
from rich.console import Console
from rich.live import Live

from contracts.logs import Stream
from contracts.run import Run
from contracts.states import RunState
from runtime import cli_render as render
from runtime.cli_auth import ca_option, credentials_for, seed_option
from runtime.clients.cli_client import InputError, parse_input, resolve
from runtime.clients.sdk import Client, ConcurrencyLimitReached, JetrunError

T = TypeVar("T")
POLL_S = 0.25
_json = msgspec.json.Encoder()


def api_options(command: Callable[..., Any]) -> Callable[..., Any]:
    command = click.option(
        "--token", envvar="JETRUN_TOKEN", default=None, help="API token ($JETRUN_TOKEN)."
    )(command)
    return click.option(
        "--url",
        envvar="JETRUN_URL",
        default=None,
        help="Gateway URL ($JETRUN_URL; default http://127.0.0.1:8080).",
    )(command)


@contextlib.contextmanager
def api(url: str | None, token: str | None) -> Iterator[Client]:
    """A client for the resolved URL and token; API and connection errors become messages."""
    try:
        settings = resolve(url, token)
    except InputError as err:
        raise click.UsageError(str(err)) from None
    if not settings.token:
        raise click.UsageError(
            'no API token: pass --token, set JETRUN_TOKEN, or put token = "..." in '
            "~/.config/jetrun/client.toml (jetrun up prints the demo token)"
        )
    try:
        with Client(settings.url, settings.token, timeout=30.0) as client:
            yield client
    except ConcurrencyLimitReached as full:
        raise click.ClickException(
            f"your team is at its limit of {full.limit} concurrent runs (tier {full.tier}); "
            f"retry in {full.retry_after:g}s"
        ) from None
    except JetrunError as err:
        raise click.ClickException(_api_message(err)) from None
    except httpx.TransportError as err:
        raise click.ClickException(f"cannot reach jetrun at {settings.url}: {err}") from None


def _api_message(err: JetrunError) -> str:
    detail = err.detail if isinstance(err.detail, dict) else {}
    if detail.get("code") == "run_not_found":
        return f"{detail.get('message')} (or it is not your team's)"
    field = f" [{detail['field']}]" if detail.get("field") else ""
    return f"{detail.get('code', f'HTTP {err.status}')}{field}: {detail.get('message', err)}"


def _out(as_json: bool) -> Console:
    return Console(highlight=False, soft_wrap=as_json)


def _err() -> Console:
    return Console(stderr=True, highlight=False)


def _print_json(value: Any) -> None:
    click.echo(_json.encode(value).decode())


# --- jetrun run ---------------------------------------------------------------------------


@click.command("run")
@click.argument("pointer")
@click.argument("inputs", nargs=-1)
@click.option("--async", "async_run", is_flag=True, help="Submit and print the run id; no wait.")
@click.option(
    "--wait-for-resources",
    is_flag=True,
    help="Queue even if no replica is up (default: fail at once with no_resources_available).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the run as JSON.")
@click.option("--timeout", type=float, default=None, help="Stop waiting after this many s.")
@api_options
def run_command(
    pointer: str,
    inputs: tuple[str, ...],
    async_run: bool,
    wait_for_resources: bool,
    as_json: bool,
    timeout: float | None,
    url: str | None,
    token: str | None,
) -> None:
    """Run POINTER with INPUTS and wait for it, showing its state, then its outputs.

    INPUTS: JSON (5, '"text"', '[1,2]', '{"type": "integer", "value": 5}'), TYPE:VALUE
    (string:5, integer:5, fp:0.5, boolean:true, array:'[1,2]', dictionary:'{"a":1}', none:,
    file:URL), or a plain string.
    """
    try:
        values = [parse_input(arg, i) for i, arg in enumerate(inputs)]
    except InputError as err:
        raise click.BadParameter(str(err), param_hint="INPUTS") from None
    with api(url, token) as client:
        run = client.run_pipeline(
            pointer, *values, async_run=True, wait_for_resources=wait_for_resources
        )
        if async_run:
            _print_json(run) if as_json else click.echo(run.id)
            return
        run = _wait(client, run, timeout)
        _show(client, run, as_json)
    sys.exit(0 if run.state is RunState.completed else 1)


def _wait(client: Client, run: Run, timeout: float | None) -> Run:
    """Poll until the run ends, with a live status line on a terminal (state changes as
    lines otherwise); Ctrl-C stops waiting, not the run."""
    console = _err()
    deadline = time.monotonic() + timeout if timeout is not None else None
    try:
        if console.is_terminal:
            with console.status(render.status_line(run, run.created_at)) as status:
                return _poll(client, run, deadline, lambda r: status.update(_line(r)))
        said: list[str] = []

        def say(r: Run) -> None:
            line = render.status_line(r, r.created_at).rsplit(" · ", 1)[0]
            if not said or said[-1] != line:
                said.append(line)
                console.print(line)

        say(run)
        return _poll(client, run, deadline, say)
    except KeyboardInterrupt:
        console.print(f"stopped waiting; {run.id} goes on (jetrun runs get / runs cancel)")
        sys.exit(130)


def _line(run: Run) -> str:
    return render.status_line(run, run.created_at)


def _poll(client: Client, run: Run, deadline: float | None, update: Callable[[Run], None]) -> Run:
    while not run.state.is_terminal:
        if deadline is not None and time.monotonic() >= deadline:
            raise click.ClickException(f"{run.id} is still {run.state}; gave up waiting")
        time.sleep(POLL_S)
        run = client.get_run(run.id)
        update(run)
    return run


def _show(client: Client, run: Run, as_json: bool) -> None:
    """The run; with its last log lines when it did not complete."""
    if as_json:
        _print_json(run)
        return
    console = _out(as_json)
    console.print(render.run_summary(run))
    if run.state.is_terminal and run.state is not RunState.completed:
        console.print(render.log_tail(client.get_run_logs(run.id)))
        console.print(f"all logs: jetrun logs {run.id}", style="dim")


# --- jetrun runs ... ----------------------------------------------------------------------


@click.group("runs")
def runs_group() -> None:
    """List, inspect, cancel and watch your team's runs."""


@runs_group.command("get")
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True)
@api_options
def runs_get(run_id: str, as_json: bool, url: str | None, token: str | None) -> None:
    """A run: state, outputs, or its error and last log lines."""
    with api(url, token) as client:
        run = client.get_run(run_id)
        if not as_json and not run.state.is_terminal:
            _err().print(render.status_line(run, run.created_at))
        _show(client, run, as_json)


@runs_group.command("cancel")
@click.argument("run_id")
@api_options
def runs_cancel(run_id: str, url: str | None, token: str | None) -> None:
    """Cancel a run (its worker is killed); prints its state after."""
    with api(url, token) as client:
        run = client.cancel_run(run_id)
    click.echo(f"{run.id} {run.state}")


def _page(client: Client, pipeline: str | None, states: tuple[str, ...], limit: int) -> list[Run]:
    return client.list_runs(pipeline=pipeline, state=list(states) or None, limit=limit).runs


list_options = [
    click.option("--pipeline", default=None, help="A pointer or pipeline id."),
    click.option("--state", "states", multiple=True, help="Only runs in this state; repeatable."),
    click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 100)),
]


def _with_list_options(command: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(list_options):
        command = option(command)
    return command


@runs_group.command("ls")
@_with_list_options
@click.option("--json", "as_json", is_flag=True)
@api_options
def runs_ls(
    pipeline: str | None,
    states: tuple[str, ...],
    limit: int,
    as_json: bool,
    url: str | None,
    token: str | None,
) -> None:
    """Your team's runs, newest first."""
    with api(url, token) as client:
        runs = _page(client, pipeline, states, limit)
    if as_json:
        for run in runs:
            _print_json(run)
    else:
        _out(False).print(render.runs_table(runs))


@runs_group.command("watch")
@_with_list_options
@click.option("--interval", default=1.0, show_default=True, type=float)
@api_options
def runs_watch(
    pipeline: str | None,
    states: tuple[str, ...],
    limit: int,
    interval: float,
    url: str | None,
    token: str | None,
) -> None:
    """A live table of your team's runs (Ctrl-C stops)."""
    with api(url, token) as client:
        table = render.runs_table(_page(client, pipeline, states, limit))
        try:
            with Live(table, console=_out(False), auto_refresh=False) as live:
                while True:
                    time.sleep(interval)
                    live.update(render.runs_table(_page(client, pipeline, states, limit)))
                    live.refresh()
        except KeyboardInterrupt:
            return


# --- jetrun logs / events -----------------------------------------------------------------


@click.command("logs")
@click.argument("run_id")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines until the run ends.")
@click.option("-t", "--timestamps", is_flag=True, help="Prefix each line with its time (UTC).")
@click.option(
    "--stream",
    type=click.Choice(["stdout", "stderr"]),
    default=None,
    help="Only what the pipeline wrote to this stream.",
)
@api_options
def logs_command(
    run_id: str,
    follow: bool,
    timestamps: bool,
    stream: Stream | None,
    url: str | None,
    token: str | None,
) -> None:
    """What RUN_ID's pipeline printed, every attempt: its stdout here on stdout, its stderr
    on stderr (so ``2>/dev/null`` keeps only stdout)."""
    with api(url, token) as client:
        if not follow:
            logs = client.get_run_logs(run_id, stream)
            _print_lines(render.log_pieces(logs.lines, timestamps=timestamps))
            return
        try:
            for line in client.follow_run_logs(run_id, stream):
                _print_lines(render.log_pieces([line], timestamps=timestamps))
        except KeyboardInterrupt:
            return


def _print_lines(pieces: list[tuple[str, str]]) -> None:
    for stream, text in pieces:
        out = sys.stderr if stream == "stderr" else sys.stdout
        out.write(text)
        out.flush()


@click.command("events")
@click.argument("run_id")
@click.option(
    "--nats",
    "nats_url",
    envvar="JETRUN_NATS",
    default="nats://127.0.0.1:4222",
    show_default="$JETRUN_NATS or nats://127.0.0.1:4222",
)
@seed_option
@ca_option
@click.option("--json", "as_json", is_flag=True, help="One event per line, as stored.")
def events_command(
    run_id: str, nats_url: str, nats_seed: Path | None, nats_ca: Path | None, as_json: bool
) -> None:
    """RUN_ID's own events, read from the event log over NATS (for operators; the service or
    admin seed), with its dispatch and end where a batch carried them (``dispatched_runs``,
    ``ended_runs``: shown as the run's own). A queued batched with other runs' by a decision
    pass is not among them."""
    credentials = credentials_for("service", nats_seed, nats_ca)
    from runtime.infra.eventlog import EventLog
    from runtime.infra.nats_conn import connect

    logging.getLogger("jetrun").setLevel(logging.WARNING)  # not the connection's comings, goings

    async def read() -> list[tuple[int, dict[str, Any]]]:
        nc = await connect(nats_url, "jetrun-events", credentials)
        try:
            stored = await EventLog(nc).history(run_id)
        finally:
            await nc.close()
        return [(s.seq, msgspec.to_builtins(s.event)) for s in stored]

    try:
        rows = anyio.run(read)
    except Exception as err:
        raise click.ClickException(f"cannot read the event log at {nats_url}: {err!r}") from None
    if not rows:
        raise click.ClickException(f"no events for {run_id}")
    if as_json:
        for seq, event in rows:
            _print_json({"seq": seq, **event})
    else:
        _out(False).print(render.events_table(rows))
