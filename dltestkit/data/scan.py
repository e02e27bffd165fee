"""What the pass with worker processes saw over a split: the batch reports merged, the samples
registered by the hash of their input (duplicates, conflicting targets, a stream's repeats)."""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Hashable, List, Optional, Sequence, Set, Tuple, Union

import numpy as np
import torch

from ..core.messages import kind
from ..core.paths import children
from .inspect import BatchReport
from .positions import Position, span
from .samples import Input, InputProblem, LoadFailure, Path
from .statistics import Statistics, Tallies, Tally
from .targets import Target, as_target

__all__ = ["LoadedSample", "Registered", "Repeats", "Scan", "structure"]


# -- a split: its plan, its probes, its scan ------------------------------------------------
@dataclass
class LoadedSample:
    """One sample loaded in the main process (a copy of its input, not the sample, which may
    share the memory of the whole dataset)."""

    failure: Optional[LoadFailure] = None
    input: Optional[Input] = None
    input_problem: Optional[InputProblem] = None
    hash: Optional[bytes] = None
    constant: bool = False
    #: for a ContractError about target_key: whether the sample lacks it, what the sample
    #: holds, and a key that looks like the target's
    target_missing: bool = False
    structure: str = ""
    target_key_hint: Any = None
    #: when the target is a container holding the class labels: their path
    labels_inside: Any = None


def structure(sample: Any) -> str:
    """What a sample holds, for messages: "its elements: ['image', 'label']"."""
    fields = children(sample)
    if isinstance(sample, torch.Tensor):
        return "it is a bare tensor"
    if fields is None:
        return f"it is {kind(sample)}"
    return f"its elements: {[k for k, _ in fields]}"


@dataclass
class Registered:
    """The first sample with some hash, and how many samples have it; of a stream, also how
    many each worker read, and whether all were read at the same place of each worker's
    sequence (the n-th sample of each)."""

    position: Position
    label: Optional[Hashable]  # the target's key (Target.key)
    count: int = 1
    workers: Optional["collections.Counter[int]"] = None
    aligned: bool = True


#: The chance below which the repeats across a stream's workers are not taken for the
#: stream's own duplicates.
REPEAT_SIGNIFICANCE = 1e-3


#: The duplicate groups of a stream that the test of repeats across workers looks at.
REPEAT_GROUPS = 2000


@dataclass
class Repeats:
    """How a stream's inputs that occur more than once are spread over the workers.

    A *spread* input was read by several workers, once by each: what a stream gives when
    every worker reads the same records. A stream sharded by worker gives spread inputs
    only from its own duplicates, about as often as chance places equal records in
    different shards; ``chance`` is the probability of seeing this many spread inputs (or,
    ``aligned``, this many at the same place of each worker's sequence) if they were.
    """

    groups: int = 0
    spread: int = 0
    aligned: int = 0
    expected: float = 0.0
    chance: float = 1.0
    example: Optional[Tuple[Position, Position]] = None

    @property
    def found(self) -> bool:
        return self.chance < REPEAT_SIGNIFICANCE


def _spread_chances(fractions: Sequence[float], largest: int) -> List[float]:
    """For c = 0..largest: the chance that c samples, each read by worker w with
    probability fractions[w], were read by c different workers (c! e_c(fractions))."""
    symmetric = [1.0] + [0.0] * largest
    for fraction in fractions:
        for c in range(largest, 0, -1):
            symmetric[c] += symmetric[c - 1] * fraction
    return [math.factorial(c) * value for c, value in enumerate(symmetric)]


def _upper_tail(chances: Sequence[float], observed: int) -> float:
    """P(X >= observed) for X the number of successes of independent trials."""
    if observed <= 0:
        return 1.0
    distribution = np.zeros(len(chances) + 1)
    distribution[0] = 1.0
    for n, chance in enumerate(chances):
        shifted = distribution[: n + 1] * chance
        distribution[: n + 2] *= 1.0 - chance
        distribution[1 : n + 2] += shifted
    return float(distribution[observed:].sum())


