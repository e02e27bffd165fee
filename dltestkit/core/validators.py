"""Validators of option values: each returns None for a good value, else what is wrong, as the
end of a sentence that starts with the option ("self.seed set in TestX.setUp" + " is '1', not
an int in [-2**63, 2**64 - 1]")."""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Optional

__all__ = [
    "SEED_RANGE",
    "Validator",
    "is_bool",
    "is_callable",
    "is_choice",
    "is_factor",
    "is_fraction",
    "is_instance",
    "is_key",
    "is_keys",
    "is_names",
    "is_non_negative_number",
    "is_number",
    "is_path",
    "is_plain_int",
    "is_positive_int",
    "is_positive_number",
    "is_reasons",
    "is_seed",
    "is_shape",
    "is_str",
    "optional",
]

Validator = Callable[[Any], Optional[str]]


def is_plain_int(value: Any) -> bool:
    """An int that is no bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_instance(*types: type, description: str) -> Validator:
    def validate(value: Any) -> Optional[str]:
        if isinstance(value, types) and not (isinstance(value, bool) and bool not in types):
            return None
        return f"is a {type(value).__name__}, not {description}"

    return validate


def optional(validate: Validator) -> Validator:
    """``validate``, letting ``None`` through."""

    def validate_optional(value: Any) -> Optional[str]:
        return None if value is None else validate(value)

    return validate_optional


def is_shape(value: Any) -> Optional[str]:
    """A tuple, list or torch.Size of non-negative ints (no bools)."""
    if (isinstance(value, (tuple, list)) or type(value).__name__ == "Size") and all(
        is_plain_int(size) and size >= 0 for size in value
    ):
        return None
    return f"is {value!r}, not a shape (a tuple of non-negative ints)"


def is_positive_int(value: Any) -> Optional[str]:
    if is_plain_int(value) and value > 0:
        return None
    return f"is {value!r}, not a positive int"


def is_number(value: Any) -> Optional[str]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return None
    return f"is {value!r}, not a number"


def is_non_negative_number(value: Any) -> Optional[str]:
    if is_number(value) is None and value >= 0:
        return None
    return f"is {value!r}, not a non-negative number"


def is_positive_number(value: Any) -> Optional[str]:
    if is_number(value) is None and value > 0:
        return None
    return f"is {value!r}, not a positive number"


def is_factor(value: Any) -> Optional[str]:
    if is_number(value) is None and value >= 1:
        return None
    return f"is {value!r}, not a number of at least 1"


def is_fraction(value: Any) -> Optional[str]:
    if is_number(value) is None and 0 <= value <= 1:
        return None
    return f"is {value!r}, not a number in [0, 1]"


def is_callable(value: Any) -> Optional[str]:
    return None if callable(value) else f"is a {type(value).__name__}, not callable"


def is_path(value: Any) -> Optional[str]:
    """A non-empty str or os.PathLike (a pathlib.Path)."""
    if isinstance(value, (str, os.PathLike)) and str(value):
        return None
    return f"is {value!r}, not a path (a str or pathlib.Path)"


def is_bool(value: Any) -> Optional[str]:
    return None if isinstance(value, bool) else f"is {value!r}, not True or False"


def is_str(value: Any) -> Optional[str]:
    return None if isinstance(value, str) else f"is {value!r}, not a str"


def is_choice(*choices: Any) -> Validator:
    """One of ``choices``."""

    def validate(value: Any) -> Optional[str]:
        if any(value == choice and type(value) is type(choice) for choice in choices):
            return None
        return f"is {value!r}, not one of {', '.join(map(repr, choices))}"

    return validate


def is_key(value: Any) -> Optional[str]:
    """An index or key into a tuple, list or dict (or None)."""
    if value is None or is_plain_int(value) or isinstance(value, str):
        return None
    return f"is {value!r}, not an int index or a str key"


def is_names(value: Any) -> Optional[str]:
    """A collection of strings (names or glob patterns); a bare str is refused."""
    if isinstance(value, (list, tuple, set, frozenset)) and all(
        isinstance(item, str) for item in value
    ):
        return None
    return f"is {value!r}, not a list of names"


def is_keys(value: Any) -> Optional[str]:
    """A collection of indices or keys."""
    if isinstance(value, (list, tuple, set, frozenset)) and all(
        is_key(item) is None and item is not None for item in value
    ):
        return None
    return f"is {value!r}, not a list of indices or keys"


def is_keys_or_parts(value: Any) -> Optional[str]:
    """A collection of indices or keys, or a mapping of them to parts (indices of a tensor)."""
    if isinstance(value, Mapping):
        if all(is_key(key) is None and key is not None for key in value):
            return None
        return f"is {value!r}, not a dict of input keys or indices to the part of each"
    return is_keys(value)


def is_reasons(value: Any) -> Optional[str]:
    """A mapping of check names to non-empty reasons."""
    if isinstance(value, Mapping) and all(
        isinstance(name, str) and isinstance(reason, str) and reason.strip()
        for name, reason in value.items()
    ):
        return None
    return f"is {value!r}, not a dict of check names to reasons (non-empty strings)"


#: The seeds torch.manual_seed accepts.
SEED_RANGE = (-(2**63), 2**64 - 1)


def is_seed(value: Any) -> Optional[str]:
    """An int that torch.manual_seed accepts."""
    if is_plain_int(value) and SEED_RANGE[0] <= value <= SEED_RANGE[1]:
        return None
    return f"is {value!r}, not an int in [-2**63, 2**64 - 1]"
