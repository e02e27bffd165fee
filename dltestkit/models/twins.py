"""CPU twins: the values of what a forward pass on ``meta`` computes from its inputs alone.

A pass on ``meta`` has shapes but no values; a model that reads a value (transformers'
``padding_mask.all()``, which decides whether an attention mask is made at all;
``attention_mask.sum(1).cpu()`` as the lengths of a packed sequence) needs it. Such reads are
mostly of tensors computed from the inputs alone (masks, ids, lengths, positions), not from
the weights: ``Twins`` computes those on the CPU beside the meta pass, from a copy of the
inputs, so that a read gets the value the model would read, without a CPU run of the whole
model. What it cannot follow (a tensor computed from a weight, a random draw, a tensor
changed in place by an operation it could not repeat) has no twin, and a read of it needs a
CPU run as before.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Optional, Tuple

import torch

from ..core.paths import map_tensors
from ..core.watch import TensorNotes, tensors_in
from .meta_results import _in_place

__all__ = ["Twins"]

#: Python's in-place operators, as torch names the methods.
_IN_PLACE_OPERATORS = frozenset(
    f"__i{name}__"
    for name in ("add", "sub", "mul", "matmul", "truediv", "floordiv", "mod", "pow")
    + ("and", "or", "xor", "lshift", "rshift")
) | {"__setitem__"}

#: Calls arguments: positional and keyword.
Arguments = Tuple[Tuple[Any, ...], Dict[str, Any]]


def _changes_an_argument(func: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> bool:
    """Whether a call may write into a tensor it is handed (``add_``, ``x += y``,
    ``x[i] = y``, ``out=``, ``inplace=True``)."""
    name = getattr(func, "__name__", "")
    if name in _IN_PLACE_OPERATORS or "out" in kwargs:
        return True
    if name.endswith("_") and not name.startswith("__"):
        return True
    return bool(_in_place(func, args, kwargs))


_CPU = torch.device("cpu")


def _is_meta(value: Any) -> bool:
    """Whether ``value`` names the meta device."""
    if isinstance(value, torch.device):
        return value.type == "meta"
    return isinstance(value, str) and value == "meta"


class Twins:
    """The CPU twin of each meta tensor computed from the inputs alone."""

    def __init__(self, pairs: Iterable[Tuple[torch.Tensor, torch.Tensor]]) -> None:
        """``pairs``: each meta input and its values on the CPU (a copy of its own, which
        the operations repeated on it may change)."""
        self._twins: TensorNotes[torch.Tensor] = TensorNotes()
        self.active = False
        for meta, values in pairs:
            self._twins[meta] = values
            self.active = True

    def arguments(
        self, func: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]
    ) -> Optional[Arguments]:
        """The call's arguments with each meta tensor replaced by its twin, or None where the
        call cannot be repeated on the CPU: a meta tensor without a twin, a CPU tensor with
        dimensions (which the repeated call could change), a generator or ``out=`` tensor.
        A call that is handed no tensor and makes one on ``meta`` (a factory:
        ``torch.arange(n, device=x.device)``) is repeated with ``device="cpu"``."""
        if "generator" in kwargs or "out" in kwargs:
            return None
        found, refused = [False], [False]
        changes: Optional[bool] = None

        def twin(tensor: torch.Tensor) -> torch.Tensor:
            nonlocal changes
            if tensor.is_meta:
                values = self._twins.get(tensor)
                if values is None:
                    refused[0] = True
                    return tensor
                found[0] = True
                return values
            if tensor.dim() == 0 and changes is None:
                changes = _changes_an_argument(func, args, kwargs)
            if tensor.dim() > 0 or changes:
                refused[0] = True
            return tensor

        twin_args, twin_kwargs = map_tensors(twin, (args, kwargs))
        if refused[0]:
            return None
        if not found[0] and not _is_meta(kwargs.get("device")):
            return None
        # the device the call moves to or makes on (x.to(y.device), device=x.device): the CPU
        return (
            tuple(_CPU if _is_meta(a) else a for a in twin_args),
            {k: _CPU if _is_meta(v) else v for k, v in twin_kwargs.items()},
        )

    def call(self, func: Any, arguments: Arguments) -> Tuple[bool, Any]:
        """``(True, result)`` of ``func`` called on the twins, or ``(False, None)`` where it
        raises or draws random numbers (a draw on the CPU is not the one the model would
        make; the generator's state is restored)."""
        state = torch.random.get_rng_state()
        try:
            result = func(*arguments[0], **arguments[1])
        except Exception:
            return False, None
        if not torch.equal(state, torch.random.get_rng_state()):
            torch.random.set_rng_state(state)
            return False, None
        return True, result

    def note(self, result: Any, values: Any) -> None:
        """Note the tensors of ``values`` as the twins of the meta tensors of ``result``,
        matched by position (none where the two do not match)."""
        made, twins = tensors_in(result), tensors_in(values)
        if len(made) != len(twins):
            return
        for meta, twin in zip(made, twins):
            if meta.is_meta and twin.device.type == "cpu" and meta.shape == twin.shape:
                self._twins[meta] = twin

    def follow(
        self,
        func: Any,
        args: Tuple[Any, ...],
        kwargs: Dict[str, Any],
        arguments: Optional[Arguments],
        result: Any,
    ) -> None:
        """After a call the meta pass made: repeat it on the twins (``arguments``, None if
        it cannot be) and note the twins of its results. A call that may have changed a
        tensor with a twin, and could not be repeated, drops every twin (the tensor's, and
        its views' with it)."""
        if arguments is not None:
            done, values = self.call(func, arguments)
            if done:
                self.note(result, values)
                return
        if _changes_an_argument(func, args, kwargs) and any(
            self._twins.get(t) is not None for t in tensors_in((args, kwargs))
        ):
            self._twins = TensorNotes()
            self.active = False

    def repeated(
        self, func: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]
    ) -> Tuple[bool, Any]:
        """``(True, result)`` of the call repeated on the twins, or ``(False, None)`` where
        it cannot be (``arguments``) or did not run alike (``call``)."""
        arguments = self.arguments(func, args, kwargs)
        if arguments is None:
            return False, None
        return self.call(func, arguments)

    def value(self, func: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Tuple[bool, Any]:
        """``(True, what the call returns)`` for a call that reads values (``.item()``,
        ``bool(x)``, ``.cpu()``) of meta tensors with twins, from the twins (a tensor it
        returns is a copy of its own); ``(False, None)`` where there are none."""
        done, values = self.repeated(func, args, kwargs)
        return (True, map_tensors(torch.Tensor.clone, values)) if done else (False, None)
