"""What the mixins share: the setUp contract, seeding, temporary folders."""

from __future__ import annotations

import contextlib
import difflib
import functools
import pathlib
import shutil
import tempfile
import types
import unittest
from dataclasses import dataclass
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    ClassVar,
    Dict,
    Iterator,
    List,
    Mapping,
    Optional,
    Tuple,
    TypeVar,
)

import torch

from ._random import make_deterministic, preserved_global_state

if TYPE_CHECKING:  # the mixins are always combined with TestCase; tell the type checker
    _TestCaseBase = unittest.TestCase
else:
    _TestCaseBase = object

__all__ = ["REQUIRED", "UNSET", "Attribute", "CheckMixin", "ContractError", "check"]

_MISSING = object()
_UNITTEST_NAMES = frozenset(vars(unittest.TestCase(methodName="__init__")))
Validator = Callable[[Any], Optional[str]]


def _is_dltestkit(cls: type) -> bool:
    return cls.__module__ == "dltestkit" or cls.__module__.startswith("dltestkit.")


class ContractError(TypeError):
    """A test class's setUp did not provide what a dltestkit mixin needs."""


class _Marker:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


#: The default of an attribute that setUp must set.
REQUIRED: Any = _Marker("REQUIRED")
#: The default of an optional attribute without a value: the checks that read it skip.
UNSET: Any = _Marker("UNSET")


@dataclass(frozen=True)
class Attribute:
    """One attribute of a mixin's setUp contract, declared once.

    The mixin's class-level defaults, its docstring and the attribute tables of the
    documentation are all derived from these declarations.

    Args:
        name: the attribute, ``self.<name>``.
        meaning: what it is, as a noun phrase ("the model under test").
        example: a Python expression that would be a good value, for messages and docs.
        default: the value used when setUp does not set it; ``REQUIRED`` (setUp must set
            it) or ``UNSET`` (the checks in ``read_by`` that need it skip, naming it).
        validate: returns an error text for a wrong value ("is 3, not a str"), or None.
        read_by: the checks that read it; empty means every check of the mixin.
        default_text: how the docs describe the default, when ``repr(default)`` does not
            say enough ("the shape of inputs").
        details: more for the docs table, after the meaning.
    """

    name: str
    meaning: str
    example: str
    default: Any = UNSET
    validate: Optional[Validator] = None
    read_by: Tuple[str, ...] = ()
    default_text: str = ""
    details: str = ""

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def describe_default(self) -> str:
        """The default as the docs show it."""
        if self.default_text:
            return self.default_text
        if self.default is REQUIRED:
            return "required"
        if self.default is UNSET:
            if self.read_by:
                verb = "skips" if len(self.read_by) == 1 else "skip"
                return f"unset: {', '.join(f'`{name}`' for name in self.read_by)} {verb}"
            return "unset: the checks that need it skip"
        return f"`{self.default!r}`"


F = TypeVar("F", bound=Callable[..., Any])


def check(func: F) -> F:
    """Mark a test method as a dltestkit check.

    Before the body runs, the setUp contract is validated; an assertion failure gets
    a last line naming the seed that reproduces it.
    """

    @functools.wraps(func)
    def wrapper(self: "CheckMixin", *args: Any, **kwargs: Any) -> Any:
        self._validate_contract()
        self._use_threads()
        self._prepare()
        self._failed_subtests = []
        reason = self._expected_failure_reason()
        if reason is None:
            with self._seed_note():
                result = func(self, *args, **kwargs)
                self._report_failed_subtests()
                return result
        self._expected_failures = []
        try:
            with self._seed_note():
                func(self, *args, **kwargs)
        except (unittest.SkipTest, ContractError):
            raise
        except Exception as exc:  # a failure, or an error of the component under test
            self._expected_failures.append(exc)
        self._report_expected_failure(reason)
        return None

    setattr(wrapper, "__dltestkit_check__", True)  # noqa: B010 (wrapper's type has no such field)
    return wrapper  # type: ignore[return-value]


# -- validators: each returns None for a good value, else what is wrong ("is ..., not ...") --
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


