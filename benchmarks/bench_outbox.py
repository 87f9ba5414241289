"""The webhook outbox alone: CPU per ended run of reading the log for callbacks to send.

    python benchmarks/bench_outbox.py [--runs 5000] [--with-callback 0.02] [--rounds 3]

Starts a nats-server (streams provisioned), fills the event log with ``--runs`` runs that went
submitted -> queued -> dispatched -> started -> completed (a share ``--with-callback`` of them
with a callback URL), then runs the outbox of ``jetrun webhooks`` in this process until its
consumer has acked every event, and prints the CPU this process used per run (and the wall
time). Only the outbox runs (nothing is POSTed: deliveries stay queued). The same script
measures an older tree with ``PYTHONPATH=<that tree>``. Runs on uvloop, as the services do.
Loopback only; every wait is bounded.
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import sys
import tempfile
import time
from pathlib import Path

import anyio

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.append(str(HERE.parent))

from contracts import RunSubmitted  # noqa: E402
from contracts.events import (  # noqa: E402
    AdmissionGrant,
    AnyEvent,
    RunCompleted,
    RunDispatched,
    RunQueued,
    RunStarted,
)
from contracts.values import RunIO  # noqa: E402
from runtime.control import webhooks  # noqa: E402
from runtime.infra.config import parse  # noqa: E402
from runtime.infra.eventlog import EventLog, LogSettings  # noqa: E402
from runtime.infra.natsserver import NatsServer  # noqa: E402
from runtime.infra.streams import EVENTS_STREAM  # noqa: E402
from runtime.provision import provision  # noqa: E402

CONFIG = parse(
    {
        "teams": {"acme": {"tier": "basic", "tokens": ["tok"], "webhook_secret": "s" * 16}},
        "tiers": {"basic": 1_000_000},
        "webhooks": {"allowed_hosts": ["127.0.0.1"]},
    }
)


def history(i: int, at: float, callback: bool) -> list[AnyEvent]:
    run_id = f"run_{i:08d}{int(at * 1000) % 100000:05d}"
    url = "http://127.0.0.1:9/hook" if callback else None
    return [
        RunSubmitted(
            run_id=run_id,
            at=at,
            team="acme",
            pipeline="demo/echo:v1",
            inputs=[RunIO(type="string", value="x" * 16)],
            admission=AdmissionGrant(tier="basic"),
            callback_url=url,
        ),
        RunQueued(run_id=run_id, at=at, attempt=1),
        RunDispatched(run_id=run_id, at=at, attempt=1, agent_id="a1"),
        RunStarted(run_id=run_id, at=at, attempt=1, agent_id="a1"),
        RunCompleted(run_id=run_id, at=at, attempt=1, outputs=[RunIO(type="string", value="y")]),
    ]


async def fill(log: EventLog, runs: int, share: float) -> int:
    every = max(1, round(1 / share)) if share > 0 else 0
    at = time.time()
    limiter = anyio.CapacityLimiter(64)
    # a tree whose appends say whether a run has a callback (its end's subject then does)
    marks = "callback" in inspect.signature(EventLog.append).parameters

    async def one(i: int) -> None:
        callback = bool(every) and i % every == 0
        async with limiter:
            for event in history(i, at, callback):
                if marks:
                    await log.append(event, callback=callback)  # type: ignore[call-arg,unused-ignore]
                else:
                    await log.append(event)

    async with anyio.create_task_group() as tg:
        for i in range(runs):
            tg.start_soon(one, i)
    return runs // every if every else 0


async def drain(service: webhooks.WebhookService, runs: int) -> tuple[float, float]:
    """(CPU s, wall s) of the outbox until its consumer has acked everything."""
    await service.ensure()
    js = service.js
    psub = await js.pull_subscribe_bind(durable=webhooks.OUTBOX, stream=EVENTS_STREAM)
    cpu, wall = time.process_time(), time.perf_counter()
    async with anyio.create_task_group() as tg:
        tg.start_soon(service._outbox_loop, psub)
        with anyio.fail_after(600):
            while True:
                await anyio.sleep(0.2)
                info = await js.consumer_info(EVENTS_STREAM, webhooks.OUTBOX)
                if not info.num_pending and not info.num_ack_pending:
                    break
        tg.cancel_scope.cancel()
    return time.process_time() - cpu, time.perf_counter() - wall


async def one_round(runs: int, share: float) -> tuple[float, float]:
    with tempfile.TemporaryDirectory(prefix="jetrun-outbox-") as tmp:
        server = NatsServer(store_dir=Path(tmp) / "nats", auth=False)
        async with server:
            nc = await server.connect("admin", "bench-outbox")
            try:
                settings = LogSettings()
                await provision(nc, CONFIG, settings)
                log = EventLog(nc, settings)
                callbacks = await fill(log, runs, share)
                service = webhooks.WebhookService(nc, CONFIG, settings=settings)
                cpu, wall = await drain(service, runs)
            finally:
                await nc.close()
    print(
        f"  {runs} runs ({callbacks} with a callback): outbox CPU {cpu / runs * 1e6:6.0f} us/run,"
        f" wall {wall:5.2f} s",
        flush=True,
    )
    return cpu / runs * 1e6, wall


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5000)
    parser.add_argument("--with-callback", type=float, default=0.02)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"code: {webhooks.__file__}")
    options = {"use_uvloop": True}  # as the services run
    results = [
        anyio.run(one_round, args.runs, args.with_callback, backend_options=options)
        for _ in range(args.rounds)
    ]
    cpu = statistics.median(r[0] for r in results)
    print(f"median outbox CPU: {cpu:.0f} us per ended run")


if __name__ == "__main__":
    main()
