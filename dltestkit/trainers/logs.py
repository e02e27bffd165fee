"""What a trainer logs: the scalars it writes, recorded, and how two of them compare."""

from __future__ import annotations

import itertools
import math
from typing import Any, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = [
    "Scalar",
    "as_number",
    "call_arguments",
    "describe_scalar",
    "first_log_difference",
    "is_finite_number",
    "same_number",
    "same_scalar",
]


def as_number(value: Any) -> Optional[float]:
    """``value`` as a float when it is one number (a Python, NumPy or one-element tensor
    number, not a bool), else None."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, (int, float, np.number)):
        return float(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.dtype != torch.bool:
        return float(value.detach().cpu())
    return None


def is_finite_number(value: Any) -> bool:
    number = as_number(value)
    return number is not None and math.isfinite(number)


def same_number(a: float, b: float, rtol: float, atol: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b or abs(a - b) <= atol + rtol * abs(b)


class Scalar(NamedTuple):
    """One add_scalar call."""

    tag: Any
    value: Any
    step: Any

    def where(self) -> str:
        return f"{self.tag!r} at step {self.step}"


def call_arguments(call: Any) -> Scalar:
    """(tag, value, global_step) of a SummaryWriter.add_scalar call."""
    names = ("tag", "scalar_value", "global_step")
    values = list(call.args[:3]) + [None] * (3 - len(call.args[:3]))
    for position, name in enumerate(names):
        if name in call.kwargs:
            values[position] = call.kwargs[name]
    return Scalar(*values)


def same_scalar(a: Scalar, b: Scalar, rtol: float, atol: float) -> bool:
    x, y = as_number(a.value), as_number(b.value)
    if x is None or y is None:
        return bool(a.value == b.value)
    return same_number(x, y, rtol, atol)


def first_log_difference(
    expected: Sequence[Scalar], actual: Sequence[Scalar], start: int = 0
) -> Optional[Tuple[Optional[Scalar], Optional[Scalar]]]:
    """The first pair (from ``start`` on) whose tag or step differs; None if there is none."""
    pairs = itertools.zip_longest(expected[start:], actual[start:])
    for a, b in pairs:
        if a is None or b is None or (a.tag, a.step) != (b.tag, b.step):
            return a, b
    return None


def describe_scalar(scalar: Optional[Scalar]) -> str:
    return "nothing" if scalar is None else scalar.where()
