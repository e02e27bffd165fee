"""The target of a sample, picked by ``target_key``: an integer class target of any shape (a
label, a label map, per-object labels), element by element, or a multi-hot vector (0s and 1s,
one per class) as the classes it marks."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Hashable, Optional, Tuple, Union

import numpy as np
import torch

from ..core.messages import article, exception_text, kind
from ..core.paths import children
from .samples import _follow, _is_numeric_list, _numpy_to_tensor, as_key, digest, key_path

__all__ = [
    "MISSING",
    "MULTI_HOT",
    "TARGET_KEYS",
    "Target",
    "as_target",
    "batched_target",
    "class_target",
    "labels_inside",
    "pick_target",
    "target_key_of",
]

#: The keys a target is usually stored under, suggested when self.target_key does not fit
#: (``class_labels``: the per-object labels of transformers' detection models).
TARGET_KEYS = ("label", "labels", "target", "targets", "y", "class", "cls", "class_labels")


def target_key_of(sample: Any) -> Any:
    return next((key for key, _ in children(sample) or () if key in TARGET_KEYS), None)


def labels_inside(sample: Any, key: Any) -> Any:
    """When the target at ``key`` is a container (a detection target dict), the path of the
    class labels in it (``(1, "labels")``), else None."""
    if isinstance(sample, torch.Tensor) or children(sample) is None:
        return None
    value, holds = _follow(sample, key_path(key))
    inner = target_key_of(value) if holds is None and not isinstance(value, torch.Tensor) else None
    return None if inner is None else (*key_path(key), inner)


#: pick_target's result for a sample without a target at self.target_key.
MISSING = "missing"

#: How Target.dtype begins for a vector of 0s and 1s, one per class (multi-label targets).
MULTI_HOT = "multi-hot"


#: How many distinct values of a target Target.text shows.
_VALUES_SHOWN = 8


@dataclass(frozen=True)
class Target:
    """An integer class target as the scan reports it: a label (``shape`` ``()``) or a
    tensor of labels of any shape (a label map, per-object labels), element by element.

    ``key`` tells equal targets from different ones: the label itself, or for a tensor its
    digest and shape. ``values`` is every distinct value with its number of elements.
    """

    key: Hashable
    shape: Tuple[int, ...]
    values: Tuple[Tuple[int, int], ...]
    dtype: str = "int"

    @property
    def plain(self) -> Optional[int]:
        """The label of a target of shape (), which the scan sends as the int itself."""
        return self.key if not self.shape and isinstance(self.key, int) else None

    @property
    def multi_hot(self) -> bool:
        """Whether the target is a vector of 0s and 1s (its ``values``: the classes it marks)."""
        return self.dtype.startswith(MULTI_HOT)

    @property
    def text(self) -> str:
        """The target as messages show it: "target 3", "a target of shape (8, 8) with
        values 0, 3, 255", "a multi-hot target of shape (5,) with classes 0, 3"."""
        if not self.shape:
            return f"target {self.key}"
        what = "a multi-hot target" if self.multi_hot else "a target"
        if not self.values and self.multi_hot:
            return f"a multi-hot target of shape {self.shape} with no class"
        if not self.values:
            return f"an empty target of shape {self.shape}"
        shown = ", ".join(str(value) for value, _ in self.values[:_VALUES_SHOWN])
        more = ", ..." if len(self.values) > _VALUES_SHOWN else ""
        named = "classes" if self.multi_hot else "values"
        return f"{what} of shape {self.shape} with {named} {shown}{more}"

    def described(self) -> str:
        """What the target is: "an int64 tensor of shape (1,) (3)"."""
        if not self.shape and self.dtype == "int":
            return f"the int {self.key}"
        one = f" ({self.values[0][0]})" if len(self.values) == 1 and _numel(self.shape) == 1 else ""
        if self.dtype == "list":
            return f"a list of shape {self.shape}{one}"
        return f"{article(self.dtype)} {self.dtype} tensor of shape {self.shape}{one}"


def as_target(value: Union[int, Target, None]) -> Target:
    """A target as the scan reported it (a label as the int itself) as a Target."""
    if isinstance(value, Target):
        return value
    assert value is not None
    return Target(value, (), ((value, 1),))


def _numel(shape: Tuple[int, ...]) -> int:
    return math.prod(shape)


