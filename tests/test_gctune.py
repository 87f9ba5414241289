"""The collector settings every long-running service starts with."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from runtime.infra.gctune import YOUNG_EVERY, tune_for_service


@pytest.fixture
def restored_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


@pytest.mark.usefixtures("restored_gc")
def test_young_passes_are_rarer_and_startup_objects_are_frozen() -> None:
    gc.unfreeze()
    _, middle, old = gc.get_threshold()
    tune_for_service()
    assert gc.get_threshold() == (YOUNG_EVERY, middle, old)
    assert gc.get_freeze_count() > 0
    tune_for_service()  # idempotent
    assert gc.get_threshold() == (YOUNG_EVERY, middle, old)
    assert gc.isenabled()  # cycles are still collected
