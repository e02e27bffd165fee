"""How DatasetTests loads the data: each sample at most twice, never from the split itself in
the main process before the workers fork (a copy instead), each load bounded by the timeout,
the workers set up as the user's DataLoader's (worker_init_fn, start method), a cache keyed on
every option that changes the scan and dropped with the class's tests, and no worker process,
file descriptor or stray traceback left behind by failing checks."""

from __future__ import annotations

import functools
import gc
import multiprocessing
import os
import shutil
import sqlite3
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import unittest
import weakref
from pathlib import Path
from typing import Any, Dict, List, Tuple
from unittest import mock

import pytest
import torch
from checkrunner import CheckTestCase, make_case, run_check
from test_dataset_checks import (
    CHECKS,
    BlocksEverywhere,
    BlocksInWorkers,
    FailsInWorkers,
    Images,
    LastImageCropped,
    TooLong,
    broken_init,
    splits_case,
)
from test_dataset_pipelines import FailsInWorker, RepeatedInEveryWorker, SizedStream, stream_case
from torch.utils.data import Dataset, get_worker_info

from dltestkit import DatasetTests
from dltestkit.data import inspect, pickling, scan, workers
from dltestkit.data import split as split_state


class CountingImages(Images):
    """Counts loads per index in shared memory, so loads in worker processes count too."""

    def __init__(self, augment: bool = False, seed: int = 123) -> None:
        super().__init__(augment=augment, seed=seed)
        self.loads = torch.zeros(len(self), dtype=torch.int64).share_memory_()

    def __getitem__(self, index: int) -> Any:
        self.loads[index] += 1
        return super().__getitem__(index)


class LoadCount(CheckTestCase):
    def test_each_sample_is_loaded_at_most_twice_across_all_checks(self) -> None:
        splits = {
            "train": CountingImages(augment=True),
            "train (plain)": CountingImages(),
            "test": CountingImages(seed=5),
        }

        def set_up(self: Any) -> None:
            self.splits = splits

        case = make_case(
            DatasetTests,
            set_up,
            augmented_splits={"train"},
            sample_shape=(1, 6, 6),
            value_range=(-1.0, 1.0),
            num_classes=10,
            batch_size=16,
        )
        for name in CHECKS:
            self.assertPasses(case, name)
        for name, split in splits.items():
            with self.subTest(split=name):
                self.assertEqual(int(split.loads.min()), 1)  # every sample scanned
                self.assertEqual(int(split.loads.max()), 2)  # probes once more, nothing more
                self.assertEqual(int((split.loads == 2).sum()), 8)  # probe_count


class Records(Dataset):
    """A file of length-prefixed records, opened lazily on first use (the usual advice for
    h5py, LMDB and record files) so that each DataLoader worker opens its own handle, and
    read with seek + read: workers that shared one handle (one file offset) would read each
    other's records."""

    def __init__(self, path: str, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.expected = torch.rand(400, 1, 6, 6, generator=generator) * 2 - 1
        self.expected[0].view(-1)[:2] = torch.tensor([-1.0, 1.0])
        self.path, self.offsets, self.file = path, [], None
        with open(path, "wb") as file:
            for image in self.expected:
                self.offsets.append(file.tell())
                data = image.numpy().tobytes()
                file.write(struct.pack("<q", len(data)) + data)

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, index: int) -> Any:
        if self.file is None:
            self.file = open(self.path, "rb", buffering=0)  # noqa: SIM115 (kept open)
        self.file.seek(self.offsets[index])
        (size,) = struct.unpack("<q", self.file.read(8))
        image = torch.frombuffer(bytearray(self.file.read(size)), dtype=torch.float32)
        return image.reshape(1, 6, 6), index % 10

    def __getstate__(self) -> Dict[str, Any]:
        return {**self.__dict__, "file": None}


