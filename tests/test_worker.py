"""Worker processes: real children, real pipes, real SIGKILLs. Nothing sleeps to synchronise:
tests wait for frames (a streamed output says a run is under way) or for process exit."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from contracts.errors import ErrorType
from contracts.values import File, IOType, RunIO, from_python
from runtime.node.worker import PipelineWorker, StartupFailed, WorkerResult, error_of

pytestmark = pytest.mark.anyio

USER_MODULE = str(Path(__file__).parent / "fixtures" / "user_pipelines.py")
DEMO = "runtime.node.demo"


def inputs(*values: object) -> list[RunIO]:
    return [from_python(v) for v in values]


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture
async def echo() -> AsyncIterator[PipelineWorker]:
    async with PipelineWorker(DEMO, "demo/echo:v1") as worker:
        yield worker


# --- round trips --------------------------------------------------------------------------


async def test_echo_round_trip(echo: PipelineWorker) -> None:
    assert echo.alive and echo.pid is not None and echo.pid != os.getpid()
    result = await echo.run(inputs("hi", 2))
    assert result == WorkerResult(outputs=[RunIO(type=IOType.string, value="hihi")])
    again = await echo.run(inputs("ab"))
    assert again.ok and again.outputs[0].value == "ab"
    stats = echo.statistics()
    assert stats.alive and not stats.busy and stats.runs == 2


async def test_large_inputs_and_outputs_cross_the_socket_in_pieces(echo: PipelineWorker) -> None:
    text = "x" * 1_000_000
    result = await echo.run(inputs(text, 3))
    assert result.ok and result.outputs[0].value == text * 3
    assert (await echo.run(inputs("small"))).outputs[0].value == "small"


async def test_concurrent_runs_queue_behind_each_other(echo: PipelineWorker) -> None:
    results: dict[int, WorkerResult] = {}

    async def one(i: int) -> None:
        results[i] = await echo.run(inputs("x", i))

    async with anyio.create_task_group() as tg:
        for i in range(5):
            tg.start_soon(one, i)
    assert {i: r.outputs[0].value for i, r in results.items()} == {i: "x" * i for i in range(5)}


async def test_a_user_module_outside_the_package_runs_in_a_worker() -> None:
    async with PipelineWorker(USER_MODULE, "user/greet:v1") as worker:
        result = await worker.run(inputs("ada", True))
        assert result.outputs == [RunIO(type=IOType.string, value="hello ada!")]
        pid = await worker.run([])
    assert pid.error is not None and pid.error.type is ErrorType.input_error


async def test_prints_do_not_corrupt_the_protocol() -> None:
    # the module prints at import, startup and run; all of it goes to stderr
    async with PipelineWorker(USER_MODULE, "user/greet:v1") as worker:
        for name in ("a", "b", "c"):
            assert (await worker.run(inputs(name))).outputs[0].value == f"hello {name}"


async def test_every_input_type_round_trips() -> None:
    values = ("t", 3, 0.5, False, {"k": [1]}, [1, 2], None, File(url="s3://b/x"), {"any": 1})
    async with PipelineWorker(USER_MODULE, "user/typed:v1") as worker:
        result = await worker.run(inputs(*values))
    assert [o.value for o in result.outputs] == [
        "t", 3, 0.5, False, {"k": [1]}, [1, 2], None, "s3://b/x", {"any": 1}
    ]  # fmt: skip


async def test_streamed_outputs_are_reported_in_order_as_they_come() -> None:
    seen: list[tuple[int, RunIO]] = []

    async def on_output(index: int, output: RunIO) -> None:
        seen.append((index, output))

    async with PipelineWorker(DEMO, "demo/stream:v1") as worker:
        result = await worker.run(inputs(3), on_output)
        silent = await worker.run(inputs(2))
    chunks = [from_python(f"chunk {i}") for i in range(3)]
    assert seen == list(enumerate(chunks))
    assert result == WorkerResult(outputs=chunks, streamed=3)
    assert silent.outputs == chunks[:2]


async def test_a_non_streamed_run_reports_no_streamed_outputs(echo: PipelineWorker) -> None:
    async def on_output(index: int, output: RunIO) -> None:
        raise AssertionError("not a stream")

    assert (await echo.run(inputs("a", 1), on_output)).ok


# --- errors -------------------------------------------------------------------------------


async def test_mismatched_inputs_are_an_input_error_naming_the_input(
    echo: PipelineWorker,
) -> None:
    result = await echo.run(inputs("hi", "2"))
    assert result.error is not None and result.error.type is ErrorType.input_error
    assert result.error.message == "input 2 ('times'): expected integer, got string"
    assert result.outputs == [] and echo.alive
    assert (await echo.run(inputs("ok"))).ok  # the worker keeps serving


async def test_a_raising_pipeline_is_a_pipeline_error_with_its_traceback() -> None:
    async with PipelineWorker(DEMO, "demo/fail:v1") as worker:
        result = await worker.run(inputs("no model today"))
        assert worker.alive
    error = result.error
    assert error is not None and error.type is ErrorType.pipeline_error
    assert error.message == "ValueError: no model today"
    assert error.traceback is not None
    assert error.traceback.startswith("Traceback (most recent call last):")
    assert 'runtime/node/demo.py", line' in error.traceback and "in fail" in error.traceback
    assert "runtime/node/worker_process.py" not in error.traceback  # its own frames are trimmed


async def test_a_stream_that_fails_keeps_the_outputs_it_streamed() -> None:
    async with PipelineWorker(USER_MODULE, "user/half-stream:v1") as worker:
        result = await worker.run(inputs(2))
    assert [o.value for o in result.outputs] == [0, 1]
    assert result.error is not None and result.error.message == "RuntimeError: stopped after 2"


@pytest.mark.parametrize(
    ("pointer", "kind", "message"),
    [
        ("user/oom:v1", ErrorType.oom, "MemoryError: cannot allocate 80 GB"),
        ("user/cuda-oom:v1", ErrorType.cuda_oom, "OutOfMemoryError: CUDA out of memory."),
        ("user/unsendable:v1", ErrorType.pipeline_error, "ValueError: a pipeline output cannot"),
    ],
)
async def test_errors_are_classified(pointer: str, kind: ErrorType, message: str) -> None:
    async with PipelineWorker(USER_MODULE, pointer) as worker:
        result = await worker.run([])
    assert result.error is not None and result.error.type is kind
    assert result.error.message.startswith(message)


def test_error_of_classifies_cuda_errors() -> None:
    assert error_of(RuntimeError("CUDA error: device-side assert")).type is ErrorType.cuda_error
    assert error_of(KeyError()).message == "KeyError"


async def test_a_worker_dying_mid_run_is_an_unknown_error() -> None:
    async with PipelineWorker(USER_MODULE, "user/crash:v1") as worker:
        pid = worker.pid
        result = await worker.run(inputs(3))
        assert not worker.alive and pid is not None and gone(pid)
        again = await worker.run(inputs(3))
    assert result.error is not None and result.error.type is ErrorType.unknown
    assert result.error.message == "the worker process exited with code 3"
    assert again.error is not None and again.error.type is ErrorType.unknown


async def test_a_worker_dying_while_a_process_it_forked_holds_its_socket_ends_the_run() -> None:
    forked: list[int] = []

    async def on_output(index: int, output: RunIO) -> None:
        assert isinstance(output.value, int)
        forked.append(output.value)

    try:
        async with PipelineWorker(USER_MODULE, "user/fork-exit:v1") as worker:
            with anyio.fail_after(10):  # not the forked process's minute
                result = await worker.run([], on_output)
            assert not worker.alive
    finally:
        for pid in forked:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert forked and result.outputs == [from_python(forked[0])]
    assert result.error is not None and result.error.type is ErrorType.unknown
    assert result.error.message == "the worker process exited with code 5"


# --- startup ------------------------------------------------------------------------------


async def test_a_failing_startup_raises_startup_failed_with_the_traceback() -> None:
    worker = PipelineWorker(USER_MODULE, "user/bad-start:v1")
    with pytest.raises(StartupFailed) as raised:
        await worker.start()
    error = raised.value.error
    assert error.type is ErrorType.startup_error
    assert error.message == "RuntimeError: model weights not found"
    assert error.traceback is not None and "in startup" in error.traceback
    assert not worker.alive and worker.pid is not None and gone(worker.pid)


@pytest.mark.parametrize(
    ("module", "pointer", "message"),
    [
        (
            USER_MODULE,
            "user/crash-start:v1",
            "the worker process exited with code 7 during startup",
        ),
        (USER_MODULE, "user/none:v1", "has no pipeline user/none:v1 (it has: user/bad-start:v1,"),
        (
            "no_such_module_xyz",
            "a/b:v1",
            "could not import no_such_module_xyz: ModuleNotFoundError",
        ),
    ],
)
async def test_startup_failures_are_startup_errors(module: str, pointer: str, message: str) -> None:
    with pytest.raises(StartupFailed) as raised:
        await PipelineWorker(module, pointer).start()
    assert raised.value.error.type is ErrorType.startup_error
    assert message in raised.value.error.message


async def test_startup_runs_once_per_worker_process() -> None:
    async with PipelineWorker(
        DEMO, "demo/slow-start:v1", env={"JETRUN_DEMO_STARTUP_S": "0"}
    ) as worker:
        results = [await worker.run(inputs(t)) for t in ("a", "b")]
    assert [r.outputs[0].value for r in results] == ["warm: a", "warm: b"]


async def test_a_worker_cannot_start_twice_or_run_before_starting(echo: PipelineWorker) -> None:
    with pytest.raises(RuntimeError, match="already started"):
        await echo.start()
    with pytest.raises(RuntimeError, match="not started"):
        await PipelineWorker(DEMO, "demo/echo:v1").run([])


# --- killing ------------------------------------------------------------------------------


async def test_kill_during_a_long_run_ends_it_with_an_unknown_error() -> None:
    async with PipelineWorker(USER_MODULE, "user/block:v1") as worker:
        pid = worker.pid
        assert pid is not None
        running = anyio.Event()
        results: list[WorkerResult] = []

        async def on_output(index: int, output: RunIO) -> None:
            running.set()

        async def attempt() -> None:
            results.append(await worker.run([], on_output))

        async with anyio.create_task_group() as tg:
            tg.start_soon(attempt)
            await running.wait()
            await worker.kill()
        await worker.kill()  # idempotent
        assert not worker.alive and gone(pid)
    [result] = results
    assert result.outputs == [from_python("started")]
    assert result.error is not None and result.error.type is ErrorType.unknown
    assert "exited with code -9 (killed by signal 9)" in result.error.message


async def test_cancelling_a_run_kills_the_worker() -> None:
    async with PipelineWorker(USER_MODULE, "user/block:v1") as worker:
        pid = worker.pid
        assert pid is not None
        with anyio.CancelScope() as scope:

            async def on_output(index: int, output: RunIO) -> None:
                scope.cancel()

            await worker.run([], on_output)
        assert scope.cancelled_caught and not worker.alive and gone(pid)


async def test_a_timeout_around_run_kills_the_worker() -> None:
    async with PipelineWorker(USER_MODULE, "user/block:v1") as worker:
        with pytest.raises(TimeoutError), anyio.fail_after(0.5):
            await worker.run([])
        await worker.kill()  # what the agent does after a timeout: a no-op by now
        assert not worker.alive
        assert worker.pid is not None and gone(worker.pid)


async def test_kill_before_start_and_twice_is_harmless(echo: PipelineWorker) -> None:
    await PipelineWorker(DEMO, "demo/echo:v1").kill()
    async with anyio.create_task_group() as tg:
        tg.start_soon(echo.kill)
        tg.start_soon(echo.kill)
    assert not echo.alive


async def test_outputs_over_the_event_limit_fail_the_attempt_before_they_are_decoded() -> None:
    limit = 100_000
    async with PipelineWorker(DEMO, "demo/echo:v1", max_output_bytes=lambda: limit) as worker:
        with anyio.fail_after(30):
            result = await worker.run(inputs("x", limit))
            assert result.error is not None and result.error.type is ErrorType.pipeline_error
            assert result.error.message.startswith("output too large: the result is 100,0")
            assert "at most 100,000 bytes" in result.error.message and not result.outputs
            assert worker.alive  # it finished: it serves the next attempt
            assert (await worker.run(inputs("x", limit - 100))).ok
    async with PipelineWorker(
        USER_MODULE, "user/stream-big:v1", max_output_bytes=lambda: limit
    ) as worker:
        with anyio.fail_after(30):
            result = await worker.run(inputs(limit))
        assert result.error is not None and result.error.type is ErrorType.pipeline_error
        assert result.error.message.startswith("output too large: an output is")
        assert [o.value for o in result.outputs] == ["small"] and result.streamed == 1
        assert not worker.alive  # stopped mid-stream


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_every_attempts_pipes_are_closed_however_it_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each attempt has pipes of its own: none may be left open by an attempt that ended,
    was killed, or a worker that failed to start."""
    async with PipelineWorker(DEMO, "demo/echo:v1") as worker:
        with anyio.fail_after(30):
            await worker.run(inputs("warm"))
            before = open_fds()
            for i in range(40):
                assert (await worker.run(inputs(str(i)))).ok
                assert not (await worker.run(inputs("x", -1))).ok  # a pipeline error
            assert open_fds() == before
    baseline = open_fds()
    with anyio.fail_after(30):
        for _ in range(3):
            with pytest.raises(StartupFailed):
                await PipelineWorker(USER_MODULE, "user/bad-start:v1").start()
            async with PipelineWorker(USER_MODULE, "user/block:v1") as blocked:
                with anyio.move_on_after(0.2):
                    await blocked.run([])  # cancelled mid-attempt: the worker is killed
            with monkeypatch.context() as patched:  # no interpreter: the spawn itself fails
                patched.setenv("JETRUN_WORKER_PYTHON", "/nonexistent/python")
                with pytest.raises(OSError):
                    await PipelineWorker(DEMO, "demo/echo:v1").start()
    assert open_fds() == baseline


async def test_a_worker_exits_once_the_agent_closes_its_request_socket() -> None:
    async with PipelineWorker(DEMO, "demo/noop:v1") as worker:
        assert (await worker.run([])).ok
        pipes, requests = worker._pipes, worker._output
        assert pipes is not None and pipes.transport is not None and requests is not None
        requests.close()  # end of file on the worker's side: it stops serving, with code 0
        with anyio.fail_after(10):
            await pipes.exited.wait()
        assert pipes.transport.get_returncode() == 0
