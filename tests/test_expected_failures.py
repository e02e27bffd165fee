"""expected_failed_checks: a listed check still runs; its failure is an expected failure with
the reason, its pass an unexpected success; under unittest and under pytest."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
import unittest
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from checkrunner import SEED
from torch import nn

from dltestkit import ContractError, ModelTests

ROOT = Path(__file__).resolve().parent.parent


class MonteCarloDropout(nn.Module):
    """Dropout at evaluation on purpose (Monte Carlo dropout): fails test_eval_deterministic."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(self.linear(x), 0.5, training=True)


class DtypeSpecific(nn.Module):
    """Fails test_dtype_moving in both of its subtests (a cast to float32 meets the weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.float())


def case(model: Any, **class_attributes: Any) -> type:
    def set_up(self: Any) -> None:
        self.model = model()
        self.inputs = torch.randn(4, 6)

    attributes = {"setUp": set_up, "seed": SEED, **class_attributes}
    return type("TestCase", (ModelTests, unittest.TestCase), attributes)


def run(test_class: type, name: str) -> unittest.TestResult:
    result = unittest.TestResult()
    test_class(name).run(result)
    return result


REASON = "Monte Carlo dropout: random at evaluation by design"


class UnderUnittest(unittest.TestCase):
    def test_a_listed_check_that_fails_is_an_expected_failure_with_the_reason(self) -> None:
        listed = case(MonteCarloDropout, expected_failed_checks={"test_eval_deterministic": REASON})
        result = run(listed, "test_eval_deterministic")
        self.assertEqual((result.failures, result.errors, result.unexpectedSuccesses), ([], [], []))
        self.assertEqual(len(result.expectedFailures), 1)
        text = result.expectedFailures[0][1]
        self.assertIn(
            f"TestCase.test_eval_deterministic failed, as expected_failed_checks says it does "
            f"({REASON}); what it reported: AssertionError: output changes with the random seed",
            text,
        )
        self.assertTrue(result.wasSuccessful())

    def test_a_listed_check_that_passes_is_an_unexpected_success(self) -> None:
        listed = case(
            lambda: nn.Linear(6, 3), expected_failed_checks={"test_eval_deterministic": REASON}
        )
        result = run(listed, "test_eval_deterministic")
        self.assertEqual(len(result.unexpectedSuccesses), 1)
        self.assertFalse(result.wasSuccessful())

    def test_failing_subtests_make_one_expected_failure(self) -> None:
        listed = case(DtypeSpecific, expected_failed_checks={"test_dtype_moving": "float32 only"})
        result = run(listed, "test_dtype_moving")
        self.assertEqual((result.failures, result.errors, result.unexpectedSuccesses), ([], [], []))
        self.assertEqual(len(result.expectedFailures), 1)
        self.assertIn("(float32 only)", result.expectedFailures[0][1])
        self.assertFailsOtherwise(case(DtypeSpecific), "test_dtype_moving")

    def test_other_checks_are_not_affected(self) -> None:
        listed = case(MonteCarloDropout, expected_failed_checks={"test_eval_deterministic": REASON})
        result = run(listed, "test_finite_outputs_and_gradients")
        self.assertEqual(
            (result.failures, result.errors, result.expectedFailures, result.unexpectedSuccesses),
            ([], [], [], []),
        )

    def test_a_misspelled_check_name_is_a_contract_error_with_a_suggestion(self) -> None:
        listed = case(MonteCarloDropout, expected_failed_checks={"test_eval_determinism": REASON})
        result = run(listed, "test_output_shape")
        self.assertEqual(len(result.errors), 1)
        text = result.errors[0][1]
        self.assertIn(ContractError.__name__, text)
        self.assertIn(
            "TestCase.expected_failed_checks lists 'test_eval_determinism', which is not a "
            "check of the class",
            text,
        )
        self.assertIn("Did you mean 'test_eval_deterministic'?", text)

    def test_set_in_setup_is_a_contract_error(self) -> None:
        def set_up(self: Any) -> None:
            self.model, self.inputs = MonteCarloDropout(), torch.randn(4, 6)
            self.expected_failed_checks = {"test_eval_deterministic": REASON}

        test_class = type("TestCase", (ModelTests, unittest.TestCase), {"setUp": set_up})
        result = run(test_class, "test_output_shape")
        self.assertIn("Set it as a class attribute", result.errors[0][1])

    def test_an_empty_reason_is_a_contract_error(self) -> None:
        listed = case(MonteCarloDropout, expected_failed_checks={"test_eval_deterministic": ""})
        result = run(listed, "test_output_shape")
        self.assertIn("not a dict of check names to reasons", result.errors[0][1])

    def assertFailsOtherwise(self, test_class: type, name: str) -> None:
        result = run(test_class, name)
        self.assertTrue(result.failures, f"{name} should fail without expected_failed_checks")


PYTEST_FILE = """
import unittest

import torch
import torch.nn.functional as F
from torch import nn

from dltestkit import ModelTests


class MonteCarloDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(6, 3)

    def forward(self, x):
        return F.dropout(self.linear(x), 0.5, training=True)


class TestListed(ModelTests, unittest.TestCase):
    expected_failed_checks = {{"test_eval_deterministic": "{reason}"}}

    def setUp(self):
        self.model = MonteCarloDropout()
        self.inputs = torch.randn(4, 6)


class TestListedButPasses(ModelTests, unittest.TestCase):
    expected_failed_checks = {{"test_eval_deterministic": "{reason}"}}

    def setUp(self):
        self.model = nn.Linear(6, 3)
        self.inputs = torch.randn(4, 6)
"""


class UnderPytest(unittest.TestCase):
    def test_xfail_with_the_reason_and_a_failure_for_a_listed_check_that_passes(self) -> None:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "test_listed.py"
            path.write_text(textwrap.dedent(PYTEST_FILE.format(reason=REASON)))
            completed = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pytest",
                    "-rxf",
                    "-p",
                    "no:cacheprovider",
                    "-k",
                    "test_eval_deterministic",
                    str(path),
                ],
                cwd=folder,
                capture_output=True,
                text=True,
                timeout=300,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
        output = completed.stdout
        self.assertIn("1 failed", output, output)
        self.assertIn("1 xfailed", output, output)
        self.assertIn(
            f"XFAIL test_listed.py::TestListed::test_eval_deterministic - "
            f"TestListed.test_eval_deterministic failed, as expected_failed_checks says it "
            f"does ({REASON})",
            output,
        )
        self.assertIn("FAILED test_listed.py::TestListedButPasses::test_eval_deterministic", output)
        self.assertIn(
            "AssertionError: TestListedButPasses.test_eval_deterministic passed, but "
            f"expected_failed_checks lists it ({REASON!r}): remove it from the list",
            output,
        )


if __name__ == "__main__":
    unittest.main()
