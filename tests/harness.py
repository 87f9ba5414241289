"""Real processes for end-to-end and fault tests: nats-server, gateways, schedulers, agents.

Every process is started with ``python -m runtime.cli ...`` exactly as an operator would, on
loopback ports, and its output goes to a log file in the test's temp dir (printed on failure).
Waiting is bounded polling of public endpoints (``/readyz``, the scaling endpoint).

NATS authorization is always on: the stack's servers accept only the role nkeys in
``<tmp>/credentials``; streams are created by the admin step (``jetrun setup``'s code) before
any service starts, and every service connects with its own role; each agent gets an identity
of its own (``agent_credentials``: minted, and the servers reloaded, as it starts). Tests
inspect NATS with ``await stack.connect()`` (admin) or ``stack.connect("gateway")`` to act as
a role.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import httpx
from nats.aio.client import Client

from runtime.infra import certs
from runtime.infra.config import load
from runtime.infra.eventlog import LogSettings
from runtime.infra.nats_auth import Credentials, agent_role
from runtime.infra.nats_conn import connect
from runtime.infra.natsserver import ClusterSpec, NatsServer, ServerTls, free_port
from runtime.provision import provision

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"

CONFIG = """
[tiers]
basic = 3
starter = 5
pro = 12

[teams.acme]
tier = "basic"
tokens = ["tok_acme"]

[teams.rival]
tier = "basic"
tokens = ["tok_rival"]

[teams.demo]
tier = "pro"
tokens = ["jr_demo_token"]

[teams.big]
tier = "startup"
tokens = ["tok_big"]

[admin]
tokens = ["tok_admin"]

