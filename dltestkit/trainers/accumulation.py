"""test_gradient_accumulation: an optimizer step of k accumulated micro-batches is the step of
the whole batch.

Two trainers from make_trainer, under one seed: ``make_trainer(accumulation_steps=1)`` steps
after every batch, ``make_trainer(accumulation_steps=k)`` after every k micro-batches that
together are that batch. Each trains one epoch with every random draw at its expected value
(``expectation.py``) and BatchNorm normalising with its running statistics, so that a sample
gives the same loss in a micro-batch as in the whole batch. The gradient each step uses, the
learning rate and the weights after it must agree. When they do not, the gradient each
micro-batch's backward pass added tells which mistake it is: the whole batch's gradient is then
a weighting of the micro-batches' gradients, and the weights say how the trainer normalised.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..core.contract import check
from ..core.messages import by_count, listed
from ..core.options import option
from ..core.validators import is_non_negative_number, is_plain_int
from .contract import TrainerContract
from .expectation import expected_randomness
from .recording import Recording, recording

__all__ = ["GradientAccumulation"]

#: How much more a step's gradients may differ than the weights before it drifted apart.
DRIFT = 100


def _at_least_two(value: Any) -> Optional[str]:
    if is_plain_int(value) and value >= 2:
        return None
    return f"is {value!r}, not an int >= 2"


def _flat(gradients: Dict[str, torch.Tensor], names: Sequence[str]) -> torch.Tensor:
    return torch.cat(
        [gradients[name].flatten() if name in gradients else torch.zeros(0) for name in names]
    )


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (0 when both are 0)."""
    scale = float(b.norm())
    difference = float((a - b).norm())
    return difference / scale if scale else (0.0 if difference == 0 else math.inf)


def _shares(weights: Sequence[float]) -> str:
    total = sum(weights)
    return " : ".join(f"{w / total:.3g}" for w in weights)


class _Finding(NamedTuple):
    """What the comparison found: a failure, or a skip when it cannot be judged. A step
    (``step``, from 1) whose numbers differ is not judged when random draws were left that
    the runs make differently."""

    text: str
    skip: bool = False
    step: int = 0


