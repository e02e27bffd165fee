"""test_frozen_parameters: training leaves the frozen parameters alone and changes the rest."""

from __future__ import annotations

import contextlib
import copy
import fnmatch
from typing import Any, Collection, Dict, Iterator, List, Optional, Set, Tuple

import torch
from torch import nn

from ..core.compare import mismatch
from ..core.contract import check
from ..core.messages import by_count, listed
from ..core.options import option
from ..core.paths import floating_tensors, map_tensors
from ..core.seeds import all_generators_seeded
from ..core.validators import is_names
from .setup import SetUpTrainer

__all__ = ["FrozenParameters"]

#: The most epochs test_frozen_parameters trains: one, unless a parameter behind a
#: zero-initialised gate (LoRA's A, ReZero) can only change once the gate has trained.
FROZEN_EPOCHS = 3

#: By how much (relative to the largest output) test_frozen_parameters lets a training-mode
#: output differ when it changes an unchanged parameter and still calls the output independent
#: of it: rounding, far above float32's (a normalisation subtracting a shifted mean), far below
#: what a parameter the output uses changes when moved by its own magnitude plus one.
INDEPENDENT = 1e-4

#: A module's call: its positional and keyword arguments.
_Call = Tuple[Tuple[Any, ...], Dict[str, Any]]


@contextlib.contextmanager
def watched_training(model: nn.Module) -> Iterator[Tuple[Dict[str, _Call], Set[str]]]:
    """While the block runs: the arguments of the last forward call in training mode with
    gradients of the model and of each of its modules (by name, "" for the model), and the
    names of the parameters that a backward pass computed a gradient for (whatever the trainer
    does with it after)."""
    calls: Dict[str, _Call] = {}
    computed: Set[str] = set()

    def noting(name: str) -> Any:
        def note(module: nn.Module, args: Any, kwargs: Any) -> None:
            if module.training and torch.is_grad_enabled():
                calls[name] = (tuple(args), dict(kwargs))

        return note

    def computing(name: str) -> Any:
        def hook(gradient: torch.Tensor) -> None:
            computed.add(name)

        return hook

    with contextlib.ExitStack() as stack:
        for name, module in model.named_modules():
            try:
                handle = module.register_forward_pre_hook(noting(name), with_kwargs=True)
            except RuntimeError:  # a ScriptModule takes no hooks: its calls are not kept
                continue
            stack.callback(handle.remove)
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                stack.callback(parameter.register_hook(computing(name)).remove)  # type: ignore[no-untyped-call]
        yield calls, computed


