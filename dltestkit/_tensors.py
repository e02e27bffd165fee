"""Picking tensors out of samples, batches and model outputs."""
from __future__ import annotations

from typing import Any, Callable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch

Key = Optional[Union[int, str]]


def select_tensor(obj: Any, key: Key, what: str, attribute: str) -> torch.Tensor:
    """Return the tensor to check from ``obj``.

    ``key`` is ``None`` (a tensor is used as it is, a tuple or list gives its first
    element) or an index/key into ``obj``. ``what`` and ``attribute`` name the
    object and the setUp attribute that chooses, for the error message.
    """
    if key is not None:
        try:
            picked = obj[key]
        except (KeyError, IndexError, TypeError) as exc:
            raise TypeError(
                f"{what} has no element {key!r} (chosen by self.{attribute}): {exc!r}"
            ) from None
    elif isinstance(obj, torch.Tensor):
        picked = obj
    elif isinstance(obj, (tuple, list)) and obj:
        picked = obj[0]
    else:
        raise TypeError(
            f"{what} is a {type(obj).__name__}; set self.{attribute} to the index or key "
            "of the tensor to check"
        )
    if not isinstance(picked, torch.Tensor):
        raise TypeError(
            f"{what} element chosen by self.{attribute}={key!r} is a "
            f"{type(picked).__name__}, not a torch.Tensor; set self.{attribute}"
        )
    return picked


def map_tensors(fn: Callable[[torch.Tensor], Any], obj: Any) -> Any:
    """Apply ``fn`` to every tensor in a nested tuple/list/dict structure."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(map_tensors(fn, item) for item in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_tensors(fn, item) for item in obj)
    if isinstance(obj, Mapping):
        return {name: map_tensors(fn, item) for name, item in obj.items()}
    return obj


def named_tensors(obj: Any, prefix: str = "output") -> Iterator[Tuple[str, torch.Tensor]]:
    """Yield ``(path, tensor)`` for every tensor in a nested structure."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, (tuple, list)):
        for index, item in enumerate(obj):
            yield from named_tensors(item, f"{prefix}[{index}]")
    elif isinstance(obj, Mapping):
        for name, item in obj.items():
            yield from named_tensors(item, f"{prefix}[{name!r}]")


def as_args(inputs: Any) -> Sequence[Any]:
    """The positional arguments for ``model(*args)``: a tuple/list is unpacked."""
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def batch_tensors(inputs: Any) -> List[torch.Tensor]:
    """The input tensors that carry a batch dimension."""
    return [t for t in as_args(inputs) if isinstance(t, torch.Tensor) and t.dim() > 0]
