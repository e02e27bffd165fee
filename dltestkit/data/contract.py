"""The dataset contract: the splits, how they are loaded, and what the checks share about them.

Each sample is loaded at most twice across all dataset checks: one pass with DataLoader worker
processes (the *scan*, ``split.py``), in which the workers inspect every sample they load
(``inspect.py``), and a few samples loaded once more in the main process. The results are kept
per test class and split until the class's tests are done.
"""

from __future__ import annotations

import inspect
import math
import multiprocessing
from typing import (
    Any,
    Callable,
    ClassVar,
    Collection,
    Dict,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
)

from torch.utils.data import default_collate

from ..core.contract import CheckMixin
from ..core.options import REQUIRED, UNSET, ContractError, option
from ..core.validators import (
    is_callable,
    is_names,
    is_positive_int,
    is_positive_number,
    is_shape,
    optional,
)
from .main_process import start_method
from .positions import SHOWN, Position, listed, where
from .samples import difference, same
from .scan import LoadedSample, Scan
from .split import Loading, SplitState, cheaper, is_stream, sized, split_state

__all__ = ["LOADING", "LOADING_CHECK", "DatasetContract", "differences", "order", "round_up"]

#: The check that reports a split that cannot be loaded; the others skip, pointing to it.
LOADING_CHECK = "test_data_loading"
#: The options every dataset check reads: the splits and how they are loaded (the scan, and the
#: samples loaded in the main process, which every check prepares).
LOADING = (
    "splits",
    "input_key",
    "target_key",
    "collate_fn",
    "num_workers",
    "worker_init_fn",
    "multiprocessing_context",
    "batch_size",
    "loader_timeout",
    "scan_time_limit",
    "max_samples",
    "probe_count",
    "augmented_splits",
)


def _is_splits(value: Any) -> Optional[str]:
    if not isinstance(value, Mapping) or not value:
        return f"is a {type(value).__name__}, not a non-empty dict"
    for name, split in value.items():
        if is_stream(split):
            continue
        if not hasattr(split, "__getitem__") or not hasattr(split, "__len__"):
            return (
                f"has split {name!r} of type {type(split).__name__}, which is neither a "
                "sized Dataset (with __len__ and __getitem__) nor an IterableDataset"
            )
    return None


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


def _is_start_method(value: Any) -> Optional[str]:
    methods = multiprocessing.get_all_start_methods()
    if value is None or value in methods:
        return None
    return f"is {value!r}, not None or one of the start methods of this platform {methods}"


def _unbound(owner: Any, name: str) -> Any:
    """An attribute as it was set: a function set on the class is not bound to self."""
    value = inspect.getattr_static(owner, name)
    return value.__func__ if isinstance(value, staticmethod) else value