def _is_plain_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_shape(value: Any) -> Optional[str]:
    """A tuple, list or torch.Size of non-negative ints (no bools)."""
    if (isinstance(value, (tuple, list)) or type(value).__name__ == "Size") and all(
        _is_plain_int(size) and size >= 0 for size in value
    ):
        return None
    return f"is {value!r}, not a shape (a tuple of non-negative ints)"


def is_positive_int(value: Any) -> Optional[str]:
    if _is_plain_int(value) and value > 0:
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


def is_callable(value: Any) -> Optional[str]:
    return None if callable(value) else f"is a {type(value).__name__}, not callable"


def is_bool(value: Any) -> Optional[str]:
    return None if isinstance(value, bool) else f"is {value!r}, not True or False"


def is_str(value: Any) -> Optional[str]:
    return None if isinstance(value, str) else f"is {value!r}, not a str"


def is_key(value: Any) -> Optional[str]:
    """An index or key into a tuple, list or dict (or None)."""
    if value is None or _is_plain_int(value) or isinstance(value, str):
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


SEED_RANGE = (-(2**63), 2**64 - 1)


def is_reasons(value: Any) -> Optional[str]:
    """A mapping of check names to non-empty reasons."""
    if isinstance(value, Mapping) and all(
        isinstance(name, str) and isinstance(reason, str) and reason.strip()
        for name, reason in value.items()
    ):
        return None
    return f"is {value!r}, not a dict of check names to reasons (non-empty strings)"


def is_seed(value: Any) -> Optional[str]:
    """An int that torch.manual_seed accepts."""
    if _is_plain_int(value) and SEED_RANGE[0] <= value <= SEED_RANGE[1]:
        return None
    return f"is {value!r}, not an int in [-2**63, 2**64 - 1]"


