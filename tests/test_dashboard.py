"""The dashboard: ``GET /v4/dashboard`` for a team and for an admin, and the page in a real
headless Chromium (Debian's package, driven by Playwright) showing a run just submitted.

``JETRUN_UPDATE_SCREENSHOT=1`` also writes the page's screenshot to docs/dashboard.png (the
README's picture)."""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from contracts.scaling import DesiredReplicasChanged
from runtime.control import openapi
from runtime.infra.config import ConfigError, parse
from runtime.infra.scalinglog import ScalingLog
from tests.harness import ROOT, Stack, client, open_gate, wait_state

pytestmark = pytest.mark.anyio
CHROMIUM = "/usr/bin/chromium"
XSS = '<img src=x onerror="window.pwned=1">'


def gate_body(path: Path) -> dict[str, Any]:
    return {
        "pipeline": "test/gate:v1",
        "inputs": [{"type": "string", "value": str(path)}],
        "async_run": True,
    }


async def submit_scene(stack: Stack, tmp_path: Path) -> dict[str, str]:
    """A queue on test/gate:v1 (one slot: one running, two queued) and a failure."""
    ids = {}
    async with client(stack, "jr_demo_token") as demo:
        for i in range(3):
            response = await demo.post("/v4/runs", json=gate_body(tmp_path / f"gate{i}"))
            assert response.status_code == 202, response.text
            ids[f"gate{i}"] = response.json()["id"]
        for key, message in [("xss", XSS), ("failed", "weights not found: model.safetensors")]:
            failing = {"pipeline": "demo/fail:v1", "inputs": [{"type": "string", "value": message}]}
            failed = await demo.post("/v4/runs", json=failing)
            assert failed.json()["state"] == "failed"
            ids[key] = failed.json()["id"]
        await wait_state(demo, ids["gate0"], {"running"})
        await wait_state(demo, ids["gate2"], {"queued"})
    nc = await stack.connect()
    try:
        ours = f"a queue of 3 behind 1 replica ({ids['gate0'][-6:]})"
        theirs = f"another team's pipeline ({ids['gate0'][-6:]})"
        for pipeline, reason in [("demo/echo:v1", ours), ("test/gate:v1", theirs)]:
            desired = DesiredReplicasChanged(
                pipeline=pipeline, at=time.time(), desired=2, current=1, reason=reason
            )
            await ScalingLog(nc.jetstream()).append(desired)
    finally:
        await nc.close()
    ids["scaling"], ids["other_scaling"] = ours, theirs
    return ids


async def open_gates(stack: Stack, tmp_path: Path, ids: dict[str, str]) -> None:
    async with client(stack, "jr_demo_token") as demo:
        for i in range(3):
            open_gate(tmp_path / f"gate{i}", "open")
        for i in range(3):
            await wait_state(demo, ids[f"gate{i}"], {"completed"})


def test_admin_tokens_are_checked() -> None:
    config = parse({"teams": {"a": {"tier": "basic", "tokens": ["t"]}}, "admin": {"tokens": ["x"]}})
    assert config.is_admin("x") and not config.is_admin("t") and not config.is_admin("")
    with pytest.raises(ConfigError, match=r"admin\.tokens"):
        parse({"teams": {"a": {"tier": "basic", "tokens": ["t"]}}, "admin": {"tokens": ["t"]}})
    with pytest.raises(ConfigError, match=r"admin\.tokens"):
        parse({"admin": {"tokens": [""]}})


async def test_team_and_admin_views(stack: Stack, tmp_path: Path) -> None:
    ids = await submit_scene(stack, tmp_path)
    async with client(stack, "tok_acme") as acme:
        response = await acme.post("/v4/runs", json=gate_body(tmp_path / "acme"))
        acme_run = response.json()["id"]
    try:
        async with client(stack, "jr_demo_token") as demo, client(stack, "tok_admin") as admin:
            mine = (await demo.get("/v4/dashboard")).json()
            everyone = (await admin.get("/v4/dashboard")).json()
            assert (
                await demo.get("/v4/dashboard", headers={"Authorization": "x"})
            ).status_code == 401
    finally:
        open_gate(tmp_path / "acme", "open")
        await open_gates(stack, tmp_path, ids)

    assert mine["team"] == "demo" and everyone["team"] is None
    runs = {r["id"]: r for r in mine["runs"]}
    assert acme_run not in runs and acme_run in {r["id"] for r in everyone["runs"]}
    assert runs[ids["gate0"]]["state"] == "running"
    assert runs[ids["gate2"]]["state"] == "queued"
    assert runs[ids["gate1"]]["queue_position"] == 0 and runs[ids["gate2"]]["queue_position"] == 1
    assert runs[ids["gate2"]]["waiting_for"] == "capacity"
    queue = next(q for q in mine["queues"] if q["pipeline"] == "test/gate:v1")
    assert queue["depth"] >= 2 and queue["oldest_wait_s"] >= 0 and queue["replicas"] == {"ready": 1}
    shown = {q["pipeline"] for q in mine["queues"]}
    assert "demo/echo:v1" in shown and "test/slow:v1" not in shown  # own or used pipelines only
    assert "test/slow:v1" in {q["pipeline"] for q in everyone["queues"]}
    agents = {a["agent_id"]: a for a in mine["agents"]}
    assert "test/slow:v1" not in agents["agent-gates"]["pipelines"]
    assert agents["agent-gates"]["used_slots"] == {"cpu": 1}
    assert agents["agent-gates"]["accelerators"][0]["slots"] == 1
    failure = next(f for f in mine["failures"] if f["id"] == ids["xss"])
    assert failure["error"]["type"] == "pipeline_error" and XSS in failure["error"]["message"]
    assert all(f["team"] == "demo" for f in mine["failures"])
    scaling = next(e for e in mine["scaling"] if e.get("reason") == ids["scaling"])
    assert scaling["event"] == "desired" and scaling["desired"] == 2
    assert all(e["pipeline"].startswith("demo/") for e in mine["scaling"])  # only its own
    assert ids["other_scaling"] in {e.get("reason") for e in everyone["scaling"]}


FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@contextlib.contextmanager
def chromium(profile: Path) -> Iterator[Any]:
    """Debian's Chromium, headless, with a fresh profile (Playwright never downloads one)."""
    from playwright.sync_api import sync_playwright

    if os.environ.get("JETRUN_SKIP_BROWSER") == "1":
        pytest.skip("JETRUN_SKIP_BROWSER=1")
    if not shutil.which(CHROMIUM) and not os.environ.get("CI"):  # CI installs it: fails there
        pytest.skip("Chromium is not installed: apt-get install -y chromium (.ci/run does)")
    assert shutil.which(CHROMIUM), "install Chromium: apt-get install -y chromium (.ci/run does)"
    with sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            str(profile),
            executable_path=CHROMIUM,
            headless=True,
            args=FLAGS,
            viewport={"width": 1280, "height": 900},
        )
        try:
            yield browser
        finally:
            browser.close()


def browse(url: str, token: str, wanted: list[str], shot: Path) -> dict[str, Any]:
    """Open the dashboard in headless Chromium; wait until every id in ``wanted`` shows."""
    with chromium(shot.parent / "chromium-profile") as browser:
        outside: list[str] = []
        page = browser.new_page()
        page.on(
            "request",
            lambda r: None if r.url.startswith(url) else outside.append(r.url),
        )
        page.goto(f"{url}/dashboard#token={token}")
        for run_id in wanted:
            page.get_by_text(run_id).first.wait_for(timeout=15_000)
        page.get_by_text("live ·").wait_for(timeout=15_000)
        row = page.locator("#failures tr", has_text=wanted[2])
        row.get_by_role("button", name="logs").click()
        logs = row.locator("pre.logs").inner_text(timeout=15_000)
        page.wait_for_timeout(2500)  # two refreshes later the logs are still shown
        logs_kept = page.locator("#failures tr", has_text=wanted[2]).locator("pre.logs").count()
        page.screenshot(path=str(shot), full_page=True)
        return {
            "runs": page.inner_text("#runs"),
            "failures": page.inner_text("#failures"),
            "agents": page.inner_text("#agents"),
            "queues": page.inner_text("#queues"),
            "scaling": page.inner_text("#scaling"),
            "who": page.inner_text("#who"),
            "address": page.url,
            "pwned": page.evaluate("window.pwned === 1"),
            "images": page.locator("#failures img").count(),
            "outside": outside,
            "logs": logs,
            "logs_kept": logs_kept,
        }


async def test_the_page_shows_a_run_just_submitted_in_chromium(
    stack: Stack, tmp_path: Path
) -> None:
    ids = await submit_scene(stack, tmp_path)
    shot = tmp_path / "dashboard.png"
    try:
        wanted = [ids["gate0"], ids["gate2"], ids["failed"], ids["xss"], ids["scaling"]]
        with anyio.fail_after(90):
            seen = await anyio.to_thread.run_sync(browse, stack.url, "jr_demo_token", wanted, shot)
    finally:
        await open_gates(stack, tmp_path, ids)
    assert seen["who"] == "team demo"
    assert "running" in seen["runs"] and "queued" in seen["runs"] and "capacity" in seen["runs"]
    assert "test/gate:v1" in seen["queues"] and "agent-gates" in seen["agents"]
    assert "pipeline_error" in seen["failures"] and XSS in seen["failures"]  # shown as text
    assert not seen["pwned"] and seen["images"] == 0
    assert "token" not in seen["address"]  # taken out of the address bar
    assert seen["outside"] == [], "the page fetched something outside the gateway"
    assert ids["other_scaling"] not in seen["scaling"]
    assert "weights not found: model.safetensors" in seen["logs"]
    assert seen["logs_kept"] == 1
    assert shot.stat().st_size > 10_000
    if os.environ.get("JETRUN_UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(shot, ROOT / "docs" / "dashboard.png")


def read_docs_page(url: str, profile: Path) -> tuple[int, str]:
    with chromium(profile) as browser:
        page = browser.new_page()
        page.goto(f"{url}/docs")
        page.locator(".op").first.wait_for(timeout=15_000)
        return page.locator(".op").count(), page.inner_text("body")


async def test_the_api_docs_page_shows_every_operation_in_chromium(
    stack: Stack, tmp_path: Path
) -> None:
    with anyio.fail_after(60):
        count, text = await anyio.to_thread.run_sync(read_docs_page, stack.url, tmp_path / "p")
    assert count == len(openapi.OPERATIONS)
    for op in openapi.OPERATIONS:
        assert op.path in text and op.summary in text
    assert "RunCreate" in text and "could not load" not in text
