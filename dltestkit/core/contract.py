"""What every mixin shares: the options and their validation, the checks and how they run
(seeded, with their parts as subtests, listed ones as expected failures), temporary folders.

A *check* is a test method decorated with ``@check(reads=...)``, naming the options it reads.
A *feature* is a mixin that owns some checks and the options only they read; a public mixin
(``ModelTests``, ``DatasetTests``, ...) is a composition of features over the contract they
share. One rule composes them all: multiple inheritance, the mixins before ``TestCase``.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import pathlib
import shutil
import tempfile
import types
import unittest
import warnings
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
    Set,
)

import torch

from .checks import SHARED, check, checks_of, is_dltestkit, reads_of
from .declaring import declare_options
from .options import UNSET, ContractError, Option, option
from .processes import end_as_terminated, terminating_as_interrupt
from .seeds import make_deterministic, preserved_global_state
from .settings import Settings
from .validators import is_positive_int, is_reasons, is_seed, optional

if TYPE_CHECKING:  # the mixins are always combined with TestCase; tell the type checker
    _TestCaseBase = unittest.TestCase
else:
    _TestCaseBase = object

__all__ = ["SHARED", "CheckMixin", "check", "checks_of", "reads_of"]

_MISSING = object()
_UNITTEST_NAMES = frozenset(vars(unittest.TestCase(methodName="__init__")))
#: What appears in the working directory without a test writing it there: Python's bytecode
#: cache of a module imported for the first time, coverage's data files.
_NOT_LEFT_BY_TESTS = ("__pycache__", ".coverage", ".pytest_cache")


class CheckMixin(_TestCaseBase):
    """Base of the dltestkit mixins. Not used directly."""

    seed: int = option(0, is_seed, example="1234")
    """The seed of every RNG during setUp and the check.

    Set it as a class attribute: the generators are seeded before setUp runs. See
    [determinism](determinism.md)."""
    num_threads: Optional[int] = option(1, optional(is_positive_int), example="2")
    """The CPU threads PyTorch uses during setUp and each check.

    Set with `torch.set_num_threads` and restored afterwards; `None` leaves PyTorch's setting alone.
    One thread keeps the small forward and backward passes of the checks fast on a loaded machine
    and under `pytest -n`, where more threads than cores make them up to 30 times slower. See
    [performance](performance.md)."""
    expected_failed_checks: Mapping[str, str] = option(
        types.MappingProxyType({}),
        is_reasons,
        example='{"test_eval_deterministic": "Monte Carlo dropout at evaluation"}',
        default_text="`{}`",
    )
    """The checks the component cannot pass by design, each with the reason.

    Set it as a class attribute. A listed check still runs: its failure is reported as an expected
    failure with the reason, and a pass as an unexpected success, so that the list stays true (under
    unittest and pytest, where it is an XFAIL). A name that is no check of the class is a contract
    error."""

    #: the public mixin whose contract a class belongs to, for messages ("ModelTests")
    _suite: ClassVar[str] = "dltestkit"
    #: the options a class declares itself (filled in when the class is made)
    _own_options: ClassVar[Dict[str, Option]] = {}
    _failed_subtests: List[str]
    _expected_failures: Optional[List[BaseException]] = None
    _reported_by_pytest: bool = False
    _reading_unset: bool = False
    _threads_before: int = 1
    _temp_root: Optional[str] = None
    _temp_dirs: List[str]
    #: what changed global settings while the check ran (for a failure's message)
    _settings_changes: List[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if is_dltestkit(cls):
            declare_options(cls)
            return
        mixin = next(base for base in cls.__mro__ if is_dltestkit(base))
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

    @classmethod
    def _options(cls) -> Dict[str, Option]:
        """Every option of the class's mixins, by name."""
        found: Dict[str, Option] = {}
        for base in reversed(cls.__mro__):
            found.update(vars(base).get("_own_options", {}))
        return found

    # -- running -----------------------------------------------------------------
    def _run_check(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a check's body (see ``check``): the options validated first, grad mode on, the
        global settings that changed and the seed named in a failure, a check listed in
        expected_failed_checks reported as expected."""
        self._validate_contract()
        self._use_threads()
        self._prepare()
        self._failed_subtests = []
        self._settings_changes = []
        reason = self._expected_failure_reason()
        if reason is None:
            with self._seed_note(), self._settings_note(), torch.enable_grad():
                result = func(self, *args, **kwargs)
                self._report_failed_subtests()
                return result
        self._expected_failures = []
        try:
            with self._seed_note(), self._settings_note(), torch.enable_grad():
                func(self, *args, **kwargs)
        except (unittest.SkipTest, ContractError):
            raise
        except Exception as exc:  # a failure, or an error of the component under test
            self._expected_failures.append(exc)
        self._report_expected_failure(reason)
        return None

    @contextlib.contextmanager
    def _seed_note(self) -> Iterator[None]:
        """Append the seed that reproduces a failure to its message."""
        try:
            yield
        except self.failureException as exc:
            text = exc.args[0] if exc.args else ""
            if "ran with seed=" not in str(text):
                exc.args = (
                    f"{text}\n[dltestkit] {type(self).__name__}.{self._testMethodName} ran "
                    f"with seed={self.seed}; set `seed` on the test class to try another.",
                ) + exc.args[1:]
            raise

    @contextlib.contextmanager
    def _settings_note(self) -> Iterator[None]:
        """Name, in the message of a failure or an error, the global settings that changed
        while it ran: those the component changed in calls the check watched (the model's
        forward, noted in ``_settings_changes``) and those that differ at the end."""
        start = Settings.capture()
        try:
            yield
        except (unittest.SkipTest, ContractError):
            raise
        except Exception as exc:
            noted = getattr(self, "_settings_changes", [])
            # the environment is left out: torch sets variables of its own on first use
            changed = start.changes(Settings.capture(), environ=False)
            changes = list(dict.fromkeys(noted + changed))
            text = str(exc.args[0]) if exc.args else ""
            said = [text, *getattr(exc, "__notes__", [])]
            if changes and not any("[dltestkit] global settings changed" in t for t in said):
                note = (
                    "[dltestkit] global settings changed while the check ran, which may "
                    f"explain this: {'; '.join(changes)}. Change them around the code that "
                    "needs them (with torch.no_grad(), torch.autocast(...), ...), not for the "
                    "whole process."
                )
                if isinstance(exc, self.failureException) and exc.args:
                    exc.args = (f"{text}\n{note}",) + exc.args[1:]
                elif hasattr(exc, "add_note"):
                    exc.add_note(note)
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
            except ContractError:
                raise
            except unittest.SkipTest:
                pass
            except Exception as exc:
                self._expected_failures.append(exc)
            return
        with super().subTest(*(() if msg is _MISSING else (msg,)), **params):
            try:
                with self._seed_note(), self._settings_note():
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

    def _skip_part(self, part: str, reason: str) -> None:
        """Report one part of a check as skipped (a subtest); the check goes on."""
        with self.subTest(part=part):
            self.skipTest(reason)

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
        restore the global RNGs, PyTorch's thread setting and the global settings a model or
        setUp can change (``core.settings``); warn about files left in the working directory.

        Interrupted (Ctrl-C, or SIGTERM, which is turned into an interrupt while the check
        runs), the test's cleanups still run (unittest and pytest skip them): its temporary
        folders are removed, its workers and ranks stopped; then the interrupt goes on (a
        SIGTERM ends the process, as it would have)."""
        self._reported_by_pytest = type(result).__module__.startswith("_pytest")
        method = getattr(type(self), self._testMethodName, None)
        if (
            not self._reported_by_pytest
            and getattr(method, "__dltestkit_check__", False)
            and self._expected_failure_reason() is not None
        ):
            self.__unittest_expecting_failure__ = True
        threads = self._threads_before = torch.get_num_threads()
        settings = Settings.capture()
        listed = _listing(settings.cwd)
        self._temp_dirs = []
        try:
            with preserved_global_state(), terminating_as_interrupt():
                # A bad seed is reported by the contract check; seed with 0 till then.
                make_deterministic(self.seed if is_seed(self.seed) is None else 0)
                self._use_threads()
                try:
                    return super().run(result)
                except KeyboardInterrupt as exc:
                    self._clean_up_interrupted()
                    end_as_terminated(exc)
                    raise
        finally:
            torch.set_num_threads(threads)
            settings.restore()
            self._warn_about_leftovers(settings.cwd, listed)

    def _clean_up_interrupted(self) -> None:
        """After an interrupt, which the test runners let through before the test's cleanups:
        run them, and remove the temporary folders whatever they do."""
        try:
            self.doCleanups()
        finally:
            for path in self._temp_dirs:
                shutil.rmtree(path, ignore_errors=True)

    def _warn_about_leftovers(self, cwd: Optional[str], before: Optional[Set[str]]) -> None:
        """Warn when the test left new files in the working directory (a checkpoint, ./runs
        written by a trainer): they stay after the test, and the next run finds them."""
        after = _listing(cwd)
        if before is None or after is None:
            return
        new = sorted(name for name in after - before if not name.startswith(_NOT_LEFT_BY_TESTS))
        if new:
            warnings.warn(
                f"{type(self).__name__}.{self._testMethodName} left new files in the working "
                f"directory {cwd}: {', '.join(new[:5])}"
                + (f" and {len(new) - 5} more" if len(new) > 5 else "")
                + ". setUp or the test wrote them there, and they stay after it; write them "
                "into a folder from self.make_temp_dir(), which is removed after the test "
                "(give it to the trainer as its checkpoint and log directory).",
                UserWarning,
                stacklevel=2,
            )

    def make_temp_dir(self) -> pathlib.Path:
        """Create a temporary folder that is removed after the test, even when it fails or is
        interrupted.

        In the processes of a distributed check (which end without running the test's
        cleanups) the folder is made inside one that the calling process removes.
        """
        path = tempfile.mkdtemp(prefix=f"dltestkit-{type(self).__name__}-", dir=self._temp_root)
        self.addCleanup(shutil.rmtree, path, ignore_errors=True)
        if self._temp_root is None:
            getattr(self, "_temp_dirs", []).append(path)
        return pathlib.Path(path)

    # -- the options ---------------------------------------------------------------
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
            if issubclass(base, CheckMixin) and is_dltestkit(base):
                continue
            if base in (unittest.TestCase, object) or base.__module__ == "unittest.case":
                continue
            for name, value in vars(base).items():
                if (
                    not name.startswith(("_", "test"))
                    and not callable(value)
                    and not isinstance(value, (classmethod, staticmethod, property))
                ):
                    yield name

    def _where(self) -> str:
        return f"{type(self).__name__}.setUp"

    def _origin(self, name: str) -> str:
        """Where the test class sets option ``name``, for messages: "set in TestX.setUp", "set
        in the class body of TestX", "a method of TestX"."""
        if name in vars(self):
            return f"set in {self._where()}"
        for base in type(self).__mro__:
            if is_dltestkit(base) or name not in vars(base):
                continue
            if callable(vars(base)[name]):
                return f"(a method of {base.__name__})"
            return f"set in the class body of {base.__name__}"
        return f"set in {self._where()}"

    def _suite_of(self, declared: Option) -> str:
        """The public mixin of this test class whose contract holds the option (for messages):
        DistributedTrainerTests for world_size in a distributed trainer's test, ModelTests for
        seed in a model's."""
        for base in type(self).__mro__:
            if (
                is_dltestkit(base)
                and vars(base).get("_suite") == base.__name__
                and declared.name in base._options()  # type: ignore[attr-defined]
            ):
                return base.__name__
        return declared.suite

    def _contract_error(self, name: str, problem: str) -> ContractError:
        """A ContractError about ``self.<name>``: what is wrong, who needs what, an example."""
        declared = self._options()[name]
        return ContractError(
            f"self.{name} {self._origin(name)} {problem}; {self._suite_of(declared)} needs "
            f"{declared.meaning}, e.g. self.{name} = {declared.example}."
        )

    def _value(self, name: str) -> Any:
        """The option's value as set; UNSET for an unset factory (no _UnsetCall)."""
        self._reading_unset = True
        try:
            return getattr(self, name, _MISSING)
        finally:
            self._reading_unset = False

    def _renamed(self, user_names: Set[str]) -> Set[str]:
        """Take the values set under the former names of renamed options, with a warning;
        return those names."""
        former: Set[str] = set()
        for declared in self._options().values():
            for old in declared.formerly:
                former.add(old)
                if old in user_names and declared.name not in user_names:
                    warnings.warn(
                        f"{type(self).__name__} sets self.{old}, which "
                        f"{self._suite_of(declared)} now calls self.{declared.name}: rename "
                        "it (the old name will stop working in a later release)",
                        DeprecationWarning,
                        stacklevel=4,
                    )
                    setattr(self, declared.name, getattr(self, old))
        return former

    def _validate_contract(self) -> None:
        declarations = self._options()
        user_names = set(self._user_names())
        former = self._renamed(user_names)
        for name in ("seed", "expected_failed_checks"):
            if name in vars(self):
                raise ContractError(
                    f"{self._where()} sets self.{name}, but "
                    + (
                        f"setUp already ran seeded with the class's seed ({type(self).seed})"
                        if name == "seed"
                        else "whether a check is expected to fail is decided before setUp runs"
                    )
                    + f". Set it as a class attribute instead: `class {type(self).__name__}"
                    f"(...):` with `{name} = {vars(self)[name]!r}` in the class body."
                )
        for name, declared in declarations.items():
            value = self._value(name)
            if value is _MISSING or value is UNSET:
                if declared.required:
                    close = difflib.get_close_matches(name, sorted(user_names), n=1)
                    hint = f" Did you mean self.{close[0]}?" if close else ""
                    raise ContractError(
                        f"{self._where()} must set self.{name}: {self._suite_of(declared)} needs "
                        f"{declared.meaning}, e.g. self.{name} = {declared.example}.{hint}"
                    )
                continue
            problem = declared.validate(value) if declared.validate else None
            if problem:
                raise self._contract_error(name, problem)
        for name in sorted(user_names - set(declarations) - former):
            close = difflib.get_close_matches(name, list(declarations), n=1, cutoff=0.8)
            if close and close[0] not in user_names:
                declared = declarations[close[0]]
                raise ContractError(
                    f"{type(self).__name__} sets self.{name} (in setUp or the class body), "
                    f"which no dltestkit mixin reads. Did you mean self.{close[0]} "
                    f"({self._suite_of(declared)}: {declared.meaning})?"
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
        """Rules that involve several options; raise a ContractError when one is broken."""

    def _is_set(self, name: str) -> bool:
        return self._value(name) not in (UNSET, _MISSING)

    def _defined_names(self) -> List[str]:
        """Every name the user's test class or its setUp defines, methods included."""
        names = set(self._user_names())
        for base in type(self).__mro__:
            if is_dltestkit(base) or base.__module__ in ("unittest.case", "builtins"):
                continue
            names.update(
                name
                for name, value in vars(base).items()
                if not name.startswith("_") and callable(value) and not name.startswith("test")
            )
        return sorted(names)

    def _misspelling(self, name: str) -> Optional[str]:
        """A name the test class defines that looks like a misspelling of option ``name``:
        close, and of about its length (a helper make_trainer_with(lr) is none)."""
        close = difflib.get_close_matches(name, self._defined_names(), n=1, cutoff=0.8)
        return close[0] if close and abs(len(close[0]) - len(name)) <= 2 else None

    def _get_or_skip(self, name: str) -> Any:
        """The option's value; skip the check, naming the option, when it is unset, or raise a
        ContractError when the test class defines a name close to it (a typo)."""
        value = self._value(name)
        if value is UNSET or value is _MISSING:
            declared = self._options()[name]
            close = self._misspelling(name)
            if close:
                raise ContractError(
                    f"self.{name} is not set, but {type(self).__name__} defines "
                    f"{close!r}: did you mean self.{name}? {self._suite_of(declared)} needs "
                    f"{declared.meaning}, e.g. self.{name} = {declared.example}."
                )
            self.skipTest(
                f"self.{name} is not set in {self._where()}; set it ({declared.meaning}, "
                f"e.g. self.{name} = {declared.example}) to enable this check"
            )
        return value

    def _unset_factory_error(self, name: str, what: str) -> ContractError:
        """A ContractError for an unset factory: what happened, what it must be, an example,
        and the close name the test class defines if there is one."""
        declared = self._options()[name]
        close = difflib.get_close_matches(name, self._defined_names(), n=1, cutoff=0.6)
        hint = (
            f" Did you mean {close[0]}? {type(self).__name__} defines {close[0]}, which no "
            f"dltestkit mixin reads; rename it to {name}."
            if close
            else ""
        )
        method = (
            f", or a method `def {name}({declared.factory}):` of the test class"
            if isinstance(declared.factory, str)
            else ""
        )
        return ContractError(
            f"{what}: {self._suite_of(declared)} needs {declared.meaning}, e.g. "
            f"self.{name} = {declared.example}{method}.{hint}"
        )


def _listing(folder: Optional[str]) -> Optional[Set[str]]:
    """The names in ``folder``; None when it cannot be read."""
    if folder is None:
        return None
    try:
        return set(os.listdir(folder))
    except OSError:
        return None


declare_options(CheckMixin)