class _BatchNormAsInEvaluation(torch.overrides.TorchFunctionMode):
    """F.batch_norm with its running statistics and without updating them: the normalisation
    of a sample then does not depend on the batch it is in."""

    def __torch_function__(
        self, func: Any, types: Any, args: Tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = dict(kwargs or {})
        if func is F.batch_norm:
            names = ("input", "running_mean", "running_var", "weight", "bias", "training")
            bound = dict(zip(names, args), **kwargs)
            if bound.get("running_mean") is not None and bound.get("running_var") is not None:
                bound["training"] = False
            return func(**bound)
        return func(*args, **kwargs)


class GradientAccumulation(TrainerContract):
    """One optimizer step of accumulated micro-batches is one step on the whole batch."""

    _suite: ClassVar[str] = "TrainerTests"
    accumulation_steps: int = option(2, _at_least_two, example="4")
    """The micro-batches test_gradient_accumulation accumulates for each optimizer step.

    The check calls `make_trainer(accumulation_steps=1)` and `make_trainer(accumulation_steps=k)`
    with this k: a trainer whose batches are k times smaller and that steps once every k of them,
    so that each optimizer step sees the same samples as in the first trainer."""
    accumulation_rtol: float = option(1e-4, is_non_negative_number, example="1e-3")
    """The relative difference (in norm) test_gradient_accumulation allows between the gradient
    of k accumulated micro-batches and the whole batch's, and between the updates they make.

    Float32 sums in another order differ by about 1e-6."""

    @check(
        reads=(
            "make_trainer",
            "accumulation_steps",
            "accumulation_rtol",
            "model_attribute",
            "writer_attribute",
            "trainer",
        )
    )
    def test_gradient_accumulation(self) -> None:
        """Check that an optimizer step of ``accumulation_steps`` accumulated micro-batches
        gives the gradient, the learning rate and the weights of one step on the whole batch.

        Catches gradient accumulation that changes training: the loss not divided by k (or
        divided twice), each micro-batch's mean loss weighted equally where the micro-batches
        hold different numbers of tokens (the per-micro-batch mean instead of the mean over the
        whole batch), an optimizer step before the last micro-batch, a partial last window
        dropped, gradients zeroed between micro-batches, a scheduler stepped every micro-batch.
        """
        k = self.accumulation_steps
        self._get_or_skip("make_trainer")
        refused = self._refused(accumulation_steps=k)
        if refused:
            self.skipTest(
                f"{refused}; give it accumulation_steps=1 (the default: a step after every "
                "batch), and build with accumulation_steps=k a trainer whose batches are k "
                "times smaller and that steps once every k of them, to enable this check"
            )
        whole, whole_start, left = self._run(accumulation_steps=1)
        accumulated, start, left_too = self._run(accumulation_steps=k)
        model = self.model_attribute
        if any(not torch.equal(whole_start[name], start[name]) for name in whole_start):
            self.skipTest(
                "make_trainer(accumulation_steps=1) and make_trainer(accumulation_steps="
                f"{k}), built under the same seed, start from different weights of "
                f"trainer.{model}, so their steps cannot be compared (test_reproducible says "
                "why when make_trainer() is not reproducible)"
            )
        if not whole.steps:
            self.skipTest(
                "make_trainer(accumulation_steps=1) trained one epoch without a step of a "
                f"torch.optim optimizer of trainer.{model}'s parameters, so there was no "
                "step to compare"
            )
        if any(step.backwards != 1 for step in whole.steps):
            counts = sorted({step.backwards for step in whole.steps})
            self.skipTest(
                "make_trainer(accumulation_steps=1) called backward "
                f"{listed([str(c) for c in counts])} times between optimizer steps, not once, "
                "so its steps are no whole batches to compare micro-batches with"
            )
        found = self._windows(whole, accumulated, k) or self._steps(whole, accumulated, start, k)
        if found is None:
            return
        if found.step and (left or left_too):
            self.skipTest(
                f"optimizer step {found.step} of make_trainer(accumulation_steps={k}) differs "
                "from the whole batch's, but training draws random numbers that could not be "
                f"held at their expected value ({listed(sorted(set(left + left_too)), 3)}), "
                "which a whole batch and its micro-batches draw differently, so the difference "
                "cannot be told from a mistake"
            )
        if found.skip:
            self.skipTest(found.text)
        self.fail(
            f"gradient accumulation changes training: {found.text}.\nCompared: one epoch of "
            f"make_trainer(accumulation_steps=1) and of make_trainer(accumulation_steps={k}) "
            "under the same seed, with dropout off, random noise at its mean and BatchNorm "
            "normalising with its running statistics (so that each sample's loss is the same "
            "in a micro-batch as in the whole batch). Accumulate gradients as one step on the "
            "whole batch would compute them: call backward on each micro-batch's loss divided "
            "by the number of samples (or tokens) in the whole window, step once after the "
            "last micro-batch of each window (also a partial one at the end of an epoch), and "
            "zero the gradients only after the step."
        )

    def _run(self, accumulation_steps: int) -> Tuple[Recording, Dict[str, torch.Tensor], List[str]]:
        trainer = self._new_trainer(self.seed, accumulation_steps=accumulation_steps)
        model = self._model(trainer)
        start = {name: p.detach().double().clone() for name, p in model.named_parameters()}
        with (
            expected_randomness() as noise,
            _BatchNormAsInEvaluation(),
            recording(model, added=True) as record,
        ):
            self._train(trainer, 1)
        return record, start, noise.left

    def _windows(self, whole: Recording, accumulated: Recording, k: int) -> Optional[_Finding]:
        """What is wrong with the accumulated run's windows of micro-batches (the backward
        calls of each step), if anything."""
        n = len(whole.steps)
        micro = len(accumulated.backwards)
        stepped = sum(step.backwards for step in accumulated.steps)
        expected = [k] * (n - 1) + [micro - (n - 1) * k]
        actual = [step.backwards for step in accumulated.steps]
        if not (n - 1) * k < micro <= n * k:
            return _Finding(
                f"make_trainer(accumulation_steps={k}) ran {micro} micro-batches "
                f"(backward calls) in one epoch, where make_trainer(accumulation_steps=1) "
                f"took {n} optimizer {by_count(n, 'step', 'steps')} on whole batches: "
                f"{k} micro-batches per whole batch would be {(n - 1) * k + 1} to {n * k}. "
                f"With accumulation_steps={k}, make_trainer must build batches {k} times "
                "smaller (the same samples per optimizer step), so that the steps can be "
                "compared",
                skip=True,
            )
        if actual == expected:
            return None
        if actual and actual[0] < expected[0] == k:
            return _Finding(
                f"the first optimizer step came after {actual[0]} of the {k} micro-batches "
                f"of its window (steps after {listed([str(a) for a in actual])} micro-batches, "
                f"where {listed([str(e) for e in expected])} make the whole batches): a step "
                "before the last micro-batch of the window, usually `if step % k == 0` with "
                "step counted from 0 where `(step + 1) % k == 0` was meant, or, with "
                "Accelerate, a micro-batch trained outside `with accelerator.accumulate(model)`"
            )
        if actual == expected[:-1] and expected[-1] < k:
            return _Finding(
                f"the last window, of {expected[-1]} micro-"
                f"{by_count(expected[-1], 'batch', 'batches')} (the epoch's {micro} "
                f"micro-batches are no multiple of {k}), got no optimizer step: the whole "
                f"batches take {n} steps, the accumulated run {len(actual)}. A partial last "
                "window is dropped (its gradients never applied, or carried into the next "
                "epoch); step at the end of the epoch too"
            )
        unstepped = micro - stepped
        return _Finding(
            f"it took optimizer steps after {listed([str(a) for a in actual])} micro-batches"
            + (f" ({unstepped} more never stepped)" if unstepped else "")
            + f", where the whole batches are {listed([str(e) for e in expected])} "
            f"micro-batches of {k}"
        )

    def _steps(
        self, whole: Recording, accumulated: Recording, start: Dict[str, torch.Tensor], k: int
    ) -> Optional[_Finding]:
        """Compare the steps one by one: the gradient, the learning rate, and after the
        first step the weights. Float32 sums in another order make the weights of the two
        runs drift apart a little (Adam's first steps amplify it where a gradient is near 0),
        and the gradients of the steps after with them: a step's gradients may differ by
        accumulation_rtol plus DRIFT times how far the weights before it drifted, relative to
        how far they moved."""
        rtol = self.accumulation_rtol
        model = self.model_attribute
        names = list(start)
        origin = _flat(start, names)
        drift = 0.0
        first = 0
        for index, (reference, step) in enumerate(zip(whole.steps, accumulated.steps)):
            window = accumulated.backwards[first : first + step.backwards]
            first += step.backwards
            expected = _flat(reference.gradients, names)
            actual = _flat(step.gradients, names)
            error = _relative(actual, expected)
            if error > rtol + DRIFT * drift:
                return self._diagnosis(
                    index, len(whole.steps), names, expected, actual, window, k, drift
                )
            if reference.learning_rates != step.learning_rates:
                return _Finding(
                    f"optimizer step {index + 1} used the learning rate "
                    f"{listed([f'{r:.6g}' for r in step.learning_rates])}, where the whole "
                    f"batches' step {index + 1} used "
                    f"{listed([f'{r:.6g}' for r in reference.learning_rates])}: the learning "
                    "rate scheduler is stepped every micro-batch instead of every optimizer step",
                    step=index + 1,
                )
            weights, reference_weights = _flat(step.weights, names), _flat(reference.weights, names)
            if index == 0 and _relative(weights - origin, reference_weights - origin) > 10 * rtol:
                changed = next(
                    name
                    for name in names
                    if not torch.allclose(
                        step.weights[name], reference.weights[name], rtol=10 * rtol, atol=0
                    )
                )
                return _Finding(
                    f"after optimizer step 1 the weights differ ({model}.{changed} first), "
                    "although the gradient and the learning rate of the step agree (relative "
                    f"difference {error:.2g}): the update is not made as one optimizer step on "
                    "the accumulated gradient (weight decay, an average of the weights or a "
                    "manual update applied every micro-batch?)",
                    step=1,
                )
            drift = _relative(weights - origin, reference_weights - origin)
        return None

    def _diagnosis(
        self,
        index: int,
        steps: int,
        names: List[str],
        expected: torch.Tensor,
        actual: torch.Tensor,
        window: List[Any],
        k: int,
        drift: float = 0.0,
    ) -> _Finding:
        """Why the accumulated gradient of step ``index`` is not the whole batch's."""
        rtol = self.accumulation_rtol + DRIFT * drift
        r = len(window)
        step = f"optimizer step {index + 1} (of {steps})"
        partial = (
            f" (a partial window of {r} micro-{by_count(r, 'batch', 'batches')})" if r < k else ""
        )
        difference = _relative(actual, expected)
        base = (
            f"the gradient of {step}{partial} differs from the whole batch's by "
            f"{difference:.3g} relative to it (accumulation_rtol={self.accumulation_rtol:g}"
            + (f", plus {DRIFT} times the weights' drift of {drift:.2g}" if drift else "")
            + ")"
        )
        added = [_flat(backward.added, names) for backward in window]
        comparable = all(a.numel() == actual.numel() for a in added)
        if comparable and _relative(actual, torch.stack(added).sum(0)) > rtol:
            if _relative(actual, added[-1]) <= rtol:
                return _Finding(
                    f"{base}: it is the gradient of the last micro-batch alone; the gradients "
                    "are zeroed before every micro-batch (optimizer.zero_grad() inside the "
                    "accumulation loop), so the others are lost",
                    step=index + 1,
                )
            return _Finding(
                f"{base}, and it is not the sum of what the {r} micro-batches' backward passes "
                "added (gradients changed between them: clipped, rescaled or zeroed every "
                "micro-batch)",
                step=index + 1,
            )
        scale = float(actual @ expected) / float(expected @ expected)
        if _relative(actual, scale * expected) <= rtol:
            return _Finding(f"{base}: {self._scaled(scale, r, k)}", step=index + 1)
        if not comparable or r < 2:
            return _Finding(base, step=index + 1)
        basis = torch.stack(added, dim=1)
        weights = torch.linalg.lstsq(basis, expected.unsqueeze(1)).solution.squeeze(1)
        if _relative(basis @ weights, expected) > max(10 * rtol, 1e-3):
            return _Finding(
                f"the gradient of {step} differs from the whole batch's ({difference:.3g} "
                "relative to it), but the whole batch's gradient is no weighting of the "
                "micro-batches' gradients: the loss couples the samples of a batch (in-batch "
                "negatives, statistics over the batch, a load-balancing loss), which no "
                "accumulation reproduces, so a normalisation mistake cannot be told from it",
                skip=True,
                step=index + 1,
            )
        values = [float(w) for w in weights]
        return _Finding(
            f"{base}: the whole batch's gradient is the micro-batches' gradients weighted "
            f"{_shares(values)}, but the trainer weighs them {_shares([1.0] * r)}. Each "
            "micro-batch's loss is its own mean (the per-micro-batch mean, divided by k), "
            "which weighs micro-batches of different sizes equally; where the data has "
            "padding, micro-batches hold different numbers of tokens. Divide each "
            "micro-batch's summed loss by the number of tokens (or samples) in the whole "
            "window (what transformers calls num_items_in_batch)",
            step=index + 1,
        )

    @staticmethod
    def _scaled(scale: float, r: int, k: int) -> str:
        def near(value: float) -> bool:
            return abs(scale / value - 1) < 0.02

        if near(k) and r == k:
            return (
                f"it is {k} times the whole batch's (= accumulation_steps): the loss is not "
                f"divided by {k} before backward, so the accumulated gradient is the sum of "
                f"the {k} micro-batches' mean gradients"
            )
        if near(1 / k) and r == k:
            return (
                f"it is 1/{k} of the whole batch's: the loss is divided by {k} twice (in the "
                "loss and again before backward, or averaged over the window after dividing)"
            )
        if r < k and near(r / k):
            return (
                f"it is {r}/{k} of the whole batch's: the last, partial window of {r} "
                f"micro-{by_count(r, 'batch', 'batches')} divides the loss by {k}, not by "
                f"the {r} it holds"
            )
        if r < k and near(r):
            return (
                f"it is {r} times the whole batch's: the loss of the partial window of {r} "
                f"micro-{by_count(r, 'batch', 'batches')} is not divided by {r}"
            )
        return f"it is {scale:.4g} times the whole batch's"
