"""Benchmark the example suite on full-size MNIST-format data.

    python benchmarks/run_benchmark.py [--repeats 3] [--sizes 60000,10000] [--cache DIR]
                                       [--only NAME ...]

1. Generates full-size MNIST-format files once into a cache folder (reused later).
2. Measures the floor: one pass over both splits through the example's transforms
   with a 2-worker DataLoader (batch size 256).
3. Runs the whole example suite on that data in a fresh interpreter, --repeats times,
   and prints each test's median duration, the median total and total / floor. As for the
   floor, the example's dataset module (torch and torchvision) is imported before the clock
   starts (its import time is printed apart); dltestkit and the test modules are imported on
   the clock. ``--only``: the tests whose id contains one of the names given (e.g.
   ``--only test_dataset`` for the data checks), the ratio being that of those tests.
4. Counts how often the dataset checks load each sample (a counting wrapper around
   every split, in shared memory so that worker processes count too).
Peak memory (the test process and its largest worker) is reported as well.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import unittest
from pathlib import Path
from typing import Any, Dict, List

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent / "example_project"
sys.path.insert(0, str(PROJECT))
sys.path.insert(1, str(HERE.parent))  # this repository's dltestkit, whatever is installed


def default_cache(sizes: str) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "dltestkit" / f"mnist-{sizes.replace(',', '-')}"


def prepare_data(cache: Path, sizes: str) -> None:
    from mnist_files import has_mnist, write_mnist

    if not has_mnist(cache):
        n_train, n_test = (int(n) for n in sizes.split(","))
        started = time.perf_counter()
        write_mnist(cache, n_train=n_train, n_test=n_test)
        print(
            f"generated {n_train} / {n_test} images into {cache} "
            f"in {time.perf_counter() - started:.1f} s"
        )


def floor_seconds(root: Path) -> float:
    """One pass over both splits with the example's transforms and 2 workers."""
    from dataset import MyMNIST
    from torch.utils.data import DataLoader

    data = MyMNIST(root)
    started = time.perf_counter()
    for split in (data.train_data, data.test_data):
        for _ in DataLoader(split, batch_size=256, num_workers=2):
            pass
    return time.perf_counter() - started


# -- child processes ------------------------------------------------------------------
class TimingResult(unittest.TestResult):
    def __init__(self) -> None:
        super().__init__()
        self.durations: Dict[str, float] = {}

    def startTest(self, test: unittest.TestCase) -> None:
        super().startTest(test)
        self._started = time.perf_counter()

    def stopTest(self, test: unittest.TestCase) -> None:
        self.durations[test.id()] = time.perf_counter() - self._started
        super().stopTest(test)


def peak_memory_mb() -> Dict[str, float]:
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"process_mb": self_kb / 1024, "largest_worker_mb": child_kb / 1024}


def run_suite(only: List[str]) -> Dict[str, Any]:
    # what floor_seconds imports before its clock starts: torch and torchvision
    importing = time.perf_counter()
    import dataset  # noqa: F401

    imports = time.perf_counter() - importing
    started = time.perf_counter()
    loader = unittest.TestLoader()
    if only:  # (the names unittest's -k takes: a test runs if its full name has one)
        loader.testNamePatterns = [f"*{name}*" for name in only]
    suite = loader.discover(str(PROJECT), top_level_dir=str(PROJECT))
    result = TimingResult()
    suite.run(result)
    total = time.perf_counter() - started
    return {
        "total": total,
        "imports": imports,
        "durations": result.durations,
        "memory": peak_memory_mb(),
        "ok": result.wasSuccessful(),
        "tests": result.testsRun,
        "problems": [text for _, text in result.failures + result.errors],
        "skipped": [f"{test.id()}: {reason}" for test, reason in result.skipped],
    }


class CountingDataset:
    """Wraps a split; counts loads per index in a shared-memory tensor."""

    def __init__(self, dataset: Any, counts: Any) -> None:
        self.dataset, self.counts = dataset, counts

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        self.counts[index] += 1
        return self.dataset[index]


