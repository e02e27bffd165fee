"""The words every message is made of: lists, counts, short values, exceptions."""

from __future__ import annotations

import contextlib
import os
import re
import traceback
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from .watch import raising_user_line

__all__ = [
    "article",
    "by_count",
    "describe",
    "error_text",
    "exception_text",
    "first_line",
    "forget",
    "kind",
    "listed",
    "no_eval_gradients",
    "noted",
    "short",
    "sized",
]


@contextlib.contextmanager
def noted(note: Callable[[], str]) -> Iterator[None]:
    """An exception raised inside gets ``note()`` added under its message (on Python 3.11 and
    later), once: the innermost ``noted`` around it says how the model was called."""
    try:
        yield
    except Exception as exc:
        if hasattr(exc, "add_note") and not getattr(exc, "_dltestkit_noted", False):
            exc._dltestkit_noted = True  # type: ignore[attr-defined]
            exc.add_note(note())
        raise


_AUTOGRAD_DIR = os.path.join(os.path.dirname(torch.__file__), "autograd", "")


def _through_autograd(exc: BaseException) -> bool:
    """Whether ``exc`` was raised inside a backward pass (its traceback passes through
    torch.autograd's backward or grad), not in a forward pass."""
    return any(
        frame.filename.startswith(_AUTOGRAD_DIR) and frame.name in ("backward", "grad")
        for frame in traceback.extract_tb(exc.__traceback__)
    )


def no_eval_gradients(exc: BaseException) -> Optional[str]:
    """For an exception of the backward pass of an eval-mode forward pass, why no gradient
    can be taken through that pass, in words: autograd's error about a tensor the backward
    pass needs that the forward pass changed in place (with the error's first line), or an
    exception raised by the model's own code in the backward pass (a custom autograd
    Function that runs in training mode only, as the reversible layers of transformers'
    Reformer assert; with the exception and the model's line). None for any other
    exception: one raised by torch or dltestkit alone, or outside the backward pass."""
    text = str(exc)
    if isinstance(exc, RuntimeError) and "modified by an inplace operation" in text:
        return (
            "no gradient can be taken through the model's eval-mode forward pass, which "
            "changes in place a tensor its backward pass needs (a state cache updated at "
            "evaluation, as transformers' RWKV updates its state): "
            f"{text.splitlines()[0].split('. Hint')[0]}"
        )
    line = raising_user_line(exc)
    if line is None or not _through_autograd(exc):
        return None
    return (
        "no gradient can be taken through the model's eval-mode forward pass: the model's own "
        f"backward code raises {exception_text(exc)}, at {line} (a custom autograd Function "
        "that runs in training mode only, as the reversible layers of transformers' Reformer)"
    )


def listed(names: Sequence[str], limit: int = 3) -> str:
    """The first ``limit`` names, and how many more there are: "a, b, c and 4 more"."""
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def by_count(count: int, singular: str, plural: str) -> str:
    """``singular`` for one, ``plural`` for any other count."""
    return singular if count == 1 else plural


def article(word: str) -> str:
    """ "a" or "an" before ``word``."""
    return "an" if word[:1].lower() in ("a", "e", "i", "o", "u") else "a"


def short(value: Any, width: int = 40) -> str:
    """A value for a message: a tensor by its shape, anything else by a repr of at most
    ``width`` characters."""
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def describe(value: Any) -> str:
    """A value and its type for a message: "'loss' (a str)", "a tensor of shape (3,)"."""
    if isinstance(value, torch.Tensor):
        return short(value)
    return f"{short(value, 60)} (a {type(value).__name__})"


def kind(value: Any) -> str:
    """What a non-tensor value is, for messages: "a PIL Image", "None", "a str"."""
    if value is None:
        return "None"
    name = type(value).__name__
    if type(value).__module__.startswith("PIL."):
        name = "PIL Image"
    return f"{article(name)} {name}"


def sized(value: Any) -> str:
    """What a returned value is, where a list was expected: "a list of 3 elements", "a
    Tensor"."""
    if isinstance(value, list):
        return f"a list of {len(value)} elements"
    return f"a {type(value).__name__}"


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message ("" when it has none)."""
    text = error_text(exc)
    return text.splitlines()[0] if text else ""


def exception_text(exc: BaseException) -> str:
    """``Type: message``, the message cut to its first line."""
    line = first_line(exc)
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


_SCRIPT_FRAME = re.compile(r'^\s*File "(?P<path>[^"]*)", line (?P<line>\d+), in (?P<function>\S+)')
_ERROR_PREFIX = re.compile(r"^[A-Za-z_.]*(Error|Exception|Stop): ")


def error_text(exc: BaseException) -> str:
    """The message of ``exc``. An error raised inside TorchScript code comes as a long
    report of the interpreter (both tracebacks, then the Python frames of the kernel that
    raised); it is shortened to the error and the scripted line that raised it."""
    text = str(exc).strip()
    if "TorchScript interpreter" not in text:
        return text
    lines = text.splitlines()
    errors = [i for i, line in enumerate(lines) if _ERROR_PREFIX.match(line)]
    if not errors:
        return text
    message = lines[errors[-1]]
    while _ERROR_PREFIX.match(message):  # "RuntimeError: RuntimeError: ..."
        message = message.split(": ", 1)[1]
    start = next((i for i, line in enumerate(lines) if "original code" in line), 0)
    frames = [i for i in range(start, errors[-1]) if _SCRIPT_FRAME.match(lines[i])]
    if not frames:
        return message
    frame = _SCRIPT_FRAME.match(lines[frames[-1]])
    assert frame is not None
    marker = next((i for i in range(frames[-1], errors[-1]) if "<--- HERE" in lines[i]), None)
    code = f": {lines[marker - 1].strip()}" if marker is not None else ""
    return (
        f"{message} (in TorchScript code, at {os.path.basename(frame['path'])}:"
        f"{frame['line']} in {frame['function']}{code})"
    )


def forget(exc: BaseException) -> None:
    """Drop the frames an exception's traceback keeps alive (a DataLoader iterator among
    them), so that what they hold is released now, not by a later garbage collection."""
    seen = set()
    current: Optional[BaseException] = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        traceback.clear_frames(current.__traceback__)
        current = current.__cause__ or current.__context__
