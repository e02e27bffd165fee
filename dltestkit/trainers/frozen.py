"""test_frozen_parameters: training leaves the frozen parameters alone and changes the rest."""

from __future__ import annotations

import fnmatch
from typing import Any, Collection, Dict, List, Optional

import torch
from torch import nn

from ..core.contract import check
from ..core.messages import by_count, listed
from ..core.options import option
from ..core.validators import is_names
from .setup import SetUpTrainer

__all__ = ["FrozenParameters"]

#: The most epochs test_frozen_parameters trains: one, unless a parameter behind a
#: zero-initialised gate (LoRA's A, ReZero) can only change once the gate has trained.
FROZEN_EPOCHS = 3


class FrozenParameters(SetUpTrainer):
    """What trains and what stays frozen."""

    frozen_parameters: Collection[str] = option((), is_names, example='["backbone.*"]')
    """Names or glob patterns of the model's parameters that training must leave exactly unchanged.

    Names as in `model.named_parameters()`. Every other parameter must change."""

    @check(
        reads=(
            "trainer",
            "frozen_parameters",
            "model_attribute",
            "optimizer_attribute",
            "writer_attribute",
        )
    )
    def test_frozen_parameters(self) -> None:
        """Check that training leaves ``frozen_parameters`` bitwise unchanged and changes
        every other parameter.

        Catches a layer frozen by accident (left at requires_grad=False, or missing from an
        optimizer built before it was unfrozen), and a frozen layer that still trains (its
        gradient zeroed but weight decay or momentum still moving it).
        """
        model = self._model(self.trainer)
        names = [name for name, _ in model.named_parameters()]
        patterns = list(self.frozen_parameters)
        unmatched = [
            pattern
            for pattern in patterns
            if not any(fnmatch.fnmatchcase(name, pattern) for name in names)
        ]
        if unmatched:
            raise self._contract_error(
                "frozen_parameters",
                f"has {unmatched}, which "
                f"{by_count(len(unmatched), 'matches', 'match')} no parameter of "
                f"trainer.{self.model_attribute} (its parameters: {listed(names, 6)})",
            )
        frozen = {
            name
            for name in names
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)
        }
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        epochs = 0
        changed: Dict[str, bool] = {}
        while epochs < FROZEN_EPOCHS:
            self.trainer.train(1)
            epochs += 1
            model = self._model(self.trainer)
            changed = {
                name: not torch.equal(p.detach(), before[name])
                for name, p in model.named_parameters()
                if name in before
            }
            if any(changed.get(name) for name in frozen) or all(
                changed[name] for name in changed if name not in frozen
            ):
                break
        parameters = dict(model.named_parameters())
        optimizer = self._optimizer(self.trainer)
        reasons: Dict[str, List[str]] = {}  # what is wrong -> the parameters it is wrong for
        for name in names:
            if name in frozen and changed.get(name):
                reason = self._frozen_but_changed(parameters[name], optimizer)
            elif name not in frozen and not changed.get(name, True):
                reason = self._trainable_but_unchanged(parameters[name], optimizer)
            else:
                continue
            reasons.setdefault(reason, []).append(name)
        if reasons:
            count = sum(len(group) for group in reasons.values())
            self.fail(
                f"after {epochs} epoch{'s' if epochs > 1 else ''} of trainer.train(1), "
                f"{count} of {len(names)} parameters of trainer.{self.model_attribute} did not "
                "do what frozen_parameters says (listed there: unchanged; all others: "
                "changed):\n  "
                + "\n  ".join(f"{listed(group, 4)}: {reason}" for reason, group in reasons.items())
                + "\nFreeze with p.requires_grad_(False) before building the optimizer, build "
                "the optimizer after freezing and unfreezing, and list in frozen_parameters "
                "exactly the parameters that must not train."
            )

    def _group(self, parameter: nn.Parameter, optimizer: Any) -> Optional[Dict[str, Any]]:
        """The optimizer's param group that holds ``parameter``, if any."""
        for group in getattr(optimizer, "param_groups", ()):
            if any(p is parameter for p in group["params"]):
                return dict(group)
        return None

    def _frozen_but_changed(self, parameter: nn.Parameter, optimizer: Any) -> str:
        if not parameter.requires_grad:
            return (
                "frozen (requires_grad=False) but changed: by a gradient from before the "
                "freezing, which the optimizer still applies, or by a direct write (an "
                "in-place update under torch.no_grad(), .data)"
            )
        group = self._group(parameter, optimizer) or {}
        movers = [f"{key}={group[key]}" for key in ("weight_decay", "momentum") if group.get(key)]
        moved = (
            f"; the optimizer's param group has {' and '.join(movers)}, which "
            f"{by_count(len(movers), 'moves', 'move')} a parameter even when its "
            "gradient is zeroed"
            if movers
            else ""
        )
        return (
            "listed in frozen_parameters but changed: requires_grad is True, so the "
            f"optimizer updates it{moved}"
        )

    def _trainable_but_unchanged(self, parameter: nn.Parameter, optimizer: Any) -> str:
        if not parameter.requires_grad:
            return (
                "unchanged, with requires_grad=False: frozen by accident (unfreeze with "
                "p.requires_grad_(True) before building the optimizer, or list in "
                "frozen_parameters what is meant to be frozen)"
            )
        if optimizer is not None and self._group(parameter, optimizer) is None:
            return (
                f"unchanged: not in trainer.{self.optimizer_attribute}'s param groups, so "
                "a gradient but no update: the optimizer was built before the layer was "
                "unfrozen, or from a filtered parameter list"
            )
        if parameter.grad is None:
            return (
                "unchanged, without a gradient after training: not connected to the loss "
                "(unused in forward, or cut off by .detach()); "
                "ModelTests.test_all_parameters_updated says where"
            )
        return (
            "unchanged although trainable and in the optimizer: a zero gradient (gated off "
            "by something that stays zero, a dead ReLU), a learning rate of 0, or no "
            "optimizer step in the epoch (gradients accumulated over more batches than it "
            "has)"
        )
