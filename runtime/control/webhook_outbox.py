"""What the webhook outbox knows of live runs, learnt from the log as it passes. Pure.

The outbox consumes ``submitted`` and the terminal events. A ``submitted`` tells whether the
run has a callback (only that field is decoded); its terminal event then needs no read of the
log when it has none. An entry leaves with its run's end, so memory is bounded by live runs.
"""

from __future__ import annotations

import msgspec


class _Submitted(msgspec.Struct):
    """The one field of a ``submitted`` event the outbox reads (the rest is skipped)."""

    callback_url: str | None = None


_submitted_decoder = msgspec.json.Decoder(_Submitted)


def subject_parts(subject: str) -> tuple[str, str]:
    """``(run_id, kind)`` of an event subject ``jetrun.ev.<run_id>.<kind>``."""
    parts = subject.split(".")
    return parts[2], parts[3]


class Callbacks:
    """The runs the outbox saw submitted and not yet ended, each with its callback URL (None:
    it has none)."""

    def __init__(self) -> None:
        self._urls: dict[str, str | None] = {}

    def submitted(self, run_id: str, data: bytes) -> None:
        try:
            url = _submitted_decoder.decode(data).callback_url
        except msgspec.MsgspecError:
            return  # unknown: its end asks the log
        self._urls[run_id] = url or None

    def ended(self, run_id: str) -> tuple[bool, str | None]:
        """``(known, url)``: whether this run's submission was seen, and its callback URL."""
        if run_id not in self._urls:
            return False, None
        return True, self._urls.pop(run_id)

    def __len__(self) -> int:
        return len(self._urls)