def enclosing(parameter: str) -> List[str]:
    """The names of the modules that hold the parameter ``parameter``, from the one that
    holds it directly (excluded) up to the model ("")."""
    parts = parameter.split(".")[:-1]
    return [".".join(parts[:depth]) for depth in range(len(parts) - 1, -1, -1)]


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
        before = {  # (a parameter of no element cannot change)
            name: p.detach().clone() for name, p in model.named_parameters() if p.numel()
        }
        epochs = 0
        changed: Dict[str, bool] = {}
        with watched_training(model) as (calls, computed):
            while epochs < FROZEN_EPOCHS:
                self.trainer.train(1)
                epochs += 1
                changed = self._changed(before)
                if any(changed.get(name) for name in frozen) or all(
                    changed[name] for name in changed if name not in frozen
                ):
                    break
        model = self._model(self.trainer)
        parameters = dict(model.named_parameters())
        optimizer = self._optimizer(self.trainer)
        reasons: Dict[str, List[str]] = {}  # what is wrong -> the parameters it is wrong for
        for name in names:
            if name in frozen and changed.get(name):
                reason = self._frozen_but_changed(parameters[name], optimizer)
            elif name not in frozen and not changed.get(name, True):
                reason = self._trainable_but_unchanged(
                    parameters[name], optimizer, name in computed
                )
            else:
                continue
            reasons.setdefault(reason, []).append(name)
        stuck = reasons.pop(_STUCK, [])
        if stuck:
            cancelled = [name for name in stuck if self._cancelled(model, name, calls)]
            if cancelled:
                self._skip_part(
                    "parameters cancelled in training mode",
                    f"{listed(cancelled, 4)} did not change in {epochs} epochs of training, "
                    "and the training-mode output of the module that holds "
                    f"{'it' if len(cancelled) == 1 else 'them'} does not depend on "
                    f"{'it' if len(cancelled) == 1 else 'them'} (its eval-mode output does): "
                    "changed by their own magnitude plus one, on the last training batch, no "
                    f"training-mode output moved by more than {INDEPENDENT:g} of its largest "
                    "value, so their gradient is zero but for rounding, and no trainer can "
                    "train them. A bias right before a normalisation over the batch (BatchNorm "
                    "in training mode) is cancelled by it: give that layer bias=False.",
                )
            stuck = [name for name in stuck if name not in cancelled]
        if stuck:
            reasons[_STUCK] = stuck
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

    def _trainable_but_unchanged(
        self, parameter: nn.Parameter, optimizer: Any, computed: bool
    ) -> str:
        """Why a trainable parameter did not change; ``computed``: whether a backward pass
        computed a gradient for it in the training."""
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
        if parameter.grad is None and not computed:
            return (
                "unchanged, without a gradient in training: not connected to the loss "
                "(unused in forward, or cut off by .detach()); "
                "ModelTests.test_all_parameters_updated says where"
            )
        return _STUCK

    def _changed(self, before: Dict[str, torch.Tensor]) -> Dict[str, bool]:
        """Which of the parameters in ``before`` the model holds changed."""
        return {
            name: not torch.equal(p.detach(), before[name])
            for name, p in self._model(self.trainer).named_parameters()
            if name in before
        }

    def _cancelled(self, model: nn.Module, name: str, calls: Dict[str, _Call]) -> bool:
        """Whether the parameter ``name`` is used in eval mode but cancelled in training mode
        (a normalisation over the batch subtracts it, where eval mode's running mean does
        not): judged on the innermost module that holds it, above the one that holds it
        directly, whose training-mode output, on its last training call, does not depend on
        it. One that neither mode uses there (multiplied by a zero) is not."""
        modules = dict(model.named_modules())
        for holder in enclosing(name):
            if holder not in calls:
                continue
            module, local = modules[holder], name[len(holder) + 1 :] if holder else name
            if self._output_ignores(module, local, calls[holder], training=True):
                return not self._output_ignores(module, local, calls[holder], training=False)
        return False

    def _output_ignores(self, model: nn.Module, name: str, call: _Call, training: bool) -> bool:
        """Whether the output of ``model`` in training or eval mode on the arguments of
        ``call`` stays the same (within INDEPENDENT of its largest value) when the parameter
        ``name`` is moved by its own magnitude plus one; on copies, under one seed (dropout's
        masks alike)."""
        args, kwargs = call
        outputs = []
        try:
            for moved in (False, True):
                twin = copy.deepcopy(model).train(training)
                with torch.no_grad(), all_generators_seeded(self.seed):
                    if moved:
                        parameter = dict(twin.named_parameters())[name]
                        step = torch.randn(
                            parameter.shape, generator=torch.Generator().manual_seed(0)
                        )
                        parameter.add_(step.to(parameter) * (parameter.abs().max() + 1))
                    copied = map_tensors(lambda t: t.detach().clone(), (args, kwargs))
                    outputs.append(floating_tensors(twin(*copied[0], **copied[1])))
        except Exception:  # a model that cannot be copied or called so: nothing shown
            return False
        (plain, moved_outputs) = outputs
        if not plain or [path for path, _ in plain] != [path for path, _ in moved_outputs]:
            return False
        return all(
            mismatch(b, a, rtol=0.0, atol=INDEPENDENT * max(_largest(a), 1e-12)) is None
            for (_, a), (_, b) in zip(plain, moved_outputs)
        )


def _largest(tensor: torch.Tensor) -> float:
    """The largest magnitude in ``tensor`` (0 when it is empty)."""
    return float(tensor.detach().abs().max()) if tensor.numel() else 0.0


#: Why a trainable parameter in the optimizer, with a gradient, did not change.
_STUCK = (
    "unchanged although trainable and in the optimizer: a zero gradient (gated off "
    "by something that stays zero, a dead ReLU), a learning rate of 0, or no "
    "optimizer step in the epoch (gradients accumulated over more batches than it "
    "has)"
)
