"""benchmarks/mutation_benchmark.py runs end to end (a few mutants of two models, once), with
pytest-torch's checks beside dltestkit's.

Marked slow: `python -m pytest tests` leaves it out, `python -m pytest tests -m slow` runs it.
"""

from __future__ import annotations

import subprocess
import sys
import unittest
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "mutation_benchmark.py"


@pytest.mark.slow
class MutationBenchmark(unittest.TestCase):
    def test_it_reports_kill_rates_per_model_and_operator_and_the_survivors(self) -> None:
        completed = subprocess.run(
            [
                sys.executable,
                str(SCRIPT),
                "--quick",
                "--models",
                "qwen2,lstm",
                "--workers",
                "1",
                "--pytest-torch",
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
        self.assertEqual(completed.returncode, 0, completed.stderr[-3000:])
        output = completed.stdout
        self.assertRegex(output, r"8 mutants sampled from qwen2 \d+, lstm \d+ mutation sites")
        self.assertRegex(output, r"8 mutants in [\d.]+ min; left out: .*non-equivalent mutants")
        for heading in ("per model", "per operator"):
            self.assertRegex(output, rf"{heading} +default checks +\+ reference +pytest-torch")
        self.assertRegex(output, r"  all +\d+/\d+ +[\d.]+% +\d+/\d+ +[\d.]+% +\d+/\d+ +[\d.]+%")
        self.assertRegex(output, r"killed by pytest-torch and not by the default checks: \d+")
        # its invariance check compares the logits at Qwen2's left-padded positions
        self.assertIn(
            "pytest-torch checks left out (they fail on the original model): qwen2 invariance",
            output,
        )
        self.assertIn("surviving the default checks", output)
        self.assertRegex(output, r"reference file sizes: qwen2 [\d.]+ KiB, lstm [\d.]+ KiB")


if __name__ == "__main__":
    unittest.main()
