"""Where a sample of a split comes from, and how messages name it."""

from __future__ import annotations

from typing import List, Optional, Protocol, Sequence, Tuple, Union

__all__ = ["SHOWN", "Position", "listed", "span", "where"]

#: Where a sample comes from: an index of a map-style split, or (worker, n) for the n-th
#: sample a worker read from a stream; (-1, n) is the n-th read in the main process.
Position = Union[int, Tuple[int, int]]


#: How many positions a message lists at most.
SHOWN = 5


def where(position: Position) -> str:
    """A position as messages name it: "index 17", "sample 3 of worker 1"."""
    if isinstance(position, tuple):
        worker, number = position
        if worker < 0:
            return f"sample {number} of the stream read in the main process"
        return f"sample {number} of worker {worker}"
    return f"index {position}"


class Counted(Protocol):
    """Positions counted, the first few kept (a ``statistics.Tally``)."""

    count: int
    first: List[Position]


def listed(positions: Union[Sequence[Position], Counted], total: Optional[int] = None) -> str:
    """The first positions, "index 3, index 9 and 12 more" (of a tally: the count)."""
    if not isinstance(positions, Sequence):
        count: int = positions.count
        positions, total = positions.first, count
    total = len(positions) if total is None else total
    text = ", ".join(where(p) for p in positions[:SHOWN])
    return text + (f" and {total - SHOWN} more" if total > SHOWN else "")


def span(positions: Sequence[Position]) -> str:
    """The positions of a batch: "indices 16 to 31", "samples 0 to 15 of worker 1"."""
    if not positions:
        return "no sample"
    first, last = positions[0], positions[-1]
    if isinstance(first, tuple) and isinstance(last, tuple):
        return f"samples {first[1]} to {last[1]} of worker {first[0]}"
    return f"index {first}" if first == last else f"indices {first} to {last}"
