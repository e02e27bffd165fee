"""The trainer contract: what the trainer mixins read, and how their checks use a trainer.

A trainer is any object with ``train(epochs)`` and ``eval() -> loss``, its model, optimizer and
writer held in attributes whose names are options. The helpers here fetch those parts with a
``ContractError`` that names the option when one is missing, and record what the trainer logs.
"""

from __future__ import annotations

import difflib
import inspect
import itertools
import math
import pathlib
import sys
from typing import (
    Any,
    Callable,
    ClassVar,
    Dict,
    List,
    NamedTuple,
    NoReturn,
    Optional,
    Sequence,
    Tuple,
)
from unittest import mock

import numpy as np
import torch
from torch import nn

from ._base import (
    UNSET,
    Attribute,
    CheckMixin,
    ContractError,
    is_callable,
    is_str,
    optional,
)
from ._random import derived_seed, make_deterministic

__all__ = [
    "Scalar",
    "TrainerContract",
    "as_number",
    "by_count",
    "describe",
    "is_trainer",
    "listed",
    "same_number",
]


# -- validators ------------------------------------------------------------------------------
_ABSENT = object()


def is_trainer(value: Any) -> Optional[str]:
    if callable(getattr(value, "train", None)) and callable(getattr(value, "eval", None)):
        return None
    return f"is a {type(value).__name__}, which has no train(epochs) and eval()"


def as_number(value: Any) -> Optional[float]:
    """``value`` as a float when it is one number (a Python, NumPy or one-element tensor
    number, not a bool), else None."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, (int, float, np.number)):
        return float(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.dtype != torch.bool:
        return float(value.detach().cpu())
    return None


def describe(value: Any) -> str:
    """A value for a message: a tensor by its shape, anything else by a short repr."""
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{text} (a {type(value).__name__})"


def is_finite_number(value: Any) -> bool:
    number = as_number(value)
    return number is not None and math.isfinite(number)


def same_number(a: float, b: float, rtol: float, atol: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b or abs(a - b) <= atol + rtol * abs(b)


class Scalar(NamedTuple):
    """One add_scalar call."""

    tag: Any
    value: Any
    step: Any

    def where(self) -> str:
        return f"{self.tag!r} at step {self.step}"


def call_arguments(call: Any) -> Scalar:
    """(tag, value, global_step) of a SummaryWriter.add_scalar call."""
    names = ("tag", "scalar_value", "global_step")
    values = list(call.args[:3]) + [None] * (3 - len(call.args[:3]))
    for position, name in enumerate(names):
        if name in call.kwargs:
            values[position] = call.kwargs[name]
    return Scalar(*values)


def same_scalar(a: Scalar, b: Scalar, rtol: float, atol: float) -> bool:
    x, y = as_number(a.value), as_number(b.value)
    if x is None or y is None:
        return bool(a.value == b.value)
    return same_number(x, y, rtol, atol)


def first_log_difference(
    expected: Sequence[Scalar], actual: Sequence[Scalar], start: int = 0
) -> Optional[Tuple[Optional[Scalar], Optional[Scalar]]]:
    """The first pair (from ``start`` on) whose tag or step differs; None if there is none."""
    pairs = itertools.zip_longest(expected[start:], actual[start:])
    for a, b in pairs:
        if a is None or b is None or (a.tag, a.step) != (b.tag, b.step):
            return a, b
    return None


def describe_scalar(scalar: Optional[Scalar]) -> str:
    return "nothing" if scalar is None else scalar.where()


def listed(names: Sequence[str], limit: int = 3) -> str:
    """The first ``limit`` names, and how many more there are."""
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def by_count(count: int, singular: str, plural: str) -> str:
    """``singular`` for one, ``plural`` for any other count."""
    return singular if count == 1 else plural


class _UnsetCall:
    """What ``self.make_trainer`` is while it is unset: the checks that need it skip, as for
    any unset attribute, but a call (``self.trainer = self.make_trainer()`` in a setUp whose
    class has no make_trainer, or a misspelled one) raises a ContractError that names it,
    where calling the plain UNSET marker would raise "'_Marker' object is not callable"."""

    def __init__(self, name: str, test: "TrainerContract") -> None:
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
    """The class-level default of ``make_trainer`` (see ``_UnsetCall``). A non-data
    descriptor: a method of the test class or an attribute set in setUp takes its place."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, test: Any, owner: Any = None) -> Any:
        if test is None or getattr(test, "_reading_unset", False):
            return UNSET
        return _UnsetCall(self.name, test)


