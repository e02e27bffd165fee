"""How the model is called: the arguments in ``self.inputs``, the ones that carry the batch,
and the checked tensor of an output.

One convention, used by every check: ``self.inputs`` is a tensor (``model(inputs)``), a
tuple or list (positional arguments, ``model(*inputs)``) or a dict (keyword arguments,
``model(**inputs)``, what a tokenizer returns). An argument carries the batch either as the
first dimension of a tensor or as a list with one item per sample (a *sample list*: tensors
of possibly different shapes, or dicts of tensors, as torchvision's detection models take
images and targets).
"""

from __future__ import annotations

from typing import Any, Callable, Collection, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from ..core.paths import children, map_tensors, named_tensors

__all__ = [
    "Key",
    "batch_entries",
    "batch_length",
    "batched_entries",
    "call_model",
    "describe_batched",
    "describe_input",
    "input_entries",
    "is_sample_list",
    "replace_entries",
    "sample_lists",
    "select_tensor",
    "take_samples",
]

Key = Optional[Union[int, str]]


def select_tensor(
    obj: Any, key: Key, what: str, attribute: str, passed_over: Collection[Any] = ()
) -> torch.Tensor:
    """Return the tensor to check from ``obj``.

    ``key`` is ``None`` (a tensor is used as it is; a tuple, list, dict or dataclass gives
    its first element not in ``passed_over``) or an index/key into ``obj``. ``what`` and
    ``attribute`` name the object and the setUp attribute that chooses, for the error message.
    """
    if key is not None:
        try:
            picked = obj[key]
        except (KeyError, IndexError, TypeError) as exc:
            fields = children(obj)
            keys = f"; it has {[k for k, _ in fields]}" if fields and isinstance(key, str) else ""
            raise TypeError(
                f"{what} has no element {key!r} (chosen by self.{attribute}){keys}: {exc!r}"
            ) from None
    elif isinstance(obj, torch.Tensor):
        picked = obj
    else:
        fields = [(k, v) for k, v in children(obj) or () if k not in passed_over]
        if not fields:
            raise TypeError(
                f"{what} is a {type(obj).__name__}, not a tensor"
                + (f", and every element is in {list(passed_over)}" if passed_over else "")
                + f"; set self.{attribute} to the index or key of the tensor to check"
            )
        key, picked = fields[0]
    if not isinstance(picked, torch.Tensor):
        raise TypeError(
            f"{what} element {key!r} (chosen by self.{attribute}) is a "
            f"{type(picked).__name__}, not a torch.Tensor; set self.{attribute} to the index "
            "or key of a tensor"
        )
    return picked


# -- inputs: how the model is called ---------------------------------------------------
def call_model(model: Callable[..., Any], inputs: Any) -> Any:
    """Call the model: ``model(**inputs)`` for a dict, ``model(*inputs)`` for a tuple or
    list, else ``model(inputs)``."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def input_entries(inputs: Any) -> List[Tuple[Key, Any]]:
    """The arguments in ``inputs``: (key, value) for a dict, (index, value) for a tuple or
    list, ``(None, inputs)`` for a single tensor."""
    if isinstance(inputs, Mapping):
        return list(inputs.items())
    if isinstance(inputs, (tuple, list)):
        return list(enumerate(inputs))
    return [(None, inputs)]


def batched_entries(inputs: Any, unbatched: Collection[Any] = ()) -> List[Tuple[Key, torch.Tensor]]:
    """The input tensors that carry the batch dimension (first): every tensor argument with
    at least one dimension, except those whose key or index is in ``unbatched``."""
    return [
        (key, value)
        for key, value in input_entries(inputs)
        if isinstance(value, torch.Tensor) and value.dim() > 0 and key not in unbatched
    ]


def is_sample_list(value: Any) -> bool:
    """Whether an argument is a sample list: a non-empty list whose every item is a tensor
    or holds one (a dict of tensors), one item per sample."""
    return (
        isinstance(value, list)
        and bool(value)
        and all(
            isinstance(item, torch.Tensor)
            or (not isinstance(item, (str, bytes)) and next(named_tensors(item), None) is not None)
            for item in value
        )
    )


def sample_lists(inputs: Any, unbatched: Collection[Any] = ()) -> List[Tuple[Key, List[Any]]]:
    """The arguments that are sample lists, except those in ``unbatched``."""
    return [
        (key, value)
        for key, value in input_entries(inputs)
        if key not in unbatched and is_sample_list(value)
    ]


def batch_entries(inputs: Any, unbatched: Collection[Any] = ()) -> List[Tuple[Key, Any]]:
    """The arguments that carry the batch, in their order: tensors with at least one
    dimension (batch first) and sample lists, except those in ``unbatched``."""
    return [
        (key, value)
        for key, value in input_entries(inputs)
        if key not in unbatched
        and ((isinstance(value, torch.Tensor) and value.dim() > 0) or is_sample_list(value))
    ]


def batch_length(value: Any) -> int:
    """The number of samples of a batched argument (a tensor or a sample list)."""
    return len(value) if isinstance(value, list) else int(value.shape[0])


def describe_batched(key: Key, value: Any) -> str:
    """A batched argument and its size, for messages: self.inputs[0] (4, 3) or
    self.inputs[0] (a list of 4 samples)."""
    if isinstance(value, list):
        return f"{describe_input(key)} (a list of {len(value)} samples)"
    return f"{describe_input(key)} {tuple(value.shape)}"


def take_samples(value: Any, index: Sequence[int]) -> Any:
    """The samples ``index`` of a batched argument, in that order, as a new batch: rows of a
    tensor, or clones of a sample list's items (a sample repeated is another object each
    time, so that a model editing its inputs in place cannot change another sample)."""
    if isinstance(value, list):
        return [map_tensors(lambda t: t.clone(), value[i]) for i in index]
    return value[torch.tensor(list(index), dtype=torch.long)]


def replace_entries(inputs: Any, new: Dict[Key, Any]) -> Any:
    """``inputs`` with the arguments whose keys are in ``new`` replaced."""
    if isinstance(inputs, Mapping):
        return {key: new.get(key, value) for key, value in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(new.get(index, value) for index, value in enumerate(inputs))
    return new.get(None, inputs)


def describe_input(key: Key) -> str:
    """How an argument is named in messages: self.inputs, self.inputs[1], self.inputs['ids']."""
    return "self.inputs" if key is None else f"self.inputs[{key!r}]"


def differing_batches(sizes: str, lists: bool, hint: str) -> str:
    """The contract error for inputs whose numbers of samples differ (``sizes``: each one's),
    with lists of samples among them (``lists``), and the hint for a positional list."""
    if lists:
        problem = (
            f"holds arguments whose numbers of samples differ: {sizes}. A tensor carries the "
            "batch as its first dimension, a list of tensors or dicts as its length, and all "
            "must agree; list the arguments that are not batched (a (seq, seq) mask, a list "
            "that is not one item per sample) in self.unbatched_inputs"
        )
    else:
        problem = (
            f"holds tensors whose first dimensions differ: {sizes}. Every tensor carries the "
            "batch dimension first; list the ones that are the same for every sample (a (seq, "
            "seq) mask) in self.unbatched_inputs"
        )
        if not hint:
            problem += (
                ". Inputs packed across the samples (the patches of every image in one tensor, "
                "as Qwen2-VL's processor gives them) cannot be cut by sample: test the model "
                "through a wrapper that takes them batch first, one row per sample, and packs "
                "them itself"
            )
    return problem + (f". {hint}" if hint else "")
