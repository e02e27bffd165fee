"""How DatasetTests loads the data: each sample at most twice, a cache keyed on every option
that changes the scan and dropped with the class's tests, and no worker process, file
descriptor or stray traceback left behind by failing checks."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import tempfile
import textwrap
import time
import unittest
import weakref
from pathlib import Path
from typing import Any, Dict, List, Tuple
from unittest import mock

import torch
from checkrunner import CheckTestCase, make_case, run_check
from test_dataset_checks import (
    CHECKS,
    BlocksInWorkers,
    FailsInWorkers,
    Images,
    LastImageCropped,
    TooLong,
    broken_init,
    splits_case,
)
from test_dataset_pipelines import FailsInWorker, RepeatedInEveryWorker, SizedStream, stream_case
from torch.utils.data import Dataset

from dltestkit import DatasetTests, _scan


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

    def test_the_cache_does_not_keep_the_split_alive(self) -> None:
        built: List[Any] = []

        def set_up(self: Any) -> None:
            split = Images()
            built.append(weakref.ref(split))
            self.splits = {"x": split}

        case = make_case(DatasetTests, set_up, value_range=(-1.0, 1.0), batch_size=16)
        self.assertPasses(case, "test_value_range")
        gc.collect()
        self.assertIn(case, _scan.cached_classes())
        self.assertIsNone(built[0](), "the cache keeps the dataset of a finished test")

    def test_the_cache_of_a_class_is_dropped_when_its_tests_are_done(self) -> None:
        case = splits_case(Images(augment=True), Images(seed=5))
        run_check(case, "test_value_range")  # a single test, outside a suite
        self.assertIn(case, _scan.cached_classes())
        other = splits_case(Images(augment=True), Images(seed=5))
        suite = unittest.defaultTestLoader.loadTestsFromTestCase(other)
        result = unittest.TestResult()
        suite.run(result)
        self.assertTrue(result.wasSuccessful(), result.failures + result.errors)
        self.assertNotIn(other, _scan.cached_classes())


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
    def test_failing_checks_leave_no_worker_process_and_no_open_file(self) -> None:
        cases = [
            (splits_case(Images(augment=True), FailsInWorkers()), "test_data_loading"),
            (splits_case(Images(augment=True), TooLong()), "test_value_range"),
            (splits_case(Images(augment=True), LastImageCropped(seed=5)), "test_sample_shape"),
            (
                splits_case(Images(augment=True), BlocksInWorkers(seed=5), loader_timeout=1),
                "test_data_loading",
            ),
            (stream_case(SizedStream(seed=1), RepeatedInEveryWorker(seed=2)), "test_data_loading"),
            (stream_case(SizedStream(seed=1), FailsInWorker(seed=2)), "test_value_range"),
            (
                splits_case(Images(), Images(seed=5), worker_init_fn=broken_init),
                "test_data_loading",
            ),
        ]
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


class StartMethods(unittest.TestCase):
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

        with mock.patch.object(_scan, "_statistics", broken):
            self.assertErrorsWith(
                case,
                "test_value_range",
                "RuntimeError: dltestkit failed while inspecting a batch",
                "(a bug of dltestkit)",
                "KeyError: 'bookkeeping'",
            )


if __name__ == "__main__":
    unittest.main()
