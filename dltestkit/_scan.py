"""The one shared pass of DatasetTests over each split: loading, inspecting, caching.

Each sample of a split is loaded at most twice across all dataset checks:

- the *scan*: one pass with DataLoader worker processes. Each worker inspects the samples
  where it loads them (the input's shape, value range and hash, the target) and sends back
  only what it saw, plus copies of the probe inputs; it also batches the samples with the
  split's collate function, as training would, and reports whether that failed;
- the *probes*: a few samples loaded once more in the main process (for a map-style split
  the first, the last and random indices, for a stream its first samples).

The results are cached per test class, keyed by everything that changes what is scanned,
and dropped by a class cleanup when the class's tests are done.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import traceback
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, FrozenSet, Hashable, List, Optional, Sequence, Tuple, Union

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_convert, get_worker_info

from ._random import make_deterministic, preserved_global_state
from ._tensors import _fields, named_tensors

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


def listed(positions: Sequence[Position], total: Optional[int] = None) -> str:
    """The first positions, "index 3, index 9 and 12 more"."""
    total = len(positions) if total is None else total
    text = ", ".join(where(p) for p in positions[:SHOWN])
    return text + (f" and {total - SHOWN} more" if total > SHOWN else "")


def is_stream(dataset: Any) -> bool:
    return isinstance(dataset, IterableDataset)


def sized(dataset: Any) -> Optional[int]:
    """``len(dataset)``, or None for a stream without ``__len__``."""
    try:
        return len(dataset)
    except TypeError:
        if is_stream(dataset):
            return None
        raise


def describe_callable(fn: Any) -> str:
    """A function as messages and cache keys name it: torch.utils.data.default_collate."""
    fn = getattr(fn, "__func__", fn)
    module = getattr(fn, "__module__", None) or type(fn).__module__
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    if module == "torch.utils.data._utils.collate":
        module = "torch.utils.data"
    return f"{module}.{name}"


def exception_text(exc: BaseException) -> str:
    """``Type: message``, the message cut to its first line."""
    message = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {message[0]}" if message else type(exc).__name__


def forget(exc: BaseException) -> None:
    """Drop the frames an exception's traceback keeps alive (a DataLoader iterator among
    them), so that what they hold is released now, not by a later garbage collection."""
    seen = set()
    current: Optional[BaseException] = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        traceback.clear_frames(current.__traceback__)
        current = current.__cause__ or current.__context__


# -- one sample: its input and its target -------------------------------------------------
@dataclass
class LoadFailure:
    """Loading a sample failed; stands in for the sample. ``text`` is the exception
    (``Type: message``) or, when ``raised`` is False, what went wrong."""

    text: str
    index_error: bool = False
    raised: bool = True

    @classmethod
    def of(cls, exc: BaseException) -> "LoadFailure":
        return cls(exception_text(exc), isinstance(exc, IndexError))


def _article(word: str) -> str:
    return "an" if word[0].lower() in "aeiou" else "a"


def _kind(value: Any) -> str:
    """What a non-tensor value is, for messages: "a PIL Image", "None", "a str"."""
    if value is None:
        return "None"
    name = type(value).__name__
    if type(value).__module__.startswith("PIL."):
        name = "PIL Image"
    return f"{_article(name)} {name}"


def _advice(value: Any) -> str:
    """What to do about an input that is no tensor and a sample that holds none."""
    if value is None:
        return (
            "__getitem__ gives None instead of a sample or an input (a missing return "
            "statement, a failed read that is not raised)"
        )
    if type(value).__module__.startswith("PIL."):
        return (
            "the split has no ToTensor-like transform. Add one to its transforms "
            "(torchvision.transforms.ToTensor(), or transforms.v2.ToImage() followed by "
            "transforms.v2.ToDtype(torch.float32, scale=True))"
        )
    if isinstance(value, (str, bytes)):
        return (
            "the split gives raw text. Encode it in the split's transform (a tokenizer "
            "that returns tensors); the checks look at tensors"
        )
    return "convert it to a tensor in the split's transform"


@dataclass
class InputProblem:
    """The input of a sample cannot be picked: ``kind`` is "key" (self.input_key does not fit
    the sample; ``fix`` is a key that would) or "type" (the sample holds no tensor: the data
    needs a transform)."""

    kind: str
    text: str
    fix: Any = None


def pick_input(sample: Any, key: Any) -> Union[torch.Tensor, InputProblem]:
    """The input tensor of a (converted) sample, chosen by ``key`` (None: the sample itself
    when it is a tensor, else its first element)."""
    if key is not None:
        try:
            picked = sample[key]
        except (KeyError, IndexError, TypeError):
            fields = _fields(sample)
            keys = f" (it has {[k for k, _ in fields]})" if fields else ""
            if fields is None and not _has_tensor(sample):
                return InputProblem(
                    "type",
                    f"is {_kind(sample)}, not a tensor or a tuple or "
                    f"dict holding one: {_advice(sample)}",
                )
            return InputProblem("key", f"has no element {key!r}{keys}", _tensor_key(sample))
        described = f"element {key!r}"
    elif isinstance(sample, torch.Tensor):
        return sample
    else:
        fields = _fields(sample)
        if not fields:
            return InputProblem("type", f"is {_kind(sample)}, not a tensor: {_advice(sample)}")
        key, picked = fields[0]
        described = f"element {key!r}"
    if isinstance(picked, torch.Tensor):
        return picked
    tensors = [path for path, _ in named_tensors(sample, "sample")]
    if tensors:
        return InputProblem(
            "key",
            f"has {_kind(picked)} as {described}, not a tensor (its tensors: {', '.join(tensors)})",
            _tensor_key(sample),
        )
    return InputProblem(
        "type",
        f"has {_kind(picked)} as {described} (the input), not a torch.Tensor: {_advice(picked)}",
    )


def _has_tensor(sample: Any) -> bool:
    return any(True for _ in named_tensors(sample))


def _tensor_key(sample: Any) -> Any:
    """The key of the first element of a sample that is a tensor, if any."""
    return next(
        (key for key, value in _fields(sample) or () if isinstance(value, torch.Tensor)), None
    )


#: The keys a target is usually stored under, suggested when self.target_key does not fit.
TARGET_KEYS = ("label", "labels", "target", "targets", "y", "class", "cls")


def target_key_of(sample: Any) -> Any:
    return next((key for key, _ in _fields(sample) or () if key in TARGET_KEYS), None)


#: pick_target's result for a sample without a target at self.target_key.
MISSING = "missing"


def pick_target(sample: Any, key: Any) -> Tuple[Optional[int], Optional[str]]:
    """``(label, None)`` for an integer class label, ``(None, what it is)`` otherwise,
    ``(None, MISSING)`` when the sample has no element ``key``."""
    if isinstance(sample, torch.Tensor) or _fields(sample) is None:
        return None, MISSING
    try:
        value = sample[key]
    except (KeyError, IndexError, TypeError):
        return None, MISSING
    if isinstance(value, int) and not isinstance(value, bool):
        return value, None
    if isinstance(value, torch.Tensor):
        if value.dim() == 0 and not (
            value.is_floating_point() or value.is_complex() or value.dtype == torch.bool
        ):
            return int(value), None
        shown = f" ({value.item()!r})" if value.numel() == 1 else ""
        dtype = str(value.dtype).replace("torch.", "")
        return None, f"{_article(dtype)} {dtype} tensor of shape {tuple(value.shape)}{shown}"
    return None, "None" if value is None else f"{_kind(value)} ({value!r:.40})"


def digest(tensor: torch.Tensor) -> bytes:
    """A 128-bit hash of a tensor's shape, dtype and bytes (equal tensors, equal hashes)."""
    return _digests(tensor.shape, tensor.dtype, tensor.detach().reshape(1, -1))[0]


