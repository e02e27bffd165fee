"""test_all_parameters_updated and test_finite_outputs_and_gradients: what a few training
steps on a copy of the model show."""

from __future__ import annotations

import fnmatch
from typing import Collection, Dict

import torch

from ..core.contract import check
from ..core.options import option
from ..core.paths import floating_tensors
from ..core.seeds import derived_seed
from ..core.validators import is_names
from .contract import ModelContract

__all__ = ["Training"]

#: How many optimisation steps test_all_parameters_updated trains a copy for, at most.
PARAMETER_STEPS = 3


class Training(ModelContract):
    """Every parameter trains, and nothing is NaN or infinite."""

    allowed_unchanged_parameters: Collection[str] = option(
        (), is_names, example='["decoder.unused.*"]'
    )
    """Names or glob patterns of parameters that may legitimately stay untrained."""

    # -- training ----------------------------------------------------------------------------
    @check(reads=("model", "inputs", "loss_fn", "allowed_unchanged_parameters"))
    def test_all_parameters_updated(self) -> None:
        """Check that every trainable parameter gets a gradient and changes within a few steps.

        Catches layers that never train: unused, cut off by .detach(), gated off by a factor
        that stays zero, or overwritten by forward; zero-initialised gates (ReZero, LoRA,
        zero-init BatchNorm) are no false alarm.
        """
        model = self._copy_model()
        trainable = self._trainable(model)
        if not trainable:
            self.fail(self._no_trainable_parameter())
        connected = [False] * len(trainable)
        nonzero = [False] * len(trainable)
        problems: Dict[str, str] = {}
        optimizer = torch.optim.Adam([p for _, p in trainable], lr=1e-3)
        steps = 0
        for steps in range(1, PARAMETER_STEPS + 1):
            _, grads = self._gradients(model, trainable, step=steps - 1)
            for position, ((name, parameter), grad) in enumerate(zip(trainable, grads)):
                # a sparse gradient (nn.Embedding(sparse=True)) densified: Adam takes no other
                parameter.grad = grad.to_dense() if grad is not None and grad.is_sparse else grad
                if grad is None:
                    continue
                connected[position] = True
                values = _stored_values(grad)
                if not torch.isfinite(values).all():
                    problems.setdefault(name, "gradient contains NaN or Inf")
                elif values.ne(0).any():
                    nonzero[position] = True
            if problems:  # what trains after a NaN step says nothing
                self.fail(self._untrained_message(problems, len(trainable)))
            stepped_from = [p.detach().clone() for _, p in trainable]
            optimizer.step()  # a zero-initialised gate opens here, so its inputs train next
            if all(nonzero[i] or self._allowed(name) for i, (name, _) in enumerate(trainable)):
                break
        # One more forward pass: an update that forward undoes never trains anything.
        stepped_to = [p.detach().clone() for _, p in trainable]
        with torch.no_grad():
            self._forward(model, self.inputs, training=True, seed=derived_seed(self.seed, steps))
        for position, (name, parameter) in enumerate(trainable):
            if self._allowed(name):
                continue
            if not connected[position]:
                problems[name] = (
                    f"no gradient in {steps} step(s): dead, not connected to the "
                    "loss (unused in forward, cut off by "
                    ".detach()/.data/torch.no_grad(), or in a reentrant checkpoint whose "
                    "input needs no gradient)"
                )
            elif not nonzero[position]:
                problems[name] = (
                    f"gradient exactly zero in each of {steps} steps: gated off "
                    "by something that stays zero (a frozen zero-initialised "
                    "gate or scale, a mask, a ReLU that is dead for the whole "
                    "batch)"
                )
            elif not torch.equal(stepped_to[position], stepped_from[position]) and torch.equal(
                parameter.detach(), stepped_from[position]
            ):
                problems[name] = (
                    "the optimisation step is undone by the next forward pass, "
                    "which overwrites the value (through .data, or in place "
                    "under torch.no_grad())"
                )
        if problems:
            self.fail(self._untrained_message(problems, len(trainable)))

    @staticmethod
    def _untrained_message(problems: Dict[str, str], trainable: int) -> str:
        return (
            f"{len(problems)} of {trainable} trainable parameters would not be trained "
            f"(a copy of the model was trained for up to {PARAMETER_STEPS} Adam steps on "
            "self.inputs):\n  "
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
        zero, an overflowing exp).
        """
        model = self._copy_model()
        trainable = self._trainable(model)
        output, grads = self._gradients(model, trainable)
        bad_outputs = [
            f"{path} ({int((~torch.isfinite(t)).sum())} of {t.numel()} values)"
            for path, t in floating_tensors(output)
            if not torch.isfinite(t).all()
        ]
        if bad_outputs:
            self.fail(
                f"the model's outputs contain NaN or Inf: {', '.join(bad_outputs)}. Look "
                "for log/sqrt/division of values that can be zero or negative, or exp "
                "overflow."
            )
        bad_grads = [
            name
            for (name, _), grad in zip(trainable, grads)
            if grad is not None and not torch.isfinite(_stored_values(grad)).all()
        ]
        if bad_grads:
            self.fail(
                f"the gradients of {', '.join(bad_grads)} contain NaN or Inf although "
                "the outputs are finite. Look for sqrt/log/pow at zero or division by "
                "a small number in forward."
            )

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


def _stored_values(tensor: torch.Tensor) -> torch.Tensor:
    """The values a tensor stores: of a sparse gradient (nn.Embedding(sparse=True)), its
    non-zero entries, on which elementwise tests such as ``ne`` have no kernel."""
    return tensor.coalesce().values() if tensor.is_sparse else tensor
