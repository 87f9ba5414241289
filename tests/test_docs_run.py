"""Every code block in README.md and docs/*.md runs, so the docs cannot drift.

Blocks are taken from the Markdown as written and checked by their language against one live
``jetrun up`` (real processes, loopback ports):

- ``bash``: run with ``bash -euo pipefail``; ``curl`` fails on an HTTP error status;
- ``python``: run as a script;
- ``toml``: parsed as a jetrun config (``runtime.infra.config.parse``);
- ``mermaid``: must be the generated state diagram;
- ``text`` blocks that are terminal transcripts (lines starting with ``$ ``): each command runs
  in one shell, in order, and each line the transcript shows as its output must be in what it
  printed, compared with run ids, durations, line numbers, `...` and runs of spaces as wildcards
  (live status lines, which hold `` · ``, depend on timing and are not compared). A run id the
  transcript shows stands for the run the command really made, in later commands and blocks.

``http://127.0.0.1:8080`` and ``nats://127.0.0.1:4222`` (the documented defaults) are replaced
by the live instance's addresses, and ``$JETRUN_URL``, ``$JETRUN_TOKEN`` and ``$JETRUN_NATS`` are
set, as a reader's shell would have them. A block that is not meant to run here (installing
jetrun, production files, a diagram drawn by hand) is preceded by the line
``<!-- norun: <why> -->`` (invisible on the rendered page); any other block in a language this
test does not know fails it.
"""

from __future__ import annotations

import os
import re
import sys
import tomllib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from contracts.machine import mermaid_diagram
from runtime.infra.config import parse
from runtime.infra.natsserver import free_port
from tests.harness import ROOT, Proc, wait_ready, wait_replicas

JETRUN = str(Path(sys.executable).parent / "jetrun")
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(.*)$")
NORUN = re.compile(r"^<!-- norun: (?P<why>\S.*\S) -->$")
CURL_FAILS_ON_HTTP_ERRORS = 'curl() { command curl --fail-with-body --silent --show-error "$@"; }\n'


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    lang: str
    code: str
    norun: str | None  # why it is not run, from the ``<!-- norun: ... -->`` line before it

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    found: list[Block] = []
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        info = opening.group(1).split()
        before = next((line for line in reversed(lines[:i]) if line.strip()), "")
        marked = NORUN.match(before)
        start = i
        i += 1
        body = []
        while i < len(lines) and lines[i] != "```":
            body.append(lines[i])
            i += 1
        assert i < len(lines), f"{path}:{start + 1}: code block never closed"
        lang = info[0] if info else ""
        why = marked.group("why") if marked else None
        found.append(Block(path, start + 1, lang, "\n".join(body) + "\n", why))
        i += 1
    return found


ALL = [b for path in DOCS for b in blocks(path)]


@dataclass(frozen=True)
class Live:
    url: str
    nats: str
    workdir: Path
    data_dir: Path  # jetrun up --data-dir: its credentials are in <data_dir>/credentials
    run_ids: dict[str, str] = field(default_factory=dict)  # as documented -> as made here

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env.update(JETRUN_URL=self.url, JETRUN_TOKEN="jr_demo_token", JETRUN_NATS=self.nats)
        return env

    def localise(self, code: str) -> str:
        return (
            code.replace("http://127.0.0.1:8080", self.url)
            .replace("nats://127.0.0.1:4222", self.nats)
            .replace("./jetrun-data", str(self.data_dir))
        )


@pytest.fixture(scope="module")
async def live(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Live]:
    tmp = tmp_path_factory.mktemp("docs")
    port, nats_port = free_port(), free_port()
    argv = [JETRUN, "up", "--port", str(port), "--nats-port", str(nats_port)]
    argv += ["--data-dir", str(tmp / "data"), "--slots", "4"]
    proc = Proc("jetrun-up", argv, tmp / "up.log").start()
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_ready(url, 60)
        for pointer in ("demo/echo:v1", "demo/sleep:v1", "demo/stream:v1"):
            await wait_replicas(url, "jr_demo_token", pointer)
        work = tmp / "work"
        work.mkdir()
        yield Live(url, f"nats://127.0.0.1:{nats_port}", work, tmp / "data")
    except BaseException:
        print(proc.output()[-4000:])
        raise
    finally:
        proc.stop()


def is_transcript(block: Block) -> bool:
    return block.lang == "text" and block.code.startswith("$ ")


def test_every_block_is_found_and_known() -> None:
    assert len(ALL) >= 6
    runnable = {"bash", "python", "toml", "mermaid"}
    unknown = [
        b.name for b in ALL if b.lang not in runnable and not is_transcript(b) and b.norun is None
    ]
    assert unknown == [], "blocks this test cannot run: mark them <!-- norun: why -->"