class TrainerContract(CheckMixin):
    """The contract of the trainer mixins (TrainerTests, DistributedTrainerTests), and how
    their checks reach the parts of a trainer."""

    _mixin_name: ClassVar[str] = "TrainerTests"
    _contract: ClassVar[Tuple[Attribute, ...]] = (
        Attribute(
            "make_trainer",
            "a callable that builds a fresh trainer, with the same data, "
            "hyperparameters and model class every time",
            "lambda rank=0, world_size=1: Trainer(MyModel(), data)",
            validate=is_callable,
            read_by=(
                "test_resume",
                "test_reproducible",
                "test_eval_leaves_model_unchanged",
                "test_ddp_training",
            ),
            details="The weights are drawn from the seeded global RNG. `TrainerTests` "
            "calls `make_trainer()` (test_eval_leaves_model_unchanged only when eval() "
            "switches a mode, to train a trainer that no eval() came before), the "
            "distributed checks "
            "`make_trainer(rank=rank, world_size=world_size)` in each process: a "
            "method `def make_trainer(self, rank=0, world_size=1)` on the test "
            "class, which setUp also calls, serves both.",
        ),
        Attribute(
            "model_attribute",
            "the name of the trainer's attribute holding its model (an nn.Module)",
            '"net"',
            default="model",
            validate=is_str,
            read_by=(
                "test_resume",
                "test_reproducible",
                "test_eval_leaves_model_unchanged",
                "test_frozen_parameters",
                "test_ddp_training",
            ),
        ),
        Attribute(
            "optimizer_attribute",
            "the name of the trainer's attribute holding its optimizer",
            '"opt"',
            default="optimizer",
            validate=optional(is_str),
            read_by=("test_resume", "test_frozen_parameters"),
            details="`None`: no single optimizer (a GAN's two); no optimizer state is compared.",
        ),
        Attribute(
            "writer_attribute",
            "the name of the trainer's SummaryWriter attribute",
            '"writer"',
            default="summary",
            validate=optional(is_str),
            read_by=("test_logging", "test_resume", "test_reproducible", "test_ddp_training"),
            details="Any object with `add_scalar(tag, scalar_value, global_step)` will "
            "do. `None`: the trainer logs nothing; then `expected_scalars` stays "
            "unset and the other checks compare no logs.",
        ),
    )

    make_trainer: Callable[..., Any]
    _reading_unset: bool = False
    model_attribute: str
    optimizer_attribute: Optional[str]
    writer_attribute: Optional[str]

    # -- factories that are not set ---------------------------------------------------------
    def _is_set(self, name: str) -> bool:
        return super()._is_set(name) and not isinstance(getattr(self, name), _UnsetCall)

    def _get_or_skip(self, name: str) -> Any:
        if not isinstance(getattr(self, name, None), _UnsetCall):
            return super()._get_or_skip(name)
        # read as what it is, UNSET: the base class skips naming it, or raises a
        # ContractError naming the close name the test class defines instead
        self._reading_unset = True
        try:
            return super()._get_or_skip(name)
        finally:
            self._reading_unset = False

    def _unset_factory_error(self, name: str, what: str) -> ContractError:
        """A ContractError for an unset factory: what happened, what it must be, an example,
        and the close name the test class defines if there is one."""
        attribute, mixin = self._declarations()[name]
        close = difflib.get_close_matches(name, self._defined_names(), n=1, cutoff=0.6)
        hint = (
            f" Did you mean {close[0]}? {type(self).__name__} defines {close[0]}, which no "
            f"dltestkit mixin reads; rename it to {name}."
            if close
            else ""
        )
        return ContractError(
            f"{what}: {mixin} needs {attribute.meaning}, e.g. "
            f"self.{name} = {attribute.example}, or a method `def {name}(self, rank=0, "
            f"world_size=1):` of the test class.{hint}"
        )

    def _call_make_trainer(self, **arguments: Any) -> Any:
        """make_trainer(**arguments); a ContractError when it cannot take those arguments."""
        make_trainer = self._get_or_skip("make_trainer")
        self._check_factory_arguments(**arguments)
        return make_trainer(**arguments)

    def _check_factory_arguments(self, **arguments: Any) -> None:
        """A ContractError when make_trainer's signature does not take ``arguments``."""
        try:
            signature = inspect.signature(self.make_trainer)
        except (TypeError, ValueError):  # no signature to read (a builtin): the call will tell
            return
        try:
            signature.bind(**arguments)
        except TypeError as exc:
            call = ", ".join(f"{key}={value!r}" for key, value in arguments.items())
            raise self._contract_error(
                "make_trainer",
                f"cannot be called as make_trainer({call}) ({exc}); the checks call it so",
            ) from None

    # -- the parts of a trainer --------------------------------------------------------------
    def _close_writer(self, trainer: Any) -> None:
        if self.writer_attribute is None:
            return
        close = getattr(getattr(trainer, self.writer_attribute, None), "close", None)
        if callable(close):
            self.addCleanup(close)

    def _writer(self, trainer: Any) -> Any:
        """The trainer's writer; None when writer_attribute is None."""
        if self.writer_attribute is None:
            return None
        writer = getattr(trainer, self.writer_attribute, None)
        if writer is None or not callable(getattr(writer, "add_scalar", None)):
            raise ContractError(
                f"the trainer ({type(trainer).__name__}) has no SummaryWriter at "
                f"trainer.{self.writer_attribute} (writer_attribute): "
                + (
                    "there is no such attribute"
                    if not hasattr(trainer, self.writer_attribute)
                    else f"it is {describe(writer)}, which has no add_scalar"
                )
                + ". Give the trainer its writer there, set self.writer_attribute to the name "
                "of the attribute that holds it, or to None if the trainer logs nothing."
            )
        return writer

    def _model(self, trainer: Any) -> nn.Module:
        name = self.model_attribute
        model = getattr(trainer, name, _ABSENT)
        if isinstance(model, nn.Module):
            return model
        modules = [
            f"{key} ({type(value).__name__})"
            for key, value in (getattr(trainer, "__dict__", None) or {}).items()
            if isinstance(value, nn.Module)
        ]
        candidates = (
            f" (the trainer's nn.Module {by_count(len(modules), 'attribute', 'attributes')}: "
            f"{listed(modules, 5)})"
            if modules
            else " (the trainer has no attribute that holds an nn.Module)"
        )
        raise ContractError(
            f"the trainer ({type(trainer).__name__}) "
            + (
                f"has no attribute {name!r} (model_attribute)"
                if model is _ABSENT
                else f"has no nn.Module at trainer.{name} (model_attribute), it has "
                f"{describe(model)}"
            )
            + "; TrainerTests reads the trained model there. Set self.model_attribute to the "
            f"name of the attribute that holds it{candidates}."
        )

    def _optimizer(self, trainer: Any) -> Optional[Any]:
        """The trainer's optimizer; None when optimizer_attribute is None or the trainer has
        none yet (a Lightning adapter before fitting)."""
        if self.optimizer_attribute is None:
            return None
        if not hasattr(trainer, self.optimizer_attribute):
            raise ContractError(
                f"the trainer ({type(trainer).__name__}) has no attribute "
                f"{self.optimizer_attribute!r} (optimizer_attribute); TrainerTests reads the "
                "optimizer there. Set self.optimizer_attribute to the name of the attribute "
                "that holds it, or to None if the trainer has no single optimizer."
            )
        optimizer = getattr(trainer, self.optimizer_attribute)
        return optimizer if callable(getattr(optimizer, "state_dict", None)) else None

    def _eval_loss(self, trainer: Any) -> float:
        """trainer.eval() as a float; a ContractError naming what it returned otherwise."""
        value = trainer.eval()
        number = as_number(value)
        if number is None:
            raise ContractError(
                f"trainer.eval() returned {describe(value)}, not a number; TrainerTests needs "
                "eval() to return the evaluation loss as one number (a float, e.g. "
                "loss.item(); the mean over the evaluation data, not one value per batch or "
                "sample). Wrap a trainer whose eval() returns metrics in a subclass whose "
                "eval() returns the loss."
            )
        return number

    def _train(self, trainer: Any, epochs: int) -> List[Scalar]:
        """trainer.train(epochs), recording what it logs through its writer (not writing it)."""
        writer = self._writer(trainer)
        if writer is None:
            trainer.train(epochs)
            return []
        with mock.patch.object(writer, "add_scalar") as add_scalar:
            trainer.train(epochs)
        return [call_arguments(call) for call in add_scalar.call_args_list]

    def _state(self, trainer: Any) -> Dict[str, Any]:
        """A copy of the model's state dict (parameters and persistent buffers)."""
        return {
            name: value.detach().clone()
            for name, value in self._model(trainer).state_dict().items()
        }

    def _prepare(self) -> None:
        """A check starts without trainers of its own (``_new_trainer`` notes them)."""
        super()._prepare()
        self._made: List[Any] = []

    def _new_trainer(self, seed: int) -> Any:
        """A trainer from make_trainer(), built with every global RNG seeded with ``seed``."""
        self._get_or_skip("make_trainer")
        make_deterministic(seed)
        trainer = self._call_make_trainer()
        if is_trainer(trainer):
            raise self._contract_error(
                "make_trainer",
                f"returned a {type(trainer).__name__}, which has no train(epochs) and eval()",
            )
        model = self._model(trainer)
        for other in [getattr(self, "trainer", None), *self._made]:
            if trainer is other or model is getattr(other, self.model_attribute, None):
                what = "the same trainer" if trainer is other else "a trainer with the same model"
                raise self._contract_error(
                    "make_trainer",
                    f"returned {what} as before (self.trainer or an earlier "
                    "make_trainer() call), so the trainers it builds train one another's "
                    "weights; build a new trainer and a new model in every call",
                )
        self._made.append(trainer)
        self._close_writer(trainer)
        return trainer

    def _other_seed(self) -> int:
        return derived_seed(self.seed, 1)


# Unset, make_trainer is UNSET to the checks, and a ContractError when called (see _UnsetCall).
setattr(TrainerContract, "make_trainer", _UnsetFactory("make_trainer"))  # noqa: B010
