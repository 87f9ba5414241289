"""Webhooks end to end: real nats-server, scheduler, gateway, agent and deliverer processes,
delivering to an HTTP server on 127.0.0.1; the deliverer SIGKILLed mid-way."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import anyio
import httpx
import pytest

from runtime.control.webhook_delivery import team_consumer
from runtime.control.webhook_policy import verify
from runtime.control.webhooks import OUTBOX
from runtime.infra.eventlog import EventLog
from runtime.infra.natsserver import free_port
from runtime.infra.streams import EVENTS_STREAM, WEBHOOKS_STREAM
from tests.harness import CONFIG, ROOT, Proc, Stack, client, wait_replicas, wait_state

pytestmark = pytest.mark.anyio

SECRET = "whsec_acme_0123456789abcdef"
WEBHOOKS = """
[webhooks]
allowed_hosts = ["127.0.0.1"]
max_attempts = {attempts}
initial_backoff_s = 0.1
max_backoff_s = 0.3
timeout_s = 2
"""


@dataclass
class Receiver:
    """Records every POST; /ok answers 200, /gone 410, /flaky 503 while ``down``, /hang only
    once ``released`` (200)."""

    port: int
    down: bool = True
    released: threading.Event = field(default_factory=threading.Event)
    hanging: int = 0  # /hang requests waiting now
    posts: list[dict] = field(default_factory=list)  # type: ignore[type-arg]
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def status_for(self, path: str) -> int:
        if path == "/gone":
            return 410
        if path == "/flaky" and self.down:
            return 503
        return 200

    def of(self, run_id: str) -> list[dict]:  # type: ignore[type-arg]
        with self.lock:
            return [p for p in self.posts if p["run"]["id"] == run_id]

    def ok(self, run_id: str) -> list[dict]:  # type: ignore[type-arg]
        return [p for p in self.of(run_id) if p["status"] == 200]


def _handler(receiver: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.path == "/hang":
                with receiver.lock:
                    receiver.hanging += 1
                receiver.released.wait(60)
                with receiver.lock:
                    receiver.hanging -= 1
            status = receiver.status_for(self.path)
            with receiver.lock:
                receiver.posts.append(
                    {
                        "path": self.path,
                        "status": status,
                        "delivery": self.headers["Jetrun-Delivery-Id"],
                        "timestamp": self.headers["Jetrun-Timestamp"],
                        "signature": self.headers["Jetrun-Signature"],
                        "body": body,
                        "run": json.loads(body),
                    }
                )
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    return Handler


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    port = free_port()
    box = Receiver(port)
    server = ThreadingHTTPServer(("127.0.0.1", port), _handler(box))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield box
    finally:
        server.shutdown()
        server.server_close()


def write_config(path: Path, attempts: int, extra: str = "") -> None:
    text = CONFIG.format(node_loss_timeout_s=3.0, resource_wait_timeout_s=300.0, keep_ended_s=300.0)
    for team in ("acme", "big"):  # rival: none
        text = text.replace(
            f'tokens = ["tok_{team}"]', f'tokens = ["tok_{team}"]\nwebhook_secret = "{SECRET}"'
        )
    path.write_text(text + WEBHOOKS.format(attempts=attempts) + extra)


def start_deliverer(stack: Stack, name: str, config: Path) -> Proc:
    argv = [sys.executable, "-m", "runtime.cli", "webhooks", *stack.nats_args("webhooks")]
    proc = Proc(name, [*argv, "--config", str(config)], stack.tmp / f"{name}.log").start()
    stack.procs.append(proc)
    return proc


@pytest.fixture(scope="module")
async def hookstack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    async with Stack(tmp_path_factory.mktemp("hooks")) as stack:
        await stack.start_nats()
        write_config(stack.config_path, attempts=3)
        stack.start_scheduler()
        await stack.start_gateway()
        stack.start_agent("agent-demo", "runtime.node.demo", slots=4)
        start_deliverer(stack, "webhooks", stack.config_path)
        await wait_replicas(stack.url, "tok_acme", "demo/echo:v1")
        yield stack


async def run_with_callback(
    stack: Stack, url: str, text: str = "hi", token: str = "tok_acme"
) -> dict:  # type: ignore[type-arg]
    body = {
        "pipeline": "demo/echo:v1",
        "inputs": [{"type": "string", "value": text}],
        "callback_url": url,
    }
    async with client(stack, token) as c:
        response = await c.post("/v4/runs", json=body)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


async def until(check: object, timeout: float = 30.0) -> None:
    with anyio.fail_after(timeout):
        while not check():  # type: ignore[operator]
            await anyio.sleep(0.05)


async def test_an_ended_run_is_posted_once_signed(hookstack: Stack, receiver: Receiver) -> None:
    run = await run_with_callback(hookstack, receiver.url("/ok"), "signed")
    await until(lambda: receiver.ok(run["id"]))
    await anyio.sleep(1.0)  # nothing more comes
    [post] = receiver.of(run["id"])
    assert post["delivery"] == f"dlv_{run['id']}"
    assert verify(SECRET, post["timestamp"], post["signature"], post["body"], now=time.time())
    assert not verify(
        "not-the-secret-xxxxx", post["timestamp"], post["signature"], post["body"], time.time()
    )
    assert post["run"]["state"] == "completed" and post["run"]["outputs"][0]["value"] == "signed"


async def test_callback_urls_are_validated(hookstack: Stack, receiver: Receiver) -> None:
    cases = {
        "ftp://127.0.0.1/x": "invalid_field",
        "http://169.254.169.254/latest/meta-data": "invalid_field",
        "http://user:pw@127.0.0.1/": "invalid_field",
    }
    async with client(hookstack, "tok_acme") as c:
        for url, code in cases.items():
            body = {"pipeline": "demo/echo:v1", "inputs": [{"type": "string", "value": "x"}],
                    "callback_url": url}  # fmt: skip
            response = await c.post("/v4/runs", json=body)
            assert response.status_code == 422, url
            assert response.json()["detail"]["code"] == code
            assert response.json()["detail"]["field"] == "callback_url"
    async with client(hookstack, "tok_rival") as rival:  # no webhook_secret in the config
        body = {"pipeline": "demo/echo:v1", "inputs": [{"type": "string", "value": "x"}],
                "callback_url": receiver.url("/ok")}  # fmt: skip
        response = await rival.post("/v4/runs", json=body)
    assert response.status_code == 422
    assert response.json()["detail"]["code"] == "webhook_secret_missing"


async def jetrun(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "runtime.cli", "webhooks", *stack.nats_args("webhooks"), *args]
    with anyio.fail_after(60):
        env = dict(os.environ, COLUMNS="250")
        done = await anyio.run_process(argv, check=False, cwd=ROOT, env=env)
    return subprocess.CompletedProcess(
        argv, done.returncode, done.stdout.decode(), done.stderr.decode()
    )


async def test_failed_deliveries_are_dead_letters_until_replayed(
    hookstack: Stack, receiver: Receiver
) -> None:
    gone = await run_with_callback(hookstack, receiver.url("/gone"))
    flaky = await run_with_callback(hookstack, receiver.url("/flaky"))

    async def dead_ids() -> dict[str, dict]:  # type: ignore[type-arg]
        listed = await jetrun(hookstack, "dead", "--json")
        assert listed.returncode == 0, listed.stderr
        rows = [json.loads(line) for line in listed.stdout.splitlines()]
        return {row["delivery"]["run"]["id"]: row for row in rows}

    with anyio.fail_after(30):
        while not {gone["id"], flaky["id"]} <= set(await dead_ids()):
            await anyio.sleep(0.2)
    dead = await dead_ids()
    assert dead[gone["id"]]["attempts"] == 1 and dead[gone["id"]]["error"] == "HTTP 410"
    assert dead[flaky["id"]]["attempts"] == 3 and dead[flaky["id"]]["error"] == "HTTP 503"
    assert len(receiver.of(flaky["id"])) == 3
    table = await jetrun(hookstack, "dead")
    assert f"dlv_{gone['id']}" in table.stdout and "HTTP 410" in table.stdout

    receiver.down = False
    try:
        replayed = await jetrun(hookstack, "replay", flaky["id"])
        assert replayed.returncode == 0 and replayed.stdout.strip() == f"queued dlv_{flaky['id']}"
        await until(lambda: receiver.ok(flaky["id"]))
        assert flaky["id"] not in await dead_ids() and gone["id"] in await dead_ids()
        assert {p["delivery"] for p in receiver.of(flaky["id"])} == {f"dlv_{flaky['id']}"}
    finally:
        receiver.down = True
    missing = await jetrun(hookstack, "replay", "run_nothing")
    assert missing.returncode == 1 and "no such dead delivery" in missing.stderr


async def outbox_idle(stack: Stack) -> bool:
    nc = await stack.connect()
    try:
        info = await nc.jetstream().consumer_info(EVENTS_STREAM, OUTBOX)
    finally:
        await nc.close()
    return info.num_pending == 0 and info.num_ack_pending == 0


async def outbox_delivered(stack: Stack) -> int:
    nc = await stack.connect()
    try:
        info = await nc.jetstream().consumer_info(EVENTS_STREAM, OUTBOX)
    finally:
        await nc.close()
    return info.delivered.consumer_seq or 0 if info.delivered else 0


async def test_the_outbox_reads_nothing_of_a_run_without_a_callback(
    hookstack: Stack, receiver: Receiver
) -> None:
    with_one = await run_with_callback(hookstack, receiver.url("/ok"), "one")
    await until(lambda: receiver.ok(with_one["id"]))
    with anyio.fail_after(10):
        while not await outbox_idle(hookstack):
            await anyio.sleep(0.05)
    before = await outbox_delivered(hookstack)
    async with client(hookstack, "tok_acme") as c:
        for text in ("a", "b", "c"):
            body = {"pipeline": "demo/echo:v1", "inputs": [{"type": "string", "value": text}]}
            assert (await c.post("/v4/runs", json=body)).json()["state"] == "completed"
    with_two = await run_with_callback(hookstack, receiver.url("/ok"), "two")
    await until(lambda: receiver.ok(with_two["id"]))
    assert await outbox_delivered(hookstack) == before + 1  # the end of the run with a callback


async def test_a_run_cancelled_by_the_scheduler_is_posted_and_its_attempt_killed(
    hookstack: Stack, receiver: Receiver
) -> None:
    """The scheduler appends a cancelled run's end (the agent a completed one's): it goes where
    the outbox reads it, and the agent still hears the cancellation of a run with a callback
    (whose end has one more subject token): it kills the attempt, no result follows."""
    body = {
        "pipeline": "demo/sleep:v1",
        "inputs": [{"type": "fp", "value": 2.0}],
        "callback_url": receiver.url("/ok"),
        "async_run": True,
    }
    async with client(hookstack, "tok_acme") as c:
        run_id = (await c.post("/v4/runs", json=body)).json()["id"]
        await wait_state(c, run_id, {"running"})
        assert (await c.post(f"/v4/runs/{run_id}/cancel")).status_code == 200
    await until(lambda: receiver.ok(run_id))
    [post] = receiver.of(run_id)
    assert post["run"]["state"] == "cancelled"
    await anyio.sleep(3.0)  # the attempt would have ended by now had it not been killed
    nc = await hookstack.connect()
    try:
        kinds = [s.event.kind for s in await EventLog(nc).read(run_id)]
        end = await nc.jetstream().get_msg(
            EVENTS_STREAM, subject=f"jetrun.ev.{run_id}.cancelled.callback", direct=True
        )
    finally:
        await nc.close()
    assert kinds[-1] == "cancelled" and "completed" not in kinds
    assert end.data is not None


async def test_a_run_submitted_before_the_deliverer_restarted_is_still_posted(
    hookstack: Stack, receiver: Receiver
) -> None:
    """A deliverer started while a run with a callback was running posts it when it ends."""
    body = {
        "pipeline": "demo/sleep:v1",
        "inputs": [{"type": "fp", "value": 3.0}],
        "callback_url": receiver.url("/ok"),
        "async_run": True,
    }
    async with client(hookstack, "tok_acme") as c:
        run_id = (await c.post("/v4/runs", json=body)).json()["id"]
        await wait_state(c, run_id, {"running"})
        with anyio.fail_after(10):
            while not await outbox_idle(hookstack):  # its submitted was read and acked
                await anyio.sleep(0.05)
        old = next(p for p in hookstack.procs if p.name == "webhooks")
        old.stop()
        hookstack.procs.remove(old)
        start_deliverer(hookstack, "webhooks", hookstack.config_path)
        assert (await c.get(f"/v4/runs/{run_id}")).json()["state"] == "running"
    await until(lambda: receiver.ok(run_id))
    [post] = receiver.of(run_id)
    assert post["run"]["state"] == "completed"


async def acked(stack: Stack, in_flight: int) -> bool:
    """Every stored delivery was handed out, and only ``in_flight`` are not acked."""
    nc = await stack.connect()
    try:
        info = await nc.jetstream().consumer_info(WEBHOOKS_STREAM, team_consumer("acme"))
    finally:
        await nc.close()
    return info.num_pending == 0 and info.num_ack_pending == in_flight


async def test_a_killed_deliverer_loses_nothing_and_sends_nothing_twice(
    hookstack: Stack, receiver: Receiver
) -> None:
    main = next(p for p in hookstack.procs if p.name == "webhooks")
    main.stop()
    hookstack.procs.remove(main)
    patient = hookstack.tmp / "patient.toml"
    write_config(patient, attempts=1000)  # retries /flaky for as long as the test needs
    first = start_deliverer(hookstack, "webhooks-b", patient)
    receiver.down = True
    try:
        ok = [await run_with_callback(hookstack, receiver.url("/ok"), f"ok{i}") for i in range(3)]
        flaky = [await run_with_callback(hookstack, receiver.url("/flaky")) for _ in range(2)]
        await until(lambda: all(receiver.ok(r["id"]) for r in ok))
        await until(lambda: all(receiver.of(r["id"]) for r in flaky))
        with anyio.fail_after(30):
            while not await acked(hookstack, in_flight=2):  # ok ones acked, flaky ones retrying
                await anyio.sleep(0.1)
        first.kill()  # SIGKILL, mid-retry
        later = [await run_with_callback(hookstack, receiver.url("/ok"), "late")]  # while down
        receiver.down = False
        start_deliverer(hookstack, "webhooks-c", patient)
        runs = ok + flaky + later
        await until(lambda: all(receiver.ok(r["id"]) for r in runs), timeout=60)
        await anyio.sleep(1.0)  # anything sent twice would come now
    finally:
        receiver.down = True
    for run in runs:
        assert len(receiver.ok(run["id"])) == 1, run["id"]  # one 2xx per delivery id
        posts = receiver.of(run["id"])
        assert {p["delivery"] for p in posts} == {f"dlv_{run['id']}"}
        assert all(
            verify(SECRET, p["timestamp"], p["signature"], p["body"], time.time()) for p in posts
        )
    for run in ok + later:
        assert len(receiver.of(run["id"])) == 1  # acked before the kill: never sent again


async def test_a_team_whose_endpoint_hangs_delays_no_other_teams_callbacks(
    hookstack: Stack, receiver: Receiver
) -> None:
    """Two slots in all, one per team: acme's endpoint hangs (each POST waits 30 s for its
    timeout), yet big's callbacks arrive at once."""
    for proc in [p for p in hookstack.procs if p.name.startswith("webhooks")]:
        proc.stop()
        hookstack.procs.remove(proc)
    fair = hookstack.tmp / "fair.toml"
    write_config(fair, attempts=1000)
    fair.write_text(
        fair.read_text().replace(
            "timeout_s = 2", "timeout_s = 30\nconcurrency = 2\nteam_concurrency = 1"
        )
    )
    start_deliverer(hookstack, "webhooks-fair", fair)
    receiver.released.clear()
    try:
        hung = [
            await run_with_callback(hookstack, receiver.url("/hang"), f"h{i}") for i in range(3)
        ]
        await until(lambda: receiver.hanging == 1)
        theirs = [
            await run_with_callback(hookstack, receiver.url("/ok"), f"b{i}", token="tok_big")
            for i in range(3)
        ]
        await until(lambda: all(receiver.ok(r["id"]) for r in theirs), timeout=10)
        assert receiver.hanging == 1  # acme's POSTs: one at a time (its cap), still hung
    finally:
        receiver.released.set()
    await until(lambda: all(receiver.ok(r["id"]) for r in hung), timeout=60)


async def test_jetrun_up_runs_the_deliverer(tmp_path: Path, receiver: Receiver) -> None:
    """With no config, ``jetrun up``'s demo team signs its callbacks with the demo secret and
    may call this machine."""
    from runtime.infra.config import DEMO_WEBHOOK_SECRET
    from tests.test_up import up, wait_output

    port = free_port()
    proc = up(tmp_path, port, "up-hooks")
    try:
        await wait_output(proc, "Ctrl-C stops everything.")
        body = {"pipeline": "demo/echo:v1", "inputs": [{"type": "string", "value": "up"}],
                "callback_url": receiver.url("/ok")}  # fmt: skip
        headers = {"Authorization": "Bearer jr_demo_token"}
        async with httpx.AsyncClient(timeout=30) as c:
            response = await c.post(f"http://127.0.0.1:{port}/v4/runs", json=body, headers=headers)
        run = response.json()
        assert run["state"] == "completed", response.text
        await until(lambda: receiver.ok(run["id"]))
        [post] = receiver.of(run["id"])
        assert verify(
            DEMO_WEBHOOK_SECRET, post["timestamp"], post["signature"], post["body"], time.time()
        )
    finally:
        proc.stop()