@dataclass
class Scan(Statistics):
    """What the pass with worker processes saw, merged over the batches."""

    count: int = 0
    complete: bool = False  # the whole split (or its max_samples subset) was read
    #: a stream that gave more samples than its len() says (the scan stopped one batch past)
    overrun: bool = False
    #: the scan stopped at scan_time_limit
    out_of_time: bool = False
    seconds: float = 0.0
    loader_error: Optional[str] = None
    timed_out: bool = False
    worker_died: bool = False
    in_flight: str = ""
    #: per value of the targets: the samples whose target holds it (a class present in a
    #: label map counts once for that sample), its elements, the first sample holding it
    labels: "collections.Counter[int]" = field(default_factory=collections.Counter)
    elements: "collections.Counter[int]" = field(default_factory=collections.Counter)
    first_with_label: Dict[int, Position] = field(default_factory=dict)
    labelled: int = 0
    #: the shapes of the targets: shape -> the samples with it
    target_shapes: Tallies[Tuple[int, ...], Position] = field(default_factory=Tallies)
    #: the shapes of the multi-hot targets (vectors of 0s and 1s): shape -> the samples
    multi_hot: Tallies[Tuple[int, ...], Position] = field(default_factory=Tallies)
    #: the first one-element target (shape (1,)) of class indices, and where
    one_element: Optional[Tuple[Position, Target]] = None
    #: the first batch of several samples whose targets collate_fn put in one tensor:
    #: (samples, the tensor's shape)
    target_batch: Optional[Tuple[int, Tuple[int, ...]]] = None
    #: hash -> the first sample with it (deterministic splits and streams only); inputs
    #: whose values are all equal (silence, blank images) are only counted
    hashes: Dict[bytes, Registered] = field(default_factory=dict)
    constant_hashes: Set[bytes] = field(default_factory=set)
    constant_count: int = 0
    conflicts: Tally[Tuple[Registered, Position, Target]] = field(default_factory=Tally)
    #: streams: the hashed (not constant) samples each worker read, and the inputs read
    #: more than once (the first REPEAT_GROUPS of them)
    per_worker: "collections.Counter[int]" = field(default_factory=collections.Counter)
    groups: List[Registered] = field(default_factory=list)
    example: Optional[Tuple[Position, Position]] = None
    pids: Dict[int, int] = field(default_factory=dict)  # worker process id -> worker id
    kept: Dict[Position, Input] = field(default_factory=dict)
    collate_error: Optional[str] = None
    collate_shapes: List[Tuple[Path, Tuple[int, ...]]] = field(default_factory=list)
    collate_at: str = ""

    @property
    def blocked(self) -> bool:
        return bool(self.loader_error or self.failures or self.input_problems)

    @property
    def nested(self) -> bool:
        """Whether the inputs are nested (several tensors each)."""
        return any(path for path, _ in self.shapes)

    def add(self, report: BatchReport) -> None:
        """Merge one batch's report (in the order the batches come)."""
        if report.internal_error:
            raise RuntimeError(
                f"dltestkit failed while inspecting a batch in a DataLoader "
                f"worker (a bug of dltestkit):\n{report.internal_error}"
            )
        self.pids[report.pid] = report.worker
        self.count += len(report.positions)
        self.merge(report)
        for position, hashed, target, constant in report.samples:
            if target is not None:
                self._count(position, target)
            if hashed is None:
                continue
            if constant:
                self.constant_count += 1
                self.constant_hashes.add(hashed)
            else:
                self._register(position, hashed, target, report.worker)
        if (
            self.target_batch is None
            and report.batched_target is not None
            and len(report.positions) > 1
        ):
            self.target_batch = (len(report.positions), report.batched_target)
        self.kept.update(
            (position, tuple((path, tensor.clone()) for path, tensor in value))
            for position, value in report.kept.items()
        )
        if report.collate_error and self.collate_error is None:
            self.collate_error = report.collate_error
            self.collate_shapes = list(report.shapes)
            self.collate_at = span(report.positions)

    def _count(self, position: Position, target: Union[int, Target]) -> None:
        self.labelled += 1
        if isinstance(target, int):  # a plain label, the common case: counted directly
            self.labels[target] += 1
            self.elements[target] += 1
            self.first_with_label.setdefault(target, position)
            self.target_shapes.add((), position)
            return
        for value, elements in target.values:
            self.labels[value] += 1
            self.elements[value] += elements
            self.first_with_label.setdefault(value, position)
        self.target_shapes.add(target.shape, position)
        if target.multi_hot:
            self.multi_hot.add(target.shape, position)
        elif target.shape == (1,) and self.one_element is None:
            self.one_element = (position, target)

    def _register(
        self, position: Position, hashed: bytes, target: Union[int, Target, None], worker: int
    ) -> None:
        stream = isinstance(position, tuple)
        if stream:
            self.per_worker[worker] += 1
        first = self.hashes.get(hashed)
        label = target.key if isinstance(target, Target) else target
        if first is None:
            self.hashes[hashed] = Registered(position, label)
            return
        first.count += 1
        if first.label is not None and label is not None and label != first.label:
            self.conflicts.add((first, position, as_target(target)))
        if stream and isinstance(first.position, tuple) and isinstance(position, tuple):
            if first.workers is None:
                first.workers = collections.Counter({first.position[0]: 1})
                if len(self.groups) < REPEAT_GROUPS:
                    self.groups.append(first)
            first.workers[worker] += 1
            first.aligned = first.aligned and position[1] == first.position[1]
            if self.example is None and first.position[0] != worker:
                self.example = (first.position, position)

    def repeats(self) -> Repeats:
        """Whether a stream's workers read the same records: its inputs that occur more than
        once, tested against the stream's own duplicates placed in the workers' shards by
        chance. Inputs whose values are all equal are left out."""
        found = Repeats(groups=len(self.groups), example=self.example)
        total = sum(self.per_worker.values())
        if len(self.per_worker) < 2 or not self.groups:
            return found
        fractions = [count / total for count in self.per_worker.values()]
        smallest = min(self.per_worker.values())
        by_size = _spread_chances(fractions, len(fractions))
        spread, aligned = [], []
        for group in self.groups:
            workers = group.workers or collections.Counter()
            size = sum(workers.values())
            chance = by_size[size] if size < len(by_size) else 0.0
            hit = max(workers.values()) == 1
            spread.append(chance)
            # the same place in each worker's sequence: about 1 in `smallest` for each more
            aligned.append(chance * smallest ** (1 - size))
            found.spread += hit
            found.aligned += hit and group.aligned
        found.expected = sum(spread)
        if found.spread >= 3:
            # two tests: each at half the significance
            found.chance = 2 * min(
                _upper_tail(spread, found.spread), _upper_tail(aligned, found.aligned)
            )
        return found