@pytest.mark.anyio
@pytest.mark.parametrize("block", [b for b in ALL if b.norun is None], ids=lambda b: b.name)
async def test_the_block_runs(block: Block, live: Live) -> None:
    if block.lang == "toml":
        parse(tomllib.loads(block.code))
        return
    if block.lang == "mermaid":
        assert block.code == mermaid_diagram(), "only the generated state diagram is allowed"
        return
    if is_transcript(block):
        await replay(block, live)
        return
    code = live.localise(block.code)
    if block.lang == "bash":
        script, argv = CURL_FAILS_ON_HTTP_ERRORS + code, ["bash", "-euo", "pipefail", "-c"]
    elif block.lang == "python":
        script, argv = code, [sys.executable, "-c"]
    else:
        pytest.fail(f"{block.name}: cannot run a {block.lang!r} block; mark it <!-- norun: why -->")
    with anyio.fail_after(120):
        done = await anyio.run_process(
            [*argv, script], cwd=live.workdir, env=live.env(), check=False
        )
    out, err = done.stdout.decode(errors="replace"), done.stderr.decode(errors="replace")
    assert done.returncode == 0, f"{block.name} failed:\n{out}\n{err}"


RUN_ID = re.compile(r"run_[0-9a-f]{32}")


def pattern(line: str) -> re.Pattern[str]:
    """A documented output line as a pattern: run ids, durations, line numbers, ``...`` and
    runs of spaces are wildcards."""
    out = re.escape(" ".join(line.split()))
    out = out.replace(r"\.\.\.", ".*")
    out = re.sub(r"run_[0-9a-f]{32}", "(run_[0-9a-f]{32})", out)
    out = re.sub(r"\d+\\.\d+s", r"\\d+\\.\\d+s", out)
    out = re.sub(r"line\\ \d+", r"line\\ \\d+", out)
    out = out.replace(r"\ ", r"\s+")
    return re.compile(out)


def commands(block: Block) -> list[tuple[str, list[str]]]:
    """``(command, its documented output lines)`` of a transcript, in order."""
    found: list[tuple[str, list[str]]] = []
    for line in block.code.splitlines():
        if line.startswith("$ "):
            found.append((line[2:], []))
        elif line.strip():
            found[-1][1].append(line)
    return found


async def replay(block: Block, live: Live) -> None:
    exports = ""
    for command, shown in commands(block):
        if command.startswith("export "):
            exports += command + "\n"
            continue
        for documented, real in live.run_ids.items():
            command = command.replace(documented, real)
        script = CURL_FAILS_ON_HTTP_ERRORS + exports + live.localise(command)
        with anyio.fail_after(120):
            done = await anyio.run_process(
                ["bash", "-c", script], cwd=live.workdir, env=live.env(), check=False
            )
        printed = (done.stdout + done.stderr).decode(errors="replace")
        lines = [" ".join(line.split()) for line in printed.splitlines()]
        for documented in shown:
            if " · " in documented:  # a live status line: depends on timing
                continue
            want = pattern(documented)
            match = next((m for line in lines if (m := want.fullmatch(line))), None)
            assert match is not None, (
                f"{block.name}: `{command}` did not print a line like\n  {documented}\n"
                f"it printed (exit {done.returncode}):\n{printed}"
            )
            for doc_id, real_id in zip(RUN_ID.findall(documented), match.groups(), strict=True):
                live.run_ids.setdefault(doc_id, real_id)


@pytest.mark.anyio
async def test_jetrun_up_exposes_the_schedulers_metrics_on_the_gateway(live: Live) -> None:
    """After the blocks ran their runs: ``jetrun up``'s /metrics carries the phase histograms
    (scheduler) beside the gateway's own metrics, each family once."""
    admin = {"Authorization": "Bearer jr_demo_admin"}
    async with httpx.AsyncClient(timeout=10, headers=admin) as http:
        text = (await http.get(f"{live.url}/metrics")).text
    families = [f.name for f in text_string_to_metric_families(text)]
    assert len(families) == len(set(families))
    samples = {
        (s.name, s.labels.get("phase"), s.labels.get("pipeline")): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }
    # echo runs end within the agent's STARTED_AFTER_S, appending no ``started``: they have no
    # start phase, and their execution counts from the dispatch
    for phase in ("queue_wait", "execution"):
        assert samples[("jetrun_run_phase_seconds_count", phase, "demo/echo:v1")] >= 1
    assert ("jetrun_http_request_duration_seconds_count", None, None) in samples  # gateway
    assert any(name == "jetrun_nodes_lost_total" for name, _, _ in samples)
