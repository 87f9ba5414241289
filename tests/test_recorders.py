"""Second writers of views, history and checkpoint, against a real nats-server. Two recorders
at once (an HA pair of ``jetrun up`` with dedicated gateways), one of them stopped and started
again from the checkpoint meanwhile: every run is listed once, in log order, with its view
stored, and the checkpoint moves past them all. A standby scheduler whose leader (or recorder)
died with views not stored stores them when it takes over."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest
from nats.aio.client import Client

from runtime.control.history import RunHistory
from runtime.control.recorder import Recorder
from runtime.control.views import RunViews, ViewKeeper
from runtime.infra.eventlog import EventLog, LogSettings
from runtime.infra.projection import RunIndex
from runtime.provision import provision
from tests.test_history import CONFIG, T0, completed_history, submitted

pytestmark = pytest.mark.anyio


@pytest.fixture
async def log(nc: Client) -> AsyncIterator[EventLog]:
    await provision(nc, CONFIG, LogSettings())
    yield EventLog(nc)


async def listed(history: RunHistory, team: str) -> list[tuple[int, str, int]]:
    newest = await history.newest(team)
    if newest is None:
        return []
    return [(n, e.run_id, e.seq) async for n, e in history.entries(team, newest[0], 1)]


async def test_two_recorders_list_every_run_once_and_store_every_view(
    nc: Client, log: EventLog
) -> None:
    views = RunViews(log.js)
    await views.require()
    history = RunHistory(log.js)
    teams = {"acme": [f"a{i:02d}" for i in range(40)], "rival": [f"r{i:02d}" for i in range(20)]}
    order = [(t, ids[i]) for i in range(40) for t, ids in teams.items() if i < len(ids)]

    async def recorder(scope: anyio.CancelScope) -> None:
        with scope:
            await Recorder(nc, CONFIG).run()

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            tg.start_soon(recorder, anyio.CancelScope())
            second = anyio.CancelScope()
            tg.start_soon(recorder, second)
            for k, (team, run_id) in enumerate(order):
                for event in completed_history(run_id, T0 + k, team):
                    await log.append(event)
                if k == 25:  # one of them stops (its unstored runs with it) and starts again
                    second.cancel()
                    second = anyio.CancelScope()
                    tg.start_soon(recorder, second)
                if k % 8 == 0:
                    await anyio.sleep(0.3)  # steps of both happen while runs keep coming
            last = await log.last_seq()
            for team, ids in teams.items():
                while len(await listed(history, team)) < len(ids):
                    await anyio.sleep(0.1)
            for run_id in (r for ids in teams.values() for r in ids):
                while (view := await views.get(run_id)) is None:
                    await anyio.sleep(0.1)
                assert view.state.is_terminal
            # every run stored and listed: the checkpoint has nothing of them to read again
            while (
                checkpoint := await views.checkpoint()
            ) is None or checkpoint.replay_from <= last:
                await anyio.sleep(0.1)
            tg.cancel_scope.cancel()
    for team, ids in teams.items():
        entries = await listed(history, team)
        assert [n for n, _, _ in entries] == list(range(len(ids), 0, -1))  # no gap, none twice
        assert [run_id for _, run_id, _ in entries] == ids[::-1]  # in log order
        seqs = [seq for _, _, seq in entries]
        assert seqs == sorted(seqs, reverse=True)


async def test_a_standby_stores_the_views_its_writer_died_without_storing(
    nc: Client, log: EventLog
) -> None:
    views = RunViews(log.js)
    await views.require()
    writer_index, standby_index = RunIndex(), RunIndex()
    writer = ViewKeeper(views, writer_index, CONFIG.settings)  # the leader's, or a recorder's
    standby = ViewKeeper(views, standby_index, CONFIG.settings)  # a scheduler's, not leading
    later = T0 + 1000  # past keep_ended_s of every run here

    def both(run_id: str, first_seq: int) -> None:
        for seq, event in enumerate(completed_history(run_id, T0), start=first_seq):
            writer_index.apply(seq, event)
            standby_index.apply(seq, event)

    both("early", 1)  # stored, listed and forgotten by its writer, whose checkpoint moves on
    await writer.step(later, 0.0)
    await standby.step(later, 0.0, leading=False)
    assert standby_index.get("early") is None and not standby.unstored  # the standby lets go
    assert await views.get("early") is not None

    both("late", 6)  # its writer dies before storing its view (or listing it)
    soon = T0 + 10  # the takeover comes within keep_ended_s of the run's end
    await standby.step(soon, 1.0, leading=False)
    assert standby_index.get("late") is not None and "late" in standby.unstored
    await standby.step(soon, 2.0, leading=True)  # the standby takes over
    view = await views.get("late")
    assert view is not None and view.state.is_terminal
    await standby.step(later, 3.0 + CONFIG.settings.checkpoint_every_s, leading=True)
    checkpoint = await views.checkpoint()
    assert checkpoint is not None and checkpoint.replay_from == 11  # past both, both stored


async def test_a_standby_lets_go_of_runs_ended_keep_ended_s_ago_while_a_live_run_runs_on(
    nc: Client, log: EventLog
) -> None:
    views = RunViews(log.js)
    await views.require()
    writer_index, standby_index = RunIndex(), RunIndex()
    writer = ViewKeeper(views, writer_index, CONFIG.settings)
    standby = ViewKeeper(views, standby_index, CONFIG.settings)
    events = [submitted("long", T0), *completed_history("done", T0)]  # "long" runs on
    for seq, event in enumerate(events, start=1):
        writer_index.apply(seq, event)
        standby_index.apply(seq, event)
    later = T0 + CONFIG.settings.keep_ended_s + 10
    await writer.step(later, 0.0)
    checkpoint = await views.checkpoint()
    assert checkpoint is not None and checkpoint.replay_from == 1  # held back by "long"
    assert await views.get("done") is not None
    await standby.step(later, 1.0, leading=False)
    # bounded by keep_ended_s, as a standby always was, whatever the checkpoint says
    assert "done" not in standby.unstored and standby_index.get("done") is None
    assert standby_index.get("long") is not None
