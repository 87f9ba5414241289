"""The agent's end of a worker's pipes and protocol socket, fed by hand: real pipes whose
write ends the test holds (as a worker would); a real socket pair carries frames in pieces."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import time
import tracemalloc
from collections.abc import Iterator

import anyio
import msgspec
import pytest

from contracts.values import from_python
from runtime.infra.capture import DEFAULT_MAX_BYTES, LogCapture
from runtime.node import worker_channel, worker_output
from runtime.node.worker_channel import (
    MAX_FRAME_BYTES,
    MAX_QUEUED,
    MAX_QUEUED_BYTES,
    FrameChannel,
    Gone,
)
from runtime.node.worker_output import (
    PIPELINE_LOG_WINDOW_S,
    UNCAPTURED_MAX_BYTES,
    AttemptOutput,
    PipelineLog,
)
from runtime.node.worker_process import HEADER, Finished, Output, frame_bytes, output_bytes

pytestmark = pytest.mark.anyio


def attempt_output(max_bytes: int = DEFAULT_MAX_BYTES) -> AttemptOutput:
    output = AttemptOutput(LogCapture(time.time, max_bytes=max_bytes))
    fds, output.write_fds = output.write_fds, ()  # type: ignore[assignment]
    writers.extend(fds)
    return output


writers: list[int] = []  # the write ends a test holds (the worker's, here)


@pytest.fixture(autouse=True)
def close_writers() -> Iterator[None]:
    yield
    while writers:
        with contextlib.suppress(OSError):
            os.close(writers.pop())


async def test_an_attempt_reads_as_it_goes_and_finish_takes_what_is_left() -> None:
    output = attempt_output()
    out, err = writers
    os.write(out, b"first\n")
    with anyio.fail_after(5):
        while not output.capture.has_lines:
            await anyio.sleep(0.001)
    assert [line.text for line in output.capture.take()] == ["first"]
    os.write(out, b"second\npartial")  # written just before the reply: finish reads it
    os.write(err, b"oops\n")
    capture = output.finish()
    assert [(line.stream, line.text) for line in capture.take()] == [
        ("stdout", "second"),
        ("stderr", "oops"),
        ("stdout", "partial"),
    ]
    output.finish()  # idempotent


async def test_what_is_written_after_finish_reaches_no_one() -> None:
    """A process the pipeline forked keeps the write end: once the attempt ended its writes
    fail (EPIPE), they never wait in a pipe for a later reader."""
    output = attempt_output()
    out, _ = writers
    capture = output.finish()
    with pytest.raises(BrokenPipeError):
        os.write(out, b"late\n")
    assert not capture.take()


async def test_a_flood_past_the_cap_is_read_slowly_and_its_reader_comes_back() -> None:
    output = attempt_output(max_bytes=1000)
    out, _ = writers
    os.set_blocking(out, False)
    with anyio.fail_after(5):
        while not output.capture.over_cap:
            with contextlib.suppress(BlockingIOError):
                os.write(out, b"x" * 5000 + b"\n")
            await anyio.sleep(0.001)
        dropped = output.capture.dropped_bytes
        os.write(out, b"y" * 100 + b"\n")
        while output.capture.dropped_bytes == dropped:  # read again after its pause
            await anyio.sleep(0.001)
    output.finish()


async def test_the_pipelines_own_output_is_logged_as_it_comes_within_a_cap_per_window(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """What belongs to no attempt (a startup thread's heartbeat, say) goes to the agent's log
    for the worker's life: at most 64 KiB per window, the rest counted with a marker line."""
    caplog.set_level(logging.INFO, logger="jetrun.worker")
    now = [0.0]
    output = PipelineLog("team/p:v1", clock=lambda: now[0])
    fds, output.write_fds = output.write_fds, ()  # type: ignore[assignment]
    writers.extend(fds)
    out, err = fds
    os.set_blocking(out, False)

    def logged() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "jetrun.worker"]

    os.write(err, b"beat 0\n")
    with anyio.fail_after(5):
        while logged() != ["team/p:v1: beat 0"]:  # as it comes, not at the end
            await anyio.sleep(0.001)
        line = b"x" * 999 + b"\n"
        while not output.capture.over_cap:
            with contextlib.suppress(BlockingIOError):
                os.write(out, line * 8)
            await anyio.sleep(0.001)
        assert sum(len(text) for text in logged()) < UNCAPTURED_MAX_BYTES + 2000
        while worker_output._available(output._fds["stdout"]):  # the rest of the flood
            await anyio.sleep(0.001)
        now[0] = PIPELINE_LOG_WINDOW_S  # a new window: the marker, then lines again
        os.write(out, b"after the window\n")
        while "team/p:v1: after the window" not in logged():
            with contextlib.suppress(BlockingIOError):
                os.write(out, b"after the window\n")
            await anyio.sleep(0.001)
    assert any("output truncated" in text for text in logged())
    output.finish()


async def test_a_pipe_closed_by_the_pipeline_stops_being_read_and_its_attempt_ends() -> None:
    output = attempt_output()
    out, err = writers
    os.write(err, b"before closing\n")
    os.close(err)
    writers.remove(err)
    os.write(out, b"on stdout\n")
    capture = output.finish()
    assert {line.text for line in capture.take()} == {"before closing", "on stdout"}


async def channel() -> tuple[FrameChannel, socket.socket]:
    ours, theirs = socket.socketpair()
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_unix_connection(FrameChannel, sock=ours)
    return protocol, theirs


