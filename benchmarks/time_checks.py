"""Time the checks of a test class, in one process: per check and for the whole class.

    python benchmarks/time_checks.py example_project/tests/test_trainer.py:TestVAETrainer
    python benchmarks/time_checks.py tests/test_zoo.py:RealModels --repeats 3

The class is given as FILE:CLASS (its folder and the folder above it go on sys.path, so that
the example project's tests import as they do under unittest discover). Every check runs
``--repeats`` times (default 5, after one warm-up run that is not counted); the median, min and
max wall time of each check and of the whole class are printed, with the outcome of the last
run (ok, skip, FAIL).
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
import unittest
from pathlib import Path
from typing import Dict, List


def load(target: str) -> type:
    path, _, name = target.partition(":")
    file = Path(path).resolve()
    sys.path[:0] = [str(file.parent.parent), str(file.parent)]
    module = (
        importlib.import_module(f"{file.parent.name}.{file.stem}")
        if (file.parent / "__init__.py").exists()
        else importlib.import_module(file.stem)
    )
    return getattr(module, name)


def main(arguments: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", help="FILE:CLASS, e.g. tests/test_zoo.py:RealModels")
    parser.add_argument("--repeats", type=int, default=5)
    options = parser.parse_args(arguments)
    case = load(options.target)
    names = unittest.TestLoader().getTestCaseNames(case)
    times: Dict[str, List[float]] = {name: [] for name in names}
    outcome: Dict[str, str] = {}
    for repeat in range(options.repeats + 1):
        for name in names:
            result = unittest.TestResult()
            started = time.perf_counter()
            case(name).run(result)
            elapsed = time.perf_counter() - started
            if repeat:
                times[name].append(elapsed)
            outcome[name] = (
                "FAIL" if result.failures or result.errors else "skip" if result.skipped else "ok"
            )
    totals = [sum(times[name][i] for name in names) for i in range(options.repeats)]
    print(f"{case.__name__}: {len(names)} checks, {options.repeats} runs (+1 warm-up)")
    print(f"  {'check':40s} {'median s':>9s} {'min':>7s} {'max':>7s}  outcome")
    for name in names:
        print(
            f"  {name:40s} {statistics.median(times[name]):9.3f} {min(times[name]):7.3f} "
            f"{max(times[name]):7.3f}  {outcome[name]}"
        )
    print(
        f"  {'whole class':40s} {statistics.median(totals):9.3f} {min(totals):7.3f} "
        f"{max(totals):7.3f}"
    )
    return 1 if "FAIL" in outcome.values() else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