def pick_target(sample: Any, key: Any) -> Tuple[Optional[Target], Optional[str]]:
    """``(target, None)`` for an integer class target (an int, or an integer tensor of any
    shape), ``(None, what it is)`` otherwise, ``(None, MISSING)`` when the sample has no
    element ``key`` (an index, key or path)."""
    if isinstance(sample, torch.Tensor) or children(sample) is None:
        return None, MISSING
    value, holds = _follow(sample, key_path(key))
    if holds is not None:
        return None, MISSING
    target, problem = class_target(value)
    inner = next(
        (k for k, item in children(value) or () if class_target(item)[0] is not None), None
    )
    if problem is not None and inner is not None:
        path = as_key((*key_path(key), inner))
        problem += f" (to check the class labels in it, set self.target_key = {path!r})"
    return target, problem


def class_target(value: Any) -> Tuple[Optional[Target], Optional[str]]:
    """A target value as a Target, or what it is when it is not an integer class target.
    Numpy arrays and lists of numbers are taken as the tensors they convert to."""
    original = value
    value = _numpy_to_tensor(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return Target(value, (), ((value, 1),)), None
    if isinstance(value, list) and not value:
        value = torch.zeros(0, dtype=torch.int64)  # no object in this sample
    elif _is_numeric_list(value):
        try:
            value = torch.as_tensor(value)
        except (ValueError, TypeError, RuntimeError) as exc:
            problem = exception_text(exc)
            return None, f"{kind(value)} that torch.as_tensor cannot convert ({problem})"
    if isinstance(value, torch.Tensor):
        dtype = str(value.dtype).replace("torch.", "")
        hot = _multi_hot(value, dtype)
        if hot is not None:
            return hot, None
        if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            shown = f" ({value.item()!r})" if value.numel() == 1 else ""
            what = f"{article(dtype)} {dtype} tensor of shape {tuple(value.shape)}{shown}"
            if not isinstance(original, torch.Tensor):
                what = f"{kind(original)} of {dtype} values ({original!r:.40})"
            return None, what
        if not isinstance(original, (torch.Tensor, np.ndarray, np.generic)):
            dtype = "list"
        if value.dim() == 0:
            label = int(value)
            return Target(label, (), ((label, 1),), dtype), None
        shape = tuple(value.shape)
        key = (digest(value), shape)
        return Target(key, shape, _value_counts(value.detach()), dtype), None
    fields = children(value)
    if fields is not None and not isinstance(value, str):
        return None, f"{kind(value)} with elements {[k for k, _ in fields]}"
    return None, "None" if value is None else f"{kind(value)} ({value!r:.40})"


def _multi_hot(value: torch.Tensor, dtype: str) -> Optional[Target]:
    """A floating-point or bool vector of 0s and 1s (the multi-label targets of
    BCEWithLogitsLoss, a one-hot label) as the classes it marks; None for other tensors.
    test_labels requires its length to be num_classes."""
    if not (value.is_floating_point() or value.dtype == torch.bool):
        return None
    if value.dim() != 1 or not value.numel() or not bool(((value == 0) | (value == 1)).all()):
        return None
    classes = value.nonzero().flatten().tolist()
    shape = tuple(value.shape)
    return Target(
        (digest(value), shape), shape, tuple((c, 1) for c in classes), f"{MULTI_HOT} {dtype}"
    )


def _value_counts(tensor: torch.Tensor) -> Tuple[Tuple[int, int], ...]:
    """Each distinct value of an integer tensor with its number of elements, in order."""
    flat = tensor.reshape(-1).to(torch.int64)
    if not flat.numel():
        return ()
    low, high = int(flat.min()), int(flat.max())
    if high - low < 2**16:  # a label map: counting is ten times faster than sorting
        counts = torch.bincount(flat - low)
        present = counts.nonzero().flatten()
        return tuple(zip((present + low).tolist(), counts[present].tolist()))
    distinct, numbers = torch.unique(flat, return_counts=True)
    return tuple(zip(distinct.tolist(), numbers.tolist()))


def batched_target(batch: Any, key: Any) -> Optional[Tuple[int, ...]]:
    """The shape of the targets in a batch made by the collate function, when the batch
    holds them as one tensor at ``key``; None when it keeps them apart (a list of target
    dicts) or holds no target there."""
    try:
        value, holds = _follow(batch, key_path(key))
    except Exception:  # a batch object that answers indexing in its own way
        return None
    if holds is not None or not isinstance(value, torch.Tensor):
        return None
    return tuple(value.shape)
