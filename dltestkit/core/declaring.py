"""Declaring options: what ``option()`` in a mixin's class body becomes when the class is made
(its name, annotation and suite filled in, its default in its place), and the stand-in of an
unset factory option."""

from __future__ import annotations

import dataclasses
import pathlib
import sys
from typing import Any, Dict, List, NoReturn, Protocol

from .checks import SHARED, checks_of
from .options import UNSET, Option


class _Test(Protocol):
    """What an unset factory needs of the test (a CheckMixin)."""

    def _unset_factory_error(self, name: str, what: str) -> Exception: ...


__all__ = ["declare_options"]


class _UnsetCall:
    """What an unset factory option (``make_model``, ``make_trainer``) is on a test: the checks
    that need it skip, as for any unset option, but a call (``self.trainer =
    self.make_trainer()`` in a setUp whose class has none, or a misspelled one) raises a
    ContractError that names it."""

    def __init__(self, name: str, test: _Test) -> None:
        self.name = name
        self.test = test

    def __call__(self, *args: Any, **kwargs: Any) -> NoReturn:
        caller = sys._getframe(1)
        where = (
            f"{type(self.test).__name__}.{caller.f_code.co_name} "
            f"({pathlib.Path(caller.f_code.co_filename).name}, line {caller.f_lineno})"
        )
        raise self.test._unset_factory_error(
            self.name, f"{where} calls self.{self.name}(), which is not set"
        )

    def __repr__(self) -> str:
        return repr(UNSET)


class _UnsetFactory:
    """The class-level default of a factory option (see ``_UnsetCall``). A non-data
    descriptor: a method of the test class or an attribute set in setUp takes its place."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, test: Any, owner: Any = None) -> Any:
        if test is None or getattr(test, "_reading_unset", False):
            return UNSET
        return _UnsetCall(self.name, test)


def _rst(markdown: str) -> str:
    """Markdown inline code (`x`) as reStructuredText inline literals (``x``)."""
    return markdown.replace("`", "``")


def declare_options(cls: type) -> None:
    """Fill in the options declared in ``cls``'s body (name, annotation, suite), put their
    defaults in their place, check that its checks read declared options, and give a public
    mixin (one named by its own ``_suite``) its whole contract in ``__doc__``."""
    annotations = vars(cls).get("__annotations__", {})
    suite = getattr(cls, "_suite", "dltestkit")
    own: Dict[str, Option] = {}
    for name, value in list(vars(cls).items()):
        if not isinstance(value, Option):
            continue
        declared = dataclasses.replace(
            value, name=name, annotation=str(annotations.get(name, "")), suite=suite, owner=cls
        )
        own[name] = declared
        if declared.required:
            delattr(cls, name)
        elif declared.factory and declared.default is UNSET:
            setattr(cls, name, _UnsetFactory(name))
        else:
            setattr(cls, name, declared.default)
    cls._own_options = own  # type: ignore[attr-defined]
    options = cls._options()  # type: ignore[attr-defined]
    if vars(cls).get("_suite") != cls.__name__:
        return
    # a public mixin: every option its checks read is one of its own
    for name in checks_of(cls):
        unknown = [
            n for n in getattr(getattr(cls, name), "__dltestkit_reads__", ()) if n not in options
        ]
        if unknown:
            raise TypeError(f"{cls.__name__}.{name} reads undeclared options {unknown}")
    if cls.__doc__:
        cls.__doc__ = _ContractDoc(cls.__doc__, list(options.values()))  # type: ignore[assignment]


class _ContractDoc:
    """A public mixin's ``__doc__``: its docstring and its whole contract, written when first
    read (``help()``, the docs), since the options' meanings come from the source."""

    def __init__(self, doc: str, declared: List[Option]) -> None:
        self.doc = doc
        self.declared = declared
        self.text = ""

    def __get__(self, instance: Any, owner: Any = None) -> str:
        if not self.text:
            self.text = self.doc.rstrip() + _contract_text(self.declared)
        return self.text


def _contract_text(declared: List[Option]) -> str:
    declared = sorted(declared, key=lambda o: o.name in SHARED)  # the shared ones last
    required = [o for o in declared if o.required]
    optional_ = [o for o in declared if not o.required]
    lines = ["", "", "Required in setUp:"] if required else [""]
    lines += [f"    ``self.{o.name}``: {o.meaning}, e.g. ``{o.example}``." for o in required]
    lines += ["", "Optional (default in brackets):"]
    lines += [
        f"    ``self.{o.name}``: {o.meaning} [{_rst(o.describe_default())}]." for o in optional_
    ]
    return "\n    ".join(lines) + "\n"
