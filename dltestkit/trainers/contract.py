"""The trainer contract: what the trainer mixins read, and how their checks use a trainer.

A trainer is any object with ``train(epochs)`` and ``eval() -> loss``, its model, optimizer and
writer held in attributes whose names are options. The helpers here fetch those parts with a
``ContractError`` that names the option when one is missing, and record what the trainer logs.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, ClassVar, Dict, List, Optional
from unittest import mock

from torch import nn

from ..core.contract import CheckMixin
from ..core.messages import by_count, describe, listed
from ..core.options import UNSET, ContractError, option
from ..core.seeds import derived_seed, make_deterministic
from ..core.validators import is_callable, is_str, optional
from .logs import Scalar, as_number, call_arguments
from .state import persistent_loaders

__all__ = ["TrainerContract", "is_trainer"]

# -- validators ------------------------------------------------------------------------------
_ABSENT = object()


def is_trainer(value: Any) -> Optional[str]:
    if callable(getattr(value, "train", None)) and callable(getattr(value, "eval", None)):
        return None
    return f"is a {type(value).__name__}, which has no train(epochs) and eval()"


class TrainerContract(CheckMixin):
    """The contract of the trainer mixins (TrainerTests, DistributedTrainerTests), and how
    their checks reach the parts of a trainer."""

    _suite: ClassVar[str] = "TrainerTests"
    make_trainer: Callable[..., Any] = option(
        UNSET,
        is_callable,
        example="lambda rank=0, world_size=1: Trainer(MyModel(), data)",
        factory="self, rank=0, world_size=1",
    )
    """A callable that builds a fresh trainer, with the same data, hyperparameters and model class
    every time.

    The weights are drawn from the seeded global RNG. `TrainerTests` calls `make_trainer()`
    (test_eval_leaves_model_unchanged only when eval() switches a mode, to train a trainer that no
    eval() came before), the distributed checks `make_trainer(rank=rank, world_size=world_size)` in
    each process: a function taking `rank=0, world_size=1`, assigned in setUp (which calls it for
    `self.trainer` too), serves both. The checks of the training stack call it with one more
    keyword argument each, and skip when it does not take it: `accumulation_steps=k`
    (test_gradient_accumulation), `grad_scale=s` and `precision="bf16"` or `"32"`
    (test_mixed_precision), `compile_backend=b` (test_compiled_training); see the trainers
    page."""
    model_attribute: str = option("model", is_str, example='"net"')
    """The name of the trainer's attribute holding its model (an nn.Module)."""
    optimizer_attribute: Optional[str] = option("optimizer", optional(is_str), example='"opt"')
    """The name of the trainer's attribute holding its optimizer.

    `None`: no single optimizer (a GAN's two); no optimizer state is compared."""
    save_checkpoint_method: str = option("save_checkpoint", is_str, example='"save"')
    """The name of the trainer's method that saves a checkpoint to a path."""
    load_checkpoint_method: str = option("load_checkpoint", is_str, example='"load"')
    """The name of the trainer's method that restores a checkpoint from a path."""
    writer_attribute: Optional[str] = option("summary", optional(is_str), example='"writer"')
    """The name of the trainer's SummaryWriter attribute.

    Any object with `add_scalar(tag, scalar_value, global_step)` will do. `None`: the trainer logs
    nothing; then `expected_scalars` stays unset and the other checks compare no logs."""

    def _call_make_trainer(self, **arguments: Any) -> Any:
        """make_trainer(**arguments); a ContractError when it cannot take those arguments."""
        make_trainer = self._get_or_skip("make_trainer")
        self._check_factory_arguments(**arguments)
        return make_trainer(**arguments)

    def _refused(self, **arguments: Any) -> Optional[str]:
        """Why make_trainer cannot take these keyword arguments (for a skip that names them),
        or None when its signature takes them (or cannot be read)."""
        try:
            signature = inspect.signature(self.make_trainer)
        except (TypeError, ValueError):
            return None
        try:
            signature.bind(**arguments)
        except TypeError:
            refused = [
                name
                for name in arguments
                if name not in signature.parameters
                and not any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
            ] or list(arguments)
            return f"make_trainer does not take the keyword argument {listed(refused)}"
        return None

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

    def _method(self, trainer: Any, option: str) -> Callable[..., Any]:
        name = getattr(self, option)
        method = getattr(trainer, name, None)
        if not callable(method):
            raise ContractError(
                f"the trainer ({type(trainer).__name__}) has no method {name}(path) "
                f"({option}); {self._testMethodName} saves and loads checkpoints with it. Set "
                f"self.{option} to the name of the trainer's method."
            )
        return method  # type: ignore[no-any-return]

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

    def _new_trainer(self, seed: int, **keywords: Any) -> Any:
        """A trainer from make_trainer(**keywords), built with every global RNG seeded with
        ``seed``."""
        self._get_or_skip("make_trainer")
        make_deterministic(seed)
        try:
            trainer = self._call_make_trainer(**keywords)
        except TypeError as exc:  # make_trainer(**kwargs) handed on what the trainer refuses
            refused = [name for name in keywords if f"keyword argument '{name}'" in str(exc)]
            if not refused:
                raise
            self.skipTest(
                f"make_trainer does not take the keyword argument {refused[0]}: it raised "
                f"TypeError: {exc}"
            )
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
        self.addCleanup(_stop_loader_workers, trainer)
        return trainer

    def _other_seed(self) -> int:
        return derived_seed(self.seed, 1)


def _stop_loader_workers(trainer: Any) -> None:
    """Stop the worker processes of the trainer's DataLoaders with persistent workers (those
    among its attributes), once the check is done with it: left to the garbage collector (a
    trainer in a reference cycle), such a loader stops each worker only after torch's 5 s
    timeout, in whichever test runs then."""
    for loader in persistent_loaders(trainer).values():
        shutdown = getattr(getattr(loader, "_iterator", None), "_shutdown_workers", None)
        if callable(shutdown):
            shutdown()
