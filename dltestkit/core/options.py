"""Options: the attributes a test class sets for the checks, each declared once.

A mixin declares an option in its class body, beside the checks that read it::

    class OutputShape(ModelContract):
        expected_output_shape: Sequence[int] = option(
            "the shape of the checked output for self.inputs", "(4, 10)", validate=is_shape
        )

        @check(reads=("model", "inputs", "expected_output_shape"))
        def test_output_shape(self) -> None: ...

The name comes from the attribute, the type from the annotation; the default becomes the class
attribute (a required option has none). The contract errors, the mixins' docstrings, the
documentation's tables and its "Reads." lines are generated from these declarations and from
the ``reads`` of each check.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Tuple, Union

from .validators import Validator

__all__ = ["REQUIRED", "UNSET", "ContractError", "Option", "option"]


class ContractError(TypeError):
    """A test class's setUp did not provide what a dltestkit mixin needs."""


class _Marker:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


#: The default of an option that setUp must set.
REQUIRED: Any = _Marker("REQUIRED")
#: The default of an optional option without a value: the checks that read it skip.
UNSET: Any = _Marker("UNSET")


@dataclass(frozen=True)
class Option:
    """One option of a mixin, declared once (see ``option``). ``name``, ``annotation`` and
    ``suite`` are filled in when the declaring class is made."""

    meaning: str
    example: str
    default: Any = UNSET
    validate: Optional[Validator] = None
    default_text: str = ""
    details: str = ""
    #: a callable the checks call: True, or the parameters of a method that can stand for it
    #: (``"self, rank=0, world_size=1"``), which the contract errors suggest
    factory: Union[bool, str] = False
    #: the names it had before a rename: still read, with a DeprecationWarning
    formerly: Tuple[str, ...] = ()
    name: str = ""
    annotation: str = ""
    #: the public mixin whose contract the option belongs to, for messages ("ModelTests")
    suite: str = "dltestkit"

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def describe_default(self, read_by: "tuple[str, ...]" = ()) -> str:
        """The default as the docs show it."""
        if self.default_text:
            return self.default_text
        if self.required:
            return "required"
        if self.default is UNSET:
            if read_by:
                verb = "skips" if len(read_by) == 1 else "skip"
                return f"unset: {', '.join(f'`{name}`' for name in read_by)} {verb}"
            return "unset: the checks that need it skip"
        return f"`{self.default!r}`"


def option(
    meaning: str,
    example: str,
    default: Any = UNSET,
    *,
    validate: Optional[Validator] = None,
    default_text: str = "",
    details: str = "",
    factory: Union[bool, str] = False,
    formerly: Tuple[str, ...] = (),
) -> Any:
    """Declare an option in a mixin's class body.

    Args:
        meaning: what it is, as a noun phrase ("the model under test").
        example: a Python expression that would be a good value, for messages and docs.
        default: the value when the test class does not set it; ``REQUIRED`` (it must) or
            ``UNSET`` (the checks that read it skip, naming it).
        validate: returns what is wrong with a value ("is 3, not a str"), or None.
        default_text: how the docs describe the default, when ``repr(default)`` does not say
            enough ("the shape of inputs").
        details: more for the docs, after the meaning.
        factory: a callable the checks call (``make_model``): while unset, calling it is a
            ContractError that names it, not a ``TypeError`` about UNSET. A string gives the
            parameters of a method of the test class that serves as well, for messages.
        formerly: the names the option had before a rename. A test class that sets one still
            works: the value is used, with a DeprecationWarning that names the new name.
    """
    return Option(meaning, example, default, validate, default_text, details, factory, formerly)
