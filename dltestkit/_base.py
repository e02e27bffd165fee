"""What the three mixins share: the setUp contract, seeding, temporary folders."""
from __future__ import annotations

import contextlib
import difflib
import functools
import pathlib
import shutil
import tempfile
import unittest
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Dict, Iterator, Optional, Tuple, TypeVar

from ._random import make_deterministic, preserved_global_state

__all__ = ["Attribute", "CheckMixin", "ContractError", "check"]

_MISSING = object()
_UNITTEST_NAMES = frozenset(vars(unittest.TestCase(methodName="__init__")))


def _is_dltestkit(cls: type) -> bool:
    return cls.__module__ == "dltestkit" or cls.__module__.startswith("dltestkit.")


class ContractError(TypeError):
    """A test class's setUp did not provide what a dltestkit mixin needs."""


@dataclass(frozen=True)
class Attribute:
    """One attribute of a mixin's setUp contract.

    ``required`` attributes must always be set. Optional attributes either have a
    class-level default on the mixin, or (``skip_without=True``) make the checks that
    need them skip, with a reason naming the attribute, when they are not set.
    ``validate`` returns an error text for a wrong value, or ``None``.
    """

    name: str
    meaning: str
    example: str
    required: bool = False
    validate: Optional[Callable[[Any], Optional[str]]] = None


F = TypeVar("F", bound=Callable[..., Any])