class CheckMixin(_TestCaseBase):
    """Base of the dltestkit mixins. Not used directly."""

    seed: int
    num_threads: Optional[int]
    expected_failed_checks: Mapping[str, str]

    _contract: ClassVar[Tuple[Attribute, ...]] = (
        Attribute(
            "seed",
            "the seed of every RNG during setUp and the check",
            "1234",
            default=0,
            validate=is_seed,
            details="Set it as a class attribute: the generators are seeded before "
            "setUp runs. See [determinism](determinism.md).",
        ),
        Attribute(
            "num_threads",
            "the CPU threads PyTorch uses during setUp and each check",
            "2",
            default=1,
            validate=optional(is_positive_int),
            details="Set with `torch.set_num_threads` and restored afterwards; `None` "
            "leaves PyTorch's setting alone. One thread keeps the small forward "
            "and backward passes of the checks fast on a loaded machine and "
            "under `pytest -n`, where more threads than cores make them up to "
            "30 times slower. See [performance](performance.md).",
        ),
        Attribute(
            "expected_failed_checks",
            "the checks the component cannot pass by design, each with the reason",
            '{"test_eval_deterministic": "Monte Carlo dropout at evaluation"}',
            default=types.MappingProxyType({}),
            validate=is_reasons,
            default_text="`{}`",
            details="Set it as a class attribute. A listed check still runs: its failure is "
            "reported as an expected failure with the reason, and a pass as an unexpected "
            "success, so that the list stays true (under unittest and pytest, where it is "
            "an XFAIL). A name that is no check of the class is a contract error.",
        ),
    )
    _failed_subtests: List[str]
    _expected_failures: Optional[List[BaseException]] = None
    _reported_by_pytest: bool = False
    _threads_before: int = 1
    _temp_root: Optional[str] = None
    _mixin_name: ClassVar[str] = "dltestkit"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if _is_dltestkit(cls):
            _install_contract(cls)
            return
        mixin = next(base for base in cls.__mro__ if "_mixin_name" in vars(base))
        if unittest.TestCase not in cls.__mro__:  # (the type checker assumes a TestCase)
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
        except self.failureException as exc:
            text = exc.args[0] if exc.args else ""
            if "[dltestkit]" not in str(text):
                exc.args = (
                    f"{text}\n[dltestkit] {type(self).__name__}.{self._testMethodName} ran "
                    f"with seed={self.seed}; set `seed` on the test class to try another.",
                ) + exc.args[1:]
            raise

    @contextlib.contextmanager
    def subTest(self, msg: Any = _MISSING, **params: Any) -> Iterator[None]:
        """``unittest.TestCase.subTest`` for one part of a check; a failure inside also names
        the seed. A part that skips is reported as a skipped subtest, and the check as passed
        when its other parts pass: unittest, left alone, reports the whole check as skipped
        when one of its subtests skips, so a reader would conclude that none of it ran
        (pytest reports the skipped subtest and the check itself as passed). In a check
        listed in expected_failed_checks, a failing part is noted and the others run."""
        if self._expected_failures is not None:
            try:
                yield
            except (unittest.SkipTest, ContractError) as exc:
                if isinstance(exc, ContractError):
                    raise
            except Exception as exc:
                self._expected_failures.append(exc)
            return
        with super().subTest(*(() if msg is _MISSING else (msg,)), **params):
            try:
                with self._seed_note():
                    yield
            except unittest.SkipTest as skip:
                outcome = getattr(self, "_outcome", None)
                add_skip = getattr(getattr(outcome, "result", None), "addSkip", None)
                subtest = getattr(self, "_subtest", None)
                if self._reported_by_pytest or add_skip is None or subtest is None:
                    raise
                add_skip(subtest, str(skip))
            except Exception:
                described = ", ".join(f"{k}={v!r}" for k, v in params.items())
                getattr(self, "_failed_subtests", []).append(
                    described or ("" if msg is _MISSING else str(msg))
                )
                raise

    def _report_failed_subtests(self) -> None:
        """Under pytest, fail the check itself when a subtest failed.

        unittest marks such a check failed; pytest 9 reports each failed subtest as SUBFAILED
        but the check itself as PASSED, which reads as if nothing were wrong.
        """
        if self._failed_subtests and self._reported_by_pytest:
            self.fail(
                f"{len(self._failed_subtests)} subtest(s) of this check failed "
                f"({'; '.join(self._failed_subtests)}); their messages are reported "
                "above as SUBFAILED"
            )

    def _expected_failure_reason(self) -> Optional[str]:
        """The reason expected_failed_checks gives for the running check, if it lists it."""
        listed = getattr(type(self), "expected_failed_checks", None)
        if not isinstance(listed, Mapping):
            return None
        reason = listed.get(self._testMethodName)
        return reason if isinstance(reason, str) else None

    def _report_expected_failure(self, reason: str) -> None:
        """End a check listed in expected_failed_checks: an expected failure with the reason
        if it failed, an unexpected success if it passed."""
        name = f"{type(self).__name__}.{self._testMethodName}"
        failures, self._expected_failures = self._expected_failures or [], None
        if failures:
            text = str(failures[0]).strip()
            message = (
                f"{name} failed, as expected_failed_checks says it does ({reason}); "
                f"what it reported: {type(failures[0]).__name__}: {text}"
            )
            if self._reported_by_pytest:
                import pytest

                pytest.xfail(message)
            raise self.failureException(message) from failures[0]
        if self._reported_by_pytest:
            self.fail(
                f"{name} passed, but expected_failed_checks lists it ({reason!r}): remove it "
                "from the list, so that the list says which checks really fail"
            )
        # under unittest the test is marked expecting a failure: a pass is reported as an
        # unexpected success, which makes the run unsuccessful

    def _use_threads(self) -> None:
        """Apply num_threads (set on the class or in setUp); None: the caller's setting."""
        if self.num_threads is None:
            torch.set_num_threads(self._threads_before)
        elif is_positive_int(self.num_threads) is None:
            torch.set_num_threads(self.num_threads)

    def _prepare(self) -> None:
        """Called before each check, after the contract is validated."""

    def run(self, result: Optional[unittest.TestResult] = None) -> Any:
        """Run setUp, the check and the cleanups seeded and with ``num_threads`` threads, then
        restore the global RNGs and PyTorch's thread setting."""
        self._reported_by_pytest = type(result).__module__.startswith("_pytest")
        method = getattr(type(self), self._testMethodName, None)
        if (
            not self._reported_by_pytest
            and getattr(method, "__dltestkit_check__", False)
            and self._expected_failure_reason() is not None
        ):
            self.__unittest_expecting_failure__ = True
        threads = self._threads_before = torch.get_num_threads()
        try:
            with preserved_global_state():
                # A bad seed is reported by the contract check; seed with 0 till then.
                make_deterministic(self.seed if is_seed(self.seed) is None else 0)
                self._use_threads()
                return super().run(result)
        finally:
            torch.set_num_threads(threads)

    def make_temp_dir(self) -> pathlib.Path:
        """Create a temporary folder that is removed after the test, even when it fails.

        In the processes of a distributed check (which end without running the test's
        cleanups) the folder is made inside one that the calling process removes.
        """
        path = tempfile.mkdtemp(prefix=f"dltestkit-{type(self).__name__}-", dir=self._temp_root)
        self.addCleanup(shutil.rmtree, path, ignore_errors=True)
        return pathlib.Path(path)

    # -- the contract ------------------------------------------------------------
    @classmethod
    def _attributes(cls) -> Dict[str, Attribute]:
        """Every attribute the class's mixins read, by name."""
        return {name: attribute for name, (attribute, _) in cls._declarations().items()}

    @classmethod
    def _declarations(cls) -> Dict[str, Tuple[Attribute, str]]:
        """Every attribute the class's mixins read, with the name of the mixin declaring it."""
        found: Dict[str, Tuple[Attribute, str]] = {}
        for base in reversed(cls.__mro__):
            for attribute in vars(base).get("_contract", ()):
                found[attribute.name] = (attribute, vars(base).get("_mixin_name", "dltestkit"))
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
                if (
                    not name.startswith("_")
                    and not callable(value)
                    and not isinstance(value, (classmethod, staticmethod, property))
                ):
                    yield name

    def _where(self) -> str:
        return f"{type(self).__name__}.setUp"

    def _contract_error(self, name: str, problem: str) -> ContractError:
        """A ContractError about ``self.<name>``: what is wrong, who needs what, an example."""
        attribute, mixin = self._declarations()[name]
        return ContractError(
            f"self.{name} set in {self._where()} {problem}; {mixin} needs "
            f"{attribute.meaning}, e.g. self.{name} = {attribute.example}."
        )

    def _validate_contract(self) -> None:
        declarations = self._declarations()
        user_names = set(self._user_names())
        if "seed" in vars(self):
            raise ContractError(
                f"{self._where()} sets self.seed, but setUp already ran seeded with the "
                f"class's seed ({type(self).seed}). Set it as a class attribute instead: "
                f"`class {type(self).__name__}(...):` with `seed = {vars(self)['seed']!r}` in "
                "the class body."
            )
        if "expected_failed_checks" in vars(self):
            raise ContractError(
                f"{self._where()} sets self.expected_failed_checks, but whether a check is "
                "expected to fail is decided before setUp runs. Set it as a class attribute: "
                f"`expected_failed_checks = {vars(self)['expected_failed_checks']!r}` in the "
                f"body of class {type(self).__name__}."
            )
        for name, (attribute, mixin) in declarations.items():
            value = getattr(self, name, _MISSING)
            if value is _MISSING or value is UNSET:
                if attribute.required:
                    close = difflib.get_close_matches(name, sorted(user_names), n=1)
                    hint = f" Did you mean self.{close[0]}?" if close else ""
                    raise ContractError(
                        f"{self._where()} must set self.{name}: {mixin} needs "
                        f"{attribute.meaning}, e.g. self.{name} = {attribute.example}.{hint}"
                    )
                continue
            problem = attribute.validate(value) if attribute.validate else None
            if problem:
                raise self._contract_error(name, problem)
        for name in sorted(user_names - set(declarations)):
            close = difflib.get_close_matches(name, list(declarations), n=1, cutoff=0.8)
            if close and close[0] not in user_names:
                attribute, mixin = declarations[close[0]]
                raise ContractError(
                    f"{type(self).__name__} sets self.{name} (in setUp or the class body), "
                    f"which no dltestkit mixin reads. Did you mean self.{close[0]} "
                    f"({mixin}: {attribute.meaning})?"
                )
        self._validate_expected_failures()
        self._validate_combination()

    def _validate_expected_failures(self) -> None:
        checks = checks_of(type(self))
        unknown = [name for name in self.expected_failed_checks if name not in checks]
        if unknown:
            close = difflib.get_close_matches(unknown[0], checks, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ContractError(
                f"{type(self).__name__}.expected_failed_checks lists {unknown[0]!r}, which is "
                f"not a check of the class (its checks: {', '.join(checks)}).{hint}"
            )

    def _validate_combination(self) -> None:
        """Rules that involve several attributes; raise a ContractError when one is broken."""

    def _is_set(self, name: str) -> bool:
        return getattr(self, name, UNSET) is not UNSET

    def _defined_names(self) -> List[str]:
        """Every name the user's test class or its setUp defines, methods included."""
        names = set(self._user_names())
        for base in type(self).__mro__:
            if _is_dltestkit(base) or base.__module__ in ("unittest.case", "builtins"):
                continue
            names.update(
                name
                for name, value in vars(base).items()
                if not name.startswith("_") and callable(value) and not name.startswith("test")
            )
        return sorted(names)

    def _get_or_skip(self, name: str) -> Any:
        """The attribute's value; skip the check, naming the attribute, when it is unset, or
        raise a ContractError when the test class defines a name close to it (a typo)."""
        value = getattr(self, name, UNSET)
        if value is UNSET:
            attribute, mixin = self._declarations()[name]
            close = difflib.get_close_matches(name, self._defined_names(), n=1, cutoff=0.8)
            if close:
                raise ContractError(
                    f"self.{name} is not set, but {type(self).__name__} defines "
                    f"{close[0]!r}: did you mean self.{name}? {mixin} needs {attribute.meaning}, "
                    f"e.g. self.{name} = {attribute.example}."
                )
            self.skipTest(
                f"self.{name} is not set in {self._where()}; set it ({attribute.meaning}, "
                f"e.g. self.{name} = {attribute.example}) to enable this check"
            )
        return value


def checks_of(cls: type) -> Tuple[str, ...]:
    """The names of the dltestkit checks a class has, in definition order of the mixins."""
    names = []
    for base in reversed(cls.__mro__):
        for name, value in vars(base).items():
            if getattr(value, "__dltestkit_check__", False) and name not in names:
                names.append(name)
    return tuple(names)


def shared_attributes() -> List[str]:
    """The attributes every mixin reads (CheckMixin's own: seed, num_threads)."""
    return [attribute.name for attribute in CheckMixin._contract]


def _rst(markdown: str) -> str:
    """Markdown inline code (`x`) as reStructuredText inline literals (``x``)."""
    return markdown.replace("`", "``")


def _install_contract(mixin: type) -> None:
    """Give a mixin its declared defaults as class attributes and, for a public mixin (one
    named by its own ``_mixin_name``), its whole contract in ``__doc__``."""
    for attribute in vars(mixin).get("_contract", ()):
        if not attribute.required:
            setattr(mixin, attribute.name, attribute.default)
    if not mixin.__doc__ or vars(mixin).get("_mixin_name") != mixin.__name__:
        return
    shared = shared_attributes()
    declared = list(mixin._attributes().values())  # type: ignore[attr-defined]
    declared.sort(key=lambda attribute: attribute.name in shared)  # the shared ones last
    required = [a for a in declared if a.required]
    optional_ = [a for a in declared if not a.required]
    lines = ["", "", "Required in setUp:"] if required else [""]
    lines += [f"    ``self.{a.name}``: {a.meaning}, e.g. ``{a.example}``." for a in required]
    lines += ["", "Optional (default in brackets):"]
    lines += [
        f"    ``self.{a.name}``: {a.meaning} [{_rst(a.describe_default())}]." for a in optional_
    ]
    mixin.__doc__ = mixin.__doc__.rstrip() + "\n    ".join(lines) + "\n"


_install_contract(CheckMixin)
