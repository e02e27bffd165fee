"""Functions the checks are given (a collate function, a worker_init_fn): how messages name
them, and what identifies one for the cache of scans."""

from __future__ import annotations

import functools
import types
from typing import Any, Hashable

from ..core.messages import article, short

__all__ = ["callable_key", "describe_callable"]


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, complex, str, bytes))


def describe_callable(fn: Any) -> str:
    """A function as messages name it: "torch.utils.data.default_collate",
    "functools.partial(mypackage.pad, max_len=64)", "a mypackage.Collate object"."""
    if isinstance(fn, functools.partial):
        arguments = [short(a) if _plain(a) else _describe_value(a) for a in fn.args]
        arguments += [
            f"{k}={short(v) if _plain(v) else _describe_value(v)}" for k, v in fn.keywords.items()
        ]
        return f"functools.partial({', '.join([describe_callable(fn.func), *arguments])})"
    fn = getattr(fn, "__func__", fn)
    if isinstance(fn, (types.FunctionType, types.BuiltinFunctionType, type)):
        module = getattr(fn, "__module__", None) or "?"
        if module == "torch.utils.data._utils.collate":
            module = "torch.utils.data"
        return f"{module}.{fn.__qualname__}"
    return _describe_value(fn)


def _describe_value(value: Any) -> str:
    kind = type(value)
    return f"{article(kind.__name__)} {kind.__module__}.{kind.__qualname__} object"


def callable_key(fn: Any, depth: int = 0) -> Hashable:
    """What identifies a function for the cache: its name, and for a functools.partial or a
    callable object the arguments or attributes that are plain values (``max_len=64``), so
    that changing them scans again, while equal ones made anew in each setUp do not."""
    if depth > 3:
        return type(fn).__qualname__
    if isinstance(fn, functools.partial):
        return (
            "partial",
            callable_key(fn.func, depth + 1),
            tuple(_value_key(a, depth) for a in fn.args),
            tuple(sorted((k, _value_key(v, depth)) for k, v in fn.keywords.items())),
        )
    function = getattr(fn, "__func__", fn)
    if isinstance(function, types.FunctionType):
        # a lambda or a function made by a factory: where it is defined, and the plain
        # values it closes over or defaults to (make_collate(max_len=64))
        code = function.__code__
        captured = [cell.cell_contents for cell in function.__closure__ or () if _filled(cell)]
        captured += list(function.__defaults__ or ())
        return (
            describe_callable(function),
            code.co_filename,
            code.co_firstlineno,
            tuple(_value_key(value, depth) for value in captured),
        )
    if isinstance(function, (types.BuiltinFunctionType, type)):
        return describe_callable(function)
    attributes = getattr(fn, "__dict__", None)
    plain = (
        tuple(
            sorted((k, _value_key(v, depth)) for k, v in attributes.items() if isinstance(k, str))
        )
        if isinstance(attributes, dict)
        else ()
    )
    return (type(fn).__module__, type(fn).__qualname__, plain)


def _filled(cell: Any) -> bool:
    try:
        _ = cell.cell_contents
    except ValueError:  # a variable not assigned yet
        return False
    return True


def _value_key(value: Any, depth: int) -> Hashable:
    if _plain(value):
        return (type(value).__name__, value)
    if isinstance(value, (tuple, list)) and len(value) <= 16 and all(_plain(v) for v in value):
        return (type(value).__name__, tuple(value))
    if callable(value):
        return callable_key(value, depth + 1)
    return (type(value).__module__, type(value).__qualname__)