def count_loads() -> Dict[str, Dict[str, int]]:
    import torch
    from tests.test_dataset import TestMyMNIST

    counters: Dict[str, torch.Tensor] = {}

    class CountedMNIST(TestMyMNIST):
        def setUp(self) -> None:
            super().setUp()
            for name, split in self.splits.items():
                counts = counters.setdefault(
                    name, torch.zeros(len(split), dtype=torch.int32).share_memory_()
                )
                self.splits[name] = CountingDataset(split, counts)

    result = unittest.TestResult()
    unittest.defaultTestLoader.loadTestsFromTestCase(CountedMNIST).run(result)
    if not result.wasSuccessful():
        raise SystemExit(f"dataset checks failed: {result.failures + result.errors}")
    return {
        name: {"min": int(c.min()), "max": int(c.max()), "samples": len(c)}
        for name, c in counters.items()
    }


def child(mode: str, only: List[str]) -> None:
    output = run_suite(only) if mode == "suite" else count_loads()
    print("BENCHMARK-RESULT " + json.dumps(output))


def in_child(mode: str, root: Path, only: List[str]) -> Any:
    env = {**os.environ, "DLTESTKIT_MNIST_ROOT": str(root)}
    completed = subprocess.run(
        [sys.executable, __file__, "--child", mode, *(["--only", *only] if only else [])],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    for line in completed.stdout.splitlines():
        if line.startswith("BENCHMARK-RESULT "):
            return json.loads(line.split(" ", 1)[1])
    raise SystemExit(f"benchmark child failed:\n{completed.stdout}\n{completed.stderr}")


# -- main --------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", default="60000,10000", help="train,test images")
    parser.add_argument("--cache", type=Path, help="data folder (default: ~/.cache/dltestkit)")
    parser.add_argument(
        "--only", nargs="+", default=[], metavar="NAME", help="only the tests whose id has NAME"
    )
    parser.add_argument("--child", choices=["suite", "count"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.only)
        return
    cache = args.cache or default_cache(args.sizes)
    prepare_data(cache, args.sizes)

    # a floor, then a suite run, and again: on a shared machine both see about the same load
    floors: List[float] = []
    runs: List[Dict[str, Any]] = []
    for _ in range(args.repeats):
        floors.append(floor_seconds(cache))
        runs.append(in_child("suite", cache, args.only))
    for run in runs:
        if not run["ok"]:
            raise SystemExit("the example suite failed:\n" + "\n".join(run["problems"]))
    counts = in_child("count", cache, args.only)

    floor = statistics.median(floors)
    totals = [run["total"] for run in runs]
    total = statistics.median(totals)
    print(f"data: {args.sizes} images in {cache}; {args.repeats} runs, medians shown")
    print(
        f"floor (one 2-worker pass over both splits): {floor:6.2f} s  "
        f"(runs: {', '.join(f'{f:.2f}' for f in floors)})"
    )
    print(f"{'test':<72} seconds")
    for test_id in runs[0]["durations"]:
        seconds = statistics.median(run["durations"][test_id] for run in runs)
        print(f"{test_id.replace('tests.', ''):<72} {seconds:6.2f}")
    print(
        f"{'suite total (' + str(runs[0]['tests']) + ' tests)':<72} {total:6.2f}  "
        f"(runs: {', '.join(f'{seconds:.2f}' for seconds in totals)})"
    )
    print(f"ratio total / floor: {total / floor:.2f}")
    imports = statistics.median(run["imports"] for run in runs)
    print(
        f"not in the total, as not in the floor: importing the example's dataset module "
        f"(torch, torchvision) {imports:.2f} s"
    )
    for name, count in counts.items():
        print(
            f"loads per sample, split {name!r}: min {count['min']}, max {count['max']} "
            f"over {count['samples']} samples (all dataset checks)"
        )
    memory = max(runs, key=lambda run: run["memory"]["process_mb"])["memory"]
    print(
        f"peak memory: test process {memory['process_mb']:.0f} MB, largest worker "
        f"{memory['largest_worker_mb']:.0f} MB"
    )
    for skipped in runs[0]["skipped"]:
        print(f"skipped: {skipped}")


if __name__ == "__main__":
    main()