async def test_frames_in_pieces_and_several_in_one_read_come_out_whole_and_in_order() -> None:
    ours, theirs = await channel()
    big = Finished(outputs=output_bytes([from_python("y" * 300_000)]))
    data = frame_bytes(Output(index=0, output=output_bytes(from_python("a")))) + frame_bytes(big)
    theirs.setblocking(True)
    with anyio.fail_after(10):
        for at in range(0, len(data), 7_000):
            theirs.sendall(data[at : at + 7_000])
            await anyio.sleep(0.001)  # each piece read on its own
        assert await ours.receive() == Output(index=0, output=output_bytes(from_python("a")))
        assert await ours.receive() == big
    theirs.close()
    with anyio.fail_after(5), pytest.raises(Gone):
        await ours.receive()


async def test_an_unreadable_frame_ends_the_channel_after_the_frames_before_it() -> None:
    ours, theirs = await channel()
    good = frame_bytes(Finished())
    theirs.sendall(good + b"\x00\x00\x00\x03\xc1\xc1\xc1")
    with anyio.fail_after(5):
        assert await ours.receive() == Finished()
        with pytest.raises(Gone, match="unreadable frame"):
            await ours.receive()
    theirs.close()
    ours.close()


async def test_a_frame_announced_too_large_ends_the_channel_before_it_is_kept() -> None:
    ours, theirs = await channel()
    theirs.sendall(HEADER.pack(MAX_FRAME_BYTES + 1) + b"x" * 1000)
    with anyio.fail_after(5), pytest.raises(Gone, match="at most"):
        await ours.receive()
    theirs.close()
    ours.close()


async def test_a_flood_of_frames_stops_the_socket_being_read_until_they_are_taken() -> None:
    ours, theirs = await channel()
    theirs.setblocking(False)
    frame = frame_bytes(Output(index=0, output=output_bytes(from_python("o"))))
    sent = 0
    with anyio.fail_after(10):
        while True:  # until the socket is full: the agent's end stopped reading
            try:
                theirs.send(frame)
            except BlockingIOError:
                break
            sent += 1
            if sent % 256 == 0:
                await anyio.sleep(0.001)
        await anyio.sleep(0.05)
        queued = ours.queued
        assert MAX_QUEUED <= queued < sent  # the rest waits in the socket, not in memory
        for _ in range(sent):
            assert isinstance(await ours.receive(), Output)  # taking them reads on
    theirs.close()
    ours.close()


async def test_a_worker_that_exited_ends_the_channel_after_its_frames_though_the_socket_is_open(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(worker_channel, "EXIT_GRACE_S", 0.05)
    ours, theirs = await channel()  # ``theirs`` stays open: a process the worker forked
    frames = [
        frame_bytes(Output(index=i, output=output_bytes(from_python(i))))
        for i in range(MAX_QUEUED * 3)
    ]
    theirs.sendall(b"".join(frames))
    with anyio.fail_after(10):
        while not ours.queued:
            await anyio.sleep(0.001)
        ours.worker_exited()
        await anyio.sleep(0.2)  # the grace is over while frames wait: the rest is still read
        for i in range(len(frames)):
            frame = await ours.receive()
            assert isinstance(frame, Output) and frame.index == i
        with pytest.raises(Gone):
            await ours.receive()
    theirs.close()
    ours.close()


async def test_large_frames_stop_the_socket_being_read_by_their_bytes_not_their_count() -> None:
    ours, theirs = await channel()
    frame = frame_bytes(Output(index=0, output=output_bytes(from_python("z" * 1_048_576))))
    size, count = len(frame) - HEADER.size, 40  # 40 MiB: fewer than MAX_QUEUED frames
    sender = threading.Thread(target=theirs.sendall, args=(frame * count,), daemon=True)
    sender.start()
    try:
        with anyio.fail_after(20):
            queued = -1
            while ours.queued != queued:  # until the agent's end stopped reading
                queued = ours.queued
                await anyio.sleep(0.2)
            assert sender.is_alive()  # blocked: the rest waits in the socket, not in memory
            assert queued * size <= MAX_QUEUED_BYTES + size
            for _ in range(count):
                assert isinstance(await ours.receive(), Output)  # taking them reads on
    finally:
        theirs.close()
        ours.close()
        sender.join(5)


async def test_a_frame_of_many_tiny_values_costs_about_its_own_size_to_decode() -> None:
    """A pipeline writing to its worker's socket a frame of 8 million one-byte values (which
    used to decode into a list of 64 MB, before any size check) is refused unread; a frame of
    the real shape decodes into about its own size (its outputs stay bytes until weighed)."""
    count = 8_000_000
    forged = {"type": "finished", "outputs": [{"type": "array", "value": [0] * count}]}
    shaped = Finished(outputs=b"[" + b"0," * (count // 2) + b"0]")
    for frame, refused in ((msgspec.msgpack.encode(forged), True), (frame_bytes(shaped), False)):
        if refused:
            frame = HEADER.pack(len(frame)) + frame
        ours, theirs = await channel()
        tracemalloc.start()
        try:
            sender = threading.Thread(target=theirs.sendall, args=(frame,))
            sender.start()
            with anyio.fail_after(20):
                if refused:
                    with pytest.raises(Gone, match="unreadable"):
                        await ours.receive()
                else:
                    assert await ours.receive() == shaped
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
            sender.join(timeout=10)
            theirs.close()
            ours.close()
        assert peak < 4 * len(frame), (len(frame), peak)  # its pieces, joined, its outputs
