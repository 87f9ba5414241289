"""LogCapture: lines, streams, caps (pure, no processes)."""

from __future__ import annotations

from runtime.infra.capture import LINE_OVERHEAD, LogCapture


def capture(max_bytes: int = 10_000, max_line_bytes: int = 1000) -> LogCapture:
    return LogCapture(lambda: 1.0, max_bytes=max_bytes, max_line_bytes=max_line_bytes)


def texts(c: LogCapture) -> list[str]:
    return [line.text for line in c.take()]


def test_lines_are_split_and_partial_lines_wait() -> None:
    c = capture()
    c.feed(b"one\ntw")
    assert texts(c) == ["one"]
    c.feed(b"o\r\nthree")
    assert texts(c) == ["two"]
    c.finish()
    assert texts(c) == ["three"]


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


def test_stdout_and_stderr_stay_apart_and_finish_ends_both() -> None:
    c = capture()
    c.feed(b"result 1\npartial", "stdout")
    c.feed(b"warning: slow\n", "stderr")
    c.feed(b" line\n", "stdout")
    c.feed(b"Traceback", "stderr")
    c.finish()
    c.feed(b"after the end\n", "stdout")
    lines = [(line.stream, line.text) for line in c.take()]
    assert lines == [
        ("stdout", "result 1"),
        ("stderr", "warning: slow"),
        ("stdout", "partial line"),
        ("stderr", "Traceback"),
    ]


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
