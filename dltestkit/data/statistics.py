"""What a pass over the samples counts, in one mergeable type: a batch's report in a worker
and the whole split's scan are both ``Statistics``, and the scan merges each report into
itself. A new statistic is a field of ``Statistics`` (a ``Tally``, ``Tallies``, an ``Extreme``
or a number with its merge), filled where the samples are inspected; merging follows from its
type."""

from __future__ import annotations

import operator
from dataclasses import dataclass, field, fields
from typing import Any, Dict, Generic, Hashable, Iterator, List, Optional, Tuple, TypeVar

from .positions import SHOWN, Position
from .samples import InputProblem, LoadFailure, Path

__all__ = ["Extreme", "Statistics", "Tallies", "Tally"]

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)


class Tally(Generic[T]):
    """How many of something were seen, and the first ``SHOWN`` of them, in order."""

    __slots__ = ("count", "first")

    def __init__(self) -> None:
        self.count = 0
        self.first: List[T] = []

    def add(self, item: T) -> None:
        self.count += 1
        if len(self.first) < SHOWN:
            self.first.append(item)

    def merge(self, other: "Tally[T]") -> None:
        """Add what ``other`` saw after what this one saw."""
        self.count += other.count
        self.first += other.first[: SHOWN - len(self.first)]

    def __bool__(self) -> bool:
        return self.count > 0

    def __iter__(self) -> Iterator[T]:
        return iter(self.first)

    def __getstate__(self) -> Tuple[int, List[T]]:
        return self.count, self.first

    def __setstate__(self, state: Tuple[int, List[T]]) -> None:
        self.count, self.first = state

    def __repr__(self) -> str:
        return f"Tally({self.count}, first={self.first!r})"


class Tallies(Dict[K, Tally[T]]):
    """A tally per key (per shape, say), in the order the keys were first seen."""

    def add(self, key: K, item: T) -> None:
        self.setdefault(key, Tally()).add(item)

    def merge(self, other: "Tallies[K, T]") -> None:
        for key, tally in other.items():
            self.setdefault(key, Tally()).merge(tally)


@dataclass
class Extreme:
    """The lowest (or, ``highest``, the highest) value seen, and where: the sample and the
    tensor's path."""

    highest: bool
    value: float = float("inf")  # -inf when highest: nothing seen yet
    position: Optional[Position] = None
    path: Path = ()

    def __post_init__(self) -> None:
        if self.highest and self.position is None:
            self.value = -self.value

    def offer(self, value: float, position: Optional[Position], path: Path) -> None:
        """Keep ``value`` if it is beyond the one kept."""
        if value > self.value if self.highest else value < self.value:
            self.value, self.position, self.path = value, position, path

    def merge(self, other: "Extreme") -> None:
        self.offer(other.value, other.position, other.path)


def _merged_by(how: Any) -> Any:
    return {"merge": how}


@dataclass
class Statistics:
    """What the inputs and targets of some samples showed (see the module's docstring)."""

    failures: Tally[Tuple[Position, LoadFailure]] = field(default_factory=Tally)
    input_problems: Tally[Tuple[Position, InputProblem]] = field(default_factory=Tally)
    #: the shapes of the input tensors: (path, shape) -> the samples with it
    shapes: Tallies[Tuple[Path, Tuple[int, ...]], Position] = field(default_factory=Tallies)
    tensors: int = field(default=0, metadata=_merged_by(operator.add))
    low: Extreme = field(default_factory=lambda: Extreme(highest=False))
    high: Extreme = field(default_factory=lambda: Extreme(highest=True))
    #: the machine epsilon of the coarsest floating-point dtype of the inputs
    float_eps: float = field(default=0.0, metadata=_merged_by(max))
    nonfinite: Tally[Position] = field(default_factory=Tally)
    target_problems: Tally[Tuple[Position, str]] = field(default_factory=Tally)
    #: the samples without a target
    unlabelled: Tally[Position] = field(default_factory=Tally)

    def merge(self, other: "Statistics") -> None:
        """Add what ``other`` saw after what this one saw."""
        for declared in fields(Statistics):
            mine = getattr(self, declared.name)
            theirs = getattr(other, declared.name)
            if "merge" in declared.metadata:
                setattr(self, declared.name, declared.metadata["merge"](mine, theirs))
            else:
                mine.merge(theirs)
