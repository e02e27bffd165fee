"""Nested structures (model outputs, samples, batches, optimizer states) and paths into them.

A path is a tuple of steps: an index, a key, or a ``Field`` (a dataclass field, written
``.name``). Messages render it from a root: ``output['logits']``, ``sample[1]['labels']``,
``output.last_hidden_state``. Containers looked into: tuples, lists, dicts (transformers'
``ModelOutput`` among them) and dataclasses.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Collection, Iterator, List, Mapping, Optional, Tuple, Union

import torch

__all__ = [
    "Field",
    "Path",
    "children",
    "floating_tensors",
    "follow",
    "leaves",
    "map_tensors",
    "named_tensors",
    "render",
]


class Field(str):
    """A dataclass field as a step of a path (rendered ``.name``)."""


Step = Union[int, str]
Path = Tuple[Step, ...]


def render(path: Path, root: str = "output") -> str:
    """A path as messages name it: ``render((0, "labels"), "sample")`` is
    ``sample[0]['labels']``; a Field step is written ``.name``."""
    return root + "".join(f".{step}" if isinstance(step, Field) else f"[{step!r}]" for step in path)


def children(obj: Any) -> Optional[List[Tuple[Step, Any]]]:
    """(step, value) of a container the checks look into, or None for a leaf."""
    if isinstance(obj, Mapping):  # dict, OrderedDict, transformers' ModelOutput
        if hasattr(obj, "__dataclass_fields__"):  # a ModelOutput: its fields are attributes
            return [(Field(k) if isinstance(k, str) else k, v) for k, v in obj.items()]
        return list(obj.items())
    if isinstance(obj, (tuple, list)):
        return list(enumerate(obj))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [(Field(field.name), getattr(obj, field.name)) for field in dataclasses.fields(obj)]
    return None


def leaves(
    obj: Any, path: Path = (), passed_over: Collection[Any] = ()
) -> Iterator[Tuple[Path, torch.Tensor]]:
    """Every tensor of a nested structure with its path, except those under the top-level
    steps in ``passed_over``."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
        return
    for step, item in children(obj) or ():
        if not path and step in passed_over:
            continue
        yield from leaves(item, (*path, step))


def named_tensors(
    obj: Any, prefix: str = "output", passed_over: Collection[Any] = ()
) -> Iterator[Tuple[str, torch.Tensor]]:
    """Yield ``(path as text, tensor)`` for every tensor in a nested structure, except those
    under the top-level keys or indices in ``passed_over``."""
    for path, tensor in leaves(obj, passed_over=passed_over):
        yield render(path, prefix), tensor


def floating_tensors(obj: Any) -> List[Tuple[str, torch.Tensor]]:
    """The floating-point tensors of a nested structure, with their paths as text."""
    return [(path, t) for path, t in named_tensors(obj) if t.is_floating_point()]


def follow(obj: Any, path: Path) -> Tuple[Any, Optional[Path]]:
    """The value at ``path`` in ``obj``, or ``(None, the longest part of the path that
    exists)`` when a step is missing."""
    value = obj
    for depth, step in enumerate(path):
        try:
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                names = {f.name for f in dataclasses.fields(value)}
                if not isinstance(step, str) or step not in names:
                    raise KeyError(step)
                value = getattr(value, step)
            elif isinstance(value, (str, bytes)):
                raise TypeError("a str has no elements")
            else:
                value = value[step]
        except (KeyError, IndexError, TypeError, AttributeError):
            return None, path[:depth]
    return value, None


def map_tensors(fn: Callable[[torch.Tensor], Any], obj: Any) -> Any:
    """Apply ``fn`` to every tensor in a nested structure, keeping the containers' types."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(map_tensors(fn, item) for item in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_tensors(fn, item) for item in obj)
    if isinstance(obj, Mapping):
        mapped = {name: map_tensors(fn, item) for name, item in obj.items()}
        try:
            return type(obj)(**mapped) if type(obj) is not dict else mapped
        except TypeError:
            return mapped
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(
            obj,
            **{
                field.name: map_tensors(fn, getattr(obj, field.name))
                for field in dataclasses.fields(obj)
                if field.init
            },
        )
    return obj