def _digests(shape: Sequence[int], dtype: torch.dtype, rows: torch.Tensor) -> List[bytes]:
    """The digests of the tensors of one shape and dtype stacked as the rows of ``rows``."""
    header = f"{tuple(shape)}{dtype}".encode()
    if rows.dtype == torch.bool:
        rows = rows.to(torch.uint8)
    data = rows.contiguous().view(torch.uint8).numpy()
    return [_hash(header, row.data) for row in data]


def _hash(header: bytes, data: memoryview) -> bytes:
    hashed = hashlib.blake2b(header, digest_size=16)
    hashed.update(data)
    return hashed.digest()


def same(first: torch.Tensor, second: torch.Tensor) -> bool:
    """Exactly equal, NaN at the same places counting as equal."""
    if first.shape != second.shape or first.dtype != second.dtype:
        return False
    if first.is_floating_point() or first.is_complex():
        nan_first, nan_second = torch.isnan(first), torch.isnan(second)
        return bool(
            torch.equal(nan_first, nan_second)
            and torch.equal(first[~nan_first], second[~nan_second])
        )
    return bool(torch.equal(first, second))


def difference(first: torch.Tensor, second: torch.Tensor) -> str:
    """How two inputs of one sample differ, for messages."""
    if first.shape != second.shape:
        return f"shape {tuple(first.shape)} vs {tuple(second.shape)}"
    if first.dtype != second.dtype:
        return f"dtype {first.dtype} vs {second.dtype}"
    keep = ~(torch.isnan(first) | torch.isnan(second)) if first.is_floating_point() else None
    delta = (first.double() - second.double()).abs()
    if keep is not None:
        delta = delta[keep]
    return f"max difference {float(delta.max()) if delta.numel() else float('nan'):.3g}"


