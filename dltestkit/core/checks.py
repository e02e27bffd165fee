"""Checks: test methods marked with ``@check(reads=...)``, the options each reads, and how a
check runs (the options validated first, the seed named in a failure, a check listed in
``expected_failed_checks`` reported as an expected failure)."""

from __future__ import annotations

import functools
from typing import Any, Callable, Tuple, TypeVar

__all__ = ["SHARED", "check", "checks_of", "is_dltestkit", "reads_of"]

F = TypeVar("F", bound=Callable[..., Any])

#: The options every check reads (the machinery reads them), declared by CheckMixin.
SHARED: Tuple[str, ...] = ("seed", "num_threads", "expected_failed_checks")


def is_dltestkit(cls: type) -> bool:
    return cls.__module__ == "dltestkit" or cls.__module__.startswith("dltestkit.")


def check(*, reads: Tuple[str, ...] = ()) -> Callable[[F], F]:
    """Mark a test method as a dltestkit check that reads the options ``reads`` (besides
    ``seed``, ``num_threads`` and ``expected_failed_checks``, which every check reads).

    Before the body runs, the options are validated; the body runs with grad mode on (the
    checks turn it off where they need it off, whatever setUp or the caller left); a failure
    gets a line naming the global settings that changed while it ran, if any, and a last line
    naming the seed that reproduces it; a check listed in ``expected_failed_checks`` reports
    an expected failure or an unexpected success."""

    def decorate(func: F) -> F:
        @functools.wraps(func)
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            return self._run_check(func, *args, **kwargs)  # CheckMixin._run_check

        setattr(wrapper, "__dltestkit_check__", True)  # noqa: B010
        setattr(wrapper, "__dltestkit_reads__", tuple(reads))  # noqa: B010
        return wrapper  # type: ignore[return-value]

    return decorate


def checks_of(cls: type) -> Tuple[str, ...]:
    """The names of the dltestkit checks a class has: those of its mixins in the order the
    class lists them (its method resolution order), each in the order its mixin defines them."""
    names = []
    for base in cls.__mro__:
        for name, value in vars(base).items():
            if getattr(value, "__dltestkit_check__", False) and name not in names:
                names.append(name)
    return tuple(names)


def reads_of(cls: type, name: str) -> Tuple[str, ...]:
    """The options check ``name`` of ``cls`` reads: those it declares, and ``seed``, which
    every check reads (as it does ``num_threads`` and ``expected_failed_checks``, which the
    docs leave out)."""
    declared = tuple(getattr(getattr(cls, name), "__dltestkit_reads__", ()))
    return declared + (("seed",) if "seed" not in declared else ())
