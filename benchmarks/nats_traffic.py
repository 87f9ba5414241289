"""NATS messages per run, read from nats-server's monitoring endpoints (``/varz``, ``/connz``).

``jetrun up --nats-monitor-port N`` serves them on loopback. ``snapshot`` before and after a
phase, ``per_run`` of the two: the server's totals (``/varz``: every message and byte the server
received from and sent to its clients) and each connection's (``/connz``
with closed connections: what the client sent, acknowledgements included, and what it received:
deliveries, replies, publish acks), grouped by the connection's name (``jetrun-gateway`` ->
``gateway``), and the JetStream API requests (``/jsz``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import anyio
import httpx

from runtime.infra.nats_auth import Credentials

#: Connection names of jetrun's processes -> the group they are counted in.
GROUPS = {
    "jetrun-gateway": "gateway",
    "jetrun-scheduler": "scheduler",
    "jetrun-recorder": "recorder",
    "jetrun-agent": "agent",
    "jetrun-webhooks": "webhooks",
    "jetrun-client": "bench",
    "bench-peers": "bench",
}


@dataclass
class Counts:
    """Messages and bytes: ``sent`` by a client to the server (publishes, acks, requests),
    ``received`` by it from the server (deliveries, publish acks, replies)."""

    sent: int = 0
    received: int = 0
    sent_bytes: int = 0
    received_bytes: int = 0
    subscriptions: int = 0

    def __sub__(self, other: Counts) -> Counts:
        return Counts(
            self.sent - other.sent,
            self.received - other.received,
            self.sent_bytes - other.sent_bytes,
            self.received_bytes - other.received_bytes,
            self.subscriptions,
        )

    def __add__(self, other: Counts) -> Counts:
        return Counts(
            self.sent + other.sent,
            self.received + other.received,
            self.sent_bytes + other.sent_bytes,
            self.received_bytes + other.received_bytes,
            self.subscriptions + other.subscriptions,
        )


@dataclass
class Snapshot:
    server: Counts  # /varz: in = what the server received, out = what it sent
    connections: dict[int, tuple[str, Counts]] = field(default_factory=dict)  # cid -> (group, n)
    api_requests: int = 0  # /jsz: JetStream API calls (stream/consumer info, creates, ...)


def group_of(name: str) -> str:
    return GROUPS.get(name, name or "unnamed")


def snapshot(monitor_url: str) -> Snapshot:
    """The server's counters now (connections closed since it started included)."""
    with httpx.Client(base_url=monitor_url, timeout=10) as http:
        varz = http.get("/varz").json()
        connz = http.get("/connz", params={"subs": 1, "state": "any", "limit": 10_000}).json()
        jsz = http.get("/jsz").json()
    server = Counts(varz["in_msgs"], varz["out_msgs"], varz["in_bytes"], varz["out_bytes"])
    found: dict[int, tuple[str, Counts]] = {}
    for conn in connz.get("connections") or []:
        counts = Counts(
            conn["in_msgs"],
            conn["out_msgs"],
            conn["in_bytes"],
            conn["out_bytes"],
            len(conn.get("subscriptions_list") or []),
        )
        found[conn["cid"]] = (group_of(conn.get("name", "")), counts)
    api = (jsz.get("api") or {}).get("total", 0)
    return Snapshot(server, found, int(api))


@dataclass
class Traffic:
    """What one phase cost, per run."""

    runs: int
    server: Counts
    groups: dict[str, Counts]
    api_requests: int

    def lines(self) -> list[str]:
        n = max(self.runs, 1)
        s = self.server
        out = [
            f"NATS messages per run: {(s.sent + s.received) / n:.2f} "
            f"(server in {s.sent / n:.2f}, out {s.received / n:.2f}; "
            f"bytes in {s.sent_bytes / n:.0f}, out {s.received_bytes / n:.0f}; "
            f"JetStream API requests {self.api_requests / n:.3f})"
        ]
        order = sorted(self.groups.items(), key=lambda kv: -(kv[1].sent + kv[1].received))
        for group, c in order:
            if not c.sent and not c.received:
                continue
            out.append(
                f"  {group:10} {(c.sent + c.received) / n:6.2f} per run: sent {c.sent / n:5.2f}"
                f" received {c.received / n:5.2f} (bytes {c.sent_bytes / n:5.0f} /"
                f" {c.received_bytes / n:5.0f}; {c.subscriptions} subscriptions)"
            )
        return out


def per_run(before: Snapshot, after: Snapshot, runs: int) -> Traffic:
    groups: dict[str, Counts] = {}
    for cid, (group, counts) in after.connections.items():
        old = before.connections.get(cid)
        delta = counts - old[1] if old is not None else counts
        groups[group] = groups.get(group, Counts()) + delta
    return Traffic(
        runs, after.server - before.server, groups, after.api_requests - before.api_requests
    )


async def outbox_caught_up(nats_url: str, creds: Credentials) -> None:
    """Wait (60 s at most) until the webhook outbox has read every event so far."""
    from runtime.infra.nats_conn import connect

    nc = await connect(nats_url, "bench-peers", creds)
    try:
        with anyio.move_on_after(60):
            while True:
                info = await nc.jetstream().consumer_info("JETRUN_EVENTS", "webhooks-outbox")
                if not info.num_pending and not info.num_ack_pending:
                    return
                await anyio.sleep(0.1)
    finally:
        await nc.close()
