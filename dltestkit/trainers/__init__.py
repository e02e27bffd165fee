"""The trainer wing: ``TrainerTests``, a composition of one feature mixin per check (or pair
of checks), each in its module with the options only it reads.

- ``runs.py``: test_resume, test_reproducible (``state.py``: comparing what trainers hold)
- ``logging.py``: test_logging (``logs.py``: recorded scalars)
- ``overfit.py``: test_overfit_one_batch
- ``evaluation.py``: test_eval_leaves_model_unchanged
- ``initial_loss.py``: test_initial_loss
- ``frozen.py``: test_frozen_parameters
- ``accumulation.py``: test_gradient_accumulation (``expectation.py``: random draws at their
  expected value; ``recording.py``: what a training run does, seen from outside)
- ``graphs.py``: test_no_retained_graphs
- ``precision.py``: test_mixed_precision
- ``compiled.py``: test_compiled_training
- ``vae.py``: test_kl_divergence, a VAE add-on ``TrainerTests`` includes
- ``reference.py``: test_reference_losses (``core/references.py``: the reference files)

``contract.py`` holds the options every trainer check reads and how they reach the parts of a
trainer; ``setup.py`` the trainer built in setUp.
"""

from __future__ import annotations

from typing import ClassVar

from .accumulation import GradientAccumulation
from .compiled import CompiledTraining
from .evaluation import EvalLeavesModelUnchanged
from .frozen import FrozenParameters
from .graphs import RetainedGraphs
from .initial_loss import InitialLoss
from .logging import Logging
from .overfit import OverfitOneBatch
from .precision import MixedPrecision
from .reference import ReferenceLosses
from .runs import RunChecks
from .vae import VAEChecks

__all__ = ["TrainerTests"]


class TrainerTests(
    RunChecks,
    Logging,
    OverfitOneBatch,
    EvalLeavesModelUnchanged,
    InitialLoss,
    FrozenParameters,
    GradientAccumulation,
    RetainedGraphs,
    MixedPrecision,
    CompiledTraining,
    VAEChecks,
    ReferenceLosses,
):
    """Checks for a trainer: logging, overfitting one batch, resuming from a checkpoint,
    reproducibility, evaluation that leaves the model alone, the loss at initialisation,
    frozen layers, gradient accumulation, autograd graphs kept alive, mixed precision, a
    compiled model, and a VAE's KL divergence.

    For the overfit check the trainer built in setUp should train and evaluate on the
    same single small batch (e.g. 4 fixed, un-augmented training samples). The checks
    that need several trainers build them with ``make_trainer``.
    """

    _suite: ClassVar[str] = "TrainerTests"
