"""A run's outputs as the fold builds them: an immutable sequence that grows in O(1).

A run that streams n outputs goes through n versions. Copying the list into each version costs
O(n^2) in every service that folds the log; ``Outputs`` instead lets a version share the list
of the version it came from. Each version sees only its own first ``len`` items, so versions
stay immutable values: appending to the newest version extends the shared list in place;
appending to (or changing) an older version copies first.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, overload

from contracts.values import IOType, RunIO

_PLACEHOLDER = RunIO(type=IOType.none)


class Outputs(Sequence[RunIO]):
    __slots__ = ("_items", "_n")

    def __init__(self, items: Iterable[RunIO] = ()) -> None:
        self._items = list(items)
        self._n = len(self._items)

    @classmethod
    def of(cls, items: Iterable[RunIO]) -> Outputs:
        """``items`` as ``Outputs`` (the same object if it already is one)."""
        return items if isinstance(items, Outputs) else cls(items)

    @classmethod
    def _view(cls, items: list[RunIO], n: int) -> Outputs:
        view = cls.__new__(cls)
        view._items, view._n = items, n
        return view

    def __len__(self) -> int:
        return self._n

    @overload
    def __getitem__(self, index: int) -> RunIO: ...
    @overload
    def __getitem__(self, index: slice) -> list[RunIO]: ...
    def __getitem__(self, index: int | slice) -> RunIO | list[RunIO]:
        """An item, or a slice as a new list (O(length of the slice))."""
        if isinstance(index, slice):
            start, stop, step = index.indices(self._n)
            return self._items[start:stop:step]
        if not -self._n <= index < self._n:
            raise IndexError("output index out of range")
        return self._items[index % self._n]

    def __iter__(self) -> Iterator[RunIO]:
        items = self._items
        return (items[i] for i in range(self._n))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str | bytes):
            return NotImplemented
        return len(other) == self._n and all(a == b for a, b in zip(self, other, strict=False))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Outputs({self.to_list()!r})"

    def to_list(self) -> list[RunIO]:
        """A new list of the items (O(n))."""
        return self._items[: self._n]

    def put(self, index: int, output: RunIO) -> Outputs:
        """This sequence with ``output`` at ``index`` (padded with ``none`` placeholders up to
        it). O(1) amortized when appending to the newest version; copies otherwise."""
        if index < self._n and self._items[index] == output:
            return self  # a resend: nothing changes
        owns_tail = len(self._items) == self._n  # no later version extended the list
        items = self._items if index >= self._n and owns_tail else self.to_list()
        if index >= len(items):
            items.extend([_PLACEHOLDER] * (index - len(items)))
            items.append(output)
        else:
            items[index] = output
        return Outputs._view(items, len(items))

    def extend_from(self, start: int, outputs: Iterable[RunIO]) -> Outputs:
        """The first ``start`` items (padded with placeholders if there are fewer), then
        ``outputs``; shares the list when this is the newest version and nothing is cut."""
        result = self
        if start < self._n:
            result = Outputs(self._items[:start])
        for index, output in enumerate(outputs, start):
            result = result.put(index, output)
        if len(result) < start:
            result = result.put(start - 1, _PLACEHOLDER)
        return result


def encode_hook(obj: Any) -> Any:
    """For ``msgspec`` encoders and ``to_builtins``: ``Outputs`` as a list."""
    if isinstance(obj, Outputs):
        return obj.to_list()
    raise NotImplementedError(f"cannot encode {type(obj).__name__}")
