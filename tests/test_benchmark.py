"""benchmarks/run_benchmark.py runs end to end (on tiny data, once).

Marked slow (a minute on a loaded machine): `python -m pytest tests` leaves it out, `python -m
pytest tests -m slow` runs it; .ci/run runs it as a step of its own.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "run_benchmark.py"


@pytest.mark.slow
class Benchmark(unittest.TestCase):
    def test_it_reports_floor_tests_ratio_loads_and_memory(self) -> None:
        with tempfile.TemporaryDirectory() as cache:
            completed = subprocess.run(
                [
                    sys.executable,
                    str(SCRIPT),
                    "--repeats",
                    "1",
                    "--sizes",
                    "300,100",
                    "--cache",
                    cache,
                    # the data checks (whose loads are counted) and one trainer check: the
                    # whole example suite runs in CI's first step already
                    "--only",
                    "test_dataset",
                    "test_overfit_one_batch",
                ],
                capture_output=True,
                text=True,
                timeout=600,
            )
            self.assertEqual(completed.returncode, 0, completed.stderr)
            self.assertTrue((Path(cache) / "MNIST" / "raw" / "train-images-idx3-ubyte").exists())
        output = completed.stdout
        self.assertRegex(output, r"floor \(one 2-worker pass over both splits\): +\d+\.\d\d s")
        self.assertRegex(output, r"test_trainer\.TestVAETrainer\.test_overfit_one_batch +\d+\.\d\d")
        total = re.search(r"suite total \((\d+) tests\) +\d+\.\d\d", output)
        assert total is not None, output
        timed = re.findall(r"^test_\w+\.Test\w+\.test_\w+ +\d+\.\d\d$", output, re.M)
        self.assertEqual(int(total.group(1)), len(timed))  # a line per test run
        # --only: the dataset checks and the one trainer check, nothing else
        self.assertTrue(all(t.startswith(("test_dataset.", "test_trainer.")) for t in timed))
        self.assertEqual(sum(t.startswith("test_trainer.") for t in timed), 1, timed)
        self.assertGreater(len(timed), 4, timed)
        self.assertRegex(output, r"ratio total / floor: \d+\.\d\d")
        self.assertRegex(output, r"importing the example's dataset module .* \d+\.\d\d s")
        for split, size in (("train", 300), ("test", 100)):
            self.assertIn(
                f"loads per sample, split '{split}': min 1, max 2 over {size} samples", output
            )
        self.assertTrue(re.search(r"peak memory: test process \d+ MB", output))


if __name__ == "__main__":
    unittest.main()