# -- what a worker reports about one batch -------------------------------------------------
@dataclass
class BatchReport:
    """What a worker saw in one batch; small (no data but copies of the probe inputs)."""

    worker: int = -1
    positions: List[Position] = field(default_factory=list)
    failures: List[Tuple[Position, LoadFailure]] = field(default_factory=list)
    input_problems: List[Tuple[Position, InputProblem]] = field(default_factory=list)
    shapes: Dict[Tuple[int, ...], List[Any]] = field(default_factory=dict)
    low: float = float("inf")
    low_at: Optional[Position] = None
    high: float = float("-inf")
    high_at: Optional[Position] = None
    nonfinite: List[Position] = field(default_factory=list)
    #: per inspected sample: (position, hash or None, label or None)
    samples: List[Tuple[Position, Optional[bytes], Optional[int]]] = field(default_factory=list)
    target_problems: List[Tuple[Position, str]] = field(default_factory=list)
    unlabelled: List[Position] = field(default_factory=list)  # the first samples without one
    unlabelled_count: int = 0
    kept: Dict[Position, torch.Tensor] = field(default_factory=dict)
    collate_error: Optional[str] = None
    internal_error: Optional[str] = None


@dataclass(frozen=True)
class Inspection:
    """What the scan's workers look at; also the split's collate function."""

    input_key: Any
    target_key: Any
    collate_fn: Callable[[List[Any]], Any]
    probes: FrozenSet[Any] = frozenset()
    hash_inputs: bool = False
    stream: bool = False


