"""DatasetTests: checks for torch Datasets, map-style and iterable (streams)."""

from __future__ import annotations

import inspect
import itertools
import math
import multiprocessing
from typing import (
    Any,
    Callable,
    ClassVar,
    Collection,
    Dict,
    FrozenSet,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
)

import torch
from torch.utils.data import default_collate

from . import _scan
from ._base import (
    REQUIRED,
    Attribute,
    CheckMixin,
    ContractError,
    check,
    is_callable,
    is_names,
    is_number,
    is_positive_int,
    is_shape,
    optional,
)
from ._scan import Extreme, Position, SplitState, listed, path_text, shape_text, value_text, where

__all__ = ["DatasetTests"]

#: The check that reports a split that cannot be loaded; the others skip, pointing to it.
LOADING_CHECK = "test_data_loading"


def _is_splits(value: Any) -> Optional[str]:
    if not isinstance(value, Mapping) or not value:
        return f"is a {type(value).__name__}, not a non-empty dict"
    for name, split in value.items():
        if _scan.is_stream(split):
            continue
        if not hasattr(split, "__getitem__") or not hasattr(split, "__len__"):
            return (
                f"has split {name!r} of type {type(split).__name__}, which is neither a "
                "sized Dataset (with __len__ and __getitem__) nor an IterableDataset"
            )
    return None


def _is_range(value: Any) -> Optional[str]:
    if (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        and value[0] < value[1]
    ):
        return None
    return f"is {value!r}, not a (low, high) pair with low < high"


def _is_fraction(value: Any) -> Optional[str]:
    if is_number(value) is None and 0 <= value <= 1:
        return None
    return f"is {value!r}, not a number in [0, 1]"


def _is_positive_number(value: Any) -> Optional[str]:
    if is_number(value) is None and value > 0:
        return None
    return f"is {value!r}, not a positive number"