[settings]
node_loss_timeout_s = {node_loss_timeout_s}
resource_wait_timeout_s = {resource_wait_timeout_s}
heartbeat_interval_s = 0.5
release_grace_s = 5
request_deadline_s = 3
keep_ended_s = {keep_ended_s}
"""


@dataclass
class Proc:
    name: str
    argv: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
        with open(self.log_path, "ab") as out:
            self.popen = subprocess.Popen(
                self.argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=ROOT,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def signal(self, signum: int) -> None:
        if self.popen is not None and self.popen.poll() is None:
            os.kill(self.popen.pid, signum)

    def kill(self) -> None:
        """SIGKILL the process (and its workers: the whole session)."""
        if self.popen is not None and self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait()

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        with contextlib.suppress(ProcessLookupError):  # leftover workers
            os.killpg(self.popen.pid, signal.SIGKILL)
        return self.popen.returncode

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class Stack:
    tmp: Path
    node_loss_timeout_s: float = 3.0
    resource_wait_timeout_s: float = 300.0
    keep_ended_s: float = 300.0  # how long services hold an ended run in memory
    short_attempt_s: float = 0.05  # runs of pipelines this short may wait at an agent
    agent_queue_wait_s: float = 0.02  # ... while the wait there is expected to be under this
    nats: NatsServer | None = None
    procs: list[Proc] = field(default_factory=list)
    gateway_urls: list[str] = field(default_factory=list)
    # name -> URL of a scheduler's or agent's /metrics, /healthz, /readyz
    health_urls: dict[str, str] = field(default_factory=dict)
    tls: bool = False  # TLS-only NATS (client and route ports), certificates by jetrun certs

    @property
    def config_path(self) -> Path:
        return self.tmp / "jetrun.toml"

    @property
    def url(self) -> str:
        return self.gateway_urls[0]

    cluster: list[NatsServer] = field(default_factory=list)

    @property
    def nats_url(self) -> str:
        if self.cluster:
            return ",".join(node.url for node in self.cluster)
        assert self.nats is not None
        return self.nats.url

    @property
    def replicas(self) -> str:
        return "3" if self.cluster else "1"

    @property
    def credentials_dir(self) -> Path:
        return self.tmp / "credentials"

    def credentials(self, role: str = "admin") -> Credentials:
        assert self.nats is not None
        return self.nats.credentials(role)

    def agent_credentials(self, agent_id: str) -> Credentials:
        """Agent ``agent_id``'s own identity, minted and accepted by every server."""
        assert self.nats is not None
        for node in self.cluster or [self.nats]:
            node.add_agent(agent_id)
        return self.nats.credentials(agent_role(agent_id))

    async def connect(self, role: str = "admin", name: str = "test") -> Client:
        """A NATS client of ``role`` (admin: may read and change anything). Close it."""
        return await connect(self.nats_url, name, self.credentials(role))

    def server_tls(self) -> ServerTls | None:
        """With ``tls``: a CA and a loopback certificate (made once, by ``jetrun certs``'s
        code) for every node's client and route ports."""
        if not self.tls:
            return None
        directory = self.tmp / "certs"
        if not (directory / "server.pem").exists():
            certs.create(directory, ["127.0.0.1", "localhost"])
        return ServerTls(
            cert_file=str(directory / "server.pem"),
            key_file=str(directory / "server-key.pem"),
            ca_file=str(directory / "ca.pem"),
        )

    async def provision(self) -> None:
        """The admin step: create the streams the services wait for."""
        nc = await self.connect("admin", "setup")
        try:
            settings = LogSettings(replicas=int(self.replicas))
            await provision(nc, load(self.config_path), settings)
        finally:
            await nc.close()

    def nats_args(self, role: str) -> list[str]:
        credentials = self.credentials(role)
        args = ["--nats", self.nats_url]
        if credentials.seed_file is not None:
            args += ["--nats-seed", str(credentials.seed_file)]
        if credentials.ca_file is not None:
            args += ["--nats-ca", str(credentials.ca_file)]
        return args

    def write_config(self) -> None:
        text = CONFIG.format(
            node_loss_timeout_s=self.node_loss_timeout_s,
            resource_wait_timeout_s=self.resource_wait_timeout_s,
            keep_ended_s=self.keep_ended_s,
        )
        settings = (
            f"[settings]\nshort_attempt_s = {self.short_attempt_s}\n"
            f"agent_queue_wait_s = {self.agent_queue_wait_s}\n"
        )
        self.config_path.write_text(text.replace("[settings]\n", settings))

    async def start_nats(self) -> NatsServer:
        """One nats-server; called again, restarts it on the same port and store dir."""
        self.write_config()
        port = self.nats.port if self.nats is not None else 0
        self.nats = NatsServer(
            store_dir=self.tmp / "nats",
            port=port,
            credentials_dir=self.credentials_dir,
            tls=self.server_tls(),
        )
        await self.nats.start()
        await self.provision()
        return self.nats

    async def start_cluster(self, size: int = 3) -> list[NatsServer]:
        """A JetStream cluster on loopback: the config shape of deploy/nats/*.conf."""
        self.write_config()
        route_ports = [free_port() for _ in range(size)]
        routes = [f"nats-route://127.0.0.1:{p}" for p in route_ports]
        for i, route_port in enumerate(route_ports):
            node = NatsServer(
                store_dir=self.tmp / f"nats-{i + 1}",
                name=f"nats-{i + 1}",
                cluster=ClusterSpec(name="jetrun-test", port=route_port, routes=routes),
                credentials_dir=self.credentials_dir,
                tls=self.server_tls(),
            )
            node.start_process()
            self.cluster.append(node)
        for node in self.cluster:
            await node.wait_ready()
        self.nats = self.cluster[0]
        await self.provision()
        return self.cluster

    def _cli(self, name: str, *args: str) -> Proc:
        assert self.nats is not None
        argv = [sys.executable, "-m", "runtime.cli", *args]
        proc = Proc(name, argv, self.tmp / f"{name}.log").start()
        self.procs.append(proc)
        return proc

    async def start_gateway(self, port: int | None = None, timeout: float = 30.0) -> str:
        port = port or free_port()
        assert self.nats is not None
        self._cli(
            f"gateway-{port}",
            "gateway",
            "--replicas",
            self.replicas,
            *self.nats_args("gateway"),
            "--config",
            str(self.config_path),
            "--port",
            str(port),
        )
        url = f"http://127.0.0.1:{port}"
        await wait_ready(url, timeout)
        if url not in self.gateway_urls:
            self.gateway_urls.append(url)
        return url

    def _health(self, name: str) -> list[str]:
        port = free_port()
        self.health_urls[name] = f"http://127.0.0.1:{port}"
        return ["--health-port", str(port)]

    def start_scheduler(self, name: str = "scheduler") -> Proc:
        assert self.nats is not None
        return self._cli(
            name,
            "scheduler",
            *self._health(name),
            "--replicas",
            self.replicas,
            *self.nats_args("scheduler"),
            "--config",
            str(self.config_path),
        )

    def start_agent(
        self, name: str, *modules: str, slots: int = 2, queue_depth: int | None = None
    ) -> Proc:
        """An agent process; ``queue_depth`` None: the agent's default (``QUEUE_PER_SLOT``
        per slot)."""
        assert self.nats is not None
        self.agent_credentials(name)
        args = [
            "agent",
            *self._health(name),
            "--replicas",
            self.replicas,
            *self.nats_args(agent_role(name)),
            "--slots",
            str(slots),
            "--heartbeat",
            "0.5",
            "--id",
            name,
        ]
        if queue_depth is not None:
            args += ["--queue-depth", str(queue_depth)]
        for module in modules or ("runtime.node.demo",):
            args += ["--pipelines", module]
        return self._cli(name, *args)

    async def inject(self, fault: str) -> None:
        """Kill a control-plane process or the nats-server and start it again at once:
        ``scheduler``, ``gateway`` (the first one, on the same port), ``nats`` (same port and
        store dir), or ``cluster-node`` (SIGKILL one node of a cluster, no restart)."""
        if fault == "scheduler":
            proc = next(p for p in self.procs if p.name == "scheduler")
            proc.kill()
            self.procs.remove(proc)
            self.start_scheduler()
        elif fault == "gateway":
            proc = next(p for p in self.procs if p.name.startswith("gateway"))
            port = int(self.url.rsplit(":", 1)[1])
            proc.kill()
            self.procs.remove(proc)
            await self.start_gateway(port)
        elif fault == "nats":
            assert self.nats is not None
            self.nats.kill()
            await self.start_nats()
        elif fault == "cluster-node":
            self.cluster[0].kill()
        else:
            raise ValueError(f"unknown fault {fault!r}")

    async def __aenter__(self) -> Stack:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        """Print every process's log if the block failed; stop everything."""
        if exc_type is not None:
            print(self.logs())
        await self.stop()

    async def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        for node in self.cluster or ([self.nats] if self.nats is not None else []):
            await node.stop()

    def logs(self) -> str:
        return "\n".join(f"----- {p.name} -----\n{p.output()[-4000:]}" for p in self.procs)


