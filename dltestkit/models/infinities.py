"""Where the non-finite values of a forward pass come from: an operation that makes them from
finite values (a log of 0, an overflowing exp, 0 / 0: a bug), or infinities that the model's
code places itself (``masked_fill(mask, float("-inf"))``, ``torch.full(..., -inf)``: a mask by
design, such as logits that a softmax or a sigmoid turns into exactly 0)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch

from ..core.watch import ModuleTracker, Watch, op_name, tensors_in

__all__ = ["InfinityWatch", "NonFinite"]


@dataclass(frozen=True)
class NonFinite:
    """An operation that made non-finite values: ``what`` (``"NaN"``, ``"Inf"``), and the
    operation with the submodule running and the line of the model's code."""

    what: str
    where: str


def _constants(value: Any) -> Iterator[float]:
    """The Python numbers in ``value`` (nested in lists, tuples and dicts)."""
    if isinstance(value, float):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _constants(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _constants(item)


def _floating(value: Any) -> List[torch.Tensor]:
    return [t for t in tensors_in(value) if t.is_floating_point() or t.is_complex()]


def _has(tensors: List[torch.Tensor], test: Any) -> bool:
    return any(bool(test(t).any()) for t in tensors if t.numel())


class InfinityWatch(Watch):
    """Watches each torch call of a forward pass: a call whose result holds NaN though none
    of its arguments does, or an infinity though none of its arguments is infinite (no tensor
    holding one, no infinite constant), made it (``made``); a call given an infinite constant
    whose result holds infinities placed them (``placed``). In-place calls are judged on the
    tensor they change."""

    def __init__(self, modules: Optional[ModuleTracker] = None) -> None:
        super().__init__(modules)
        self.made: List[NonFinite] = []  # from finite values: a bug
        self.placed: List[NonFinite] = []  # infinities the model's code put there

    def handle(self, func: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        arguments = _floating((args, kwargs))
        constants = list(_constants((args, kwargs)))
        infinite_in = _has(arguments, torch.isinf) or any(math.isinf(c) for c in constants)
        nan_in = _has(arguments, torch.isnan) or any(math.isnan(c) for c in constants)
        out = func(*args, **kwargs)
        name = op_name(func)
        changed = name.endswith("_")  # in place (__setitem__ too)
        results = _floating(out) + (arguments[:1] if changed else [])
        if _has(results, torch.isnan) and not nan_in:
            self._note(self.made, "NaN", name)
        elif _has(results, torch.isinf) and not infinite_in:
            self._note(self.made, "Inf", name)
        elif _has(results, torch.isinf) and any(math.isinf(c) for c in constants):
            self._note(self.placed, "Inf", name)
        return out

    def _note(self, where: List[NonFinite], what: str, name: str) -> None:
        if len(where) < 3:
            where.append(NonFinite(what, f"{name} {self.where()}"))
