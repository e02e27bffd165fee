"""The trainer a test class builds in setUp, which most trainer checks train and evaluate."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..core.options import REQUIRED, option
from .contract import TrainerContract, is_trainer

__all__ = ["SetUpTrainer"]


class SetUpTrainer(TrainerContract):
    """The checks that use ``self.trainer``, the trainer built in setUp."""

    _suite: ClassVar[str] = "TrainerTests"

    trainer: Any = option(REQUIRED, is_trainer, example="Trainer(model, ...)")
    """The trainer under test: train(epochs), eval() -> loss, and its model, optimizer and
    SummaryWriter as attributes.

    Built on one small fixed batch that it trains and evaluates on. test_resume also calls its
    save_checkpoint(path) and load_checkpoint(path). The attribute and method names are options
    below."""

    def _prepare(self) -> None:
        """Close the writer of every trainer a check uses, and restore the grad mode."""
        super()._prepare()
        restore_grad_mode = torch.is_grad_enabled()
        self.addCleanup(torch.set_grad_enabled, restore_grad_mode)
        self._close_writer(self.trainer)