@contextlib.asynccontextmanager
async def own_server(tmp_path: Path) -> AsyncIterator[tuple[NatsServer, Client]]:
    """A nats-server of the test's own (its store under ``tmp_path``) and a connection to it,
    for tests that stop and start it; both closed at the end."""
    server = NatsServer(store_dir=tmp_path / "nats")
    await server.start()
    nc = await server.connect()
    try:
        yield server, nc
    finally:
        await nc.close()
        await server.stop()


async def stop_until_disconnected(server: NatsServer, nc: Client, timeout: float = 10.0) -> None:
    """Stops ``server`` and waits until ``nc`` knows it is disconnected."""
    await server.stop()
    with anyio.fail_after(timeout):
        while nc.is_connected:
            await anyio.sleep(0.01)


def open_gate(path: Path, text: str) -> None:
    """Open a gate (tests/fixtures/gate_pipelines.py): the file appears with its whole content
    at once (written aside, then renamed), so a gate never reads it half written."""
    aside = path.with_name(f".{path.name}.writing")
    aside.write_text(text)
    os.replace(aside, path)


async def gate_run(c: httpx.AsyncClient, gate: Path, pointer: str = "test/gate:v1") -> str:
    """Submit an async run of a gate pipeline (tests/fixtures/gate_pipelines.py and its kin)
    that waits for ``gate`` to open; its run id."""
    body = {
        "pipeline": pointer,
        "async_run": True,
        "inputs": [{"type": "string", "value": str(gate)}],
    }
    response = await c.post("/v4/runs", json=body)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def client(stack: Stack, token: str, gateway: int = 0) -> httpx.AsyncClient:
    """An HTTP client for one of the stack's gateways, with a team's token."""
    return httpx.AsyncClient(
        base_url=stack.gateway_urls[gateway],
        headers={"Authorization": f"Bearer {token}"},
        timeout=60.0,
    )