class Inspector:
    """The collate function of the scan: runs in each worker on the samples of a batch,
    inspects them, batches them with the split's collate function, and returns a
    BatchReport instead of the batch."""

    def __init__(self, inspection: Inspection) -> None:
        self.inspection = inspection
        self.read = 0  # samples this worker read from a stream (each worker has its copy)

    def __call__(self, items: List[Any]) -> BatchReport:
        info = get_worker_info()
        report = BatchReport(worker=info.id if info is not None else -1)
        try:
            self._inspect(items, report)
        except Exception:  # a bug of dltestkit, not of the data: reported as an error
            report.internal_error = traceback.format_exc()
        return report

    def _inspect(self, items: List[Any], report: BatchReport) -> None:
        check = self.inspection
        if check.stream:
            positions: List[Position] = [(report.worker, self.read + n) for n in range(len(items))]
            self.read += len(items)
            samples = list(items)
        else:
            positions = [index for index, _ in items]
            samples = [sample for _, sample in items]
        report.positions = positions
        inputs: List[Tuple[Position, torch.Tensor]] = []
        for position, sample in zip(positions, samples):
            if isinstance(sample, LoadFailure):
                report.failures.append((position, sample))
                continue
            converted = default_convert(sample)  # type: ignore[no-untyped-call]
            picked = pick_input(converted, check.input_key)
            if isinstance(picked, InputProblem):
                report.input_problems.append((position, picked))
                continue
            label, problem = pick_target(converted, check.target_key)
            if problem is MISSING:
                report.unlabelled_count += 1
                if len(report.unlabelled) < SHOWN:
                    report.unlabelled.append(position)
            elif problem is not None:
                report.target_problems.append((position, problem))
            inputs.append((position, picked.detach()))
            report.samples.append((position, None, label))
        if report.failures or report.input_problems:
            return
        hashes = _statistics(inputs, report, check.hash_inputs or check.stream)
        if hashes:
            report.samples = [
                (position, hashes[position], label) for position, _, label in report.samples
            ]
        report.kept = {
            position: tensor.clone() for position, tensor in inputs if position in check.probes
        }
        try:
            check.collate_fn(samples)
        except Exception as exc:
            report.collate_error = exception_text(exc)


def _statistics(
    inputs: List[Tuple[Position, torch.Tensor]], report: BatchReport, hash_inputs: bool
) -> Dict[Position, bytes]:
    """Shapes, extremes and non-finite samples into ``report``; the hashes, if asked for."""
    groups: Dict[Tuple[Tuple[int, ...], torch.dtype], List[Tuple[Position, torch.Tensor]]] = (
        collections.defaultdict(list)
    )
    for position, tensor in inputs:
        shape = tuple(tensor.shape)
        groups[shape, tensor.dtype].append((position, tensor))
        seen = report.shapes.setdefault(shape, [0, []])
        seen[0] += 1
        if len(seen[1]) < SHOWN:
            seen[1].append(position)
    hashes: Dict[Position, bytes] = {}
    for (shape, dtype), members in groups.items():
        positions = [position for position, _ in members]
        flat = torch.stack([tensor for _, tensor in members]).reshape(len(members), -1)
        if flat.dtype == torch.bool:
            flat = flat.to(torch.uint8)
        if hash_inputs:
            hashes.update(zip(positions, _digests(shape, dtype, flat)))
        if flat.is_complex() or flat.shape[1] == 0:
            continue
        if flat.is_floating_point():
            finite = torch.isfinite(flat).all(dim=1)
            if not bool(finite.all()):
                report.nonfinite += [p for p, ok in zip(positions, finite.tolist()) if not ok]
                positions = [p for p, ok in zip(positions, finite.tolist()) if ok]
                flat = flat[finite]
        if not positions:
            continue
        lows, highs = flat.amin(dim=1), flat.amax(dim=1)
        low, high = float(lows.min()), float(highs.max())
        if low < report.low:
            report.low, report.low_at = low, positions[int(lows.argmin())]
        if high > report.high:
            report.high, report.high_at = high, positions[int(highs.argmax())]
    return hashes


