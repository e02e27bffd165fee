"""Options: the attributes a test class sets for the checks, each declared once.

A mixin declares an option in its class body, beside the checks that read it: one line with
the type (the annotation), the default, the validator and an example, and under it the
attribute's docstring, whose first paragraph says what it means (the rest is more for the
docs)::

    class OutputShape(ModelContract):
        expected_output_shape: Sequence[int] = option(UNSET, is_shape, example="(4, 10)")
        \"""The shape of the checked output for self.inputs.\"""

        @check(reads=("model", "inputs", "expected_output_shape"))
        def test_output_shape(self) -> None: ...

The name comes from the attribute; the default becomes the class attribute (a required option
has none). Editors show the docstring where the option is used. The contract errors, the
mixins' docstrings, the documentation's lists and its "Reads." lines are generated from these
declarations and from the ``reads`` of each check.
"""

from __future__ import annotations

import ast
import functools
import inspect
import re
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple, Union

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


@functools.lru_cache(maxsize=None)
def _class_bodies(module: str) -> Dict[str, List[ast.stmt]]:
    """The class bodies of a module's source, by qualified name (read once, when a message or
    the docs first need an option's meaning, not at import)."""
    tree = ast.parse(inspect.getsource(sys.modules[module]))
    bodies: Dict[str, List[ast.stmt]] = {}

    def visit(statements: List[ast.stmt], prefix: str) -> None:
        for statement in statements:
            if isinstance(statement, ast.ClassDef):
                bodies[prefix + statement.name] = statement.body
                visit(statement.body, f"{prefix}{statement.name}.")
            elif isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(statement.body, f"{prefix}{statement.name}.<locals>.")

    visit(tree.body, "")
    return bodies


def _attribute_docstring(owner: type, name: str) -> str:
    """The docstring under the declaration of ``name`` in ``owner``'s class body."""
    body = _class_bodies(owner.__module__).get(owner.__qualname__, [])
    for statement, following in zip(body, body[1:]):
        if (
            isinstance(statement, ast.AnnAssign)
            and isinstance(statement.target, ast.Name)
            and statement.target.id == name
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            return inspect.cleandoc(following.value.value)
    raise TypeError(
        f"option {owner.__qualname__}.{name} ({owner.__module__}) has no docstring: write what "
        "it means in a docstring on the line under its declaration"
    )


def _as_phrase(sentence: str) -> str:
    """'The model under test.' as the phrase messages use: 'the model under test'."""
    sentence = sentence.strip().removesuffix(".")
    if re.match(r"[A-Z][a-z]*\b", sentence):
        sentence = sentence[0].lower() + sentence[1:]
    return sentence


@dataclass(frozen=True)
class Option:
    """One option of a mixin, declared once (see ``option``). ``name``, ``annotation``,
    ``suite`` and ``owner`` are filled in when the declaring class is made."""

    example: str
    default: Any = UNSET
    validate: Optional[Validator] = None
    default_text: str = ""
    #: a callable the checks call: True, or the parameters of a method that can stand for it
    #: (``"self, rank=0, world_size=1"``), which the contract errors suggest
    factory: Union[bool, str] = False
    #: the names it had before a rename: still read, with a DeprecationWarning
    formerly: Tuple[str, ...] = ()
    #: the docstring, for a class made without source; otherwise read from the source
    doc: str = ""
    name: str = ""
    annotation: str = ""
    #: the public mixin whose contract the option belongs to, for messages ("ModelTests")
    suite: str = "dltestkit"
    #: the class whose body declares it
    owner: Optional[type] = None

    def _paragraphs(self) -> List[str]:
        text = self.doc
        if not text and self.owner is not None:
            text = _attribute_docstring(self.owner, self.name)
        return [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip()]

    @property
    def meaning(self) -> str:
        """What it is, as a noun phrase ("the model under test"): the docstring's first
        paragraph."""
        paragraphs = self._paragraphs()
        return _as_phrase(paragraphs[0]) if paragraphs else ""

    @property
    def details(self) -> str:
        """More for the docs: the docstring after its first paragraph."""
        return " ".join(self._paragraphs()[1:])

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
    default: Any = UNSET,
    validate: Optional[Validator] = None,
    *,
    example: str,
    default_text: str = "",
    factory: Union[bool, str] = False,
    formerly: Tuple[str, ...] = (),
    doc: str = "",
) -> Any:
    """Declare an option in a mixin's class body; its docstring goes on the line under it.

    Args:
        default: the value when the test class does not set it; ``REQUIRED`` (it must) or
            ``UNSET`` (the checks that read it skip, naming it).
        validate: returns what is wrong with a value ("is 3, not a str"), or None.
        example: a Python expression that would be a good value, for messages and docs.
        default_text: how the docs describe the default, when ``repr(default)`` does not say
            enough ("the shape of inputs").
        factory: a callable the checks call (``make_model``): while unset, calling it is a
            ContractError that names it, not a ``TypeError`` about UNSET. A string gives the
            parameters of a method of the test class that serves as well, for messages.
        formerly: the names the option had before a rename. A test class that sets one still
            works: the value is used, with a DeprecationWarning that names the new name.
        doc: the docstring, for a class made without source code (``type(...)``).
    """
    return Option(example, default, validate, default_text, factory, formerly, doc)
