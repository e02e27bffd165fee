"""test_mixed_precision: a trainer's loss scaling and its bfloat16 autocast train as float32
does.

Two parts, each enabled by a keyword argument make_trainer takes:

- ``grad_scale``: two trainers with a ``GradScaler`` whose scale starts at 1 and at 2**16. In
  float32 (and bfloat16) multiplying a loss by a power of two and dividing its gradients by it
  again is exact, so the optimizer must see the same gradients and make the same steps: what
  differs is a gradient clipped before ``unscale_``, a step on the scaled gradients that
  bypasses ``scaler.step``, or (it raises on the second step) an ``update()`` never called.
- ``precision="bf16"``: one epoch under bfloat16 autocast must be finite, and its first loss
  must be the float32 trainer's within what bfloat16's precision allows.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Dict, List, Optional, Tuple

import torch

from ..core.contract import check
from ..core.messages import listed
from ..core.options import ContractError, option
from ..core.validators import is_non_negative_number, optional
from .contract import TrainerContract
from .expectation import expected_randomness
from .recording import Recording, recording

__all__ = ["MixedPrecision"]

#: The loss scales compared: 1 and the default initial scale of torch.amp.GradScaler.
SCALES = (1.0, 2.0**16)
#: The first bfloat16 loss may differ from float32's by this many times bfloat16's eps, or by
#: ROUNDING_FACTOR times the change that rounding the weights to bfloat16 makes in float32
#: (deep networks normalising small batches amplify bfloat16's rounding: EfficientNet-B0 on
#: two images changes its first loss by 10% under autocast, 1.4% with rounded weights).
EPS_FACTOR = 4
ROUNDING_FACTOR = 16


def _flat(gradients: Dict[str, torch.Tensor], names: List[str]) -> torch.Tensor:
    return torch.cat([gradients[n].flatten() for n in names if n in gradients] or [torch.zeros(0)])


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = float(b.norm())
    difference = float((a - b).norm())
    return difference / scale if scale else (0.0 if difference == 0 else math.inf)


class MixedPrecision(TrainerContract):
    """Loss scaling and bfloat16 autocast train as float32 does."""

    _suite: ClassVar[str] = "TrainerTests"
    mixed_precision_rtol: Optional[float] = option(
        None, optional(is_non_negative_number), example="0.05"
    )
    """The relative tolerance comparing the first loss of a bfloat16 trainer with a float32
    one's.

    `None`: derived from bfloat16 and the model: 4 times bfloat16's machine epsilon
    (`torch.finfo(torch.bfloat16).eps`, 2**-7: about 3%), or 16 times the relative change of
    float32's first loss when the weights are rounded to bfloat16, whichever is larger (a deep
    network normalising small batches amplifies bfloat16's rounding). Loss scales 1 and 2**16
    are compared exactly: scaling by a power of two is exact."""

    @check(
        reads=(
            "make_trainer",
            "mixed_precision_rtol",
            "model_attribute",
            "writer_attribute",
            "trainer",
        )
    )
    def test_mixed_precision(self) -> None:
        """Check that a trainer with a ``GradScaler`` steps alike at loss scales 1 and 2**16,
        and that a bfloat16 autocast epoch is finite and starts at float32's loss.

        Catches mixed-precision training that silently trains otherwise: gradients clipped
        before ``scaler.unscale_`` (so the clipping threshold is divided by the scale), an
        ``optimizer.step()`` that bypasses ``scaler.step`` (the scaled gradients applied, no
        step skipped on overflow), ``scaler.update()`` never called, and a bfloat16 path that
        gives NaN or Inf or a loss far from float32's.
        """
        self._get_or_skip("make_trainer")
        scaler = self._refused(grad_scale=SCALES[1])
        bfloat16 = self._refused(precision="bf16") or self._refused(precision="32")
        if scaler and bfloat16:
            self.skipTest(
                f"{scaler} or precision: give it grad_scale=None (a GradScaler whose scale "
                'starts at that value when it is not None) or precision="32" ("bf16": '
                "bfloat16 autocast) to enable this check"
            )
        if scaler:
            self._skip_part(
                "loss scaling",
                f"{scaler}; give it grad_scale=None, and build with grad_scale=s a trainer "
                "whose torch.amp.GradScaler starts at scale s (init_scale=s), to compare "
                "loss scales",
            )
        else:
            with self.subTest(part="loss scaling"):
                self._loss_scaling()
        if bfloat16:
            self._skip_part(
                "bfloat16",
                f'{bfloat16}; give it precision="32", and build with precision="bf16" a '
                "trainer that trains under bfloat16 autocast, to compare it with float32",
            )
        else:
            with self.subTest(part="bfloat16"):
                self._bfloat16()

    # -- loss scaling -------------------------------------------------------------------------
    def _scaled_run(self, scale: float) -> Tuple[Recording, Optional[str]]:
        trainer = self._new_trainer(self.seed, grad_scale=scale)
        error = None
        with recording(self._model(trainer), precision=True) as record:
            try:
                self._train(trainer, 2)
            except RuntimeError as exc:
                if "since the last update()" not in str(exc):
                    raise
                error = str(exc)
        if not record.scales:
            raise self._contract_error(
                "make_trainer",
                f"built with grad_scale={scale:g} a trainer that never called "
                "GradScaler.scale in two epochs; with grad_scale=s it must scale its loss "
                "with a torch.amp.GradScaler(init_scale=s)",
            )
        if record.scales[0] != scale:
            raise self._contract_error(
                "make_trainer",
                f"built with grad_scale={scale:g} a trainer whose GradScaler first scaled the "
                f"loss by {record.scales[0]:g}; with grad_scale=s it must start at scale s "
                "(torch.amp.GradScaler(init_scale=s))",
            )
        return record, error

    def _loss_scaling(self) -> None:
        runs = [self._scaled_run(scale) for scale in SCALES]
        if any(error for _, error in runs):
            error = next(error for _, error in runs if error)
            cause = (
                "scaler.unscale_(optimizer) is called twice before scaler.update() (once per "
                "micro-batch, or again after the step), or update() is never called"
                if "unscale_()" in str(error)
                else "scaler.update() is not called after scaler.step(optimizer), so the scale "
                "never adapts (after an overflow every step is skipped for good) and the "
                "scaler refuses a second step"
            )
            self.fail(
                "the trainer's GradScaler raised in two epochs of training (RuntimeError: "
                f"{error}): {cause}. Per optimizer step, call scaler.unscale_(optimizer) at "
                "most once (before clipping), then scaler.step(optimizer) and scaler.update()."
            )
        (low, _), (high, _) = runs
        if torch.float16 in low.autocast | high.autocast:
            self.skipTest(
                "the trainer built with grad_scale trains under float16 autocast, where "
                "gradients underflow at scale 1 and overflow at 2**16 by design, so the two "
                "scales cannot be compared; with grad_scale, train in float32 or bfloat16 "
                "(the scaler's code path is the same)"
            )
        names = list(dict(self._model_names(low, high)))
        for index, (one, other) in enumerate(zip(low.steps, high.steps)):
            expected = _flat(one.gradients, names)
            actual = _flat(other.gradients, names)
            if _relative(actual, expected) > 1e-6:
                self.fail(self._scaling_failure(index, expected, actual))
            weights = _flat(one.weights, names)
            other_weights = _flat(other.weights, names)
            if _relative(other_weights, weights) > 1e-6:
                self.fail(
                    f"with the loss scaled by {SCALES[1]:g} instead of 1, the optimizer "
                    f"stepped on the same gradients in step {index + 1} but left other "
                    "weights: the update depends on the scale (weight decay or a manual "
                    "update on the scaled gradients?)."
                )
        if len(low.steps) != len(high.steps):
            self.fail(
                f"with the loss scaled by 1 the trainer took {len(low.steps)} optimizer "
                f"steps in two epochs, scaled by {SCALES[1]:g} {len(high.steps)}: steps "
                "skipped at one scale (gradients that overflowed) or taken without the "
                "scaler."
            )

    @staticmethod
    def _model_names(*records: Recording) -> Dict[str, None]:
        names: Dict[str, None] = {}
        for record in records:
            for step in record.steps:
                names.update(dict.fromkeys(step.gradients))
        return names

    @staticmethod
    def _scaling_failure(index: int, expected: torch.Tensor, actual: torch.Tensor) -> str:
        scale = SCALES[1]
        ratio = float(actual @ expected) / float(expected @ expected)
        proportional = _relative(actual, ratio * expected) < 1e-4
        head = (
            f"the loss scale changes training: optimizer step {index + 1} got other "
            f"gradients with the loss scaled by {scale:g} than scaled by 1 (after "
            "unscaling, they must be the same: scaling by a power of two is exact)"
        )
        if proportional and abs(ratio / scale - 1) < 1e-3:
            return (
                f"{head}: they are {scale:g} times larger, the scaled gradients themselves. "
                "The optimizer steps without the scaler (optimizer.step() instead of "
                "scaler.step(optimizer), or scaler.unscale_ never called): the scale "
                "multiplies every update, and overflowed gradients are not skipped. Step "
                "with scaler.step(optimizer), then scaler.update()."
            )
        if proportional and ratio < 1:
            clip = float(actual.norm()) * scale
            return (
                f"{head}: they point the same way but are {1 / ratio:.4g} times smaller, "
                f"with a norm of {float(actual.norm()):.3g} ({clip:.3g} before dividing by "
                f"the scale {scale:g}). The gradients are clipped while still scaled, before "
                "scaler.unscale_(optimizer), so the clipping threshold is divided by the "
                "scale. Call scaler.unscale_(optimizer) before clip_grad_norm_."
            )
        return (
            f"{head}: relative difference {_relative(actual, expected):.3g}"
            + (f", {ratio:.4g} times" if proportional else "")
            + ". Unscale with scaler.unscale_(optimizer) before anything reads the "
            "gradients (clipping, logging their norm), and step with scaler.step(optimizer)."
        )

    # -- bfloat16 -----------------------------------------------------------------------------
    def _precision_run(self, precision: str, rounded: bool = False) -> Tuple[Recording, Any]:
        """One epoch of make_trainer(precision=precision); with ``rounded``, its model's
        floating-point parameters rounded to bfloat16 first (and kept in their dtype)."""
        trainer = self._new_trainer(self.seed, precision=precision)
        model = self._model(trainer)
        if rounded:
            with torch.no_grad():
                for p in model.parameters():
                    if p.is_floating_point():
                        p.copy_(p.to(torch.bfloat16))
        with expected_randomness(), recording(model, precision=True) as record:
            self._train(trainer, 1)
        return record, trainer

    def _tolerance(self, reference: float) -> Tuple[float, str]:
        """The relative tolerance of the first bfloat16 loss, and how it was derived."""
        if self.mixed_precision_rtol is not None:
            return self.mixed_precision_rtol, f"mixed_precision_rtol={self.mixed_precision_rtol}"
        eps = torch.finfo(torch.bfloat16).eps
        rounded = next((loss for loss in self._precision_run("32", True)[0].losses), None)
        change = abs(rounded - reference) / abs(reference) if rounded is not None else 0.0
        if not math.isfinite(change):
            change = 0.0
        rtol = max(EPS_FACTOR * eps, ROUNDING_FACTOR * change)
        return rtol, (
            f"{rtol:.3g}: the larger of {EPS_FACTOR} times bfloat16's eps and "
            f"{ROUNDING_FACTOR} times the {change:.3g} relative change of float32's first loss "
            "with the weights rounded to bfloat16; mixed_precision_rtol sets it"
        )

    def _bfloat16(self) -> None:
        full, _ = self._precision_run("32")
        half, trainer = self._precision_run("bf16")
        model = self.model_attribute
        if torch.bfloat16 not in half.autocast | half.parameter_dtypes:
            seen = sorted(str(d) for d in (half.autocast - {None}) | half.parameter_dtypes)
            raise ContractError(
                f'make_trainer(precision="bf16") built a trainer whose training ran no '
                f"forward pass under bfloat16 autocast or with bfloat16 parameters (seen: "
                f'{listed(seen) or "float32, no autocast"}); with precision="bf16" '
                "make_trainer must build a trainer that trains under "
                "torch.autocast(device_type, dtype=torch.bfloat16)."
            )
        losses = [loss for loss in half.losses if loss is not None]
        if not losses:
            self.skipTest(
                'one epoch of make_trainer(precision="bf16") called backward on no single '
                "loss, so there is no loss to compare"
            )
        problems = []
        infinite = [i for i, loss in enumerate(losses) if not math.isfinite(loss)]
        if infinite:
            problems.append(
                f"{len(infinite)} of its {len(losses)} losses are not finite (the first, "
                f"{losses[infinite[0]]}, in backward call {infinite[0] + 1})"
            )
        broken = [
            name
            for name, p in self._model(trainer).named_parameters()
            if not bool(torch.isfinite(p.detach()).all())
        ]
        if broken:
            problems.append(f"after it {model}.{listed(broken, 3)} hold NaN or Inf")
        reference = next((loss for loss in full.losses if loss is not None), None)
        first = losses[0]
        if reference and math.isfinite(first) and math.isfinite(reference):
            difference = abs(first - reference) / abs(reference)
            eps = torch.finfo(torch.bfloat16).eps
            if self.mixed_precision_rtol is not None or difference > EPS_FACTOR * eps:
                rtol, derived = self._tolerance(reference)
                if difference > rtol:
                    problems.append(
                        f"its first loss is {first:.6g}, where float32's is {reference:.6g}: "
                        f"a relative difference of {difference:.3g}, more than bfloat16's "
                        f"precision allows ({derived})"
                    )
        if problems:
            self.fail(
                'one epoch under bfloat16 autocast (make_trainer(precision="bf16")) does not '
                "train as float32 does: " + "; ".join(problems) + ". Compared with "
                'make_trainer(precision="32") under the same seed, dropout off and random '
                "noise at its mean. Compute the loss in float32 (cast the logits with "
                ".float() before the loss, reduce in float32), keep the parameters and the "
                "optimizer in float32 (autocast, not model.to(torch.bfloat16)), and avoid "
                "constants bfloat16 cannot hold (eps=1e-8 added in bfloat16 is lost)."
            )