class Indexed(Dataset[Any]):
    """A map-style split whose samples come with their index; a sample that cannot be
    loaded becomes a LoadFailure instead of an exception that stops the DataLoader."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Tuple[int, Any]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: List[int]) -> List[Tuple[int, Any]]:
        getitems = getattr(self.dataset, "__getitems__", None)
        batched: Optional[str] = None
        if getitems is not None:
            try:
                samples = getitems(list(indices))
            except Exception as exc:  # find the index that fails, one by one
                batched = exception_text(exc)
            else:
                if len(samples) == len(indices):
                    return list(zip(indices, samples))
                return [
                    (
                        indices[0],
                        LoadFailure(
                            f"the dataset's __getitems__ returned {len(samples)} samples for the "
                            f"{len(indices)} indices {indices[0]} to {indices[-1]}; it must "
                            "return one sample per index",
                            raised=False,
                        ),
                    )
                ]
        loaded = []
        for index in indices:
            try:
                loaded.append((index, self.dataset[index]))
            except Exception as exc:
                loaded.append((index, LoadFailure.of(exc)))
        if batched is not None and not any(isinstance(s, LoadFailure) for _, s in loaded):
            return [
                (
                    indices[0],
                    LoadFailure(
                        f"the dataset's __getitems__ raised {batched} for the indices "
                        f"{indices[0]} to {indices[-1]}, though __getitem__ loads each of them",
                        raised=False,
                    ),
                )
            ]
        return loaded

    def __getattr__(self, name: str) -> Any:
        # worker_init_fn and __iter__ code may read get_worker_info().dataset.<attribute>
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


# -- a split: its plan, its probes, its scan ------------------------------------------------
@dataclass
class Probe:
    """One sample loaded in the main process (a copy of its input, not the sample, which may
    share the memory of the whole dataset)."""

    failure: Optional[LoadFailure] = None
    input: Optional[torch.Tensor] = None
    input_problem: Optional[InputProblem] = None
    hash: Optional[bytes] = None
    #: for a ContractError about target_key: whether the sample lacks it, what the sample
    #: holds, and a key that looks like the target's
    target_missing: bool = False
    structure: str = ""
    target_key_hint: Any = None


def structure(sample: Any) -> str:
    """What a sample holds, for messages: "its elements: ['image', 'label']"."""
    fields = _fields(sample)
    if isinstance(sample, torch.Tensor):
        return "it is a bare tensor"
    if fields is None:
        return f"it is {_kind(sample)}"
    return f"its elements: {[k for k, _ in fields]}"


@dataclass
class Registered:
    """The first sample with some hash, and how many samples have it."""

    position: Position
    label: Optional[int]
    count: int = 1


@dataclass
class Scan:
    """What the pass with worker processes saw, merged over the batches."""

    count: int = 0
    complete: bool = False  # the whole split (or its max_samples subset) was read
    loader_error: Optional[str] = None
    timed_out: bool = False
    in_flight: str = ""
    failures: List[Tuple[Position, LoadFailure]] = field(default_factory=list)
    failure_count: int = 0
    input_problems: List[Tuple[Position, InputProblem]] = field(default_factory=list)
    input_problem_count: int = 0
    shapes: Dict[Tuple[int, ...], List[Any]] = field(default_factory=dict)
    low: float = float("inf")
    low_at: Optional[Position] = None
    high: float = float("-inf")
    high_at: Optional[Position] = None
    nonfinite: List[Position] = field(default_factory=list)
    nonfinite_count: int = 0
    labels: "collections.Counter[int]" = field(default_factory=collections.Counter)
    first_with_label: Dict[int, Position] = field(default_factory=dict)
    labelled: int = 0
    unlabelled: List[Position] = field(default_factory=list)
    unlabelled_count: int = 0
    target_problems: List[Tuple[Position, str]] = field(default_factory=list)
    target_problem_count: int = 0
    #: hash -> the first sample with it (deterministic splits and streams only)
    hashes: Dict[bytes, Registered] = field(default_factory=dict)
    conflicts: List[Tuple[Registered, Position, Optional[int]]] = field(default_factory=list)
    conflict_count: int = 0
    #: streams: samples each worker read, and those another worker had read first
    per_worker: "collections.Counter[int]" = field(default_factory=collections.Counter)
    repeated: "collections.Counter[Tuple[int, int]]" = field(default_factory=collections.Counter)
    repeated_example: Dict[Tuple[int, int], Tuple[Position, Position]] = field(default_factory=dict)
    kept: Dict[Position, torch.Tensor] = field(default_factory=dict)
    collate_error: Optional[str] = None
    collate_shapes: List[Tuple[int, ...]] = field(default_factory=list)
    collate_at: str = ""

    @property
    def blocked(self) -> bool:
        return bool(self.loader_error or self.failures or self.input_problems)

    def add(self, report: BatchReport) -> None:
        """Merge one batch's report (in the order the batches come)."""
        if report.internal_error:
            raise RuntimeError(
                f"dltestkit failed while inspecting a batch in a DataLoader "
                f"worker (a bug of dltestkit):\n{report.internal_error}"
            )
        self.count += len(report.positions)
        self.failure_count += len(report.failures)
        self.failures += report.failures[: SHOWN - len(self.failures)]
        self.input_problem_count += len(report.input_problems)
        self.input_problems += report.input_problems[: SHOWN - len(self.input_problems)]
        for shape, (count, positions) in report.shapes.items():
            seen = self.shapes.setdefault(shape, [0, []])
            seen[0] += count
            seen[1] += positions[: SHOWN - len(seen[1])]
        if report.low < self.low:
            self.low, self.low_at = report.low, report.low_at
        if report.high > self.high:
            self.high, self.high_at = report.high, report.high_at
        self.nonfinite_count += len(report.nonfinite)
        self.nonfinite += report.nonfinite[: SHOWN - len(self.nonfinite)]
        self.target_problem_count += len(report.target_problems)
        self.target_problems += report.target_problems[: SHOWN - len(self.target_problems)]
        self.unlabelled_count += report.unlabelled_count
        self.unlabelled += report.unlabelled[: SHOWN - len(self.unlabelled)]
        self.per_worker[report.worker] += len(report.positions)
        for position, hashed, label in report.samples:
            if label is not None:
                self.labelled += 1
                self.labels[label] += 1
                self.first_with_label.setdefault(label, position)
            if hashed is not None:
                self._register(position, hashed, label, report.worker)
        self.kept.update((position, tensor.clone()) for position, tensor in report.kept.items())
        if report.collate_error and self.collate_error is None:
            self.collate_error = report.collate_error
            self.collate_shapes = list(report.shapes)
            self.collate_at = _span(report.positions)

    def _register(
        self, position: Position, hashed: bytes, label: Optional[int], worker: int
    ) -> None:
        first = self.hashes.get(hashed)
        if first is None:
            self.hashes[hashed] = Registered(position, label)
            return
        first.count += 1
        if first.label is not None and label is not None and label != first.label:
            self.conflict_count += 1
            if len(self.conflicts) < SHOWN:
                self.conflicts.append((first, position, label))
        if isinstance(first.position, tuple) and first.position[0] != worker:
            pair = (first.position[0], worker)
            self.repeated[pair] += 1
            self.repeated_example.setdefault(pair, (first.position, position))


