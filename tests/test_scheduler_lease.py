"""One scheduler decides at a time (a lease in NATS KV); a hot standby takes over within a few
seconds of the leader's death, and a leader whose lease ran out appends no decision."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from runtime.infra.eventlog import EventLog, kind_subjects
from runtime.infra.lease import LEASE_BUCKET, SCHEDULER_KEY, Lease
from runtime.infra.natsserver import NatsServer
from tests.harness import FIXTURES, Load, Proc, Stack, audit, wait_replicas

pytestmark = pytest.mark.anyio

GATES = str(FIXTURES / "gate_pipelines.py")


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[NatsServer]:
    async with NatsServer(store_dir=tmp_path / "nats") as server:
        yield server


async def test_one_holder_at_a_time_and_the_next_takes_over_after_the_ttl(
    server: NatsServer,
) -> None:
    nc = await server.connect("admin", "test")  # the bucket: made by the admin step
    try:
        a = Lease(nc.jetstream(), "a", monotonic=time.monotonic, ttl_s=1.2)
        b = Lease(nc.jetstream(), "b", monotonic=time.monotonic, ttl_s=1.2)
        await a.ensure()
        await b.ensure()
        with anyio.fail_after(5):
            await a.acquire()
        assert a.valid() and not await b._try(take=True)
        # a stops renewing (frozen or dead): its own clock says it lost the lease before the
        # server lets b take it
        taken_at = time.monotonic()
        with anyio.fail_after(10):
            await b.acquire()
        assert not a.valid() and b.valid()
        assert time.monotonic() - taken_at >= 1.2 - 1.2 / 3 - 0.05
        with anyio.fail_after(5):  # a's renewal is refused: it knows it lost
            await a.keep()
        assert not a.valid()
        await b.release()  # given back: a takes it at once
        with anyio.fail_after(2):
            await a.acquire()
    finally:
        await nc.close()


async def leader(stack: Stack, names: list[str], timeout: float = 30.0) -> Proc:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        leading = [p for p in stack.procs if p.name in names and "holds the lease" in p.output()]
        if leading:
            assert len(leading) == 1, "two schedulers lead at once"
            return leading[0]
        await anyio.sleep(0.1)
    raise TimeoutError("no scheduler took the lease")


async def test_killing_the_leading_scheduler_under_load_loses_nothing_and_runs_nothing_twice(
    tmp_path: Path,
) -> None:
    async with Stack(tmp_path / "stack", node_loss_timeout_s=2.0) as stack:
        stack.tmp.mkdir()
        await stack.start_nats()
        stack.start_scheduler("scheduler-a")
        stack.start_scheduler("scheduler-b")
        await stack.start_gateway()
        stack.start_agent("agent-1", GATES, slots=2)
        stack.start_agent("agent-2", GATES, slots=2)
        await wait_replicas(stack.url, "tok_big", "test/count:v1", n=2)
        first = await leader(stack, ["scheduler-a", "scheduler-b"])
        standby = "scheduler-b" if first.name == "scheduler-a" else "scheduler-a"
        load = Load(stack, tmp_path, seconds=0.05)
        async with anyio.create_task_group() as tg:
            tg.start_soon(load.submit_many, 60, "scheduler")
            with anyio.fail_after(60):
                while len(load.run_ids) < 20:
                    await anyio.sleep(0.05)
            first.kill()
            killed_at = time.monotonic()
            await leader(stack, [standby])  # timed while the load goes on (not after it)
            took = time.monotonic() - killed_at
        assert took < 10, f"the standby took {took:.1f} s to take over"
        result = await audit(load, timeout=120)
        assert result.submitted == 60
        assert result.lost == 0, result
        assert result.ran_twice == 0, result
        assert result.states == {"completed": 60}, result


async def test_a_lease_write_whose_answer_was_lost_is_kept(server: NatsServer) -> None:
    """A create that timed out on the client but landed on the server (a frozen or overloaded
    server) is this process's lease: it is read back and kept at once, instead of waiting out
    a whole TTL for a key that holds its own id (what made a takeover take 16 s under load)."""
    nc = await server.connect("admin", "test")
    try:
        lease = Lease(nc.jetstream(), "b", monotonic=time.monotonic, ttl_s=6.0)
        await lease.ensure()
        assert server.pid is not None
        os.kill(server.pid, signal.SIGSTOP)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(lease.acquire)
                await anyio.sleep(2.5)  # the create times out (after 2 s) while it waits
                os.kill(server.pid, signal.SIGCONT)  # ... and lands now
                resumed = time.monotonic()
                with anyio.fail_after(10):
                    while not lease.valid():
                        await anyio.sleep(0.05)
        finally:
            os.kill(server.pid, signal.SIGCONT)
        assert time.monotonic() - resumed < 6.0, "it waited for its own key to expire"
        entry = await (await nc.jetstream().key_value(LEASE_BUCKET)).get(SCHEDULER_KEY)
        assert entry.value == b"b" and entry.revision == lease.term
        with anyio.fail_after(10):  # and it renews it on that revision
            assert await lease._try(take=False)
    finally:
        await nc.close()


async def test_setting_the_bucket_up_outlasts_a_stalled_server(server: NatsServer) -> None:
    """A lookup that times out at startup (a cluster still electing its leaders, a server
    frozen for a moment) is retried: the scheduler that calls ``ensure`` does not die of it."""
    nc = await server.connect("admin", "test")  # the bucket: made by the admin step
    try:
        lease = Lease(nc.jetstream(timeout=0.3), "a", monotonic=time.monotonic)
        assert server.pid is not None
        os.kill(server.pid, signal.SIGSTOP)
        try:
            with anyio.fail_after(30):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(lease.ensure)
                    await anyio.sleep(1.0)  # several lookups time out meanwhile
                    os.kill(server.pid, signal.SIGCONT)
        finally:
            os.kill(server.pid, signal.SIGCONT)
        with anyio.fail_after(10):
            await lease.acquire()
        assert lease.valid()
    finally:
        await nc.close()


async def test_a_frozen_leader_is_fenced_out_by_the_server_when_it_wakes(tmp_path: Path) -> None:
    """SIGSTOP the leader under load until the standby leads, SIGCONT it: whatever it decided
    from its stale picture is refused by the server (no requeue of a run that never lost its
    node, nothing run twice), and it stands by."""
    async with Stack(tmp_path / "stack", node_loss_timeout_s=2.0) as stack:
        stack.tmp.mkdir()
        await stack.start_nats()
        stack.start_scheduler("scheduler-a")
        stack.start_scheduler("scheduler-b")
        await stack.start_gateway()
        stack.start_agent("agent-1", GATES, slots=2)
        stack.start_agent("agent-2", GATES, slots=2)
        await wait_replicas(stack.url, "tok_big", "test/count:v1", n=2)
        first = await leader(stack, ["scheduler-a", "scheduler-b"])
        standby = "scheduler-b" if first.name == "scheduler-a" else "scheduler-a"
        load = Load(stack, tmp_path, seconds=3.0)  # runs are running all along the freeze
        async with anyio.create_task_group() as tg:
            tg.start_soon(load.submit_many, 24, "frozen")
            with anyio.fail_after(60):
                while len(load.run_ids) < 12:
                    await anyio.sleep(0.05)
            first.signal(signal.SIGSTOP)
            try:
                await leader(stack, [standby])
            finally:
                first.signal(signal.SIGCONT)
        with anyio.fail_after(30):
            while "standing by" not in first.output():
                await anyio.sleep(0.1)
        result = await audit(load, timeout=120)
        # woken with a picture 4 s old, it took the live agents for lost and decided to end
        # their runs: the server refused that (its own clock was not asked)
        assert "decision refused by the server" in first.output(), first.output()[-2000:]
        nc = await stack.connect("admin", "audit")
        try:  # nothing it decided from that picture was stored: no run lost its node
            log = EventLog(nc)
            for kind in ("preempted", "requeued"):
                assert await log.read_subject(kind_subjects(kind)) == [], kind
        finally:
            await nc.close()
        assert result.lost == 0, result
        assert result.ran_twice == 0, result
        assert result.states == {"completed": 24}, result
