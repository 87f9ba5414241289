"""LogCapture: lines, caps, markers (pure, no processes)."""

from __future__ import annotations

from runtime.infra.capture import LINE_OVERHEAD, LogCapture, marker_bytes, start_marker_bytes


def capture(max_bytes: int = 10_000, max_line_bytes: int = 1000) -> LogCapture:
    return LogCapture(
        lambda: 1.0, nonce="n0nce", max_bytes=max_bytes, max_line_bytes=max_line_bytes
    )


def texts(c: LogCapture) -> list[str]:
    return [line.text for line in c.take()]


def test_lines_are_split_and_partial_lines_wait() -> None:
    c = capture()
    assert not c.feed(b"one\ntw")
    assert texts(c) == ["one"]
    assert not c.feed(b"o\r\nthree")
    assert texts(c) == ["two"]
    c.finish()
    assert texts(c) == ["three"]


def test_the_end_marker_ends_the_capture_even_split_across_reads() -> None:
    c = capture()
    marker = marker_bytes("n0nce")
    assert not c.feed(b"last words" + marker[:5])
    assert c.feed(marker[5:] + b"next attempt\n")
    assert not c.done  # stderr's marker has not come yet
    assert c.feed(marker, "stderr") and c.done
    c.finish()
    assert texts(c) == ["last words"]
    assert c.leftover("stdout") == b"next attempt\n"


def test_a_marker_with_another_nonce_is_just_output() -> None:
    c = capture()
    assert not c.feed(marker_bytes("guess") + b"more\n")
    assert c.feed(marker_bytes("n0nce"))
    c.finish()
    assert texts(c) == ["\x1ejetrun-end guess", "more"]


def test_output_past_the_cap_is_dropped_and_marked() -> None:
    c = capture(max_bytes=100)
    c.feed(b"a" * 40 + b"\n" + b"b" * 40 + b"\n" + b"c" * 500 + b"\n")
    c.finish()
    lines = texts(c)
    assert lines[0] == "a" * 40
    assert len(lines) == 2
    assert lines[-1].startswith("[jetrun: output truncated:") and "cap 100 bytes" in lines[-1]
    assert c.dropped_bytes == 41 + 501
    assert c.kept_bytes <= 100


def test_empty_lines_count_against_the_cap() -> None:
    c = capture(max_bytes=10 * LINE_OVERHEAD)
    c.feed(b"\n" * 10_000)
    c.finish()
    assert len(c.take()) == 10 + 1  # ten kept, then the truncation marker


def test_a_line_without_newline_is_cut_into_pieces() -> None:
    c = capture(max_line_bytes=100)
    c.feed(b"z" * 1000)
    pieces = texts(c)
    assert pieces and all(len(p) <= 100 for p in pieces)
    c.finish()
    assert "".join(pieces + texts(c)) == "z" * 1000


def test_finish_is_idempotent() -> None:
    c = capture(max_bytes=40)
    c.feed(b"x" * 100 + b"\n")
    c.finish()
    c.finish()
    assert len(c.take()) == 1


def test_what_comes_before_the_start_marker_is_dropped_even_split_byte_by_byte() -> None:
    c = capture()
    c.expect_start()
    stream = b"late line of the last attempt\n" + start_marker_bytes("n0nce") + b"mine\n"
    stream += marker_bytes("n0nce")
    done = [c.feed(bytes([b])) for b in stream]
    assert done[-1] and not any(done[:-1])
    c.finish()
    assert texts(c) == ["mine"]
    assert c.stray_bytes == len(b"late line of the last attempt\n")


def test_stdout_and_stderr_stay_apart_each_ending_on_its_own_marker() -> None:
    c = capture()
    marker = marker_bytes("n0nce")
    assert not c.feed(b"result 1\npartial", "stdout")
    assert not c.feed(b"warning: slow\n", "stderr")
    assert c.feed(b" line\n" + marker, "stdout") and not c.done
    assert c.feed(b"Traceback\n" + marker + b"next\n", "stderr") and c.done
    c.finish()
    lines = [(line.stream, line.text) for line in c.take()]
    assert lines == [
        ("stdout", "result 1"),
        ("stderr", "warning: slow"),
        ("stdout", "partial line"),
        ("stderr", "Traceback"),
    ]
    assert c.leftover("stderr") == b"next\n" and c.leftover("stdout") == b""


def test_both_streams_share_one_cap_and_the_truncation_line_is_on_stderr() -> None:
    c = capture(max_bytes=100)
    c.feed(b"o" * 40 + b"\n", "stdout")
    c.feed(b"e" * 40 + b"\n" + b"f" * 40 + b"\n", "stderr")
    c.feed(b"p" * 10 + b"\n", "stdout")
    c.finish()
    lines = c.take()
    assert [(line.stream, line.text) for line in lines[:-1]] == [("stdout", "o" * 40)]
    assert lines[-1].stream == "stderr" and lines[-1].text.startswith("[jetrun: output truncated")
    assert c.dropped_bytes == 41 + 41 + 11


def test_a_stream_without_its_start_marker_keeps_nothing_of_before() -> None:
    c = capture()
    c.expect_start()
    c.feed(b"stray on stderr\n", "stderr")
    c.feed(start_marker_bytes("n0nce") + b"mine\n", "stdout")
    c.finish()
    assert [(line.stream, line.text) for line in c.take()] == [("stdout", "mine")]
    assert c.stray_bytes > 0


def test_nonces_are_fresh_for_every_capture_and_across_batches() -> None:
    nonces = [LogCapture(lambda: 1.0).nonce for _ in range(200)]  # more than one batch
    assert len(set(nonces)) == 200
    assert all(len(n) == 16 and int(n, 16) >= 0 for n in nonces)
