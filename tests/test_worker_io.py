"""The agent's end of a worker's pipes and protocol socket, fed by hand: a fake subprocess
transport records when a pipe is paused; a real socket pair carries frames in pieces."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import anyio
import pytest

from contracts.values import from_python
from runtime.infra.capture import DEFAULT_MAX_BYTES, LogCapture, marker_bytes, start_marker_bytes
from runtime.node import worker_channel
from runtime.node.worker_channel import (
    MAX_FRAME_BYTES,
    MAX_QUEUED,
    MAX_QUEUED_BYTES,
    FrameChannel,
    Gone,
)
from runtime.node.worker_output import WorkerPipes
from runtime.node.worker_process import HEADER, Finished, Output, frame_bytes

pytestmark = pytest.mark.anyio


class FakePipe:
    def __init__(self) -> None:
        self.paused = False

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


class FakeTransport:
    def __init__(self) -> None:
        self.pipes = {1: FakePipe(), 2: FakePipe()}

    def get_pipe_transport(self, fd: int) -> FakePipe:
        return self.pipes[fd]


def pipes() -> tuple[WorkerPipes, FakeTransport]:
    transport = FakeTransport()
    pipes = WorkerPipes("test/p:v1")
    pipes.connection_made(transport)  # type: ignore[arg-type]
    return pipes, transport


def attempt_capture(max_bytes: int = DEFAULT_MAX_BYTES) -> LogCapture:
    capture = LogCapture(time.time, max_bytes=max_bytes)
    capture.expect_start()
    return capture


def both(pipes: WorkerPipes, data: bytes) -> None:
    pipes.pipe_data_received(1, data)
    pipes.pipe_data_received(2, data)


async def test_an_attempt_that_printed_nothing_is_settled_by_its_markers_alone() -> None:
    worker, transport = pipes()
    capture = attempt_capture()
    worker.begin(capture)
    both(worker, start_marker_bytes(capture.nonce) + marker_bytes(capture.nonce))
    assert worker.ended
    with anyio.fail_after(1):
        assert await worker.settle(grace_s=30)
    assert worker.release() is capture and not capture.take()
    assert not any(pipe.paused for pipe in transport.pipes.values())


async def test_output_between_attempts_is_held_paused_and_never_the_next_attempts() -> None:
    worker, transport = pipes()
    first = attempt_capture()
    worker.begin(first)
    worker.pipe_data_received(1, start_marker_bytes(first.nonce) + b"mine\n")
    worker.pipe_data_received(1, marker_bytes(first.nonce) + b"late from a thread\n")
    assert transport.pipes[1].paused  # what came after the end marker waits, unread
    worker.pipe_data_received(2, start_marker_bytes(first.nonce) + marker_bytes(first.nonce))
    worker.release()
    worker.pipe_data_received(2, b"printed between attempts\n")
    assert transport.pipes[2].paused
    assert [line.text for line in first.take()] == ["mine"]

    second = attempt_capture()
    worker.begin(second)
    assert not any(pipe.paused for pipe in transport.pipes.values())
    both(worker, start_marker_bytes(second.nonce) + b"theirs\n" + marker_bytes(second.nonce))
    assert worker.ended
    assert [line.text for line in second.take()] == ["theirs", "theirs"]
    assert second.stray_bytes == len(b"late from a thread\n") + len(b"printed between attempts\n")


async def test_a_flood_past_the_cap_pauses_its_pipe_and_resumes_it_later() -> None:
    worker, transport = pipes()
    capture = attempt_capture(max_bytes=1000)
    worker.begin(capture)
    worker.pipe_data_received(1, start_marker_bytes(capture.nonce) + b"x" * 5000 + b"\n")
    assert capture.over_cap and transport.pipes[1].paused and not transport.pipes[2].paused
    with anyio.fail_after(5):
        while transport.pipes[1].paused:
            await anyio.sleep(0.001)


async def test_a_closed_pipe_ends_its_stream_and_a_missing_marker_times_out() -> None:
    worker, _ = pipes()
    capture = attempt_capture()
    worker.begin(capture)
    worker.pipe_data_received(1, start_marker_bytes(capture.nonce) + marker_bytes(capture.nonce))
    with anyio.fail_after(5):
        assert not await worker.settle(grace_s=0.05)  # stderr never ended
    worker.pipe_connection_lost(2, None)
    assert worker.ended
    worker.release()
    later = attempt_capture()
    worker.begin(later)  # a pipe that is gone has no end to wait for
    worker.pipe_data_received(1, start_marker_bytes(later.nonce) + marker_bytes(later.nonce))
    assert worker.ended


async def channel() -> tuple[FrameChannel, socket.socket]:
    ours, theirs = socket.socketpair()
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_unix_connection(FrameChannel, sock=ours)
    return protocol, theirs


async def test_frames_in_pieces_and_several_in_one_read_come_out_whole_and_in_order() -> None:
    ours, theirs = await channel()
    big = Finished(outputs=[from_python("y" * 300_000)])
    data = frame_bytes(Output(index=0, output=from_python("a"))) + frame_bytes(big)
    theirs.setblocking(True)
    with anyio.fail_after(10):
        for at in range(0, len(data), 7_000):
            theirs.sendall(data[at : at + 7_000])
            await anyio.sleep(0.001)  # each piece read on its own
        assert await ours.receive() == Output(index=0, output=from_python("a"))
        assert await ours.receive() == big
    theirs.close()
    with anyio.fail_after(5), pytest.raises(Gone):
        await ours.receive()
    with pytest.raises(Gone):
        ours.send(b"too late")


async def test_an_unreadable_frame_ends_the_channel_after_the_frames_before_it() -> None:
    ours, theirs = await channel()
    good = frame_bytes(Finished(outputs=[]))
    theirs.sendall(good + b"\x00\x00\x00\x03\xc1\xc1\xc1")
    with anyio.fail_after(5):
        assert await ours.receive() == Finished(outputs=[])
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
    frame = frame_bytes(Output(index=0, output=from_python("o")))
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
    frames = [frame_bytes(Output(index=i, output=from_python(i))) for i in range(MAX_QUEUED * 3)]
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
    frame = frame_bytes(Output(index=0, output=from_python("z" * 1_048_576)))
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
