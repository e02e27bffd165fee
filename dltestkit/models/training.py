"""test_all_parameters_updated and test_finite_outputs_and_gradients: what a few training
steps on a copy of the model show."""

from __future__ import annotations

import fnmatch
from typing import Any, Collection, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from ..core.compare import dense
from ..core.contract import check
from ..core.messages import listed
from ..core.options import option
from ..core.paths import floating_tensors, map_tensors
from ..core.seeds import derived_seed
from ..core.validators import is_names
from ..core.watch import watching
from .contract import ModelContract
from .infinities import InfinityWatch
from .norm_calls import Degenerate, TrainingForward
from .passes import GradientSummary, TrainingPass

__all__ = ["Training"]

#: How many optimisation steps test_all_parameters_updated trains a copy for, at most.
PARAMETER_STEPS = 3
#: How far a step moves each element of a parameter (Adam's first step at its default rate).
STEP_SIZE = 1e-3
#: How a parameter whose gradient stayed exactly zero is reported (and found again).
_GATED = "gradient exactly zero"
#: How many elements of a parameter a step updates at a time (the memory it needs besides).
_CHUNK = 1 << 16


class Training(ModelContract):
    """Every parameter trains, and nothing is NaN or infinite."""

    allowed_unchanged_parameters: Collection[str] = option(
        (), is_names, example='["decoder.unused.*"]'
    )
    """Names or glob patterns of parameters that may legitimately stay untrained."""

    # -- training ----------------------------------------------------------------------------
    @check(reads=("model", "inputs", "unbatched_inputs", "loss_fn", "allowed_unchanged_parameters"))
    def test_all_parameters_updated(self) -> None:
        """Check that every trainable parameter gets a gradient and changes within a few steps.

        Catches layers that never train: unused, cut off by .detach(), gated off by a factor
        that stays zero, or overwritten by forward; zero-initialised gates (ReZero, LoRA,
        zero-init BatchNorm) are no false alarm, nor is attention over a single position at a
        small input (a skipped part naming the call).

        Each step moves every parameter that has a gradient by Adam's first step (the
        learning rate against the sign of the gradient), without an optimizer's state, which
        would take twice the model's memory. Where the first forward pass writes a parameter
        (in place, through .data), the value before a step is kept in the memory of the
        gradient that made it, so that the check needs the copy and one set of gradients
        besides the model, and a forward pass after the last step shows whether it undoes it.
        """
        state: Dict[str, Any] = {}

        def first_step() -> TrainingPass:
            state["model"] = model = self._copy_model()
            state["trainable"] = trainable = self._trainable(model)
            first, state["grads"] = self._first_step_on(model, trainable)
            return first

        # (the first step is the training pass the other checks share)
        first = self._shared_training_pass(first_step, recompute=True)
        summaries = first.gradients
        model, trainable = state["model"], state["trainable"]
        grads: List[Optional[torch.Tensor]] = state.pop("grads")
        if not trainable:
            self.fail(self._no_trainable_parameter())
        connected = [False] * len(trainable)
        nonzero = [False] * len(trainable)
        problems: Dict[str, str] = {}
        before: Dict[int, torch.Tensor] = {}  # the values a step moved, before it

        def undone() -> None:
            """After the forward pass that follows a step: a parameter the step moved that
            is back at its value before the step was overwritten by that forward pass."""
            for position, value in before.items():
                name, parameter = trainable[position]
                if torch.equal(parameter.detach(), value):
                    problems.setdefault(
                        name,
                        "the optimisation step is undone by the next forward pass, which "
                        "overwrites the value (through .data, or in place under "
                        "torch.no_grad())",
                    )
            before.clear()

        # A forward pass that writes no parameter (the first step's shows it, as most do)
        # cannot undo a step: the values before each step are kept only for one that does.
        watched = first.forward is None or bool(first.forward.written_parameters)
        steps = 1
        while True:
            for position, ((name, _), summary) in enumerate(zip(trainable, summaries)):
                if not summary.connected:
                    continue
                connected[position] = True
                if not summary.finite:
                    problems.setdefault(name, "gradient contains NaN or Inf")
                elif summary.nonzero:
                    nonzero[position] = True
            if any(text == "gradient contains NaN or Inf" for text in problems.values()):
                self.fail(self._untrained_message(problems, len(trainable)))
            # a zero-initialised gate opens here, so its inputs train next
            for position, (_, parameter) in enumerate(trainable):
                moved_from = _step(parameter, grads[position], keep=watched)
                if moved_from is not None:
                    before[position] = moved_from
            del grads
            if steps == PARAMETER_STEPS or all(
                nonzero[i] or self._allowed(name) for i, (name, _) in enumerate(trainable)
            ):
                break
            _, _, grads = self._training_step(model, trainable, step=steps, after_forward=undone)
            summaries = tuple(GradientSummary.of(grad) for grad in grads)
            steps += 1
        # One more forward pass: an update that forward undoes never trains anything (on two
        # samples: whether forward overwrites a parameter does not depend on the batch).
        if watched:
            with torch.no_grad():
                self._on_few_samples(
                    lambda inputs: self._forward(
                        model, inputs, training=True, seed=derived_seed(self.seed, steps)
                    ),
                    count=2,
                )
            undone()
        for position, (name, _) in enumerate(trainable):
            if self._allowed(name) or name in problems:
                continue
            if not connected[position]:
                problems[name] = (
                    f"no gradient in {steps} step(s): dead, not connected to the "
                    "loss (unused in forward, or used only with an input that self.inputs "
                    "leaves out, as a mask token with a pretraining mask; cut off by "
                    ".detach()/.data/torch.no_grad(); or in a reentrant checkpoint whose "
                    "input needs no gradient)"
                )
            elif not nonzero[position]:
                problems[name] = (
                    f"{_GATED} in each of {steps} steps: gated off "
                    "by something that stays zero (a frozen zero-initialised "
                    "gate or scale, a mask, a ReLU that is dead for the whole "
                    "batch, or a computation that cancels at the inputs' size: a "
                    "pooling over a single position minus its input)"
                )
        problems = {
            name: problems[name] for name, _ in trainable if name in problems
        }  # in the model's order
        problems = self._degenerate_at_this_size(problems, first.forward)
        problems = self._cancelling_at_this_size(problems)
        if problems:
            self.fail(self._untrained_message(problems, len(trainable)))

    def _degenerate_at_this_size(
        self, problems: Dict[str, str], forward: Optional[TrainingForward]
    ) -> Dict[str, str]:
        """The problems but the exactly zero gradients that a call degenerate at the inputs'
        size may explain (a softmax over a single attention position, in the parameter's
        module or one around it), which are reported as a skipped part naming the call: at a
        larger input they may train, and whether they would cannot be told at this one."""
        calls = forward.degenerate if forward is not None else ()
        explained: Dict[str, Degenerate] = {}
        for name, text in problems.items():
            found = next((call for call in calls if call.explains(name)), None)
            if found is not None and text.startswith(_GATED):
                explained[name] = found
        if explained:
            # one entry per line of code: a stage of several blocks makes the same call
            by_line: Dict[Tuple[str, str, str], Tuple[List[str], List[str]]] = {}
            for name, call in explained.items():
                modules, names = by_line.setdefault(
                    (call.operation, call.location, call.what), ([], [])
                )
                if call.module not in modules:
                    modules.append(call.module)
                names.append(name)
            self._skip_part(
                "zero gradients at this input size",
                "exactly zero gradients at the size of self.inputs, in every step, of "
                f"{len(explained)} parameters of modules that make a call whose input gets "
                "none at that size: "
                + "; ".join(
                    f"{operation} at {location} ({what}), in {listed(modules, 2)}, for "
                    f"{listed(names, 4)}"
                    for (operation, location, what), (modules, names) in by_line.items()
                )
                + ". At a larger input they may train (a softmax over one attention position "
                "is 1 whatever the query and key), so this is not judged; check them with "
                "inputs large enough for every stage of the model. If the size-1 dimension is "
                "not meant (a softmax over the wrong dimension), that is the bug.",
            )
        return {name: text for name, text in problems.items() if name not in explained}

    def _cancelling_at_this_size(self, problems: Dict[str, str]) -> Dict[str, str]:
        """The problems but the exactly zero gradients that one training pass on images
        twice as large shows non-zero: the model computes something that cancels at the
        inputs' size (PoolFormer's token mixer, a pooling minus its input, over the single
        position of its last stage), reported as a skipped part naming both sizes. Only for
        inputs with images (``_larger_images``) and a model that runs on the larger ones."""
        zero = [name for name, text in problems.items() if text.startswith(_GATED)]
        larger = self._larger_images() if zero else None
        if larger is None:
            return problems
        model = self._copy_model()
        trainable = self._trainable(model)
        try:
            _, _, grads = self._training_step(model, trainable, inputs=larger[0])
        except Exception:  # (a model made for one image size: the failure stands)
            return problems
        trains = [
            name
            for (name, _), grad in zip(trainable, grads)
            if name in zero and grad is not None and bool(torch.nan_to_num(grad).ne(0).any())
        ]
        if trains:
            self._skip_part(
                "zero gradients at this input size",
                f"exactly zero gradients at the size of self.inputs ({larger[1]}), in every "
                f"step, of {len(trains)} parameters ({listed(trains, 4)}), which get "
                f"gradients on images twice as large ({larger[2]}): the model computes "
                "something that cancels at this size (a pooling over a single position "
                "minus its input, as PoolFormer's token mixer in a stage that the images "
                "have shrunk to one position), so this is not judged; check them with inputs "
                "large enough for every stage of the model.",
            )
        return {name: text for name, text in problems.items() if name not in trains}

    def _larger_images(self) -> Optional[Tuple[Any, str, str]]:
        """self.inputs with every image (a floating-point tensor of 4 or 5 dimensions,
        batch first) interpolated to twice its height and width (and depth), with the sizes
        before and after in words; None where self.inputs holds no image."""
        batch, sizes = self._batch_size(), []

        def grown(tensor: torch.Tensor) -> torch.Tensor:
            if not (tensor.is_floating_point() and tensor.dim() in (4, 5) and len(tensor) == batch):
                return tensor
            larger = F.interpolate(
                tensor.detach(),
                scale_factor=2.0,
                mode="bilinear" if tensor.dim() == 4 else "trilinear",
                align_corners=False,
            )
            sizes.append((tensor.shape[2:], larger.shape[2:]))
            return larger.requires_grad_(tensor.requires_grad)

        inputs = map_tensors(grown, self.inputs)
        if not sizes:
            return None
        before, after = (" x ".join(map(str, shape)) for shape in sizes[0])
        return inputs, f"images of {before}", after

    @staticmethod
    def _untrained_message(problems: Dict[str, str], trainable: int) -> str:
        return (
            f"{len(problems)} of {trainable} trainable parameters would not be trained "
            f"(a copy of the model was trained for up to {PARAMETER_STEPS} steps on "
            f"self.inputs, each moving every parameter by Adam's first step, {STEP_SIZE} "
            "against the sign of its gradient):\n  "
            + "\n  ".join(f"{name}: {text}" for name, text in problems.items())
            + "\nParameters behind a zero-initialised gate (ReZero, layer scale, LoRA's B, "
            "a zero-init BatchNorm weight) get their first gradient once the gate has "
            "trained, so they pass. Use every layer in forward and do not detach on the way "
            "to the output; if a parameter may legitimately stay untouched (an expert that "
            "this batch does not route to), list it in self.allowed_unchanged_parameters."
        )

    @check(reads=("model", "inputs", "loss_fn"))
    def test_finite_outputs_and_gradients(self) -> None:
        """Check that the outputs and every parameter's gradient contain no NaN or Inf.

        Catches NaN or Inf in the outputs or in any gradient (a log or sqrt at or below
        zero, an overflowing exp), naming the operation that made them. Infinities that the
        model's code places itself (masked_fill(mask, float("-inf")): masked logits) are
        a design, not a failure, where no operation makes any from finite values.
        """
        first = self._training_pass()
        bad_outputs = [
            f"{path} ({int((~torch.isfinite(t)).sum())} of {t.numel()} values)"
            for path, t in floating_tensors(first.output)
            if not torch.isfinite(t).all()
        ]
        if bad_outputs:
            seen = self._non_finite_origins()
            if seen.made or not seen.placed or self._has_nan(first.output):
                made = (
                    f" The first operation that made them from finite values: "
                    f"{seen.made[0].where} ({seen.made[0].what})."
                    if seen.made
                    else ""
                )
                self.fail(
                    f"the model's outputs contain NaN or Inf: {', '.join(bad_outputs)}.{made} "
                    "Look for log/sqrt/division of values that can be zero or negative, or "
                    "exp overflow."
                )
        bad_grads = [
            name
            for name, gradient in zip(first.names, first.gradients)
            if gradient.connected and not gradient.finite
        ]
        if bad_grads:
            self.fail(
                f"the gradients of {', '.join(bad_grads)} contain NaN or Inf although "
                "the outputs are finite. Look for sqrt/log/pow at zero or division by "
                "a small number in forward."
            )

    @staticmethod
    def _has_nan(output: Any) -> bool:
        return any(bool(torch.isnan(t).any()) for _, t in floating_tensors(output))

    def _non_finite_origins(self) -> InfinityWatch:
        """The training pass's forward again (a copy of the model, the same seed), watched
        for the operations that make non-finite values or place infinities."""
        model = self._copy_model()
        with torch.no_grad(), watching(model, InfinityWatch) as watch:
            self._forward(model, self.inputs, training=True, seed=derived_seed(self.seed, 0))
        return watch

    def _allowed(self, name: str) -> bool:
        return any(
            fnmatch.fnmatchcase(name, pattern) for pattern in self.allowed_unchanged_parameters
        )

    def _no_trainable_parameter(self) -> str:
        return (
            "the model has no trainable parameter (every parameter has "
            "requires_grad=False, or there is none): it cannot learn. Unfreeze the layers "
            "that should train (p.requires_grad_(True)), or skip this check for a model "
            "that is never trained"
        )


