"""One split as the checks of a test class know it: how it is loaded, its samples loaded in the
main process, its scan, cached per test class."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import operator
import time
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, Hashable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, IterableDataset

from ..core.messages import exception_text, forget
from ..core.seeds import derived_seed, make_deterministic, preserved_global_state
from .callables import callable_key
from .inspect import Indexed, Inspection, Inspector
from .main_process import MainProcess, TimedOut
from .pickling import Pickled
from .positions import Position, span
from .samples import Input, InputProblem, LoadFailure, input_digest, is_constant, pick_input
from .scan import LoadedSample, Scan, structure
from .targets import MISSING, labels_inside, pick_target, target_key_of
from .workers import (
    DEAD_WORKER,
    POLL,
    WatchedWorker,
    kill_workers,
    next_batch,
    unwatch,
    workers_folder,
)

__all__ = [
    "Loading",
    "SplitState",
    "cached_classes",
    "cheaper",
    "is_stream",
    "sized",
    "split_state",
]

#: Seconds after which a scan that has not ended says, once, how to make it cheaper.
SLOW_SCAN = 30.0


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
    time_limit: float
    multiprocessing_context: Optional[str]

    def key(self) -> Tuple[Hashable, ...]:
        values = (getattr(self, option.name) for option in dataclasses.fields(self))
        return tuple(callable_key(v) if callable(v) else v for v in values)


def cheaper(count: int, seconds: float) -> str:
    """The advice of a long scan: a max_samples that scans in about a minute at the rate
    seen."""
    rate = count / seconds if seconds > 0 else 0.0
    minute = int(rate * 60)
    if minute < 1000:
        suggested = 1000
    else:  # two significant digits
        scale = 10 ** (int(math.log10(minute)) - 1)
        suggested = minute // scale * scale
    return (
        f"Set self.max_samples (e.g. self.max_samples = {suggested:_}, about a minute at the "
        f"{rate:,.0f} samples/s seen) to scan a seeded random subset of each split, or a "
        "stream's first samples; see the docs' page on large datasets."
    )


class SplitState:
    """One split as the checks of a test class know it: loaded lazily, at most once.

    ``dataset`` is the split of the test that is running (set by ``use``); it is released
    after each test, so that the cache does not keep a dataset alive.
    """

    def __init__(self, dataset: Any, loading: Loading, name: str = "") -> None:
        self.name = name
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
        self.dataset = None  # until ``use``
        self._probes: Optional[Dict[Position, LoadedSample]] = None
        self._scan: Optional[Scan] = None
        self._reloaded: Optional[Dict[Position, LoadedSample]] = None
        self._loads_in_main: Dict[Position, bool] = {}
        #: why the split could not be copied by pickling (a spawned worker fails the same
        #: way), when pickling worked but unpickling did not
        self.unpickling_error: Optional[str] = None

    def use(self, dataset: Any) -> bool:
        """Load from ``dataset`` (the running test's split); True if it was not in use."""
        fresh = self.dataset is not dataset
        self.dataset = dataset
        return fresh

    def release(self) -> None:
        self.dataset = None

    # -- the main process -----------------------------------------------------------------
    @property
    def probes(self) -> Dict[Position, LoadedSample]:
        if self._probes is None:
            self._probes = self._load_probes(self.probe_positions, self.loading.seed)
        return self._probes

    @contextlib.contextmanager
    def _main_process(self) -> Iterator[MainProcess]:
        """Where the main process loads from: a copy of the split, made as a spawned worker
        would unpickle it (the tensors and arrays shared, not copied), so that nothing the
        split opens lazily is opened in the split itself before the scan's workers fork.
        A split that cannot be copied is loaded itself, after the scan."""
        timeout = self.loading.timeout
        pickled = Pickled.of(self.dataset)
        main = MainProcess(timeout, pickled=pickled) if pickled is not None else None
        if main is not None and main.copy_error is not None:
            self.unpickling_error = main.copy_error
            main.close()
            main = None
        if main is None:
            self.scan  # noqa: B018 (the workers start before the main process loads)
            main = MainProcess(timeout, source=self.dataset)
        try:
            yield main
        finally:
            main.close()

    def _load(self, main: MainProcess, function: Callable[[Any], Any]) -> Any:
        """``function(source)`` in the main process: the sample, or a LoadFailure."""
        try:
            return main.call(lambda: function(main.source))
        except TimedOut:
            return LoadFailure(
                f"did not finish within loader_timeout={self.loading.timeout:g} s",
                timed_out=True,
            )
        except Exception as exc:
            if main.source is self.dataset and main.source is not None:
                # the split itself (it could not be copied): it may hold a handle bound to
                # the main thread (an SQLite connection); try there once more
                try:
                    return function(main.source)
                except Exception as again:
                    forget(exc)
                    exc = again
            failure = LoadFailure.of(exc)
            forget(exc)
            return failure

    def _load_probes(self, positions: List[Position], seed: int) -> Dict[Position, LoadedSample]:
        """Load samples one by one in the main process, the global RNGs seeded and restored;
        after a load that timed out, the later positions are left out."""
        loaded: Dict[Position, Any] = {}
        with preserved_global_state():
            make_deterministic(seed)
            with self._main_process() as main:
                if self.stream:
                    loaded = self._read_stream(main, len(positions))
                else:
                    for index in positions:
                        loaded[index] = self._load(main, operator.itemgetter(index))
                        if isinstance(loaded[index], LoadFailure) and loaded[index].timed_out:
                            break
        return {position: self._probe(sample) for position, sample in loaded.items()}

    def _read_stream(self, main: MainProcess, count: int) -> Dict[Position, Any]:
        read: Dict[Position, Any] = {}
        iterator: List[Any] = []
        started = self._load(main, lambda source: iterator.append(iter(source)))
        if isinstance(started, LoadFailure):
            return {(-1, 0): started}
        for number in range(count):
            sample = self._load(main, lambda _: next(iterator[0], _END))
            if sample is _END:
                break
            read[(-1, number)] = sample
            if isinstance(sample, LoadFailure):
                break
        close = getattr(iterator[0], "close", None)
        if close is not None and not main.stuck:
            self._load(main, lambda _: close())
        return read

    def _probe(self, sample: Any) -> LoadedSample:
        if isinstance(sample, LoadFailure):
            return LoadedSample(failure=sample)
        probe = LoadedSample(
            target_missing=pick_target(sample, self.loading.target_key)[1] is MISSING,
            structure=structure(sample),
            target_key_hint=target_key_of(sample),
            labels_inside=labels_inside(sample, self.loading.target_key),
        )
        picked = pick_input(sample, self.loading.input_key)
        if isinstance(picked, InputProblem):
            probe.input_problem = picked
        else:
            probe.input = tuple((path, tensor.detach().clone()) for path, tensor in picked)
            probe.hash, probe.constant = input_digest(picked), is_constant(picked)
        return probe

    def reloaded(self, positions: List[Position]) -> Dict[Position, LoadedSample]:
        """The probes at ``positions`` loaded once more in the main process, under another
        seed: tells random data from data that depends on the process. Only used when a
        check is failing."""
        if self._reloaded is None:
            self._reloaded = self._load_probes(
                [p for p in positions if isinstance(p, int)], derived_seed(self.loading.seed, 1)
            )
        return self._reloaded

    def loads_in_main_process(self, position: Position) -> bool:
        """Whether the sample at ``position`` loads in the main process: its probe, or (an
        index that is not one) loaded now, once for every check that asks. Only asked when the
        workers failed on it."""
        if position not in self._loads_in_main:
            probe = self.probes.get(position)
            if probe is None and isinstance(position, int):
                probe = self._load_probes([position], self.loading.seed).get(position)
            self._loads_in_main[position] = probe is not None and probe.failure is None
        return self._loads_in_main[position]

    def load_again(self, indices: List[int]) -> Dict[int, Input]:
        """The inputs of some samples, loaded in the main process (to confirm a match
        exactly); those that fail to load are left out."""
        probes = self._load_probes(sorted(set(indices)), self.loading.seed)
        return {
            index: probe.input
            for index, probe in probes.items()
            if isinstance(index, int) and probe.input is not None
        }

    @property
    def probe_timed_out(self) -> bool:
        """Whether loading a probe in the main process timed out."""
        return any(p.failure is not None and p.failure.timed_out for p in self.probes.values())

    # -- the scan with worker processes -------------------------------------------------------
    @property
    def scan(self) -> Scan:
        if self._scan is None:
            self._scan = self._run_scan()
        return self._scan

    def _run_scan(self) -> Scan:
        with workers_folder(self.loading.num_workers):
            return self._scan_with_loader()

    def _scan_with_loader(self) -> Scan:
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
            timeout=min(loading.timeout, POLL),
            worker_init_fn=WatchedWorker(loading.worker_init_fn),
            multiprocessing_context=loading.multiprocessing_context,
            generator=torch.Generator().manual_seed(loading.seed),
        )
        scan = Scan()
        limit = self._limit()
        started = time.monotonic()
        said = False
        batches = 0
        iterator = None
        with warnings.catch_warnings():
            # the DataLoader's own warnings (a stream whose len() is wrong, a dataset that
            # cannot be pickled for the workers) are what test_data_loading reports
            warnings.filterwarnings("ignore", module=r"torch\.utils\.data\.dataloader")
            try:
                iterator = iter(loader)
                unwatch(iterator)  # a worker that dies is found by next_batch
                while True:
                    try:
                        report = next_batch(iterator, loading.timeout)
                    except StopIteration:
                        scan.complete = True
                        break
                    except Exception as exc:
                        self._loader_failed(scan, exc, batches)
                        forget(exc)
                        if scan.timed_out:  # a blocked worker: not waited for 5 s on shutdown
                            kill_workers(iterator)
                        break
                    batches += 1
                    scan.add(report)
                    scan.seconds = time.monotonic() - started
                    if scan.blocked or (limit is not None and scan.count >= limit):
                        scan.complete = (
                            not scan.blocked and self.size is not None and scan.count >= self.size
                        )
                        # a stream read past its len(): more than it declares, maybe endless
                        scan.overrun = (
                            self.stream and self.size is not None and scan.count > self.size
                        )
                        scan.complete = scan.complete and not scan.overrun
                        break
                    if scan.seconds > loading.time_limit:
                        scan.out_of_time = True
                        break
                    if not said and scan.seconds > SLOW_SCAN:
                        said = True
                        self._say_it_is_slow(scan, limit)
            except KeyboardInterrupt:  # Ctrl-C, or SIGTERM during a check: no waiting
                kill_workers(iterator, interrupted=True)
                raise
            except Exception as exc:  # iter(loader) failed: the workers did not start
                if iterator is not None:
                    raise
                self._loader_failed(scan, exc, batches)
                forget(exc)
            finally:
                del iterator  # shuts the workers down now (nothing else refers to it)
        return scan

    def _limit(self) -> Optional[int]:
        """How many samples the scan reads at most: of a split, its indices (a random subset of
        max_samples, or all); of a stream, max_samples, and one more than len() says, to see
        a stream that gives more (an endless one), which is not read further."""
        if not self.stream:
            return None
        caps = [self.loading.max_samples, None if self.size is None else self.size + 1]
        return min((cap for cap in caps if cap is not None), default=None)

    def _say_it_is_slow(self, scan: Scan, limit: Optional[int]) -> None:
        """Say, once, that the scan takes long and how to make it cheaper."""
        total = limit if self.stream else len(self.indices)
        rate = scan.count / scan.seconds
        whole = (
            f", about {total / rate:,.0f} s for the {total:,} samples at this rate" if total else ""
        )
        warnings.warn(
            f"dltestkit: the scan of split {self.name!r} has read "
            f"{scan.count:,} samples in {scan.seconds:.0f} s{whole} (it stops at "
            f"scan_time_limit={self.loading.time_limit:g} s). " + cheaper(scan.count, scan.seconds),
            UserWarning,
            stacklevel=2,
        )

    def _loader_failed(self, scan: Scan, exc: BaseException, batches: int) -> None:
        message = str(exc)
        scan.timed_out = message.startswith("DataLoader timed out")
        if "Original Traceback" in message:  # an exception in a worker, with its traceback
            lines = [line for line in message.strip().splitlines() if line.strip()]
            text = f"{lines[0].strip()} {lines[-1].strip()}"
        else:
            text = exception_text(exc)
        scan.loader_error = text
        if self.stream:
            scan.in_flight = f"after {scan.count} samples had arrived"
            return
        size, workers = self.loading.batch_size, self.loading.num_workers
        total = -(-len(self.indices) // size)

        def batch(number: int) -> str:
            return span(list(self.indices[number * size : (number + 1) * size]))

        dead = DEAD_WORKER.search(message)
        # a worker that exits while it sends a batch breaks the pipe instead
        if dead is None and not isinstance(exc, (ConnectionError, EOFError)):
            # the batch the DataLoader waited for: the oldest one its worker had not sent
            scan.in_flight = f"{batch(batches)} (batch {batches + 1} of {total})"
            return
        # A worker exited while loading one of the batches sent to it that had not arrived
        # (the DataLoader sends batch n to worker n % num_workers, two per worker ahead).
        scan.worker_died = True
        ahead = range(batches, min(batches + 2 * workers, total))
        found = dead.group(1).replace(" ", "").split(",") if dead is not None else []
        pids = [int(pid) for pid in found if pid]
        known = sorted({scan.pids[pid] for pid in pids if pid in scan.pids})
        if known:
            scan.in_flight = (
                f"one of the batches sent to worker {', '.join(map(str, known))}: "
                + ", ".join(
                    f"{batch(n)} (batch {n + 1} of {total})" for n in ahead if n % workers in known
                )
            )
        else:
            scan.in_flight = (
                f"one of the batches in flight: {', '.join(batch(n) for n in ahead)} "
                f"(batches {ahead.start + 1} to {ahead.stop} of {total})"
            )


#: What _read_stream's next() gives at the end of a stream.
_END: Any = object()


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
        cache[key] = SplitState(dataset, loading, name)
    return cache[key]


def cached_classes() -> List[type]:
    """The test classes that hold cached scans (for tests of the cache's lifetime)."""
    return list(_CACHE.keys())
