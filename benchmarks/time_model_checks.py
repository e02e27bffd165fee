"""Time the model checks on real models: the whole check class, per model, in one process.

    python benchmarks/time_model_checks.py            # 5 runs each, medians
    python benchmarks/time_model_checks.py --repeats 9
    python benchmarks/time_model_checks.py --stack --repeats 3   # TrainingStackTests' checks

For each model of tests/test_zoo.py (tiny BERT and GPT-2 with 4 x 8 tokens, timm and
torchvision ResNet-18 on 4 x 3 x 32 x 32 images, ...) it runs the test class that suite builds
(ModelTests or SequenceModelTests, every check) and prints the median, min and max wall time
of the whole class, and the slowest check. ``--stack``: TrainingStackTests' checks instead
(test_compile with its default backend, aot_eager; the memory layouts, autocast and activation
checkpointing), each check's median on its own, so that test_compile's time per model shows.
Needs the zoo extra (timm, transformers, peft).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import unittest
import warnings
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import test_zoo  # noqa: E402


class _Timed(unittest.TestResult):
    def __init__(self) -> None:
        super().__init__()
        self.times: Dict[str, float] = {}
        self._started = 0.0

    def startTest(self, test: unittest.TestCase) -> None:
        super().startTest(test)
        self._started = time.perf_counter()

    def stopTest(self, test: unittest.TestCase) -> None:
        self.times[test._testMethodName] = time.perf_counter() - self._started
        super().stopTest(test)


def main(arguments: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", default="", help="a substring of the model labels to time")
    parser.add_argument("--stack", action="store_true", help="time TrainingStackTests' checks")
    options = parser.parse_args(arguments)
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    if options.stack:
        return _time_stack(options.repeats, options.only)
    print(f"{'model':50s} {'checks':>6s} {'median s':>9s} {'min':>6s} {'max':>6s}  slowest check")
    for label, (mixin, attributes, _) in test_zoo.ZOO.items():
        if options.only not in label:
            continue
        case = test_zoo.zoo_case(mixin, attributes)
        totals, slowest = [], {}
        for _ in range(options.repeats):
            result = _Timed()
            suite = unittest.defaultTestLoader.loadTestsFromTestCase(case)
            started = time.perf_counter()
            suite.run(result)
            totals.append(time.perf_counter() - started)
            if result.failures or result.errors:
                print(f"{label}: {len(result.failures) + len(result.errors)} problems")
                return 1
            for name, seconds in result.times.items():
                slowest.setdefault(name, []).append(seconds)
        name = max(slowest, key=lambda n: statistics.median(slowest[n]))
        print(
            f"{label[:50]:50s} {result.testsRun:6d} {statistics.median(totals):9.2f} "
            f"{min(totals):6.2f} {max(totals):6.2f}  {name} "
            f"({statistics.median(slowest[name]):.2f} s)"
        )
    return 0


def _time_stack(repeats: int, only: str) -> int:
    """Each of TrainingStackTests' checks on each model of the zoo: median, min and max."""
    from dltestkit import TrainingStackTests

    checks = (
        "test_compile",
        "test_memory_layouts",
        "test_autocast",
        "test_activation_checkpointing",
    )
    import torch

    started = time.perf_counter()  # torch.compile's first use in a process: imports, warm-up
    linear = torch.compile(torch.nn.Linear(3, 3), backend="aot_eager")
    linear(torch.randn(2, 3)).sum().backward()
    warm_up = time.perf_counter() - started
    print(f"(torch.compile's first use in this process, before the clock: {warm_up:.2f} s)")
    print(f"{'model':50s} " + " ".join(f"{name[5:]:>22s}" for name in checks))
    everything: List[float] = []
    for label, (mixin, attributes, _) in test_zoo.ZOO.items():
        if only not in label:
            continue
        case = test_zoo.zoo_case(type("Stack", (TrainingStackTests, mixin), {}), attributes)
        cells = []
        for name in checks:
            times = []
            for _ in range(repeats):
                result = _Timed()
                case(name).run(result)
                if result.failures or result.errors:
                    print(f"{label}: {name} fails or errs")
                    return 1
                times.append(result.times[name])
            median = statistics.median(times)
            if name == "test_compile":
                everything.append(median)
            cells.append(f"{median:6.2f} ({min(times):5.2f}-{max(times):5.2f})")
        print(f"{label[:50]:50s} " + " ".join(f"{cell:>22s}" for cell in cells), flush=True)
    if everything:
        under = sum(1 for seconds in everything if seconds < 3)
        print(
            f"test_compile: median {statistics.median(everything):.2f} s over "
            f"{len(everything)} models, {under} under 3 s, the slowest {max(everything):.2f} s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
