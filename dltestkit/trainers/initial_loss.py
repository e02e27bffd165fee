"""test_initial_loss: the loss before any training is what the untrained model should give."""

from __future__ import annotations

import difflib
import math
from typing import Optional

from ..core.contract import check
from ..core.messages import describe
from ..core.options import UNSET, option
from ..core.validators import is_factor, is_non_negative_number, is_number, is_str, optional
from .logs import as_number
from .setup import SetUpTrainer

__all__ = ["InitialLoss"]

#: The tag test_initial_loss reads the first training loss from, unless told otherwise.
DEFAULT_LOSS_TAG = "train/loss"


class InitialLoss(SetUpTrainer):
    """The loss at initialisation, of eval() and of the first training batch."""

    expected_initial_loss: float = option(UNSET, is_number, example="math.log(10)")
    """The eval() loss of the untrained model.

    For a classifier of C balanced classes the cross-entropy at initialisation is about log(C)."""
    initial_loss_tag: Optional[str] = option(DEFAULT_LOSS_TAG, optional(is_str), example='"loss"')
    """The tag under which the trainer logs its training loss, whose first value is compared with
    expected_initial_loss too.

    The first value logged under it in one epoch of `train(1)` is the loss of the first batch,
    before any update: a training loss summed over the batch while `eval()` averages shows there.
    The default is compared when the trainer logs it; `None`: only `eval()` is compared."""
    initial_loss_rtol: float = option(0.25, is_non_negative_number, example="0.1")
    """The relative tolerance of the initial loss check."""
    initial_loss_atol: float = option(0.0, is_non_negative_number, example="0.05")
    """The absolute tolerance of the initial loss check."""
    initial_batch_factor: float = option(2.0, is_factor, example="1.25")
    """How far, as a factor, the first training loss may be from `eval()`'s loss and be put down
    to the one batch it was computed on, when it is outside the tolerance of
    expected_initial_loss.

    One batch's loss at initialisation differs from the loss over the evaluation data by chance,
    and by batch statistics and dropout in training mode: by up to 1.4 times for a small
    classifier on batches of 4. A loss summed over the batch is off by the batch size. Within
    the factor, such a first training loss is a skipped part; beyond it, a failure. `1`: any
    first training loss outside the tolerance fails (large batches vary little)."""

    @check(
        reads=(
            "trainer",
            "expected_initial_loss",
            "initial_loss_tag",
            "initial_loss_rtol",
            "initial_loss_atol",
            "initial_batch_factor",
            "writer_attribute",
        )
    )
    def test_initial_loss(self) -> None:
        """Check that the loss before any training, of ``eval()`` and the first logged
        training loss, is close to ``expected_initial_loss``.

        Catches a loss that is wrong from the first step: summed over the batch instead of
        averaged (in training, in evaluation or both), the wrong reduction over classes,
        pixels or tokens, a final layer initialised far too large, a softmax before a loss
        that expects logits.
        """
        expected = float(self._get_or_skip("expected_initial_loss"))
        rtol, atol = self.initial_loss_rtol, self.initial_loss_atol
        within = f"expected_initial_loss, within rtol={rtol}, atol={atol}"
        loss = self._eval_loss(self.trainer)
        problems = []
        if not self._close_to(loss, expected):
            problems.append(
                f"trainer.eval() before any training returned {loss:.6g}, expected about "
                f"{expected:.6g} ({within}){self._ratio(loss, expected)}."
            )
        first = self._first_training_loss()
        if (
            first is not None
            and not self._close_to(first, expected)
            # (with eval() in the tolerance, a small difference may be the batch's: skipped)
            and (problems or not self._put_down_to_the_batch(first, loss, expected))
        ):
            problems.append(
                f"The first training loss trainer.train(1) logged as {self.initial_loss_tag!r} "
                f"(initial_loss_tag) was {first:.6g}, expected about {expected:.6g} "
                f"({within}){self._ratio(first, expected)}"
                + (
                    f", although trainer.eval() returned {loss:.6g}: training computes another "
                    "loss than evaluation (summed over the batch there, which multiplies the "
                    "learning rate by the batch size, or weighted differently)."
                    if not problems
                    else "."
                )
                + " If that tag logs another quantity than the loss eval() computes, set "
                "initial_loss_tag to the tag that logs it, or to None."
            )
        if problems:
            self.fail(
                "\n".join(problems)
                + "\nUsual causes: the loss summed over the batch instead of averaged (off by "
                "the batch size; use reduction='mean'), the wrong reduction over classes, "
                "pixels or tokens, a final layer initialised far too large (the logits of an "
                "untrained classifier should be near 0: scale its initial weights down), a "
                "softmax or log_softmax before a loss that expects logits, targets in the "
                "wrong form. For a classifier of C balanced classes the loss at "
                "initialisation is about log(C)."
            )

    def _put_down_to_the_batch(self, first: float, loss: float, expected: float) -> bool:
        """Whether the first training loss, outside the tolerance while eval()'s ``loss`` is
        within it, is within initial_batch_factor of ``loss``: then a skipped part says so."""
        factor = self.initial_batch_factor
        if not (first > 0 and loss > 0 and math.isfinite(first)):
            return False
        if max(first / loss, loss / first) > factor:
            return False
        self._skip_part(
            "first training loss",
            f"The first training loss trainer.train(1) logged as {self.initial_loss_tag!r} "
            f"was {first:.6g}, outside the tolerance of expected_initial_loss "
            f"({expected:.6g}, rtol={self.initial_loss_rtol}, atol={self.initial_loss_atol})"
            f"{self._ratio(first, expected)}, but within a factor of {factor} "
            f"(initial_batch_factor) of the {loss:.6g} that trainer.eval() returned: one "
            "batch's loss at initialisation differs from that over the evaluation data by "
            "chance, and by batch statistics and dropout in training mode, while a loss "
            "summed over the batch is off by the batch size. Not judged; lower "
            "initial_batch_factor (1: strict) to judge it.",
        )
        return True

    def _close_to(self, value: float, expected: float) -> bool:
        rtol, atol = self.initial_loss_rtol, self.initial_loss_atol
        return math.isfinite(value) and abs(value - expected) <= atol + rtol * abs(expected)

    @staticmethod
    def _ratio(value: float, expected: float) -> str:
        return f" ({value / expected:.3g} times the expected value)" if expected else ""

    def _first_training_loss(self) -> Optional[float]:
        """The first value one epoch of training logs under initial_loss_tag; None when there
        is no tag to read (initial_loss_tag None, the default tag not logged, no writer)."""
        tag = self.initial_loss_tag
        if tag is None or self.writer_attribute is None:
            return None
        logged = self._train(self.trainer, 1)
        values = [scalar.value for scalar in logged if scalar.tag == tag]
        if not values:
            if tag == DEFAULT_LOSS_TAG:
                return None
            tags = sorted({str(scalar.tag) for scalar in logged})
            close = difflib.get_close_matches(tag, tags, n=1)
            raise self._contract_error(
                "initial_loss_tag",
                f"is {tag!r}, which one epoch of trainer.train(1) did not log"
                + (f" (did you mean {close[0]!r}?)" if close else "")
                + f"; it logged {tags or 'nothing'}. Set it to the tag of the training loss, "
                "or to None",
            )
        first = as_number(values[0])
        if first is None:
            raise self._contract_error(
                "initial_loss_tag",
                f"is {tag!r}, logged first with {describe(values[0])}, not a number",
            )
        return first
