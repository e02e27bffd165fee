"""Run a dltestkit check on a component and report what happened (not a test module)."""

from __future__ import annotations

import importlib.util
import os
import unittest
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, TypeVar

import torch

T = TypeVar("T")

#: Every check runs with this seed; CI and the determinism runs vary it.
SEED = int(os.environ.get("DLTESTKIT_TEST_SEED", "0"))
#: The reason test_device_moving_on_gpu gives on CPU-only machines.
NO_GPU = "no CUDA, MPS or other accelerator"
#: How test_initial_loss reports a first training loss within initial_batch_factor of eval()'s
#: (a correct trainer's first batch, under some seeds): skipped.
PUT_DOWN_TO_THE_BATCH = "The first training loss trainer.train(1) logged as"
#: The reason test_running_statistics gives for a model without running statistics.
NO_RUNNING_STATISTICS = "no normalisation in eval mode is handed running statistics"

#: The reasons the opt-in reference checks give until their option is set: always allowed by
#: assertPasses (tests/test_zoo_references.py runs them on the zoos with the options set).
UNSET_REFERENCES = (
    "self.reference_file is not set",
    "self.reference_model is not set",
)


@dataclass
class Outcome:
    failures: List[str] = field(default_factory=list)
    errors: List[str] = field(default_factory=list)
    skips: List[str] = field(default_factory=list)
    ran: int = 0


def built_under_seed(build: Callable[[], T]) -> T:
    """``build()`` under the test seed, as in a setUp (which the checks seed), the global
    generator left as it was: for a component built outside a setUp (once for several checks),
    whose weights would otherwise depend on what the tests before it in the process drew."""
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        return build()


def make_case(mixin: type, set_up: Callable[[Any], None], **class_attributes: Any) -> type:
    """A concrete test class ``(mixin, unittest.TestCase)`` whose setUp is ``set_up``."""
    attributes: Dict[str, Any] = {"setUp": set_up, "seed": SEED, **class_attributes}
    return type("Case", (mixin, unittest.TestCase), attributes)


def with_class_attributes(case: type, **attributes: Any) -> type:
    """A subclass of the test class ``case`` with class ``attributes`` (a seed pinned, an
    option set in the class body)."""
    return type(case.__name__, (case,), attributes)


def run_check(case: type, name: str) -> Outcome:
    result = unittest.TestResult()
    case(name).run(result)
    return Outcome(
        failures=[text for _, text in result.failures],
        errors=[text for _, text in result.errors],
        skips=[reason for _, reason in result.skipped],
        ran=result.testsRun,
    )


class CheckTestCase(unittest.TestCase):
    """Assertions about the outcome of one check."""

    def assertPasses(self, case: type, name: str, allowed_skips: Sequence[str] = (NO_GPU,)) -> None:
        """No failure, no error, no skip but those whose reason starts with one of
        ``allowed_skips`` (by default test_device_moving_on_gpu's without a GPU) or with one
        of UNSET_REFERENCES."""
        outcome = run_check(case, name)
        allowed = (*allowed_skips, *UNSET_REFERENCES)
        skips = [reason for reason in outcome.skips if not reason.startswith(allowed)]
        self.assertEqual(
            (outcome.failures, outcome.errors, skips), ([], [], []), f"{name} should pass"
        )

    def assertFailsWith(self, case: type, name: str, *fragments: str) -> str:
        outcome = run_check(case, name)
        self.assertEqual(outcome.errors, [], f"{name} should fail, not error")
        self.assertTrue(outcome.failures, f"{name} should fail")
        text = "\n".join(outcome.failures)
        for fragment in fragments:
            self.assertIn(fragment, text)
        return text

    def assertSkipsWith(self, case: type, name: str, *fragments: str) -> None:
        outcome = run_check(case, name)
        self.assertEqual((outcome.failures, outcome.errors), ([], []))
        self.assertTrue(outcome.skips, f"{name} should skip")
        for fragment in fragments:
            self.assertIn(fragment, "\n".join(outcome.skips))

    def assertErrorsWith(self, case: type, name: str, *fragments: str) -> str:
        outcome = run_check(case, name)
        self.assertTrue(outcome.errors, f"{name} should raise an error")
        text = "\n".join(outcome.errors)
        for fragment in fragments:
            self.assertIn(fragment, text)
        return text


def example_project_module(name: str) -> Any:
    """example_project/<name>.py, loaded by path (its module names are too common)."""
    path = Path(__file__).resolve().parents[1] / "example_project" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"dltestkit_example_project_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