class DatasetContract(CheckMixin):
    """The options every dataset check reads (the splits, how they are loaded), and what the
    checks share: the split's state, whether it can be loaded, its samples compared."""

    _suite: ClassVar[str] = "DatasetTests"

    splits: Mapping[str, Any] = option(
        REQUIRED, _is_splits, example='{"train": train_data, "test": test_data}'
    )
    """A dict mapping split name to a torch Dataset.

    A map-style dataset (with `__len__` and `__getitem__`) or an `IterableDataset` (a stream), which
    must give each DataLoader worker its own shard."""
    sample_shape: Sequence[int] = option(
        UNSET, is_shape, example="(1, 32, 32)", default_text="unset: `test_sample_shape` skips"
    )
    """The shape of one sample's input tensor.

    Without the batch dimension. (`test_data_loading` leaves samples of another shape, which cannot
    be batched, to `test_sample_shape`.)"""
    augmented_splits: Collection[str] = option(frozenset(), is_names, example='{"train"}')
    """The names of the splits that are randomly augmented.

    Every other split must give the same sample each time."""
    num_classes: int = option(
        UNSET, is_positive_int, example="10", default_text="unset: `test_labels` skips"
    )
    """The number of classes of the targets.

    Targets are integer class indices in `[0, num_classes)`, checked element by element: a label per
    sample, a label map (segmentation masks), per-object labels. (`test_data_loading` leaves targets
    that cannot be batched to `test_labels`.)"""
    target_key: Any = option(1, _is_target_key, example='"label"')
    """The index or key of the target (class label) in a sample.

    `1`: element 1 of an `(input, target)` tuple. A tuple is a path into nested samples: `("meta",
    "label")` is `sample["meta"]["label"]`; `(1, "labels")` the per-box labels of torchvision's
    detection samples `(image, {"boxes": ..., "labels": ...})`."""
    input_key: Optional[Any] = option(None, _is_input_key, example="0")
    """The index or key of the input tensor in a sample.

    `None`: a tensor sample itself, else the first element of a tuple or dict sample. A tuple is a
    path into nested samples: `("inputs", "image")` is `sample["inputs"]["image"]`. An input that is
    a tuple, list or dict of tensors (two views of an image) has each of its tensors checked; numpy
    arrays and lists of numbers are checked as the tensors they convert to."""
    collate_fn: Optional[Callable[[List[Any]], Any]] = option(
        None, optional(is_callable), example="pad_sequences"
    )
    """The function that batches the samples of a split.

    The one your DataLoader uses, e.g. one that pads sequences. `None`: PyTorch's default,
    `torch.utils.data.default_collate`."""
    num_workers: int = option(2, is_positive_int, example="2")
    """The worker processes of the DataLoader that scans each split.

    At least 1: loading in workers is part of what is checked."""
    worker_init_fn: Optional[Callable[[int], None]] = option(
        None, optional(is_callable), example="shard_worker"
    )
    """The worker_init_fn your DataLoader uses.

    For streams that give each worker its shard there, and datasets that open a file or a connection
    per worker there. (In the scan's workers, `get_worker_info().dataset` is a wrapper that passes
    reading and setting attributes on to your dataset.)"""
    multiprocessing_context: Optional[str] = option(None, _is_start_method, example='"spawn"')
    """The start method of the scan's worker processes.

    `None`: the platform's default (fork on Linux up to Python 3.13, forkserver from 3.14, spawn on
    macOS and Windows). `"spawn"` also catches datasets that only work in forked workers; see
    `test_data_loading`."""
    batch_size: int = option(256, is_positive_int, example="256")
    """The batch size of the scan of each split."""
    loader_timeout: float = option(300.0, is_positive_number, example="600")
    """The seconds the checks wait for one batch of the scan or one sample loaded in the main
    process.

    A load that blocks longer fails `test_data_loading`, naming the split and the indices, instead
    of hanging the tests."""
    scan_time_limit: float = option(1800.0, is_positive_number, example="3600")
    """The seconds the scan of one split may take.

    A scan that has not ended by then stops, and the checks skip, saying how many samples were read
    and which `max_samples` would scan a random subset in about a minute. A scan that takes more
    than 30 s says so once (a warning), with the same advice. See [large
    datasets](large-datasets.md)."""
    max_samples: Optional[int] = option(None, optional(is_positive_int), example="10_000")
    """A cap on the samples scanned per split (None: all).

    A seeded random subset of that size is scanned (of a stream: its first samples; required for a
    stream without `__len__`). See [large datasets](large-datasets.md)."""
    probe_count: int = option(8, is_positive_int, example="8")
    """How many samples are loaded a second time.

    The first, the last and random indices, in the main process (of a stream: its first samples)."""

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
                if is_stream(split) and sized(split) is None:
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

    def _first_probe(self, name: str) -> Optional[LoadedSample]:
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
    def _loading(self, name: str) -> Loading:
        return Loading(
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
            time_limit=float(self.scan_time_limit),
            multiprocessing_context=self.multiprocessing_context,
        )

    def _collate_fn(self) -> Callable[[List[Any]], Any]:
        collate_fn = _unbound(self, "collate_fn")
        return default_collate if collate_fn is None else collate_fn

    def _state(self, name: str) -> SplitState:
        dataset = self.splits[name]
        state = split_state(type(self), name, dataset, self._loading(name))
        if state.use(dataset):
            self.addCleanup(state.release)  # the cache keeps what was seen, not the dataset
        return state

    def _loaded(self, name: str) -> SplitState:
        """The split, scanned; skips (pointing to test_data_loading) if it cannot be loaded."""
        state = self._state(name)
        problem = self._load_problem(name, state)
        if problem is not None:
            self.skipTest(f"split {name!r} cannot be loaded ({problem[0]}); see {LOADING_CHECK}")
        self._skip_if_out_of_time(name, state)
        return state

    def _skip_if_out_of_time(self, name: str, state: SplitState) -> None:
        """Skip when the scan of the split stopped at scan_time_limit: what it read is a part
        of the split (its first batches, not a random subset), which the checks cannot
        judge."""
        if state.probe_timed_out:
            return
        scan = state.scan
        if scan.out_of_time:
            self.skipTest(
                f"split {name!r}: the scan stopped at scan_time_limit="
                f"{self.scan_time_limit:g} s, having read {scan.count:,} of "
                f"{len(state.indices) if not state.stream else self.max_samples or state.size:,}"
                f" samples; the checks judge a whole split or a random subset, not its first "
                f"batches. {cheaper(scan.count, scan.seconds)}"
            )

    def _load_problem(self, name: str, state: SplitState) -> Optional[Tuple[str, str]]:
        """(short reason, full message) when the split cannot be loaded, else None."""
        if not state.stream and state.size == 0:
            return "it is empty", (
                f"split {name!r} is empty: len() is 0. Check the path, "
                "the file list or the filter that builds it."
            )
        # a load that blocks in the main process is reported without a scan, which would
        # fork the process while the blocked load's thread runs
        scan = Scan() if state.probe_timed_out else state.scan
        failed = [
            (p, probe.failure, "in the main process")
            for p, probe in state.probes.items()
            if probe.failure is not None
        ]
        failed += [(p, failure, "in a DataLoader worker") for p, failure in scan.failures]
        if failed:
            position, failure, place = min(failed, key=lambda item: order(item[0]))
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
            if scan.failures.count > 1:
                text += (
                    f" ({scan.failures.count} samples failed in the batches the workers "
                    f"read: {listed([p for p, _ in scan.failures], scan.failures.count)})"
                )
            if failure.index_error and not state.stream:
                text += (
                    f". len() says the split has {state.size} samples: is __len__ larger "
                    "than the data, or does __getitem__ index the wrong list?"
                )
            elif place != "in the main process" and state.loads_in_main_process(position):
                method = start_method(self.multiprocessing_context)
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
        ] + scan.input_problems.first
        if problems:
            position, problem = min(problems, key=lambda item: order(item[0]))
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
            method = start_method(self.multiprocessing_context)
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
            if probe.input is not None and kept is not None and not same(kept, probe.input):
                different[position] = difference(kept, probe.input)
        return different

    def _random(self, state: SplitState, positions: Sequence[Position]) -> bool:
        """Whether loading these probes again in the main process gives other inputs."""
        for position, again in state.reloaded(list(positions)).items():
            first = state.probes[position].input
            if first is not None and again.input is not None and not same(first, again.input):
                return True
        return False


def differences(different: Dict[Position, str]) -> str:
    shown = [f"{where(p)} ({d})" for p, d in sorted(different.items(), key=lambda i: order(i[0]))]
    more = f" and {len(shown) - SHOWN} more" if len(shown) > SHOWN else ""
    return ", ".join(shown[:SHOWN]) + more


def round_up(fraction: float) -> str:
    """A fraction rounded up to two decimals (tiny float errors ignored): 0.15 -> "0.15"."""
    return f"{math.ceil(round(fraction * 100, 6)) / 100:g}"


def order(position: Position) -> Tuple[int, int]:
    return position if isinstance(position, tuple) else (0, position)
