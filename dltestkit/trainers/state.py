"""Comparing what a trainer holds: nested states, random generators, counters.

test_resume and test_reproducible compare a resumed or repeated run with the original, and,
when they differ, the parts of the trainer (optimizer state, generators, counters) to say
which one a checkpoint did not restore.
"""

from __future__ import annotations

import copy
import random
from typing import Any, Dict, NamedTuple, Optional, Tuple

import numpy as np
import torch
from torch import nn

from .logs import as_number, same_number

__all__ = [
    "Difference",
    "attributes",
    "cloned",
    "difference",
    "generators",
    "global_states",
    "numbers",
    "persistent_loaders",
    "plain",
]


class Difference(NamedTuple):
    path: Tuple[Any, ...]
    detail: str


def tensor_report(text: str) -> str:
    """assert_close's report on one line, without its first line."""
    lines = [line.strip().rstrip(".") for line in text.strip().splitlines()[1:] if line.strip()]
    return "; ".join(lines) if lines else text.strip()


def difference(
    a: Any, b: Any, rtol: float = 0.0, atol: float = 0.0, path: Tuple[Any, ...] = ()
) -> Optional[Difference]:
    """The first place where the nested states ``a`` (expected) and ``b`` differ; None when
    they are equal within the tolerances (NaN equals NaN)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        try:
            torch.testing.assert_close(
                b.detach().cpu(), a.detach().cpu(), rtol=rtol, atol=atol, equal_nan=True
            )
        except AssertionError as exc:
            return Difference(path, tensor_report(str(exc)))
        return None
    if isinstance(a, dict) and isinstance(b, dict):
        missing = [key for key in a if key not in b]
        if missing:
            return Difference(path + (missing[0],), "is missing")
        extra = [key for key in b if key not in a]
        if extra:
            return Difference(path + (extra[0],), "is there, but was not")
        for key in a:
            found = difference(a[key], b[key], rtol, atol, path + (key,))
            if found:
                return found
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        for index, (x, y) in enumerate(zip(a, b)):
            found = difference(x, y, rtol, atol, path + (index,))
            if found:
                return found
        return None
    x, y = as_number(a), as_number(b)
    if x is not None and y is not None:
        same = same_number(y, x, rtol, atol)
    else:
        try:
            same = bool(a == b)
        except Exception:  # e.g. arrays of another shape
            same = repr(a) == repr(b)
    return None if same else Difference(path, f"is {short(b)}, was {short(a)}")


def short(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def cloned(state: Any) -> Any:
    """A copy of a state dict that later training cannot change (tensors are cloned)."""
    try:
        return copy.deepcopy(state)
    except Exception:  # something in it cannot be copied; compare what can be
        if isinstance(state, dict):
            return {key: cloned(value) for key, value in state.items()}
        return repr(state)


def plain(value: Any) -> Any:
    """NumPy arrays (in random states) as lists, so that states compare with ==."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(item) for item in value)
    return value


def rng_state(value: Any) -> Any:
    """The state of a random number generator, comparable with ==; None for anything else."""
    if isinstance(value, torch.Generator):
        return value.get_state().tolist()
    if isinstance(value, random.Random):
        return value.getstate()
    if isinstance(value, np.random.Generator):
        return plain(value.bit_generator.state)
    if isinstance(value, np.random.RandomState):
        return plain(value.get_state())
    return None


def attributes(value: Any) -> Dict[str, Any]:
    try:
        return dict(vars(value))
    except TypeError:  # no __dict__
        return {}


def persistent_loaders(trainer: Any) -> Dict[str, Any]:
    """The trainer's DataLoaders with persistent workers (among its attributes), by name."""
    from torch.utils.data import DataLoader

    return {
        name: value
        for name, value in attributes(trainer).items()
        if isinstance(value, DataLoader) and value.persistent_workers
    }


def generators(trainer: Any) -> Dict[str, Any]:
    """The states of the random number generators the trainer holds, directly or in its data
    loaders, samplers and other plain objects (up to three attributes deep), each by its
    shortest path."""
    found: Dict[str, Any] = {}
    seen = {id(trainer)}
    level = [("trainer", trainer)]
    for _ in range(3):
        below = []
        for path, value in level:
            for name, attribute in attributes(value).items():
                if id(attribute) in seen:
                    continue
                seen.add(id(attribute))
                state = rng_state(attribute)
                if state is not None:
                    found[f"{path}.{name}"] = state
                elif not isinstance(
                    attribute,
                    (nn.Module, torch.Tensor, torch.optim.Optimizer, str, bytes, int, float, type),
                ):
                    below.append((f"{path}.{name}", attribute))
        level = below
    return found


def global_states() -> Dict[str, Any]:
    return {
        "torch's global RNG": torch.get_rng_state().tolist(),
        "Python's random": random.getstate(),
        "NumPy's global RNG": plain(np.random.get_state()),
    }


def numbers(trainer: Any) -> Dict[str, Any]:
    return {
        name: value
        for name, value in attributes(trainer).items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    }
