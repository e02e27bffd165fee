"""A concrete test module runs under both unittest and pytest, subtests shown as such."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import textwrap
import unittest
from pathlib import Path

MODULE = textwrap.dedent("""
    import unittest
    import torch
    from torch.utils.data import Dataset
    from dltestkit import DatasetTests


    class Images(Dataset):
        def __init__(self, low):
            self.images = low + (1 - low) * torch.rand(20, 1, 4, 4)

        def __len__(self):
            return 20

        def __getitem__(self, index):
            return self.images[index], 0


    class TestImages(DatasetTests, unittest.TestCase):
        def setUp(self):
            self.splits = {"train": Images(-1.0), "test": Images(0.0)}  # test split: [0, 1]
            self.value_range = (-1.0, 1.0)
""")


class Runners(unittest.TestCase):
    def run_in_temp_dir(self, *command: str) -> str:
        with tempfile.TemporaryDirectory() as folder:
            Path(folder, "test_images.py").write_text(MODULE)
            completed = subprocess.run(
                [sys.executable, *command], cwd=folder, text=True, capture_output=True, timeout=300
            )
            self.assertEqual(
                sorted(p.name for p in Path(folder).iterdir() if p.name != "__pycache__"),
                ["test_images.py"],
                "the checks wrote into the working directory",
            )
        return completed.stdout + completed.stderr

    def test_pytest_reports_the_failing_split_as_a_subtest_and_the_check_as_failed(self) -> None:
        output = self.run_in_temp_dir("-m", "pytest", "-v", "-p", "no:cacheprovider")
        self.assertIn(
            "SUBFAILED(split='test') test_images.py::TestImages::test_value_range", output
        )
        # pytest 9 prints a check whose subtests failed as PASSED unless the check itself fails
        self.assertRegex(output, r"test_images.py::TestImages::test_value_range FAILED")
        self.assertNotRegex(output, r"test_value_range PASSED")
        self.assertIn(
            "1 subtest(s) of this check failed (split='test'); their messages are "
            "reported above as SUBFAILED",
            output,
        )
        self.assertRegex(output, r"2 failed, \d+ passed, 2 skipped")  # options unset

    def test_unittest_runs_every_check(self) -> None:
        output = self.run_in_temp_dir("-m", "unittest", "-v")
        self.assertIn(
            "FAIL: test_value_range (test_images.TestImages.test_value_range) (split='test')",
            output,
        )
        self.assertIn("Ran 6 tests", output)
        self.assertIn("FAILED (failures=1, skipped=2)", output)


class Import(unittest.TestCase):
    def test_importing_dltestkit_leaves_scipy_unimported(self) -> None:
        # scipy takes about a second to import; dltestkit uses none of it (the KL check's
        # reference integrates with torch)
        completed = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys, dltestkit; print(sorted(set(sys.modules) & "
                "{'scipy', 'scipy.stats', 'scipy.integrate'}))",
            ],
            cwd=Path(__file__).resolve().parent.parent,
            text=True,
            capture_output=True,
            timeout=300,
        )
        self.assertEqual(completed.stdout.strip(), "[]", completed.stderr)


if __name__ == "__main__":
    unittest.main()