def check(func: F) -> F:
    """Mark a test method as a dltestkit check.

    Before the body runs, the setUp contract is validated; an assertion failure gets
    a last line naming the seed that reproduces it.
    """

    @functools.wraps(func)
    def wrapper(self: "CheckMixin", *args: Any, **kwargs: Any) -> Any:
        self._validate_contract()
        self._prepare()
        with self._seed_note():
            return func(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


# -- validators -------------------------------------------------------------------
def is_instance(*types: type, description: str) -> Callable[[Any], Optional[str]]:
    def validate(value: Any) -> Optional[str]:
        if isinstance(value, types):
            return None
        return f"is a {type(value).__name__}, not {description}"

    return validate


def is_shape(value: Any) -> Optional[str]:
    if isinstance(value, (tuple, list)) and all(
        isinstance(size, int) and not isinstance(size, bool) and size >= 0 for size in value
    ):
        return None
    if hasattr(value, "__len__") and all(isinstance(size, int) for size in value):
        return None  # torch.Size
    return f"is {value!r}, not a shape (a tuple of non-negative ints)"


def is_positive_int(value: Any) -> Optional[str]:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return None
    return f"is {value!r}, not a positive int"


def is_number(value: Any) -> Optional[str]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return None
    return f"is {value!r}, not a number"


def is_int(value: Any) -> Optional[str]:
    if isinstance(value, int) and not isinstance(value, bool):
        return None
    return f"is {value!r}, not an int"


def is_optional_number(value: Any) -> Optional[str]:
    return None if value is None else is_number(value)


class CheckMixin:
    """Base of the dltestkit mixins. Not used directly."""

    #: Seed for every RNG during setUp and the check (Python, NumPy, torch).
    seed: int = 0

    _contract: ClassVar[Tuple[Attribute, ...]] = (
        Attribute("seed", "the seed of every RNG during setUp and the check", "0",
                  validate=is_int),
    )
    _mixin_name: ClassVar[str] = "CheckMixin"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if _is_dltestkit(cls):
            return
        mixin = next(base for base in cls.__mro__ if "_mixin_name" in vars(base))
        if not issubclass(cls, unittest.TestCase):
            if cls.__name__.startswith("Test"):
                raise TypeError(
                    f"class {cls.__name__} uses {mixin.__name__} but not unittest.TestCase, "
                    f"so unittest would run none of its checks. Write "
                    f"`class {cls.__name__}({mixin.__name__}, unittest.TestCase):`."
                )
            return
        mro = cls.__mro__
        if mro.index(unittest.TestCase) < mro.index(mixin):
            raise TypeError(
                f"class {cls.__name__} lists unittest.TestCase before {mixin.__name__}; put "
                f"the mixin first (`class {cls.__name__}({mixin.__name__}, "
                "unittest.TestCase)`) so that its seeding of setUp takes effect."
            )

    # -- running -----------------------------------------------------------------
    @contextlib.contextmanager
    def _seed_note(self) -> Iterator[None]:
        """Append the seed that reproduces a failure to its message."""
        try:
            yield
        except self.failureException as exc:  # type: ignore[attr-defined]
            text = exc.args[0] if exc.args else ""
            if "[dltestkit]" not in str(text):
                exc.args = (
                    f"{text}\n[dltestkit] {type(self).__name__}.{self._testMethodName} ran "  # type: ignore[attr-defined]
                    f"with seed={self.seed}; set `seed` on the test class to try another.",
                ) + exc.args[1:]
            raise

    @contextlib.contextmanager
    def subTest(self, *args: Any, **params: Any) -> Iterator[None]:
        """``unittest.TestCase.subTest``; a failure inside also names the seed."""
        with super().subTest(*args, **params), self._seed_note():  # type: ignore[misc]
            yield

    def _prepare(self) -> None:
        """Called before each check, after the contract is validated."""

    def run(self, result: Optional[unittest.TestResult] = None) -> Any:
        """Run setUp, the check and the cleanups seeded, then restore the global RNGs."""
        with preserved_global_state():
            # A seed that is not an int is reported by the contract check; seed with 0 till then.
            make_deterministic(self.seed if is_int(self.seed) is None else 0)
            return super().run(result)  # type: ignore[misc]

    def make_temp_dir(self) -> pathlib.Path:
        """Create a temporary folder that is removed after the test, even when it fails."""
        path = tempfile.mkdtemp(prefix=f"dltestkit-{type(self).__name__}-")
        self.addCleanup(shutil.rmtree, path, ignore_errors=True)  # type: ignore[attr-defined]
        return pathlib.Path(path)

    # -- the contract ------------------------------------------------------------
    @classmethod
    def _attributes(cls) -> Dict[str, Attribute]:
        found: Dict[str, Attribute] = {}
        for base in reversed(cls.__mro__):
            for attribute in vars(base).get("_contract", ()):
                found[attribute.name] = attribute
        return found

    def _user_names(self) -> Iterator[str]:
        """Names the user's test class or its setUp defined."""
        for name in vars(self):
            # pytest may set test methods on the instance; they are not configuration
            if name in _UNITTEST_NAMES or name.startswith(("_", "test")):
                continue
            if callable(getattr(type(self), name, None)):
                continue
            yield name
        for base in type(self).__mro__:
            if issubclass(base, CheckMixin) and _is_dltestkit(base):
                continue
            if base in (unittest.TestCase, object) or base.__module__ == "unittest.case":
                continue
            for name, value in vars(base).items():
                if not name.startswith("_") and not callable(value) and not isinstance(
                    value, (classmethod, staticmethod, property)
                ):
                    yield name

    def _where(self) -> str:
        return f"{type(self).__name__}.setUp"

    def _validate_contract(self) -> None:
        attributes = self._attributes()
        user_names = set(self._user_names())
        mixin = self._mixin_name
        for attribute in attributes.values():
            value = getattr(self, attribute.name, _MISSING)
            if value is _MISSING:
                if attribute.required:
                    close = difflib.get_close_matches(attribute.name, sorted(user_names), n=1)
                    hint = f" Did you mean self.{close[0]}?" if close else ""
                    raise ContractError(
                        f"{self._where()} must set self.{attribute.name}: {mixin} needs "
                        f"{attribute.meaning}, e.g. self.{attribute.name} = "
                        f"{attribute.example}.{hint}"
                    )
                continue
            problem = attribute.validate(value) if attribute.validate else None
            if problem:
                raise ContractError(
                    f"self.{attribute.name} set in {self._where()} {problem}; {mixin} needs "
                    f"{attribute.meaning}, e.g. self.{attribute.name} = {attribute.example}."
                )
        for name in sorted(user_names - set(attributes)):
            close = difflib.get_close_matches(name, list(attributes), n=1, cutoff=0.8)
            if close and close[0] not in user_names:
                raise ContractError(
                    f"{type(self).__name__} sets self.{name} (in setUp or the class body), "
                    f"which {mixin} does not read. Did you mean self.{close[0]} "
                    f"({attributes[close[0]].meaning})?"
                )

    def _get_or_skip(self, name: str) -> Any:
        """The attribute's value; skip the check, naming the attribute, when it is unset."""
        value = getattr(self, name, _MISSING)
        if value is _MISSING:
            attribute = self._attributes()[name]
            self.skipTest(  # type: ignore[attr-defined]
                f"self.{name} is not set in {self._where()}; set it ({attribute.meaning}, "
                f"e.g. self.{name} = {attribute.example}) to enable this check"
            )
        return value