class MemoryMapped(Dataset):
    """Opens its file per worker in a worker_init_fn that sets it on
    get_worker_info().dataset (the h5py/LMDB pattern); the main process reads without it."""

    def __init__(self, path: str, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        images = torch.rand(120, 1, 6, 6, generator=generator) * 2 - 1
        images[0].view(-1)[:2] = torch.tensor([-1.0, 1.0])
        images.numpy().tofile(path)
        self.path, self.handle = path, None

    def __len__(self) -> int:
        return 120

    def __getitem__(self, index: int) -> Any:
        if self.handle is None:
            if get_worker_info() is not None:
                raise RuntimeError("the worker_init_fn did not open the file")
            return torch.from_numpy(open_images(self.path)[index].copy()), index % 10
        return torch.from_numpy(self.handle[index].copy()), index % 10

    def __getstate__(self) -> Dict[str, Any]:
        return {**self.__dict__, "handle": None}


def open_images(path: str) -> Any:
    import numpy as np

    return np.memmap(path, dtype=np.float32, mode="r").reshape(-1, 1, 6, 6)


def open_in_worker(worker_id: int) -> None:
    dataset = get_worker_info().dataset
    dataset.handle = open_images(dataset.path)


class SQLiteImages(Dataset):
    """Images in an SQLite file whose connection is opened in __init__: it works in the main
    thread and (inherited) in forked workers, but cannot be pickled, so it is loaded itself."""

    def __init__(self, path: str, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        images = torch.rand(60, 1, 6, 6, generator=generator) * 2 - 1
        images[0].view(-1)[:2] = torch.tensor([-1.0, 1.0])
        self.connection = sqlite3.connect(path)
        self.connection.execute("create table images (id integer primary key, data blob)")
        self.connection.executemany(
            "insert into images values (?, ?)",
            [(n, image.numpy().tobytes()) for n, image in enumerate(images)],
        )
        self.connection.commit()

    def __len__(self) -> int:
        return 60

    def __getitem__(self, index: int) -> Any:
        (data,) = self.connection.execute(
            "select data from images where id = ?", (index,)
        ).fetchone()
        image = torch.frombuffer(bytearray(data), dtype=torch.float32).reshape(1, 6, 6)
        return image, index % 10


class InMemory(Dataset):
    """A dataset held in memory: a 64 MB array and a 64 MB tensor."""

    def __init__(self) -> None:
        import numpy as np

        self.array = np.zeros((64, 1024, 1024), dtype=np.uint8)
        self.tensor = torch.zeros(16, 1024, 1024)


def temporary_path(test: unittest.TestCase, name: str) -> str:
    folder = tempfile.mkdtemp(prefix="dltestkit-data-")
    test.addCleanup(shutil.rmtree, folder, ignore_errors=True)
    return str(Path(folder, name))


class MainProcessLoads(CheckTestCase):
    def test_a_file_opened_lazily_is_opened_by_the_workers_only(self) -> None:
        train = Records(temporary_path(self, "train.bin"), seed=1)
        test = Records(temporary_path(self, "test.bin"), seed=2)
        case = make_case(
            DatasetTests,
            lambda self: setattr(self, "splits", {"train": train, "test": test}),
            sample_shape=(1, 6, 6),
            value_range=(-1.0, 1.0),
            num_classes=10,
            batch_size=16,
        )
        for name in CHECKS:
            with self.subTest(name):
                self.assertPasses(case, name)
        # the main process loaded its probes from copies: the splits never opened their file
        # (which the forked workers would then have shared, reading each other's records)
        self.assertIsNone(train.file)
        self.assertIsNone(test.file)

    def test_a_worker_init_fn_that_sets_a_handle_on_the_dataset_works(self) -> None:
        splits = {
            "train": MemoryMapped(temporary_path(self, "train.f32"), seed=1),
            "test": MemoryMapped(temporary_path(self, "test.f32"), seed=2),
        }
        case = make_case(
            DatasetTests,
            lambda self: setattr(self, "splits", splits),
            sample_shape=(1, 6, 6),
            value_range=(-1.0, 1.0),
            num_classes=10,
            batch_size=16,
            worker_init_fn=open_in_worker,
        )
        for name in CHECKS:
            with self.subTest(name):
                self.assertPasses(case, name)
        case.worker_init_fn = None  # without it, the workers have no file: the bug is caught
        self.assertFailsWith(
            case, "test_data_loading", "RuntimeError: the worker_init_fn did not open the file"
        )

    def test_a_split_that_cannot_be_copied_is_loaded_itself_in_the_main_thread(self) -> None:
        train = SQLiteImages(temporary_path(self, "train.db"), seed=1)
        test = SQLiteImages(temporary_path(self, "test.db"), seed=2)
        case = make_case(
            DatasetTests,
            lambda self: setattr(self, "splits", {"train": train, "test": test}),
            sample_shape=(1, 6, 6),
            value_range=(-1.0, 1.0),
            num_classes=10,
            batch_size=16,
        )
        for name in CHECKS:
            with self.subTest(name):
                if name == "test_data_loading":  # spawned workers would fail
                    self.assertFailsWith(
                        case,
                        name,
                        "split 'train' cannot be pickled (TypeError: cannot pickle "
                        "'sqlite3.Connection' object)",
                    )
                else:  # the connection works in the thread that opened it
                    self.assertPasses(case, name)

    def test_no_thread_of_the_main_process_loads_runs_when_the_workers_fork(self) -> None:
        def loaders() -> int:
            return sum(t.name == "dltestkit main-process loads" for t in threading.enumerate())

        before = loaders()  # (blocked ones of earlier tests may live on)
        running = []
        run_scan = split_state.SplitState._run_scan

        def recording(state: split_state.SplitState) -> scan.Scan:
            running.append(loaders())
            return run_scan(state)

        case = splits_case(Images(augment=True), Images(seed=5), num_classes=10)
        with mock.patch.object(split_state.SplitState, "_run_scan", recording):
            for name in CHECKS:
                self.assertTrue(run_check(case, name).ran)
        self.assertEqual(running, [before, before])  # one scan per split
        self.assertEqual(loaders(), before)

    def test_the_spawn_check_pickles_without_copying_the_data(self) -> None:
        import pickle
        import tracemalloc

        big = InMemory()
        for measure in (pickle.dumps, pickling.pickled_size):
            tracemalloc.start()
            try:
                measure(big)
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            if measure is pickle.dumps:
                self.assertGreater(peak, 64_000_000)  # what the check used to cost
            else:
                self.assertLess(peak, 1_000_000)
        self.assertLess(pickling.pickled_size(big), 10_000)


def pad_to(samples: List[Any], length: int) -> Any:
    """Pad variable-length sequences to ``length`` (raises for a longer one)."""
    padded = torch.zeros(len(samples), length)
    for row, (sequence, _) in enumerate(samples):
        padded[row, : len(sequence)] = sequence
    return padded, torch.tensor([label for _, label in samples])


def padding_to(length: int) -> Any:
    """A collate function made by a factory (a closure over ``length``)."""

    def collate(samples: List[Any]) -> Any:
        return pad_to(samples, length)

    return collate


class Sequences(Dataset):
    def __init__(self) -> None:
        self.loads = torch.zeros(30, dtype=torch.int64).share_memory_()

    def __len__(self) -> int:
        return 30

    def __getitem__(self, index: int) -> Any:
        self.loads[index] += 1
        return torch.linspace(0, 1, 3 + index), index % 2


class TwoInputs(Dataset):
    """Samples {"a": values in [0, 1], "b": values in [-1, 1]}."""

    def __init__(self) -> None:
        self.values = torch.linspace(0, 1, 40).reshape(40, 1)

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, index: int) -> Any:
        return {"a": self.values[index], "b": self.values[index] * 2 - 1}


class Cache(CheckTestCase):
    def test_the_cache_is_keyed_on_input_key(self) -> None:
        case = make_case(
            DatasetTests,
            lambda self: setattr(self, "splits", {"x": TwoInputs()}),
            input_key="b",
            value_range=(-1.0, 1.0),
        )
        self.assertPasses(case, "test_value_range")
        case.input_key = "a"  # the same class and split, another input: scanned again
        self.assertFailsWith(case, "test_value_range", "split 'x' does not use value_range")

    def test_the_cache_is_keyed_on_batch_size(self) -> None:
        split = CountingImages()
        case = make_case(
            DatasetTests,
            lambda self: setattr(self, "splits", {"x": split}),
            value_range=(-1.0, 1.0),
            batch_size=16,
        )
        self.assertPasses(case, "test_value_range")
        self.assertPasses(case, "test_data_loading")
        self.assertEqual(int(split.loads.max()), 2)
        case.batch_size = 8
        self.assertPasses(case, "test_value_range")
        self.assertEqual(int(split.loads.min()), 2)  # scanned again

    def test_the_cache_is_keyed_on_the_arguments_of_a_partial_collate_fn(self) -> None:
        split = Sequences()
        case = make_case(
            DatasetTests,
            lambda self: setattr(self, "splits", {"x": split}),
            batch_size=8,
            collate_fn=functools.partial(pad_to, length=40),
        )
        self.assertPasses(case, "test_data_loading")
        case.collate_fn = functools.partial(pad_to, length=10)  # too short: scanned again
        self.assertFailsWith(
            case,
            "test_data_loading",
            "samples cannot be batched by collate_fn (functools.partial("
            "test_dataset_loading.pad_to, length=10)): RuntimeError",
        )

    def test_the_cache_is_keyed_on_what_a_collate_fn_factory_captured(self) -> None:
        split = Sequences()
        case = make_case(
            DatasetTests,
            lambda self: setattr(self, "splits", {"x": split}),
            batch_size=8,
            collate_fn=padding_to(40),
        )
        self.assertPasses(case, "test_data_loading")
        case.collate_fn = padding_to(10)
        self.assertFailsWith(
            case,
            "test_data_loading",
            "samples cannot be batched by collate_fn "
            "(test_dataset_loading.padding_to.<locals>.collate): RuntimeError",
        )

    def test_an_equal_partial_made_in_each_set_up_reuses_the_scan(self) -> None:
        split = Sequences()

        def set_up(self: Any) -> None:
            self.splits = {"x": split}
            self.collate_fn = functools.partial(pad_to, length=40)

        case = make_case(DatasetTests, set_up, batch_size=8, value_range=(0.0, 1.0))
        for name in CHECKS:
            outcome = run_check(case, name)
            self.assertEqual((outcome.failures, outcome.errors), ([], []), name)
        self.assertEqual(int(split.loads.max()), 2)

    def test_the_cache_does_not_keep_the_split_alive(self) -> None:
        built: List[Any] = []

        def set_up(self: Any) -> None:
            split = Images()
            built.append(weakref.ref(split))
            self.splits = {"x": split}

        case = make_case(DatasetTests, set_up, value_range=(-1.0, 1.0), batch_size=16)
        self.assertPasses(case, "test_value_range")
        gc.collect()
        self.assertIn(case, split_state.cached_classes())
        self.assertIsNone(built[0](), "the cache keeps the dataset of a finished test")

    def test_the_cache_of_a_class_is_dropped_when_its_tests_are_done(self) -> None:
        case = splits_case(Images(augment=True), Images(seed=5))
        run_check(case, "test_value_range")  # a single test, outside a suite
        self.assertIn(case, split_state.cached_classes())
        other = splits_case(Images(augment=True), Images(seed=5))
        suite = unittest.defaultTestLoader.loadTestsFromTestCase(other)
        result = unittest.TestResult()
        suite.run(result)
        self.assertTrue(result.wasSuccessful(), result.failures + result.errors)
        self.assertNotIn(other, split_state.cached_classes())


def children() -> List[int]:
    """The process ids whose parent is this process."""
    mine = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path("/proc", entry, "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid():
                mine.append(int(entry))
    return mine


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def settled(before: Tuple[List[int], int], seconds: float = 10.0) -> Tuple[List[int], int]:
    """The child processes and the count of open descriptors, once they are back to
    ``before`` or after ``seconds``: the pipes of a DataLoader's queues are closed by their
    feeder threads, which end a moment after the workers have been shut down."""
    deadline = time.monotonic() + seconds
    while True:
        now = (children(), open_descriptors())
        if now == before or time.monotonic() > deadline:
            return now
        time.sleep(0.05)


def live_loader_iterators() -> List[str]:
    """The DataLoader iterators (with worker processes) still alive."""
    return [
        type(obj).__name__
        for obj in gc.get_objects()
        if type(obj).__name__ == "_MultiProcessingDataLoaderIter"
    ]


def steady(seconds: float = 10.0) -> Tuple[List[int], int]:
    """The child processes and the count of open descriptors once they stop changing."""
    deadline = time.monotonic() + seconds
    last = (children(), open_descriptors())
    while time.monotonic() < deadline:
        time.sleep(0.3)
        now = (children(), open_descriptors())
        if now == last:
            break
        last = now
    return last


@unittest.skipUnless(Path("/proc/self/fd").exists(), "counts processes and files with /proc")
class NothingLeaks(CheckTestCase):
    # (in two tests, which pytest -n 2 runs side by side: each half has a check that blocks)
    def test_failing_checks_leave_no_worker_process_and_no_open_file(self) -> None:
        self.assertNothingLeftBy(
            [
                (splits_case(Images(augment=True), FailsInWorkers()), "test_data_loading"),
                (splits_case(Images(augment=True), TooLong()), "test_value_range"),
                (splits_case(Images(augment=True), LastImageCropped(seed=5)), "test_sample_shape"),
                (
                    splits_case(Images(augment=True), BlocksInWorkers(seed=5), loader_timeout=1),
                    "test_data_loading",
                ),
            ]
        )

    def test_failing_checks_on_streams_and_broken_workers_leave_nothing_open(self) -> None:
        self.assertNothingLeftBy(
            [
                (
                    stream_case(SizedStream(seed=1), RepeatedInEveryWorker(seed=2)),
                    "test_data_loading",
                ),
                (stream_case(SizedStream(seed=1), FailsInWorker(seed=2)), "test_value_range"),
                (
                    splits_case(Images(), Images(seed=5), worker_init_fn=broken_init),
                    "test_data_loading",
                ),
                (
                    splits_case(Images(augment=True), BlocksEverywhere(seed=5), loader_timeout=1),
                    "test_data_loading",
                ),
            ]
        )

    def assertNothingLeftBy(self, cases: List[Tuple[type, str]]) -> None:
        """Each check of ``cases`` (case, check) fails or skips, leaving no DataLoader
        iterator, process or open file."""
        run_check(splits_case(Images(), Images()), "test_value_range")  # torch's lazy set-up
        gc.collect()
        before = steady()
        # without the garbage collector, only what the checks release themselves is released
        gc.disable()
        self.addCleanup(gc.enable)
        for case, name in cases:
            outcome = run_check(case, name)
            self.assertTrue(outcome.failures or outcome.skips, name)
            self.assertEqual(live_loader_iterators(), [], f"{name} kept a DataLoader iterator")
            self.assertEqual(settled(before), before, f"{name} left processes or files open")

    @pytest.mark.slow  # (.ci/run's slow step) the DataLoader's shutdown waits 5 s
    def test_where_torchs_watch_of_the_workers_cannot_be_cleared_they_are_not_killed(
        self,
    ) -> None:
        # a timed-out scan kills its blocked worker only once torch no longer watches it (else
        # its death raises in whatever runs then, keeping the iterator alive): where that
        # cannot be done, the DataLoader's own shutdown ends the worker
        from torch.utils.data._utils import signal_handling

        original, refusals = signal_handling._remove_worker_pids, []

        def refused(key: int) -> None:  # to dltestkit, not to the DataLoader's shutdown
            if sys._getframe(1).f_globals.get("__name__") == workers.__name__:
                refusals.append(sys._getframe(2).f_code.co_name)  # who asked
                raise AttributeError("another torch")
            original(key)

        blocked = splits_case(Images(augment=True), BlocksInWorkers(seed=5), loader_timeout=0.5)
        with mock.patch.object(signal_handling, "_remove_worker_pids", refused):
            self.assertNothingLeftBy([(blocked, "test_data_loading")])
        # refused when each scan starts (which then waits for its workers as torch does), and
        # once where it would kill the blocked worker
        self.assertEqual(refusals.count("kill_workers"), 1, refusals)
        self.assertIn("_scan_with_loader", refusals)

    def test_no_stray_traceback_is_printed_later_from_a_worker(self) -> None:
        module = textwrap.dedent("""
            import gc
            import unittest
            import torch
            from torch.utils.data import Dataset, IterableDataset, get_worker_info
            from dltestkit import DatasetTests

            gc.disable()  # garbage left by a failing check lives on into the next fork


            class Stream(IterableDataset):
                def __len__(self):
                    return 64

                def __iter__(self):
                    info = get_worker_info()
                    for index in range(info.id if info else 0, 64, info.num_workers if info else 1):
                        if info is not None and index > 40:
                            raise OSError("shard 3 is gone")
                        yield torch.rand(1, 4, 4) * 2 - 1, 0


            class Images(Dataset):
                def __len__(self):
                    return 64

                def __getitem__(self, index):
                    return torch.full((1, 4, 4), index / 32 - 1), 0


            def collect(worker_id):
                gc.enable()  # collect, in a forked worker, the garbage of the parent
                gc.collect()


            class TestAFailing(DatasetTests, unittest.TestCase):
                def setUp(self):
                    self.splits = {"train": Stream()}
                    self.batch_size = 8


            class TestBPassing(DatasetTests, unittest.TestCase):
                def setUp(self):
                    self.splits = {"train": Images()}
                    self.batch_size = 8
                    self.worker_init_fn = collect
        """)
        output = run_unittest("test_streams.py", module)
        self.assertIn("OSError: shard 3 is gone", output)
        self.assertIn("FAILED (failures=1, skipped=", output)
        self.assertNotIn("Exception ignored", output)
        self.assertNotIn("can only test a child process", output)


SPAWNED = textwrap.dedent("""
    import multiprocessing
    import unittest

    import torch
    from torch.utils.data import Dataset, IterableDataset, get_worker_info

    from dltestkit import DatasetTests

    # the start method of macOS and Windows (and of Linux from Python 3.14 on): the workers
    # unpickle the splits and the checks' own collate function and dataset wrapper
    multiprocessing.set_start_method("spawn", force=True)


    class Images(Dataset):
        def __init__(self, seed):
            generator = torch.Generator().manual_seed(seed)
            self.images = torch.rand(40, 1, 4, 4, generator=generator) * 2 - 1
            self.images[0, 0, 0, :2] = torch.tensor([-1.0, 1.0])

        def __len__(self):
            return 40

        def __getitem__(self, index):
            return self.images[index], index % 4


    class Stream(IterableDataset):
        def __init__(self, seed):
            self.data = Images(seed).images

        def __len__(self):
            return 40

        def __iter__(self):
            info = get_worker_info()
            start, step = (info.id, info.num_workers) if info else (0, 1)
            for index in range(start, 40, step):
                yield self.data[index], index % 4


    class TestSpawned(DatasetTests, unittest.TestCase):
        def setUp(self):
            self.splits = {"train": Images(1), "stream": Stream(2)}
            self.sample_shape = (1, 4, 4)
            self.value_range = (-1.0, 1.0)
            self.num_classes = 4
            self.batch_size = 8


    class TestUnpicklable(DatasetTests, unittest.TestCase):
        def setUp(self):
            split = Images(3)
            split.transform = lambda image: image
            self.splits = {"train": split}
            self.value_range = (-1.0, 1.0)
            self.batch_size = 8
""")


SPAWN_ONLY = textwrap.dedent("""
    import unittest

    import torch
    from torch.utils.data import Dataset

    from dltestkit import DatasetTests

    STATS = None  # set at run time, as a training script sets the statistics it computed


    def configure(mean, std):
        global STATS
        STATS = (mean, std)


    class Normalised(Dataset):
        def __init__(self, seed):
            generator = torch.Generator().manual_seed(seed)
            self.images = torch.rand(40, 1, 4, 4, generator=generator)

        def __len__(self):
            return 40

        def __getitem__(self, index):
            mean, std = STATS  # None in a spawned worker, which imports this module anew
            return ((self.images[index] - mean) / std).clamp(-1, 1), index % 4


    class TestForked(DatasetTests, unittest.TestCase):
        def setUp(self):
            configure(0.5, 0.25)
            self.splits = {"train": Normalised(1)}
            self.batch_size = 8
            self.num_workers = 1


    class TestSpawned(TestForked):
        multiprocessing_context = "spawn"


    class TestSlowStart(TestForked):
        multiprocessing_context = "spawn"
        loader_timeout = 0.2
""")


class StartMethods(unittest.TestCase):
    @unittest.skipUnless("fork" in multiprocessing.get_all_start_methods(), "needs fork")
    def test_spawned_workers_catch_what_only_fails_in_them(self) -> None:
        output = run_unittest("test_spawn_only.py", SPAWN_ONLY)
        self.assertIn("test_data_loading (test_spawn_only.TestForked", output)
        # by default (fork here) the dataset works; with spawn its workers lack STATS
        self.assertIn(
            "split 'train': loading index 0 in a DataLoader worker raised TypeError: cannot "
            "unpack non-iterable NoneType object (8 samples failed in the batches the workers "
            "read: index 0, index 1, index 2, index 3, index 4 and 3 more), though it loads in "
            "the main process. The worker processes are started with spawn: each imports the "
            "dataset's modules anew and unpickles the dataset, so module state set at run "
            "time",
            output,
        )
        # a spawned worker that is slow to start is not said to inherit a lock
        self.assertIn(
            "split 'train': no batch arrived within loader_timeout=0.2 s; a DataLoader worker "
            "blocked while loading indices 0 to 7 (batch 1 of 5). The workers are started "
            "with spawn: each first imports torch and the modules of the dataset",
            output,
        )
        self.assertIn("FAILED (failures=2, skipped=", output)

    @pytest.mark.slow  # (.ci/run's slow step) a fresh interpreter per worker: ~10 s
    def test_every_check_works_with_spawned_workers(self) -> None:
        output = run_unittest("test_spawned.py", SPAWNED)
        self.assertIn("Ran 12 tests", output)
        # TestSpawned passes (test_augmentation skips: a stream has no indices); the workers
        # cannot start for TestUnpicklable: test_data_loading fails, the others skip
        self.assertIn(
            "split 'train' cannot be pickled (AttributeError: Can't pickle local object", output
        )
        self.assertIn(
            "skipped \"split 'train' cannot be loaded (the DataLoader failed); see "
            'test_data_loading"',
            output,
        )
        self.assertIn("FAILED (failures=1, skipped=6)", output)
        self.assertNotIn("Warning", output)


def environment() -> Dict[str, str]:
    """The environment of a child Python that imports this checkout's dltestkit."""
    root = str(Path(__file__).resolve().parent.parent)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}


def run_unittest(file_name: str, source: str) -> str:
    """What ``python -m unittest -v`` prints for a test module of this source, run in a
    temporary folder by a child Python that imports this checkout's dltestkit."""
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, file_name).write_text(source)
        completed = subprocess.run(
            [sys.executable, "-m", "unittest", "-v"],
            cwd=folder,
            env=environment(),
            capture_output=True,
            text=True,
            timeout=600,
        )
    return completed.stdout + completed.stderr


class OwnBugs(CheckTestCase):
    def test_a_bug_of_dltestkit_in_a_worker_is_an_error_not_a_failure(self) -> None:
        case = splits_case(Images(augment=True), Images(seed=5))

        def broken(*args: Any) -> None:
            raise KeyError("bookkeeping")

        with mock.patch.object(inspect, "_statistics", broken):
            self.assertErrorsWith(
                case,
                "test_value_range",
                "RuntimeError: dltestkit failed while inspecting a batch",
                "(a bug of dltestkit)",
                "KeyError: 'bookkeeping'",
            )


if __name__ == "__main__":
    unittest.main()