def _step(
    parameter: torch.Tensor, grad: Optional[torch.Tensor], keep: bool = True
) -> Optional[torch.Tensor]:
    """Move ``parameter`` in place by Adam's first step (``STEP_SIZE`` against the sign of
    ``grad``); with ``keep``, return its value before the step, kept in ``grad``'s memory, if
    it moved (None without a gradient or when the step changed nothing); None without."""
    if grad is None:
        return None
    grad = dense(grad)  # nn.Embedding(sparse=True)
    value = parameter.detach()
    with torch.no_grad():
        if not keep:  # (nothing to return: whether it moved is not needed)
            value.add_(grad.sign_(), alpha=-STEP_SIZE)
            moved = False
        elif not (value.is_contiguous() and grad.is_contiguous()):
            previous = value.clone()
            value.add_(grad.sign_(), alpha=-STEP_SIZE)
            moved = not torch.equal(value, previous)
            grad.copy_(previous)
        else:  # a part at a time: no copy of a large parameter, and the part stays in cache
            moved = False
            flat_value, flat_grad = value.view(-1), grad.view(-1)
            for start in range(0, flat_value.numel(), _CHUNK):
                new, kept = flat_value[start : start + _CHUNK], flat_grad[start : start + _CHUNK]
                previous = new.clone()
                new.add_(kept.sign_(), alpha=-STEP_SIZE)
                moved = moved or not torch.equal(new, previous)
                kept.copy_(previous)
    parameter.grad = None
    return grad if moved else None
