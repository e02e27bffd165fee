"""test_logging: one epoch logs every expected scalar at step 0, finite."""

from __future__ import annotations

import difflib
from typing import Any, Dict, List, Sequence, Tuple

from ..core.contract import check
from ..core.options import UNSET, option
from ..core.validators import is_names
from .logs import is_finite_number
from .setup import SetUpTrainer

__all__ = ["Logging"]


class Logging(SetUpTrainer):
    """The scalars the trainer logs."""

    expected_scalars: Sequence[str] = option(UNSET, is_names, example='["train/loss", "test/loss"]')
    """The scalar tags one epoch of training must log."""

    def _validate_combination(self) -> None:
        super()._validate_combination()
        if self.writer_attribute is None and self._is_set("expected_scalars"):
            raise self._contract_error(
                "expected_scalars",
                "lists tags, but self.writer_attribute is None (the trainer "
                "logs nothing); set writer_attribute to the name of the trainer's writer",
            )

    # -- the checks --------------------------------------------------------------------------
    @check(reads=("trainer", "expected_scalars", "writer_attribute"))
    def test_logging(self) -> None:
        """Check that one epoch of training logs every ``expected_scalars`` tag at step 0
        with a finite value.

        Catches missing, misspelled or misplaced TensorBoard scalars, and scalars that are
        not finite numbers.
        """
        expected: Sequence[str] = self._get_or_skip("expected_scalars")
        logged: Dict[Any, List[Tuple[Any, Any]]] = {}
        for scalar in self._train(self.trainer, 1):
            logged.setdefault(scalar.tag, []).append((scalar.step, scalar.value))
        problems = []
        for tag in expected:
            if tag not in logged:
                close = difflib.get_close_matches(tag, [str(t) for t in logged], n=1)
                problems.append(
                    f"{tag!r} was not logged" + (f" (did you mean {close[0]!r}?)" if close else "")
                )
                continue
            at_zero = [value for step, value in logged[tag] if step == 0]
            if not at_zero:
                steps = [step for step, _ in logged[tag]][:5]
                problems.append(
                    f"{tag!r} was logged at steps {steps}, never at global step 0 "
                    "(pass global_step, counting from 0)"
                )
            elif not all(is_finite_number(value) for value in at_zero):
                problems.append(
                    f"{tag!r} was logged at step 0 with {at_zero[0]!r}, not a finite number"
                )
        if problems:
            self.fail(
                f"one epoch of trainer.train(1) did not log as expected through "
                f"trainer.{self.writer_attribute}.add_scalar:\n  "
                + "\n  ".join(problems)
                + f"\nTags logged: {sorted(logged, key=str) or 'none'}."
            )