async def wait_ready(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            try:
                if (await client.get(f"{url}/readyz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await anyio.sleep(0.1)
    raise TimeoutError(f"{url} not ready within {timeout} s")


async def wait_replicas(
    url: str, token: str, pointer: str, n: int = 1, timeout: float = 30.0
) -> None:
    """Wait until ``pointer`` has ``n`` ready replicas, as the scaling endpoint says."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {token}"}) as client:
        while time.monotonic() < deadline:
            response = await client.get(f"{url}/v4/pipelines/{pointer}/scaling")
            if response.status_code == 200 and response.json()["current_replicas"] >= n:
                return
            await anyio.sleep(0.1)
    raise TimeoutError(f"{pointer} has no {n} ready replicas within {timeout} s")


async def wait_known(url: str, token: str, pointer: str, timeout: float = 30.0) -> None:
    """Wait until the gateway knows ``pointer`` (its scaling endpoint answers 200): a pipeline
    deployed by ``jetrun up`` may be registered a little after the gateway is ready."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {token}"}) as client:
        while time.monotonic() < deadline:
            response = await client.get(f"{url}/v4/pipelines/{pointer}/scaling")
            if response.status_code == 200:
                return
            await anyio.sleep(0.1)
    raise TimeoutError(f"{pointer} is not known within {timeout} s")


async def wait_state(
    client: httpx.AsyncClient, run_id: str, states: set[str], timeout: float = 30.0
) -> dict:  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = (await client.get(f"/v4/runs/{run_id}")).json()
        if run["state"] in states:
            return run  # type: ignore[no-any-return]
        await anyio.sleep(0.05)
    raise TimeoutError(f"run {run_id} not in {states} within {timeout} s: {run}")


# --- load and audit, for fault tests and the fault report ------------------------------------

TERMINAL = {"completed", "failed", "no_resources_available", "node_preempted", "cancelled"}


@dataclass
class Load:
    """Async runs of ``test/count:v1`` submitted with idempotency keys, so that a request that
    died with its gateway can be retried on another one without creating a second run."""

    stack: Stack
    work_dir: Path
    token: str = "tok_big"
    seconds: float = 0.05
    run_ids: dict[str, str] = field(default_factory=dict)  # idempotency key -> run id
    refused: int = 0

    def marker(self, key: str) -> Path:
        return self.work_dir / f"{key}.runs"

    async def submit(self, key: str, deadline_s: float = 90.0) -> None:
        """Submit one run, retrying on any gateway until one answers (bounded)."""
        body = {
            "pipeline": "test/count:v1",
            "async_run": True,
            "inputs": [
                {"type": "string", "value": str(self.marker(key))},
                {"type": "fp", "value": self.seconds},
            ],
        }
        headers = {"Authorization": f"Bearer {self.token}", "Idempotency-Key": key}
        deadline = time.monotonic() + deadline_s
        attempt = 0
        async with httpx.AsyncClient(timeout=30.0) as client:
            while time.monotonic() < deadline:
                url = self.stack.gateway_urls[attempt % len(self.stack.gateway_urls)]
                attempt += 1
                try:
                    response = await client.post(f"{url}/v4/runs", json=body, headers=headers)
                except httpx.TransportError:
                    await anyio.sleep(0.2)
                    continue
                if response.status_code == 202:
                    self.run_ids[key] = response.json()["id"]
                    return
                if response.status_code == 429:
                    self.refused += 1
                await anyio.sleep(0.2)
        raise TimeoutError(f"run {key} could not be submitted in {deadline_s} s")

    async def submit_many(self, n: int, prefix: str, concurrency: int = 8) -> None:
        limiter = anyio.Semaphore(concurrency)

        async def one(i: int) -> None:
            async with limiter:
                await self.submit(f"{prefix}-{i}")

        async with anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(one, i)

    async def states(self, timeout: float = 120.0) -> dict[str, str]:
        """Wait (bounded) until every run is terminal; the final state of each."""
        deadline = time.monotonic() + timeout
        headers = {"Authorization": f"Bearer {self.token}"}
        final: dict[str, str] = {}
        async with httpx.AsyncClient(timeout=10.0, headers=headers) as client:
            while time.monotonic() < deadline:
                for key, run_id in self.run_ids.items():
                    if key in final:
                        continue
                    url = self.stack.gateway_urls[len(final) % len(self.stack.gateway_urls)]
                    try:
                        state = (await client.get(f"{url}/v4/runs/{run_id}")).json()["state"]
                    except (httpx.TransportError, KeyError, ValueError):
                        continue
                    if state in TERMINAL:
                        final[key] = state
                if len(final) == len(self.run_ids):
                    return final
                await anyio.sleep(0.2)
        return final

    def executions(self, key: str) -> int:
        marker = self.marker(key)
        return len(marker.read_text().split()) if marker.exists() else 0


@dataclass
class Audit:
    submitted: int
    terminal: int
    lost: int
    ran_twice: int
    states: dict[str, int]


async def audit(load: Load, timeout: float = 120.0) -> Audit:
    """Submitted, terminal, lost (admitted but never terminal) and run twice (executed more
    than once without a node loss in between: the pipeline's own marker file says)."""
    final = await load.states(timeout)
    counts: dict[str, int] = {}
    for state in final.values():
        counts[state] = counts.get(state, 0) + 1
    twice = sum(1 for key in load.run_ids if load.executions(key) > 1)
    return Audit(
        submitted=len(load.run_ids),
        terminal=len(final),
        lost=len(load.run_ids) - len(final),
        ran_twice=twice,
        states=counts,
    )