def _span(positions: Sequence[Position]) -> str:
    """The positions of a batch: "indices 16 to 31", "samples 0 to 15 of worker 1"."""
    if not positions:
        return "no sample"
    first, last = positions[0], positions[-1]
    if isinstance(first, tuple) and isinstance(last, tuple):
        return f"samples {first[1]} to {last[1]} of worker {first[0]}"
    return f"index {first}" if first == last else f"indices {first} to {last}"


@dataclass
class Loading:
    """How the checks load a split; every field changes what the scan sees."""

    input_key: Any
    target_key: Any
    collate_fn: Callable[[List[Any]], Any]
    worker_init_fn: Optional[Callable[[int], None]]
    batch_size: int
    num_workers: int
    max_samples: Optional[int]
    probe_count: int
    seed: int
    augmented: bool
    timeout: float

    def key(self) -> Tuple[Hashable, ...]:
        values = (getattr(self, option.name) for option in dataclasses.fields(self))
        return tuple(describe_callable(v) if callable(v) else v for v in values)


class SplitState:
    """One split as the checks of a test class know it: loaded lazily, at most once.

    ``dataset`` is the split of the test that is running (set by ``use``); it is released
    after each test, so that the cache does not keep a dataset alive.
    """

    def __init__(self, dataset: Any, loading: Loading) -> None:
        self.dataset: Any = dataset
        self.loading = loading
        self.stream = is_stream(dataset)
        self.size = sized(dataset)
        generator = torch.Generator().manual_seed(loading.seed)
        self.indices: Sequence[int] = range(0)
        if self.stream:
            self.probe_positions: List[Position] = [(-1, n) for n in range(loading.probe_count)]
        else:
            size = self.size or 0
            if loading.max_samples is not None and loading.max_samples < size:
                self.indices = sorted(
                    torch.randperm(size, generator=generator)[: loading.max_samples].tolist()
                )
            else:
                self.indices = range(size)
            probes = [self.indices[0], self.indices[-1]] if len(self.indices) else []
            extra = torch.randperm(len(self.indices), generator=generator).tolist()
            probes += [self.indices[i] for i in extra if self.indices[i] not in probes]
            self.probe_positions = sorted(set(probes[: loading.probe_count]))
        self.probes = self._load_probes(self.probe_positions, loading.seed)
        self.dataset = None  # until ``use``
        self._scan: Optional[Scan] = None
        self._reloaded: Optional[Dict[Position, Probe]] = None

    def use(self, dataset: Any) -> bool:
        """Load from ``dataset`` (the running test's split); True if it was not in use."""
        fresh = self.dataset is not dataset
        self.dataset = dataset
        return fresh

    def release(self) -> None:
        self.dataset = None

    # -- the main process -----------------------------------------------------------------
    def _load_probes(self, positions: List[Position], seed: int) -> Dict[Position, Probe]:
        """Load samples one by one in the main process, the global RNGs seeded and restored."""
        loaded: Dict[Position, Any] = {}
        with preserved_global_state():
            make_deterministic(seed)
            if self.stream:
                loaded = self._read_stream(len(positions))
            else:
                for index in positions:
                    try:
                        loaded[index] = self.dataset[index]
                    except Exception as exc:
                        loaded[index] = LoadFailure.of(exc)
        return {position: self._probe(sample) for position, sample in loaded.items()}

    def _read_stream(self, count: int) -> Dict[Position, Any]:
        read: Dict[Position, Any] = {}
        iterator = None
        try:
            iterator = iter(self.dataset)
            for number in range(count):
                read[(-1, number)] = next(iterator)
        except StopIteration:
            pass
        except Exception as exc:
            read[(-1, len(read))] = LoadFailure.of(exc)
            forget(exc)
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()
        return read

    def _probe(self, sample: Any) -> Probe:
        if isinstance(sample, LoadFailure):
            return Probe(failure=sample)
        converted = default_convert(sample)  # type: ignore[no-untyped-call]
        probe = Probe(
            target_missing=pick_target(converted, self.loading.target_key)[1] is MISSING,
            structure=structure(converted),
            target_key_hint=target_key_of(converted),
        )
        picked = pick_input(converted, self.loading.input_key)
        if isinstance(picked, InputProblem):
            probe.input_problem = picked
        else:
            probe.input, probe.hash = picked.detach().clone(), digest(picked)
        return probe

    def reloaded(self, positions: List[Position]) -> Dict[Position, Probe]:
        """The probes at ``positions`` loaded once more in the main process, under another
        seed: tells random data from data that depends on the process. Only used when a
        check is failing."""
        if self._reloaded is None:
            self._reloaded = self._load_probes(
                [p for p in positions if isinstance(p, int)], self.loading.seed + 1
            )
        return self._reloaded

    def load_again(self, index: int) -> Optional[torch.Tensor]:
        """One sample's input, loaded in the main process (to confirm a match exactly)."""
        probe = self._load_probes([index], self.loading.seed)[index]
        return probe.input

    # -- the scan with worker processes -------------------------------------------------------
    @property
    def scan(self) -> Scan:
        if self._scan is None:
            self._scan = self._run_scan()
        return self._scan

    def _run_scan(self) -> Scan:
        loading = self.loading
        inspection = Inspection(
            loading.input_key,
            loading.target_key,
            loading.collate_fn,
            frozenset(self.probe_positions) if not self.stream else frozenset(),
            hash_inputs=not loading.augmented,
            stream=self.stream,
        )
        if self.stream:
            dataset, sampler = self.dataset, None
        else:
            dataset, sampler = Indexed(self.dataset), self.indices
        loader = DataLoader(
            dataset,
            batch_size=loading.batch_size,
            sampler=sampler,
            num_workers=loading.num_workers,
            collate_fn=Inspector(inspection),
            timeout=loading.timeout,
            worker_init_fn=loading.worker_init_fn,
            generator=torch.Generator().manual_seed(loading.seed),
        )
        scan = Scan()
        limit = loading.max_samples if self.stream else None
        batches = 0
        iterator = None
        with warnings.catch_warnings():
            # the DataLoader's own warnings (a stream whose len() is wrong, a dataset that
            # cannot be pickled for the workers) are what test_data_loading reports
            warnings.filterwarnings("ignore", module=r"torch\.utils\.data\.dataloader")
            try:
                iterator = iter(loader)
                while True:
                    try:
                        report = next(iterator)
                    except StopIteration:
                        scan.complete = True
                        break
                    except Exception as exc:
                        self._loader_failed(scan, exc, batches)
                        forget(exc)
                        break
                    batches += 1
                    scan.add(report)
                    if scan.blocked or (limit is not None and scan.count >= limit):
                        scan.complete = (
                            not scan.blocked and self.size is not None and scan.count >= self.size
                        )
                        break
            except Exception as exc:  # iter(loader) failed: the workers did not start
                if iterator is not None:
                    raise
                self._loader_failed(scan, exc, batches)
                forget(exc)
            finally:
                del iterator  # shuts the workers down now (nothing else refers to it)
        return scan

    def _loader_failed(self, scan: Scan, exc: BaseException, batches: int) -> None:
        message = str(exc)
        scan.timed_out = message.startswith("DataLoader timed out")
        if "Original Traceback" in message:  # an exception in a worker, with its traceback
            lines = [line for line in message.strip().splitlines() if line.strip()]
            text = f"{lines[0].strip()} {lines[-1].strip()}"
        else:
            text = exception_text(exc)
        scan.loader_error = text
        size = self.loading.batch_size
        if self.stream:
            scan.in_flight = f"after {scan.count} samples had arrived"
        else:
            batch = list(self.indices[batches * size : (batches + 1) * size])
            total = -(-len(self.indices) // size)
            scan.in_flight = f"{_span(batch)} (batch {batches + 1} of {total})"


# -- the cache ---------------------------------------------------------------------------------
_CACHE: "weakref.WeakKeyDictionary[type, Dict[Tuple[Hashable, ...], SplitState]]" = (
    weakref.WeakKeyDictionary()
)


def split_state(owner: type, name: str, dataset: Any, loading: Loading) -> SplitState:
    """The cached state of a split for the test class ``owner``. The cache of a class is
    dropped by a class cleanup (when the runner has run the class's tests) or with the
    class; it is keyed by the split's name and type and by every loading option."""
    cache = _CACHE.get(owner)
    if cache is None:
        cache = _CACHE[owner] = {}
        add_cleanup = getattr(owner, "addClassCleanup", None)
        if add_cleanup is not None:
            add_cleanup(_CACHE.pop, owner, None)
    key = (
        name,
        type(dataset).__module__,
        type(dataset).__qualname__,
        sized(dataset),
        *loading.key(),
    )
    if key not in cache:
        cache[key] = SplitState(dataset, loading)
    return cache[key]


def cached_classes() -> List[type]:
    """The test classes that hold cached scans (for tests of the cache's lifetime)."""
    return list(_CACHE.keys())