def _is_step(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def _is_input_key(value: Any) -> Optional[str]:
    """None, an index or a key, or a path of them into nested samples."""
    if value is None or _is_step(value):
        return None
    if isinstance(value, tuple) and value and all(_is_step(step) for step in value):
        return None
    return (
        f"is {value!r}, not an int index, a str key or a tuple of them (a path into "
        "nested samples, e.g. ('inputs', 'image'))"
    )


def _is_target_key(value: Any) -> Optional[str]:
    if value is None:
        return "is None, not an int index, a str key or a tuple of them (a path)"
    return _is_input_key(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_ignore_index(value: Any) -> Optional[str]:
    if _is_int(value):
        return None
    if isinstance(value, (list, tuple, set, frozenset)) and all(_is_int(v) for v in value):
        return None
    return f"is {value!r}, not an int or a collection of ints (e.g. 255 or (-100, 255))"


def _is_classes(value: Any) -> Optional[str]:
    if isinstance(value, (list, tuple, set, frozenset, range)) and all(
        _is_int(v) and v >= 0 for v in value
    ):
        return None
    return f"is {value!r}, not a collection of class indices (e.g. {{0}} or ())"


def _is_start_method(value: Any) -> Optional[str]:
    methods = multiprocessing.get_all_start_methods()
    if value is None or value in methods:
        return None
    return f"is {value!r}, not None or one of the start methods of this platform {methods}"


def _unbound(owner: Any, name: str) -> Any:
    """An attribute as it was set: a function set on the class is not bound to self."""
    value = inspect.getattr_static(owner, name)
    return value.__func__ if isinstance(value, staticmethod) else value


class DatasetTests(CheckMixin):
    """Checks for the splits of a dataset: map-style datasets and streams (IterableDataset).

    Each sample is loaded at most twice across all checks: one pass with worker
    processes, in which the workers inspect every sample they load (shape, value range,
    hash, target), serves every check, and a few probe samples are loaded once more in
    the main process. The results are kept per test class and split until the class's
    tests are done, so setUp must build the same data for every test.
    """

    _mixin_name: ClassVar[str] = "DatasetTests"
    _contract: ClassVar[Tuple[Attribute, ...]] = (
        Attribute(
            "splits",
            "a dict mapping split name to a torch Dataset",
            '{"train": train_data, "test": test_data}',
            default=REQUIRED,
            validate=_is_splits,
            details="A map-style dataset (with `__len__` and `__getitem__`) or an "
            "`IterableDataset` (a stream), which must give each DataLoader "
            "worker its own shard.",
        ),
        Attribute(
            "sample_shape",
            "the shape of one sample's input tensor",
            "(1, 32, 32)",
            validate=is_shape,
            read_by=("test_sample_shape", "test_data_loading"),
            default_text="unset: `test_sample_shape` skips",
            details="Without the batch dimension. (`test_data_loading` leaves samples of "
            "another shape, which cannot be batched, to `test_sample_shape`.)",
        ),
        Attribute(
            "value_range",
            "the inclusive (low, high) bounds of the input values",
            "(-1.0, 1.0)",
            validate=_is_range,
            read_by=("test_value_range",),
        ),
        Attribute(
            "range_coverage",
            "how close, as a fraction of high - low, the data must come to each bound",
            "0.1",
            default=0.1,
            validate=_is_fraction,
            read_by=("test_value_range",),
            details="In [0, 1]; `1.0` checks the bounds only (for data that legitimately "
            "stays away from them, like quiet audio).",
        ),
        Attribute(
            "augmented_splits",
            "the names of the splits that are randomly augmented",
            '{"train"}',
            default=frozenset(),
            validate=is_names,
            read_by=("test_augmentation", "test_data_loading", "test_split_overlap", "test_labels"),
            details="Every other split must give the same sample each time.",
        ),
        Attribute(
            "num_classes",
            "the number of classes of the targets",
            "10",
            validate=is_positive_int,
            read_by=("test_labels", "test_data_loading"),
            default_text="unset: `test_labels` skips",
            details="Targets are integer class indices in `[0, num_classes)`, checked "
            "element by element: a label per sample, a label map (segmentation masks), "
            "per-object labels. (`test_data_loading` leaves targets that cannot be batched "
            "to `test_labels`.)",
        ),
        Attribute(
            "target_key",
            "the index or key of the target (class label) in a sample",
            '"label"',
            default=1,
            validate=_is_target_key,
            read_by=("test_labels",),
            details="`1`: element 1 of an `(input, target)` tuple. A tuple is a path into "
            'nested samples: `("meta", "label")` is `sample["meta"]["label"]`; '
            '`(1, "labels")` the per-box labels of torchvision\'s detection samples '
            '`(image, {"boxes": ..., "labels": ...})`.',
        ),
        Attribute(
            "ignore_index",
            "the target values that mean no class, ignored by the loss",
            "255",
            default=-100,
            validate=_is_ignore_index,
            read_by=("test_labels",),
            details="An int or a collection of ints, as the `ignore_index` of "
            "`F.cross_entropy` (whose default is -100): `255` for Pascal VOC masks, whose "
            "object borders are 255; `(-100, 255)`. These values are neither out of range "
            "nor counted as a class.",
        ),
        Attribute(
            "target_shape",
            "the shape of one sample's target",
            "()",
            validate=is_shape,
            read_by=("test_labels",),
            default_text="unset: any shape",
            details="`()`: one class index per sample, so that a one-element target "
            "(`torch.tensor([label])`) fails even when the batches do not show its shape; "
            "`(512, 512)`: label maps of that size. Leave it unset for targets of varying "
            "shape (per-object labels).",
        ),
        Attribute(
            "unused_classes",
            "the classes that may occur in no sample of a split",
            "{0}",
            default=None,
            validate=optional(_is_classes),
            read_by=("test_labels",),
            details="`None`: a class that no sample of a large enough split holds fails for "
            "per-sample labels, and is reported in a skipped part for label maps and "
            "per-object labels, whose numbering may leave ids unused by design (the "
            "background class 0 of torchvision's detection models, COCO's unused category "
            "ids). A collection (`{0}`, `()`) makes that strict: every other class must occur.",
        ),
        Attribute(
            "class_presence",
            "the samples per class, on average, from which a split must hold every class",
            "50",
            default=20,
            validate=optional(is_positive_int),
            read_by=("test_labels",),
            details="A split of fewer scanned samples than `class_presence * "
            "num_classes` may lack a class; `None` never requires every class.",
        ),
        Attribute(
            "max_label_conflicts",
            "the fraction of a split's labelled samples that may have the input of an "
            "earlier sample but another target",
            "0.2",
            default=0.0,
            validate=_is_fraction,
            read_by=("test_labels",),
            details="For data in which equal inputs legitimately carry different labels "
            "(tabular data with few distinct feature values, label noise). Inputs whose "
            "values are all equal are never compared.",
        ),
        Attribute(
            "max_shared_fraction",
            "the fraction of a split's scanned samples that may also occur in another split",
            "0.9",
            default=0.0,
            validate=_is_fraction,
            read_by=("test_split_overlap",),
            details="For splits that legitimately share inputs (tabular data with few "
            "distinct feature values). Inputs whose values are all equal (silence, blank "
            "images) are never compared.",
        ),
        Attribute(
            "input_key",
            "the index or key of the input tensor in a sample",
            "0",
            default=None,
            validate=_is_input_key,
            details="`None`: a tensor sample itself, else the first element of a tuple "
            'or dict sample. A tuple is a path into nested samples: `("inputs", "image")` '
            'is `sample["inputs"]["image"]`. An input that is a tuple, list or dict of '
            "tensors (two views of an image) has each of its tensors checked; numpy arrays "
            "and lists of numbers are checked as the tensors they convert to.",
        ),
        Attribute(
            "collate_fn",
            "the function that batches the samples of a split",
            "pad_sequences",
            default=None,
            validate=optional(is_callable),
            details="The one your DataLoader uses, e.g. one that pads sequences. `None`: "
            "PyTorch's default, `torch.utils.data.default_collate`.",
        ),
        Attribute(
            "num_workers",
            "the worker processes of the DataLoader that scans each split",
            "2",
            default=2,
            validate=is_positive_int,
            details="At least 1: loading in workers is part of what is checked.",
        ),
        Attribute(
            "worker_init_fn",
            "the worker_init_fn your DataLoader uses",
            "shard_worker",
            default=None,
            validate=optional(is_callable),
            details="For streams that give each worker its shard there, and datasets that "
            "open a file or a connection per worker there. (In the scan's workers, "
            "`get_worker_info().dataset` is a wrapper that passes reading and setting "
            "attributes on to your dataset.)",
        ),
        Attribute(
            "multiprocessing_context",
            "the start method of the scan's worker processes",
            '"spawn"',
            default=None,
            validate=_is_start_method,
            details="`None`: the platform's default (fork on Linux up to Python 3.13, "
            'forkserver from 3.14, spawn on macOS and Windows). `"spawn"` also catches '
            "datasets that only work in forked workers; see `test_data_loading`.",
        ),
        Attribute(
            "batch_size",
            "the batch size of the scan of each split",
            "256",
            default=256,
            validate=is_positive_int,
        ),
        Attribute(
            "loader_timeout",
            "the seconds the checks wait for one batch of the scan or one sample loaded in "
            "the main process",
            "600",
            default=300.0,
            validate=_is_positive_number,
            details="A load that blocks longer fails `test_data_loading`, naming the split "
            "and the indices, instead of hanging the tests.",
        ),
        Attribute(
            "max_samples",
            "a cap on the samples scanned per split (None: all)",
            "10_000",
            default=None,
            validate=optional(is_positive_int),
            details="A seeded random subset of that size is scanned (of a stream: its "
            "first samples; required for a stream without `__len__`). See "
            "[large datasets](large-datasets.md).",
        ),
        Attribute(
            "probe_count",
            "how many samples are loaded a second time",
            "8",
            default=8,
            validate=is_positive_int,
            details="The first, the last and random indices, in the main process (of a "
            "stream: its first samples).",
        ),
    )

    splits: Mapping[str, Any]
    sample_shape: Sequence[int]
    value_range: Tuple[float, float]
    range_coverage: float
    augmented_splits: Collection[str]
    num_classes: int
    target_key: Any
    ignore_index: Any
    target_shape: Sequence[int]
    unused_classes: Optional[Collection[int]]
    class_presence: Optional[int]
    max_label_conflicts: float
    max_shared_fraction: float
    input_key: Optional[Any]
    collate_fn: Optional[Callable[[List[Any]], Any]]
    num_workers: int
    worker_init_fn: Optional[Callable[[int], None]]
    multiprocessing_context: Optional[str]
    batch_size: int
    loader_timeout: float
    max_samples: Optional[int]
    probe_count: int

    # -- the contract across attributes -------------------------------------------------
    def _validate_combination(self) -> None:
        super()._validate_combination()
        unknown = sorted(set(self.augmented_splits) - set(self.splits))
        if unknown:
            raise self._contract_error(
                "augmented_splits",
                f"names {unknown}, which are not in self.splits ({sorted(self.splits)})",
            )
        if self.max_samples is None:
            for name, split in self.splits.items():
                if _scan.is_stream(split) and _scan.sized(split) is None:
                    raise ContractError(
                        f"split {name!r} set in {self._where()} is an IterableDataset without "
                        "__len__, so the checks cannot know where it ends (or whether it "
                        "does); set self.max_samples to the number of samples to scan, e.g. "
                        "self.max_samples = 10_000 (or give the dataset a __len__)."
                    )

    def _prepare(self) -> None:
        """Load the probes of every split; a key that does not fit the samples is a
        ContractError, raised before any check looks at the data."""
        super()._prepare()
        for name in self.splits:
            probe = self._first_probe(name)
            problem = probe.input_problem if probe is not None else None
            if problem is not None and problem.kind == "key":
                raise self._key_error(
                    name,
                    "input_key",
                    problem.text,
                    "the index or key of the input tensor",
                    problem.fix,
                )

    def _first_probe(self, name: str) -> Optional[_scan.Probe]:
        return next(
            (probe for probe in self._state(name).probes.values() if probe.failure is None), None
        )

    def _key_error(
        self, name: str, attribute: str, problem: str, wanted: str, fix: Any = None
    ) -> ContractError:
        value = getattr(self, attribute)
        set_by = (
            f"self.{attribute} = {value!r}"
            if self._sets(attribute)
            else f"self.{attribute} (default {value!r})"
        )
        example = f", e.g. self.{attribute} = {fix!r}" if fix is not None else ""
        return ContractError(
            f"{set_by} does not fit the samples of split {name!r}: the first sample {problem}. "
            f"Set self.{attribute} in {self._where()} to {wanted}{example}."
        )

    def _sets(self, attribute: str) -> bool:
        return attribute in vars(self) or any(
            attribute in vars(base)
            for base in type(self).__mro__
            if not (
                isinstance(base, type)
                and issubclass(base, CheckMixin)
                and base.__module__.startswith("dltestkit")
            )
        )

    # -- loading, shared by the checks ----------------------------------------------------
    def _loading(self, name: str) -> _scan.Loading:
        return _scan.Loading(
            input_key=self.input_key,
            target_key=self.target_key,
            collate_fn=self._collate_fn(),
            worker_init_fn=_unbound(self, "worker_init_fn"),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            max_samples=self.max_samples,
            probe_count=self.probe_count,
            seed=self.seed,
            augmented=name in self.augmented_splits,
            timeout=float(self.loader_timeout),
            multiprocessing_context=self.multiprocessing_context,
        )

    def _collate_fn(self) -> Callable[[List[Any]], Any]:
        collate_fn = _unbound(self, "collate_fn")
        return default_collate if collate_fn is None else collate_fn

    def _state(self, name: str) -> SplitState:
        dataset = self.splits[name]
        state = _scan.split_state(type(self), name, dataset, self._loading(name))
        if state.use(dataset):
            self.addCleanup(state.release)  # the cache keeps what was seen, not the dataset
        return state

    def _loaded(self, name: str) -> SplitState:
        """The split, scanned; skips (pointing to test_data_loading) if it cannot be loaded."""
        state = self._state(name)
        problem = self._load_problem(name, state)
        if problem is not None:
            self.skipTest(f"split {name!r} cannot be loaded ({problem[0]}); see {LOADING_CHECK}")
        return state

    def _load_problem(self, name: str, state: SplitState) -> Optional[Tuple[str, str]]:
        """(short reason, full message) when the split cannot be loaded, else None."""
        if not state.stream and state.size == 0:
            return "it is empty", (
                f"split {name!r} is empty: len() is 0. Check the path, "
                "the file list or the filter that builds it."
            )
        # a load that blocks in the main process is reported without a scan, which would
        # fork the process while the blocked load's thread runs
        scan = _scan.Scan() if state.probe_timed_out else state.scan
        failed = [
            (p, probe.failure, "in the main process")
            for p, probe in state.probes.items()
            if probe.failure is not None
        ]
        failed += [(p, failure, "in a DataLoader worker") for p, failure in scan.failures]
        if failed:
            position, failure, place = min(failed, key=lambda item: _order(item[0]))
            if failure.timed_out:
                return f"loading {where(position)} timed out", (
                    f"split {name!r}: loading {where(position)} in the main process did not "
                    f"finish within loader_timeout={self.loader_timeout:g} s. Look for a "
                    "load that waits for something the main process does not have (a lock, "
                    "a queue, a connection, a file that a worker_init_fn opens), or raise "
                    "self.loader_timeout if loading one sample really takes that long. (The "
                    "blocked load is left in a daemon thread, which ends with the process.)"
                )
            if not failure.raised:
                return "its __getitems__ fails", f"split {name!r}: {failure.text}."
            text = f"split {name!r}: loading {where(position)} {place} raised {failure.text}"
            if scan.failure_count > 1:
                text += (
                    f" ({scan.failure_count} samples failed in the batches the workers "
                    f"read: {listed([p for p, _ in scan.failures], scan.failure_count)})"
                )
            if failure.index_error and not state.stream:
                text += (
                    f". len() says the split has {state.size} samples: is __len__ larger "
                    "than the data, or does __getitem__ index the wrong list?"
                )
            elif place != "in the main process" and state.loads_in_main_process(position):
                method = _scan.start_method(self.multiprocessing_context)
                text += (
                    f", though it loads in the main process. The worker processes are "
                    f"started with {method}: "
                    + (
                        "look for state that a forked worker inherits in a state it cannot "
                        "use (a file handle, a connection) or code that depends on "
                        "torch.utils.data.get_worker_info()."
                        if method == "fork"
                        else "each imports the dataset's modules anew and unpickles the "
                        "dataset, so module state set at run time (a global that the "
                        "training script configures) is missing there; keep such state on "
                        "the dataset."
                    )
                )
            else:
                text += ". Fix the split's __getitem__ or its transforms."
            return f"{where(position)} raised {failure.text.split(':')[0]}", text
        problems = [
            (p, probe.input_problem) for p, probe in state.probes.items() if probe.input_problem
        ] + scan.input_problems
        if problems:
            position, problem = min(problems, key=lambda item: _order(item[0]))
            return (
                "its inputs are not tensors"
                if problem.kind == "type"
                else f"{where(position)} has no input"
            ), (
                f"split {name!r}: the sample at {where(position)} {problem.text}."
                + (
                    f" Unlike the first samples, it does not fit self.input_key = "
                    f"{self.input_key!r}: samples must all have the same structure."
                    if problem.kind == "key"
                    else ""
                )
            )
        if scan.loader_error:
            method = _scan.start_method(self.multiprocessing_context)
            if scan.timed_out:
                cause = (
                    "Look for a lock, a queue, a connection or a thread pool that a forked "
                    "worker inherits in a state it cannot use"
                    if method == "fork"
                    else f"The workers are started with {method}: each first imports torch "
                    "and the modules of the dataset, which can take long on a loaded machine; "
                    "otherwise look for a lock, a queue or a connection the worker waits for"
                )
                return "a worker timed out", (
                    f"split {name!r}: no batch arrived within loader_timeout="
                    f"{self.loader_timeout:g} s; a DataLoader worker blocked while loading "
                    f"{scan.in_flight}. {cause}; raise self.loader_timeout if loading one "
                    "batch really takes that long."
                )
            died = (
                " (a worker process exited: a crash in native code, os._exit or sys.exit "
                "in the dataset, or the out-of-memory killer)"
                if scan.worker_died
                else ""
            )
            return "the DataLoader failed", (
                f"split {name!r}: the DataLoader (batch_size={self.batch_size}, "
                f"num_workers={self.num_workers}) failed while loading {scan.in_flight}: "
                f"{scan.loader_error}{died}"
            )
        if state.stream and scan.count == 0 and not state.probes:
            return "it is empty", (
                f"split {name!r} is an empty stream: neither the main "
                "process nor the DataLoader workers read a sample from it."
            )
        return None

    def _compared(self, name: str, state: SplitState) -> Dict[Position, str]:
        """Probe indices whose worker-loaded and main-process-loaded inputs differ."""
        different = {}
        for position, probe in state.probes.items():
            kept = state.scan.kept.get(position)
            if probe.input is not None and kept is not None and not _scan.same(kept, probe.input):
                different[position] = _scan.difference(kept, probe.input)
        return different

    def _random(self, state: SplitState, positions: Sequence[Position]) -> bool:
        """Whether loading these probes again in the main process gives other inputs."""
        for position, again in state.reloaded(list(positions)).items():
            first = state.probes[position].input
            if first is not None and again.input is not None and not _scan.same(first, again.input):
                return True
        return False

    # -- the checks ---------------------------------------------------------------------------
    @check
    def test_sample_shape(self) -> None:
        """Check that every scanned sample of every split has an input of shape ``sample_shape``.

        Catches samples of the wrong shape: a missing channel dimension, a resize or pad
        that is not applied to every sample.
        """
        expected = tuple(self._get_or_skip("sample_shape"))
        for name in self.splits:
            with self.subTest(split=name):
                scan = self._loaded(name).scan
                wrong = {key: seen for key, seen in scan.shapes.items() if key[1] != expected}
                if wrong:
                    count = sum(seen[0] for seen in wrong.values())
                    shapes = "; ".join(
                        f"{shape_text(*key)} at {listed(seen[1], seen[0])}"
                        for key, seen in sorted(wrong.items(), key=lambda item: repr(item[0]))
                    )
                    if not scan.nested:
                        self.fail(
                            f"split {name!r}: {count} of {scan.count} samples do not have "
                            f"sample_shape {expected}: {shapes}. Fix the split's transforms "
                            "(resize, pad, channel dimension) or self.sample_shape."
                        )
                    fitting = sorted({path for path, shape in scan.shapes if shape == expected})
                    example = (
                        f", e.g. self.input_key = {_scan.as_key(fitting[0])!r}" if fitting else ""
                    )
                    self.fail(
                        f"split {name!r}: {count} of the {scan.tensors} input tensors of "
                        f"{scan.count} samples do not have sample_shape {expected}: {shapes}. "
                        "Every tensor of a nested input must have sample_shape: fix the "
                        "split's transforms or self.sample_shape, or check one tensor of the "
                        f"input by setting self.input_key to its path{example}."
                    )

    @check
    def test_value_range(self) -> None:
        """Check that every sample of every split lies in ``value_range`` and the split uses
        that range.

        Catches wrong scaling (0-255, data in [0, 1] declared as [-1, 1]), values out of
        range, NaN or Inf.
        """
        low, high = self._get_or_skip("value_range")
        slack = self.range_coverage * (high - low)
        for name in self.splits:
            with self.subTest(split=name):
                scan = self._loaded(name).scan
                if scan.nonfinite_count:
                    self.fail(
                        f"split {name!r}: {scan.nonfinite_count} of {scan.count} samples "
                        f"contain NaN or Inf: {listed(scan.nonfinite, scan.nonfinite_count)}. "
                        "Look for a division by a zero standard deviation, a log of 0 or a "
                        "corrupt file."
                    )
                if scan.low.position is None or scan.high.position is None:
                    self.skipTest(f"split {name!r} has no input values (empty tensors)")
                seen = (
                    f"values seen over {scan.count} samples: min {_extreme(scan.low)}, "
                    f"max {_extreme(scan.high)}"
                )
                # floating-point data may pass a bound by its rounding: 4 machine epsilons
                # of float32 (or of a coarser dtype of the data) relative to the bound
                eps = 4 * max(scan.float_eps, _FLOAT32_EPS) if scan.float_eps else 0.0
                below, above = low - eps * abs(low), high + eps * abs(high)
                if scan.low.value < below or scan.high.value > above:
                    culprit = scan.low if scan.low.value < below else scan.high
                    self.fail(
                        f"split {name!r} leaves value_range [{low}, {high}]: {seen}. Fix the "
                        "normalisation, or widen self.value_range if the data is right."
                        + _nested_hint(scan, culprit.path, "lie in value_range")
                    )
                if scan.low.value > low + slack + eps * abs(low) or (
                    scan.high.value < high - slack - eps * abs(high)
                ):
                    needed = max(scan.low.value - low, high - scan.high.value) / (high - low)
                    self.fail(
                        f"split {name!r} does not use value_range [{low}, {high}]: {seen}; each "
                        f"bound must be reached within range_coverage={self.range_coverage} of "
                        "the range. The scaling is probably wrong (e.g. data in [0, 1] declared "
                        "as [-1, 1]): fix the normalisation or self.value_range. If the data is "
                        "right (quiet audio, images that are never fully dark), set "
                        f"self.range_coverage = {_round_up(needed)} (1.0 checks the bounds "
                        "only)." + _nested_hint(scan, None, "reach the bounds")
                    )

    @check
    def test_augmentation(self) -> None:
        """Check that samples of ``augmented_splits`` change between loads and the others are
        identical.

        Catches random augmentation leaking into evaluation data, or missing from the
        training data.
        """
        for name in self.splits:
            with self.subTest(split=name):
                state = self._loaded(name)
                if state.stream:
                    self.skipTest(
                        f"split {name!r} is an IterableDataset: comparing two loads "
                        "of the same sample needs indices"
                    )
                different = self._compared(name, state)
                probes = sorted(state.probes)
                if name in self.augmented_splits and not different:
                    self.fail(
                        f"split {name!r} is in augmented_splits, but loading indices {probes} "
                        "twice gave identical inputs each time: no random augmentation is "
                        "applied. Add it to the split's transforms, or remove the split from "
                        "self.augmented_splits (or raise self.probe_count for an augmentation "
                        "that changes few samples)."
                    )
                if (
                    name not in self.augmented_splits
                    and different
                    and self._random(state, sorted(different))
                ):
                    self.fail(
                        f"split {name!r} is not in augmented_splits, but loading the same index "
                        f"twice gave different inputs: {_differences(different)}. Remove the "
                        "random transform from this split (evaluation data must be "
                        "deterministic), or add the split to self.augmented_splits."
                    )

    @check
    def test_data_loading(self) -> None:
        """Check that every split pickles, loads and batches with and without worker processes,
        with equal results.

        Catches datasets that cannot be pickled (so fail with spawned workers), samples that
        raise, are no tensors or cannot be batched, a wrong len(), streams that give every
        worker the whole data, workers that load other data than the main process, workers
        that hang.
        """
        for name in self.splits:
            with self.subTest(split=name):
                state = self._state(name)
                try:
                    _scan.pickled_size(self.splits[name])
                except Exception as exc:
                    text = _scan.exception_text(exc)
                    _scan.forget(exc)
                    self.fail(
                        f"split {name!r} cannot be pickled ({text}), so DataLoader workers "
                        "started with spawn or forkserver (the default on macOS, Windows and, "
                        "from Python 3.14, Linux) fail. Replace lambdas and functions defined "
                        "inside functions with module-level functions or classes, and open "
                        "files and connections lazily (on first use, or in a worker_init_fn) "
                        "instead of in __init__."
                    )
                state.probes  # noqa: B018 (loaded from a copy of the split: pickled, unpickled)
                if state.unpickling_error is not None:
                    self.fail(
                        f"split {name!r} can be pickled but not unpickled "
                        f"({state.unpickling_error}), so DataLoader workers started with "
                        "spawn or forkserver (the default on macOS, Windows and, from Python "
                        "3.14, Linux) fail. Check the split's __getstate__ and __setstate__ "
                        "(or __reduce__): what __setstate__ needs must be in the state."
                    )
                problem = self._load_problem(name, state)
                if problem is not None:
                    self.fail(problem[1])
                scan = state.scan
                if state.stream:
                    self._check_stream(name, state)
                elif name not in self.augmented_splits:
                    different = self._compared(name, state)
                    if different and self._random(state, sorted(different)):
                        self.skipTest(
                            f"split {name!r} gives different inputs on every load, so "
                            "the loads of workers and of the main process cannot be "
                            "compared; see test_augmentation"
                        )
                    if different:
                        self.fail(
                            f"split {name!r}: inputs loaded by DataLoader worker processes "
                            "differ from those loaded in the main process: "
                            f"{_differences(different)}, while two loads in the main process "
                            "agree. Workers must give the same data: look for state that is "
                            "changed while loading (a cache, a counter), a file handle opened in "
                            "__init__ and shared by the workers, or code that depends on "
                            "torch.utils.data.get_worker_info()."
                        )
                if scan.collate_error:
                    self._check_batching(name, scan)

    def _check_stream(self, name: str, state: SplitState) -> None:
        scan = state.scan
        repeats = scan.repeats()
        if repeats.found:
            example = (
                f" (e.g. {where(repeats.example[0])} = {where(repeats.example[1])})"
                if repeats.example is not None
                else ""
            )
            aligned = (
                f", {repeats.aligned} of them as the same sample number of each worker"
                if repeats.aligned
                else ""
            )
            self.fail(
                f"split {name!r}: the DataLoader workers read the same samples: "
                f"{repeats.spread} of the {repeats.groups} inputs read more than once were "
                f"read once by each of several of the {len(scan.per_worker)} workers"
                f"{example}{aligned}; were they duplicates within the stream, a stream that "
                f"gives each worker its own shard would have given about "
                f"{repeats.groups - repeats.expected:.0f} of them to one worker twice, not "
                f"{repeats.groups - repeats.spread}. Each worker reads the whole stream (or the "
                "same shards) instead of its own shard, so every epoch holds the data up to "
                f"{self.num_workers} times. Give each worker its part in __iter__ with "
                "torch.utils.data.get_worker_info() (or set self.worker_init_fn to the "
                "worker_init_fn that does it)."
            )
        if scan.complete and state.size is not None and scan.count != state.size:
            self.fail(
                f"split {name!r}: the DataLoader's {self.num_workers} workers read "
                f"{scan.count} samples from the stream, but len() says {state.size}; make "
                "__len__ count the samples __iter__ gives (over all workers)."
            )
        if scan.complete and name not in self.augmented_splits:
            missing = [
                p
                for p, probe in sorted(state.probes.items())
                if probe.hash is not None and not probe.constant and probe.hash not in scan.hashes
            ]
            if missing:
                self.fail(
                    f"split {name!r}: {len(missing)} of the first {len(state.probes)} samples "
                    f"read in the main process were read by no DataLoader worker "
                    f"({listed(missing)}): the workers read other data than the main process "
                    "(shards that leave data out, code that depends on the worker), or the "
                    "stream is random (then add it to self.augmented_splits)."
                )

    def _check_batching(self, name: str, scan: _scan.Scan) -> None:
        shapes = scan.collate_shapes
        paths = [path for path, _ in shapes]
        varying = len(set(paths)) < len(paths)  # a tensor of the input with several shapes
        if (
            self._is_set("sample_shape")
            and varying
            and any(shape != tuple(self.sample_shape) for _, shape in scan.shapes)
        ):
            self.skipTest(
                f"split {name!r} has samples of different shapes, which cannot be "
                "batched; see test_sample_shape"
            )
        probe = self._first_probe(name)
        if (
            self._is_set("num_classes")
            and scan.target_problem_count
            # a target_key that picks a container (a detection target dict) is test_labels'
            # contract error, and says nothing about why the batch failed
            and (probe is None or probe.labels_inside is None)
        ):
            self.skipTest(
                f"split {name!r} has targets that are not class indices, which "
                "cannot be batched; see test_labels"
            )
        more = f" and {len(shapes) - _scan.SHOWN} more" if len(shapes) > _scan.SHOWN else ""
        shapes_text = (
            f"; the batch of {scan.collate_at} holds inputs of {len(shapes)} shapes: "
            f"{', '.join(shape_text(*key) for key in shapes[: _scan.SHOWN])}{more}"
            if varying
            else ""
        )
        self.fail(
            f"split {name!r}: samples cannot be batched by collate_fn "
            f"({_scan.describe_callable(self._collate_fn())}): "
            f"{scan.collate_error}{shapes_text}. Set self.collate_fn to the collate function your "
            "DataLoader uses (e.g. one that pads sequences), or fix the samples."
        )

    @check
    def test_split_overlap(self) -> None:
        """Check that no input of one split equals an input of another (splits not in
        ``augmented_splits``).

        Catches test data that is also in the training data (the same file listed in two
        splits, duplicates made before the split), which inflates test scores.
        """
        plain = [name for name in self.splits if name not in self.augmented_splits]
        if len(plain) < 2:
            self.skipTest(
                f"test_split_overlap compares the splits that are not in augmented_splits, and "
                f"there are fewer than two ({plain}); to include an augmented split, add an "
                "un-augmented view of it to self.splits under another name, e.g. "
                "self.splits['train (plain)'] = TrainData(transform=eval_transform)"
            )
        for first, second in itertools.combinations(plain, 2):
            with self.subTest(splits=(first, second)):
                one, other = self._loaded(first), self._loaded(second)
                shared = [
                    (one.scan.hashes[h], r)
                    for h, r in other.scan.hashes.items()
                    if h in one.scan.hashes
                ]
                count = sum(r.count for _, r in shared)
                fraction = count / other.scan.count if other.scan.count else 0.0
                if not count or fraction <= self.max_shared_fraction:
                    continue
                pairs = self._confirmed(one, other, shared)
                if pairs:
                    shown = ", ".join(f"{first} {where(a)} = {second} {where(b)}" for a, b in pairs)
                    self.fail(
                        f"splits {first!r} and {second!r} share inputs: {count} of the "
                        f"{other.scan.count} scanned samples of {second!r} "
                        f"({100 * fraction:.1f}%) also occur in {first!r}, e.g. {shown}. Data "
                        f"in both splits inflates the scores measured on {second!r}; remove the "
                        "duplicates from one split (compare contents, not file names). If the "
                        "splits legitimately share inputs (tabular data with few distinct "
                        "feature values), set self.max_shared_fraction = "
                        f"{_round_up(fraction)} (now {self.max_shared_fraction:g}). (Inputs "
                        "whose values are all equal, like silence or a blank image, are not "
                        "compared.)"
                    )

    def _confirmed(
        self,
        one: SplitState,
        other: SplitState,
        shared: List[Tuple[_scan.Registered, _scan.Registered]],
    ) -> List[Tuple[Position, Position]]:
        """Up to five shared pairs, confirmed by comparing the inputs exactly (loaded again in
        the main process; pairs from a stream are matched by their 128-bit hash)."""
        pairs: List[Tuple[Position, Position]] = []
        ordered = sorted(shared, key=lambda pair: _order(pair[1].position))
        chunk = 2 * _scan.SHOWN
        for start in range(0, len(ordered), chunk):
            candidates = [(a.position, b.position) for a, b in ordered[start : start + chunk]]
            indexed = [(a, b) for a, b in candidates if isinstance(a, int) and isinstance(b, int)]
            firsts = one.load_again([a for a, _ in indexed]) if indexed else {}
            seconds = other.load_again([b for _, b in indexed]) if indexed else {}
            for a, b in candidates:
                if isinstance(a, int) and isinstance(b, int):
                    x, y = firsts.get(a), seconds.get(b)
                    if x is None or y is None or not _scan.same(x, y):
                        continue
                pairs.append((a, b))
                if len(pairs) == _scan.SHOWN:
                    return pairs
        return pairs

    @check
    def test_labels(self) -> None:
        """Check that every target is made of class indices in [0, ``num_classes``) (or
        ``ignore_index``), every class occurs in every large enough split, and equal inputs
        have equal targets.

        Catches labels numbered from 1, a wrong num_classes, label-map values that are no
        class (255 borders without ignore_index), a class lost by filtering, float or
        one-element targets the loss rejects, inputs and targets paired wrongly so that the
        same input has different labels.
        """
        classes = self._get_or_skip("num_classes")
        for name in self.splits:
            probe = self._first_probe(name)
            if probe is not None and probe.target_missing:
                fix = probe.target_key_hint
                raise self._key_error(
                    name,
                    "target_key",
                    f"has no element {self.target_key!r} ({probe.structure})",
                    "the index or key of the class label"
                    + (
                        ""
                        if fix is not None
                        else ", or leave self.num_classes unset "
                        "(test_labels needs samples that hold a target)"
                    ),
                    fix,
                )
            if probe is not None and probe.labels_inside is not None:
                raise self._key_error(
                    name,
                    "target_key",
                    f"holds a container as element {self.target_key!r}, with the class labels "
                    f"at {path_text(probe.labels_inside)}",
                    "the index, key or path of the class labels",
                    _scan.as_key(probe.labels_inside),
                )
        for name in self.splits:
            with self.subTest(split=name):
                scan = self._loaded(name).scan
                self._check_target_types(name, scan)
                self._check_target_shapes(name, scan)
                self._check_label_range(name, scan, classes)
                self._check_class_presence(name, scan, classes)
                self._check_label_conflicts(name, scan)

    def _ignored(self) -> FrozenSet[int]:
        value = self.ignore_index
        return frozenset([value] if isinstance(value, int) else value)

    def _skip_part(self, part: str, reason: str) -> None:
        """Report one part of a check as skipped (in a subtest); the check goes on."""
        with self.subTest(part=part):
            self.skipTest(reason)

    def _check_target_types(self, name: str, scan: _scan.Scan) -> None:
        if scan.target_problem_count:
            position, what = scan.target_problems[0]
            self.fail(
                f"split {name!r}: {scan.target_problem_count} targets are not integer "
                f"class indices; the target of {where(position)} is {what}. Classification "
                "losses need integer class indices (an int, or an integer tensor: one index "
                "per sample, per pixel or per object); convert the labels in the dataset, "
                "or leave self.num_classes unset if the targets are not class labels."
            )
        if scan.unlabelled_count:
            self.fail(
                f"split {name!r}: {scan.unlabelled_count} samples have no element "
                f"{self.target_key!r} (self.target_key), unlike the first samples: "
                f"{listed(scan.unlabelled, scan.unlabelled_count)}."
            )

    def _check_target_shapes(self, name: str, scan: _scan.Scan) -> None:
        """target_shape when set; else one-element targets, judged from the batches."""
        if self._is_set("target_shape"):
            expected = tuple(self.target_shape)
            wrong = {shape: seen for shape, seen in scan.target_shapes.items() if shape != expected}
            if wrong:
                count = sum(seen[0] for seen in wrong.values())
                shapes = "; ".join(
                    f"{shape} at {listed(seen[1], seen[0])}"
                    for shape, seen in sorted(wrong.items())[: _scan.SHOWN]
                )
                hint = (
                    " (batches of one-element targets have shape (batch, 1), which "
                    "cross-entropy rejects: give the label as int(label))"
                    if not expected and (1,) in wrong
                    else ""
                )
                self.fail(
                    f"split {name!r}: {count} of {scan.labelled} targets do not have "
                    f"target_shape {expected}: {shapes}{hint}. Fix the targets in the dataset, "
                    "or self.target_shape."
                )
            return
        if scan.one_element is None or set(scan.target_shapes) != {(1,)}:
            return
        # Every target is a one-element tensor: a class label stored as
        # torch.tensor([label]) (a bug once batched to (batch, 1)), or the labels of
        # samples that each hold one object. The batches collate_fn makes tell them apart.
        position, target = scan.one_element
        seen = f"the target of {where(position)} is {target.described()}"
        collate = _scan.describe_callable(self._collate_fn())
        batch = scan.target_batch
        if batch is not None and batch[1] == (batch[0], 1):
            self.fail(
                f"split {name!r}: every target is a one-element tensor ({seen}), which "
                f"collate_fn ({collate}) batches to shape {batch[1]}: batches of it have "
                "shape (batch, 1), which cross-entropy rejects with (batch, classes) "
                "logits. Give the label as int(label) (or label.squeeze(0)). If each target "
                "holds the labels of a sample's objects (a detection dataset whose samples "
                "each hold one object), set self.collate_fn to the collate function your "
                "DataLoader uses (one that keeps the targets in a list)."
            )
        if batch is None:
            self._skip_part(
                "one-element targets",
                f"one-element targets not judged: every target of split {name!r} is a "
                f"one-element tensor ({seen}), and the batches of collate_fn ({collate}) hold "
                "no tensor of them at self.target_key, so the shape the loss receives is not "
                "seen. A class label stored as torch.tensor([label]) (a bug once stacked to "
                "(batch, 1), which cross-entropy rejects) and the labels of samples that each "
                "hold one object (a detection dataset) look alike here. Set "
                "self.target_shape = () if each target is one class label (this part then "
                "fails), or self.target_shape = (1,) if one-element targets are the design.",
            )

    def _check_label_range(self, name: str, scan: _scan.Scan, classes: int) -> None:
        ignored = self._ignored()
        values = [value for value in scan.labels if value not in ignored]
        outside = sorted(value for value in values if not 0 <= value < classes)
        if not outside:
            return
        per_sample = set(scan.target_shapes) == {()}
        shown = ", ".join(
            (
                f"{value} ({scan.labels[value]} samples, "
                if per_sample
                else f"{value} ({scan.elements[value]} values in {scan.labels[value]} samples, "
            )
            + f"first at {where(scan.first_with_label[value])})"
            for value in outside[:10]
        )
        hint = ""
        if min(values) == 1 and max(values) == classes:
            hint = " Labels numbered from 1 instead of 0?"
            if all(len(shape) == 1 for shape in scan.target_shapes):
                hint += (
                    " (torchvision's detection models number the object classes from 1, 0 "
                    "being the background: their num_classes counts the background too.)"
                )
        markers = [value for value in outside if value == 255 or value < 0]
        if markers:
            kept = {value for value in scan.labels if value in ignored}
            suggested = sorted(kept | set(markers))
            setting = suggested[0] if len(suggested) == 1 else tuple(suggested)
            hint += (
                f" If {' and '.join(map(str, markers))} mark{'s' if len(markers) == 1 else ''} "
                "values the loss ignores (the 255 borders of Pascal VOC masks, -100 padding), "
                f"set self.ignore_index = {setting!r} (now {self.ignore_index!r}) and give the "
                "loss that ignore_index."
            )
        self.fail(
            f"split {name!r} has targets outside [0, num_classes={classes}): {shown}. "
            f"{self._counts_name(scan).capitalize()}: {self._class_counts(scan, classes)}."
            f"{hint} Fix the labels, or self.num_classes if it is wrong."
        )

    def _check_class_presence(self, name: str, scan: _scan.Scan, classes: int) -> None:
        if self.class_presence is None:
            return
        needed = self.class_presence * classes
        may_lack = set(self.unused_classes or ()) | self._ignored()
        missing = [c for c in range(classes) if not scan.labels[c] and c not in may_lack]
        if not missing or scan.labelled < needed:
            return
        per_sample = set(scan.target_shapes) == {()}
        plural = "es" if len(missing) > 1 else ""
        found = (
            f"no sample {'of' if per_sample else 'holding'} class{plural} "
            f"{', '.join(map(str, missing[:20]))} among its {scan.labelled} scanned samples "
            f"({self._counts_name(scan)}: {self._class_counts(scan, classes)})"
        )
        if not per_sample and self.unused_classes is None:
            self._skip_part(
                "class presence",
                f"class presence not judged: split {name!r} has {found}; its targets are "
                f"{_target_kinds(scan)}, whose numbering may leave a class unused by design "
                "(the background class 0 of torchvision's detection models, COCO's unused "
                "category ids) as well as lose one by a filter. To require every class, set "
                "self.unused_classes to the classes that may be absent (e.g. {0}, or () for "
                "none): this part then fails.",
            )
            return
        example = "{" + ", ".join(map(str, missing[:3])) + "}"
        self.fail(
            f"split {name!r} has {found}. A class lost by a filter, or a split made by label? "
            f"A split of at least class_presence={self.class_presence} samples per class "
            f"({needed} here) must hold every class; if the class is legitimately rare, raise "
            "self.class_presence or set it to None; if it is never used, list it in "
            f"self.unused_classes (e.g. self.unused_classes = {example})."
        )

    def _check_label_conflicts(self, name: str, scan: _scan.Scan) -> None:
        conflicts = scan.conflict_count / scan.labelled if scan.labelled else 0.0
        if not scan.conflict_count or conflicts <= self.max_label_conflicts:
            return
        shown = ", ".join(
            _conflict(first, position, target) for first, position, target in scan.conflicts
        )
        self.fail(
            f"split {name!r}: {scan.conflict_count} samples have the same input as "
            f"an earlier sample but another target, e.g. {shown}. Inputs and "
            "targets are paired wrongly (a label list in another order than the "
            "files), or the same input is labelled twice; fix the pairing, or "
            "remove the contradicting duplicates. If equal inputs legitimately "
            "carry different labels (tabular data with few distinct feature "
            "values, label noise), set self.max_label_conflicts = "
            f"{_round_up(conflicts)} (the fraction of the {scan.labelled} labelled "
            f"samples; now {self.max_label_conflicts:g}). (Inputs whose values are "
            "all equal, like silence or a blank image, are not compared.)"
        )

    @staticmethod
    def _counts_name(scan: _scan.Scan) -> str:
        """What the class counts count: samples (a class counts once per sample)."""
        if set(scan.target_shapes) <= {()}:
            return "class counts"
        return "samples holding each class"

    def _class_counts(self, scan: _scan.Scan, classes: int) -> str:
        ignored = self._ignored()
        shown = sorted((set(range(classes)) | set(scan.labels)) - (ignored - set(range(classes))))
        if len(shown) <= 20:
            return ", ".join(f"{c}: {scan.labels[c]}" for c in shown)
        counts = [scan.labels[c] for c in range(classes)]
        return (
            f"{sum(1 for n in counts if n)} of {classes} classes present, "
            f"{min(counts)} to {max(counts)} samples per class"
        )


def _conflict(first: _scan.Registered, position: Position, target: _scan.Target) -> str:
    """Two samples with equal inputs and different targets: "index 0 (target 0) and index
    20 (target 1)", "index 2 and index 6 (targets of shape (2,) that differ)"."""
    if not isinstance(first.label, tuple) and not target.shape:
        return (
            f"{where(first.position)} (target {first.label}) and {where(position)} ({target.text})"
        )
    shape = first.label[1] if isinstance(first.label, tuple) else ()
    shapes = f"shape {shape}" if shape == target.shape else f"shapes {shape} and {target.shape}"
    return f"{where(first.position)} and {where(position)} (targets of {shapes} that differ)"


def _target_kinds(scan: _scan.Scan) -> str:
    """What the targets of a split are, for messages: "label maps of shape (8, 8)"."""
    shapes = list(scan.target_shapes)
    if all(len(shape) == 1 for shape in shapes):
        lengths = sorted(shape[0] for shape in shapes)
        size = (
            f"{lengths[0]} elements"
            if len(lengths) == 1
            else f"{lengths[0]} to {lengths[-1]} elements"
        )
        return f"label vectors of {size} (per-object labels, multi-label index lists)"
    if all(len(shape) >= 2 for shape in shapes):
        if len(shapes) == 1:
            return f"label maps of shape {shapes[0]}"
        return f"label maps of {len(shapes)} shapes"
    return f"targets of {len(shapes)} shapes"


_FLOAT32_EPS = float(torch.finfo(torch.float32).eps)


def _extreme(extreme: Extreme) -> str:
    """ "0.7 (index 3)", "2.6400001 (index 9, sample[0][1])"."""
    assert extreme.position is not None
    path = f", {path_text(extreme.path)}" if extreme.path else ""
    return f"{value_text(extreme.value)} ({where(extreme.position)}{path})"


def _nested_hint(scan: _scan.Scan, culprit: Optional[_scan.Path], rule: str) -> str:
    """For a nested input: every tensor is checked; how to check one."""
    if not scan.nested:
        return ""
    others = sorted({path for path, _ in scan.shapes if path != culprit}, key=repr)
    example = f", e.g. self.input_key = {_scan.as_key(others[0])!r}" if others else ""
    return (
        f" Every tensor of a nested input must {rule}; to check one of them, set "
        f"self.input_key to its path{example}."
    )


def _differences(different: Dict[Position, str]) -> str:
    shown = [f"{where(p)} ({d})" for p, d in sorted(different.items(), key=lambda i: _order(i[0]))]
    more = f" and {len(shown) - _scan.SHOWN} more" if len(shown) > _scan.SHOWN else ""
    return ", ".join(shown[: _scan.SHOWN]) + more


def _round_up(fraction: float) -> str:
    """A fraction rounded up to two decimals (tiny float errors ignored): 0.15 -> "0.15"."""
    return f"{math.ceil(round(fraction * 100, 6)) / 100:g}"


def _order(position: Position) -> Tuple[int, int]:
    return position if isinstance(position, tuple) else (0, position)
