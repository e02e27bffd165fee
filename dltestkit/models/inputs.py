"""test_inputs_unchanged: forward leaves the caller's inputs as they were."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..core.compare import largest_difference, same
from ..core.contract import check
from ..core.messages import noted
from ..core.paths import map_tensors, named_tensors
from ..core.seeds import seed_torch
from ..core.watch import Watch, op_name, watching
from .contract import ModelContract
from .copies import describe_mode, mode
from .passes import same_state
from .tensors import call_model, describe_input

__all__ = ["InputsUnchanged"]


@dataclass(frozen=True)
class _Change:
    """The first torch call of forward after which an input had changed in place."""

    path: str
    operation: str
    where: str


class _InPlaceWatch(Watch):
    """Notes the first call after which an input's version counter moved (an in-place
    operation on it, or on a view of it: views share it). An in-place operation on a tensor
    forward made itself leaves the inputs' counters alone."""

    def __init__(self, inputs: List[Tuple[str, torch.Tensor]], modules: Any) -> None:
        super().__init__(modules)
        self.inputs = inputs
        self.changes: Dict[str, _Change] = {}

    def handle(self, func: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        versions = [tensor._version for _, tensor in self.inputs]
        result = func(*args, **kwargs)
        for (path, tensor), version in zip(self.inputs, versions):
            if tensor._version != version and path not in self.changes:
                self.changes[path] = _Change(path, op_name(func), self.where())
        return result


class InputsUnchanged(ModelContract):
    """Forward does not change its inputs."""

    @check(reads=("model", "inputs", "loss_fn"))
    def test_inputs_unchanged(self) -> None:
        """Check that forward leaves its inputs as they were, in eval and in training mode.

        Catches a forward that changes the caller's batch in place: x /= 255 or x.sub_(mean)
        on an input, token ids edited in place (ids[ids == -100] = pad), an in-place
        activation or dropout applied to an input, x.to(device) or x.float() that returns
        the input itself before an in-place operation; named with the input and the line.
        """
        with same_state():  # (the shared passes' lookups: one fingerprint of the model)
            in_eval = self._unchanged_by_shared_pass(False)
            in_training = in_eval and self._unchanged_by_shared_pass(True)
        for training, unchanged in ((False, in_eval), (True, in_training)):
            if unchanged:
                continue
            found = self._changed_inputs(training)
            if found:
                self.fail(self._message(found, training))

    def _unchanged_by_shared_pass(self, training: bool) -> bool:
        """Whether the pass the checks share in this mode left its copies of the inputs as
        they were: the eval pass (``_eval_pass``: self.model, without gradients, under the
        seed) or the first training step (``_training_pass``: a copy, with gradients, under
        the seed), which call the model as this check's own pass does, where their copies
        are what this check hands the model: plain, contiguous tensors that need no gradient
        (a copy of another layout, or of a tensor subclass, is not what this check's own pass
        would see). A change is looked at again in a watched pass of this check's own, which
        names the call."""
        tensors = [t for _, t in named_tensors(self.inputs, prefix="")]
        if not all(
            type(t) is torch.Tensor
            and t.layout == torch.strided
            and t.is_contiguous()
            and not t.requires_grad
            for t in tensors
        ):
            return False
        try:
            changed = (
                self._training_pass().changed_inputs
                if training
                else self._eval_pass_and_changed_inputs()[1]
            )
        except Exception:  # (a failure too: None returned) this check's own pass tells
            return False
        return not changed

    def _changed_inputs(self, training: bool) -> List[Tuple[str, str, Optional[_Change]]]:
        """The inputs one forward pass in this mode changed: (the input, how its values
        differ, the call that changed it if one was seen). Eval mode runs self.model without
        gradients, training mode a copy (its BatchNorm statistics change) with them."""
        inputs = map_tensors(lambda t: t.detach().clone(), self.inputs)
        before = [(path, t.clone()) for path, t in named_tensors(inputs, prefix="")]
        watched = list(named_tensors(inputs, prefix=""))
        model = self._copy_model() if training else self.model
        with torch.random.fork_rng(devices=[]), mode(model, training=training):
            seed_torch(self.seed)
            with (
                torch.set_grad_enabled(training),
                watching(model, lambda modules: _InPlaceWatch(watched, modules)) as watch,
            ):
                with noted(lambda: self._call_note(self.inputs, training)):
                    call_model(model, inputs)
        found = []
        for (path, old), (_, new) in zip(before, watched):
            if not same(new, old):
                found.append((path, _difference(new, old), watch.changes.get(path)))
        return found

    def _message(self, found: List[Tuple[str, str, Optional[_Change]]], training: bool) -> str:
        path, difference, change = found[0]
        name = _input_name(path)
        how = (
            f": {change.operation} {change.where}"
            if change is not None
            else " (by no torch operation seen: through .data, or a tensor sharing its memory)"
        )
        others = (
            f" ({len(found) - 1} more input{'s' if len(found) > 2 else ''} too: "
            f"{', '.join(_input_name(p) for p, _, _ in found[1:4])})"
            if len(found) > 1
            else ""
        )
        return (
            f"the model's forward changes its input {name} in place in "
            f"{describe_mode(training)} mode{how}; afterwards {difference}{others}. The "
            "caller's batch is changed by the call: the same batch passed again gives other "
            "outputs, and what a training loop reuses or logs (the inputs of a second forward, "
            "images shown) is what the model made of it. Work on a copy (x = x.clone() before "
            "changing it) or use the out-of-place operation (x = x - mean, not x -= mean; "
            "note that x.to(device) and x.float() return x itself when nothing changes)."
        )


def _difference(new: torch.Tensor, old: torch.Tensor) -> str:
    if new.shape != old.shape or new.dtype != old.dtype:
        return (
            f"it is a {new.dtype} tensor of shape {tuple(new.shape)}, not the {old.dtype} "
            f"tensor of shape {tuple(old.shape)} it was"
        )
    equal = new == old
    if new.is_floating_point() or new.is_complex():
        equal |= new.isnan() & old.isnan()
    changed = ~equal
    return (
        f"{int(changed.sum())} of {new.numel()} values are other than before, by up to "
        f"{largest_difference(new, old)}"
    )


def _input_name(path: str) -> str:
    """How a message names an input tensor by its path in self.inputs: self.inputs,
    self.inputs['input_ids'], self.inputs[0][1]['boxes']."""
    return describe_input(None) + path if path else describe_input(None)
