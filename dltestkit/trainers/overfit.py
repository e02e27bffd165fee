"""test_overfit_one_batch: training on one batch drives the loss below a bar."""

from __future__ import annotations

import math

from ..core.contract import check
from ..core.options import UNSET, option
from ..core.validators import is_number, is_positive_int
from .setup import SetUpTrainer

__all__ = ["OverfitOneBatch"]


class OverfitOneBatch(SetUpTrainer):
    """The trainer can fit a single batch."""

    overfit_epochs: int = option(100, is_positive_int, example="200")
    """The epochs trained on the single batch."""
    overfit_max_loss: float = option(UNSET, is_number, example="30.0")
    """The eval() loss the trainer must reach after overfit_epochs on the single batch."""

    @check(reads=("trainer", "overfit_epochs", "overfit_max_loss", "writer_attribute"))
    def test_overfit_one_batch(self) -> None:
        """Check that training on one batch drives ``eval()`` below ``overfit_max_loss``.

        Catches a training loop that cannot fit a single batch: a wrong loss sign, an
        optimizer that does not step, gradients zeroed after backward, wrong targets.
        """
        max_loss = self._get_or_skip("overfit_max_loss")
        before = self._eval_loss(self.trainer)
        self.trainer.train(self.overfit_epochs)
        after = self._eval_loss(self.trainer)
        if not (math.isfinite(after) and after <= max_loss):
            self.fail(
                f"the trainer did not overfit one batch: eval() loss {before:.6g} before and "
                f"{after:.6g} after {self.overfit_epochs} epochs, required <= {max_loss}. "
                "A trainer that cannot fit a single batch has a bug (loss sign, optimizer not "
                "stepping, gradients zeroed after backward, wrong targets). Make sure setUp "
                "trains and evaluates on the same single batch; raise overfit_epochs or the "
                "learning rate if the model is merely slow to fit."
            )
