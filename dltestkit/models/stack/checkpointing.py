"""test_activation_checkpointing: with activation checkpointing switched on, the gradients are
those without it."""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Iterator, List, Optional, Tuple

from torch import nn

from ...core.contract import check
from ...core.messages import exception_text, listed
from ...core.options import option
from ...core.validators import is_callable, optional
from .contract import StackContract, differences, gradient_differences

__all__ = ["ActivationCheckpointing"]

#: A switch: how to turn activation checkpointing on or off in a model, and its name.
Switch = Tuple[str, Callable[[nn.Module, bool], None]]


def _method_switch(
    model: nn.Module, supported: str, pairs: Tuple[Tuple[str, str], ...]
) -> Optional[Switch]:
    """A switch made of a pair of methods (enable, disable) of the model or of the first
    submodule whose attribute ``supported`` is true (the model inside a wrapper)."""
    for path, module in model.named_modules():
        if not getattr(module, supported, False):
            continue
        for enable, disable in pairs:
            if callable(getattr(module, enable, None)) and callable(getattr(module, disable, None)):

                def switch(
                    copy: nn.Module,
                    on: bool,
                    path: str = path,
                    names: Tuple[str, str] = (enable, disable),
                ) -> None:
                    getattr(copy.get_submodule(path), names[0] if on else names[1])()

                owner = f"{path} ({type(module).__name__})" if path else type(module).__name__
                return f"{owner}.{enable}()", switch
    return None


def _transformers_switch(model: nn.Module) -> Optional[Switch]:
    """transformers' switch (``activation_checkpointing_enable``, formerly
    ``gradient_checkpointing_enable``)."""
    return _method_switch(
        model,
        "supports_gradient_checkpointing",
        (
            ("activation_checkpointing_enable", "activation_checkpointing_disable"),
            ("gradient_checkpointing_enable", "gradient_checkpointing_disable"),
        ),
    )


def _diffusers_switch(model: nn.Module) -> Optional[Switch]:
    """diffusers' switch (``enable_gradient_checkpointing``) of its models (``ModelMixin``)."""
    return _method_switch(
        model,
        "_supports_gradient_checkpointing",
        (("enable_gradient_checkpointing", "disable_gradient_checkpointing"),),
    )


def _timm_switch(model: nn.Module) -> Optional[Switch]:
    """timm's switch, ``set_grad_checkpointing(enable)``, of the model."""
    if not callable(getattr(model, "set_grad_checkpointing", None)):
        return None

    def switch(copy: nn.Module, on: bool) -> None:
        copy.set_grad_checkpointing(on)  # type: ignore[operator]

    return f"{type(model).__name__}.set_grad_checkpointing(True)", switch


@contextlib.contextmanager
def _counting_forward_calls(model: nn.Module) -> Iterator[List[int]]:
    """Count the submodule forward calls while the block runs."""
    count = [0]

    def hook(*_: Any) -> None:
        count[0] += 1

    handles = [module.register_forward_pre_hook(hook) for module in model.modules()]
    try:
        yield count
    finally:
        for handle in handles:
            handle.remove()


class ActivationCheckpointing(StackContract):
    """Activation checkpointing changes no gradient."""

    checkpointing_switch: Optional[Callable[[nn.Module, bool], Any]] = option(
        None,
        optional(is_callable),
        example="lambda model, on: model.set_checkpointing(on)",
    )
    """A function that switches activation checkpointing on (`True`) or off (`False`) in the model
    it is given (a copy of self.model).

    `None`: transformers' `activation_checkpointing_enable()` (`gradient_checkpointing_enable()`
    before transformers 5), diffusers' `enable_gradient_checkpointing()` and timm's
    `set_grad_checkpointing()` are found on the model; without them,
    test_activation_checkpointing skips."""

    @check(reads=("model", "inputs", "loss_fn", "stack_tolerance", "checkpointing_switch"))
    def test_activation_checkpointing(self) -> None:
        """Check that switching activation checkpointing on changes no output and no gradient.

        Catches checkpointing that changes what is learned: a block whose recomputation
        draws other random numbers (torch.utils.checkpoint(..., preserve_rng_state=False)
        around dropout), state that forward changes (a counter, a cache, BatchNorm's
        statistics updated again), a checkpointed function whose inputs need no gradient
        (reentrant checkpointing then cuts the parameters inside off from the loss).

        One training-mode forward and backward pass of a copy with checkpointing off and one
        of a copy with it on, under the same seed, are compared; the pass with it on must run
        forward again during the backward pass (else nothing was checkpointed, and the check
        skips).
        """
        name, switch = self._checkpointing_found_switch()
        without, with_it = self._copy_model(), self._copy_model()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # transformers' renaming
                switch(without, False)
                switch(with_it, True)
        except Exception as exc:
            self.skipTest(
                f"{name} raises: {exception_text(exc)}; the model cannot switch activation "
                "checkpointing on. Set checkpointing_switch to a function that does."
            )
        tolerance = self._tolerance(self.model)
        with _counting_forward_calls(without) as plain_calls:
            reference = self._step_run(without, self.inputs, training=True)
        with _counting_forward_calls(with_it) as calls:
            result = self._step_run(with_it, self.inputs, training=True)
        if calls[0] <= plain_calls[0]:
            self.skipTest(
                f"with {name}, no submodule ran forward again during the backward pass: "
                "nothing was checkpointed (the switch may act only under conditions this "
                "pass does not meet), so there was nothing to compare"
            )
        found = differences(result.output, reference.output, tolerance)
        found += gradient_differences(result.gradients, reference.gradients, tolerance)
        if found:
            self.fail(
                f"with activation checkpointing switched on ({name}), one training step gives "
                f"other results than without it, under the same seed: {listed(found)}. The "
                "checkpointed blocks compute something else when run again in the backward "
                "pass: random numbers drawn anew (torch.utils.checkpoint with "
                "preserve_rng_state=False around dropout), state that forward changes (a "
                "counter, a cache, BatchNorm statistics), or, with use_reentrant=True, inputs "
                "that need no gradient (the parameters inside get none)."
            )

    def _checkpointing_found_switch(self) -> Switch:
        if self.checkpointing_switch is not None:
            user = self.checkpointing_switch
            return "self.checkpointing_switch", lambda model, on: user(model, on)
        found = (
            _transformers_switch(self.model)
            or _diffusers_switch(self.model)
            or _timm_switch(self.model)
        )
        if found is None:
            self.skipTest(
                f"{type(self.model).__name__} has no switch for activation checkpointing that "
                "dltestkit knows (transformers' activation_checkpointing_enable(), diffusers' "
                "enable_gradient_checkpointing(), timm's set_grad_checkpointing()); set "
                "checkpointing_switch to the function that switches it on and off (lambda "
                "model, on: ...) to enable this check"
            )
        return found
