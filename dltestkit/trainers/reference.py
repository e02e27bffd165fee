"""test_reference_losses: one epoch of a fresh trainer, from the weights of its reference file,
logs the scalars the file holds (the first training losses) and evaluates to its loss."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, ClassVar, Dict, Iterator, List, NamedTuple, Optional, Tuple, Union

import torch
from torch import nn

from ..core.contract import check
from ..core.options import UNSET, option
from ..core.paths import named_tensors
from ..core.references import (
    Reference,
    ci_refusal,
    difference,
    missing_message,
    pack,
    pack_state,
    random_streams,
    random_streams_differ,
    read,
    resolve,
    state_hash,
    test_id,
    tolerance,
    unpack_state,
    unreadable_message,
    write,
    write_command,
    write_requested,
    written_message,
)
from ..core.seeds import derived_seed, make_deterministic
from ..core.validators import is_bool, is_choice, is_non_negative_number, is_path, optional
from .logs import Scalar, as_number
from .runs import ComparedRuns

__all__ = ["ReferenceLosses"]


class _Run(NamedTuple):
    """What one epoch of a fresh trainer showed."""

    scalars: List[Scalar]
    loss: float
    batch: List[torch.Tensor]
    dtype: torch.dtype
    device: torch.device
    loaded: bool


@contextlib.contextmanager
def _first_input(model: nn.Module) -> Iterator[List[torch.Tensor]]:
    """The tensors the first call of the model or of any of its submodules is given: the
    first batch the model sees (the trainer may call a method other than forward)."""
    modules = set(model.modules())
    found: List[torch.Tensor] = []
    seen = [False]

    def hook(module: nn.Module, args: Tuple[Any, ...]) -> None:
        if not seen[0] and module in modules:
            seen[0] = True
            found.extend(t.detach().clone() for _, t in named_tensors(args))

    handle = nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        yield found
    finally:
        handle.remove()


def _stored_value(scalar: Scalar) -> float:
    number = as_number(scalar.value)
    return float("nan") if number is None else number


class ReferenceLosses(ComparedRuns):
    """One epoch computes the losses the trainer's reference file holds."""

    _suite: ClassVar[str] = "TrainerTests"
    reference_file: Union[str, "os.PathLike[str]"] = option(
        UNSET, is_path, example='"references/trainer.safetensors"'
    )
    """The reference file of test_reference_losses, which holds the model's initial weights, the
    first batch, and what one epoch of training logs and eval() returns.

    A relative path is taken from the folder of the test's file. Written by `python -m dltestkit
    write-references <test id>` (or any run with `DLTESTKIT_WRITE_REFERENCES=1`), never in CI; see
    [references](references.md)."""
    reference_rtol: Optional[float] = option(None, optional(is_non_negative_number), example="1e-3")
    """The relative tolerance comparing the logged scalars with the reference file's.

    `None`: by the dtype and device of the model's parameters, as for `ModelTests`'
    `reference_rtol` (1e-4 for float32 on the CPU)."""
    reference_atol: Optional[float] = option(None, optional(is_non_negative_number), example="1e-4")
    """The absolute tolerance comparing the logged scalars with the reference file's.

    `None`: by the dtype and device of the model's parameters (1e-5 for float32 on the CPU)."""
    reference_weights: str = option("stored", is_choice("stored", "drawn"), example='"drawn"')
    """How the reference file holds the model's initial weights.

    `"stored"`: the state dict itself, exact. `"drawn"`: each parameter's mean and standard
    deviation, from which the weights are drawn with NumPy's legacy generator (the file stays
    small), as for `ModelTests`' `reference_weights`."""
    strict_reference_data: bool = option(False, is_bool, example="True")
    """Whether a first batch other than the reference's makes test_reference_losses fail.

    `False`: it skips, naming the difference: the data on this machine are not those the reference
    was written with (another copy of the data set, generated data), and the losses of other data
    say nothing about the code."""

    @check(
        reads=(
            "make_trainer",
            "trainer",
            "model_attribute",
            "writer_attribute",
            "nondeterministic_scalars",
            "reference_file",
            "reference_weights",
            "reference_rtol",
            "reference_atol",
            "strict_reference_data",
        )
    )
    def test_reference_losses(self) -> None:
        """Check that one epoch of a fresh trainer, started from the weights of its reference
        file, logs the scalars the file holds and evaluates to its loss.

        Catches a training step that computes something else than before: a changed loss (a
        reduction, a weight, a term), another optimizer, learning rate or schedule, gradients
        clipped or accumulated otherwise, a refactoring of the training loop that changed the
        numbers.
        """
        path = resolve(self, self._get_or_skip("reference_file"))
        self._get_or_skip("make_trainer")
        if write_requested():
            self._write_reference_losses(path)
        if not path.is_file():
            self.fail(missing_message(self, path, "the trainer's losses"))
        try:
            reference = read(path)
        except Exception as exc:
            self.fail(unreadable_message(self, path, exc))
        self._compare_with_reference(reference, self._reference_epoch(reference))

    # -- one epoch ---------------------------------------------------------------------------
    def _reference_epoch(self, reference: Reference, seed: Optional[int] = None) -> _Run:
        """One epoch of a fresh trainer from make_trainer() (under the reference's seed, or
        ``seed``) with the reference's weights, then its eval() loss."""
        seed = int(reference.meta["seed"]) if seed is None else seed
        trainer = self._new_trainer(seed)
        model = self._model(trainer)
        loaded = state_hash(model.state_dict()) != reference.meta.get("state_hash")
        if loaded or reference.meta.get("drawn"):
            try:
                with torch.no_grad():
                    model.load_state_dict(unpack_state(reference))
            except RuntimeError as exc:
                self.fail(
                    f"the trainer's model ({type(model).__name__}) does not load the weights "
                    f"of the reference {reference.path.name}: {exc}. Its architecture "
                    f"changed since the reference was written ({reference.versions()}). If "
                    f"the change is intended, rewrite the reference: {write_command(self)}"
                )
        make_deterministic(seed)  # training draws from here, whatever building the trainer drew
        with _first_input(model) as batch:
            scalars = self._train(trainer, 1)
        loss = self._eval_loss(trainer)
        first = next((p for p in model.parameters() if p.is_floating_point()), torch.zeros(()))
        return _Run(scalars, loss, batch, first.dtype, first.device, loaded)

    def _write_reference_losses(self, path: Path) -> None:
        refusal = ci_refusal(self)
        if refusal:
            self.fail(refusal)
        seed = self.seed
        meta: Dict[str, Any] = {"kind": "trainer losses", "test": test_id(self), "seed": seed}
        model = self._model(self._new_trainer(seed))
        drawn = (
            {name for name, _ in model.named_parameters(remove_duplicate=False)}
            if self.reference_weights == "drawn"
            else set()
        )
        tensors = pack_state(model.state_dict(), meta, drawn)
        meta["state_hash"] = state_hash(model.state_dict())
        run = self._reference_epoch(Reference(path, tensors, meta), seed)
        # the same weights under another seed: does the epoch depend on random numbers?
        other = self._reference_epoch(Reference(path, tensors, meta), derived_seed(seed, 1))
        meta["random"] = [s.value for s in run.scalars] != [
            s.value for s in other.scalars
        ] or run.loss != other.loss
        meta["scalars"] = [
            {"tag": str(s.tag), "step": s.step if isinstance(s.step, int) else None}
            for s in run.scalars
        ]
        tensors.update(pack("batch", run.batch, meta))
        tensors["values"] = torch.tensor(
            [_stored_value(s) for s in run.scalars] + [run.loss], dtype=torch.float64
        )
        meta["dtype"] = str(run.dtype).replace("torch.", "")
        tensors.update({f"random/{name}": t for name, t in random_streams().items()})
        size = write(path, tensors, meta)
        written = read(path)
        self._compare_with_reference(written, self._reference_epoch(written), just_written=True)
        self.skipTest(written_message(path, size))

    # -- comparing ---------------------------------------------------------------------------
    def _reference_tolerances(
        self, dtype: torch.dtype, device: torch.device
    ) -> Tuple[float, float]:
        rtol, atol = tolerance(dtype, device)
        return (
            rtol if self.reference_rtol is None else float(self.reference_rtol),
            atol if self.reference_atol is None else float(self.reference_atol),
        )

    def _compare_with_reference(
        self, reference: Reference, run: _Run, just_written: bool = False
    ) -> None:
        meta = reference.meta
        name = reference.path.name
        stored_batch = reference.group("batch")
        changed = self._reference_batch_change(run.batch, stored_batch)
        if changed and not just_written:
            text = (
                f"the first batch the model sees in one epoch of a fresh trainer differs from "
                f"the one the reference {name} was written with ({changed}): the data are not "
                "those of the reference (another copy of the data set, generated data), and the "
                "losses of other data say nothing about the code."
            )
            if self.strict_reference_data:
                self.fail(
                    f"{text} self.strict_reference_data is True. If the data changed on purpose, "
                    f"rewrite the reference: {write_command(self)}"
                )
            self.skipTest(
                f"{text} Set strict_reference_data = True to make this a failure, or rewrite the "
                f"reference with these data: {write_command(self)}"
            )
        streams = random_streams_differ(
            {
                k[len("random/") :]: v
                for k, v in reference.tensors.items()
                if k.startswith("random/")
            }
        )
        if meta.get("random") and streams and not just_written:
            self.skipTest(
                f"one epoch depends on random numbers (data order, dropout, sampling), and "
                f"{streams} draws other numbers under one seed here than where the reference "
                f"{name} was written ({reference.versions()}), so the losses cannot be compared. "
                f"Rewrite the reference on this installation: {write_command(self)}"
            )
        dtype = getattr(torch, str(meta.get("dtype", "float32")))
        rtol, atol = self._reference_tolerances(dtype, run.device)
        expected = [
            Scalar(entry["tag"], float(value), entry["step"])
            for entry, value in zip(meta["scalars"], reference.tensors["values"].tolist())
        ]
        expected_loss = float(reference.tensors["values"][-1])
        actual = [
            Scalar(str(s.tag), _stored_value(s), s.step if isinstance(s.step, int) else None)
            for s in run.scalars
        ]
        problem = self._first_reference_difference(actual, expected, rtol, atol)
        if problem is None and not self._reference_close(run.loss, expected_loss, rtol, atol):
            problem = (
                f"eval() after the epoch returns {run.loss:.8g}, {expected_loss:.8g} in the "
                f"reference (difference {abs(run.loss - expected_loss):.3g}, beyond rtol={rtol:g}, "
                f"atol={atol:g})"
            )
        if problem is None:
            return
        if just_written:
            self.fail(
                f"the reference {name} was just written, and a fresh trainer trained again from "
                f"its weights under the same seed differs from it: {problem}. The trainer is not "
                "reproducible (test_reproducible says why), so no reference can be compared with "
                "it."
            )
        weights = (
            " The fresh trainer's own initial weights differ from the reference's (another "
            "torch release's initialisation, a changed model); it trained from the reference's."
            if run.loaded
            else ""
        )
        self.fail(
            f"one epoch of a fresh trainer from make_trainer(), started from the weights of the "
            f"reference {name}, does not compute what the reference holds: {problem}. The data "
            f"and the weights are the reference's, so the training step now computes something "
            f"else than when the reference was written ({reference.versions()}).{weights}"
            f"{reference.rounding_hint()} If the change is intended, rewrite the reference and "
            f"commit it:\n    "
            f"{write_command(self)}\nIf not, look for the change in the loss, the optimizer and "
            "the training loop since the reference was committed."
        )

    def _first_reference_difference(
        self, actual: List[Scalar], expected: List[Scalar], rtol: float, atol: float
    ) -> Optional[str]:
        for position, (now, then) in enumerate(zip(actual, expected)):
            if (now.tag, now.step) != (then.tag, then.step):
                return f"scalar {position} logged is {now.where()}, {then.where()} in the reference"
            if not self._same_value(now, then, rtol, atol):
                return (
                    f"{now.where()} is {now.value:.8g}, {then.value:.8g} in the reference "
                    f"(difference {abs(now.value - then.value):.3g}, beyond rtol={rtol:g}, "
                    f"atol={atol:g})"
                )
        if len(actual) != len(expected):
            return f"the epoch logged {len(actual)} scalars, {len(expected)} in the reference" + (
                f" (the first extra: {actual[len(expected)].where()})"
                if actual[len(expected) :]
                else ""
            )
        return None

    @staticmethod
    def _reference_close(a: float, b: float, rtol: float, atol: float) -> bool:
        return a == b or abs(a - b) <= atol + rtol * abs(b) or (a != a and b != b)

    def _reference_batch_change(
        self, now: List[torch.Tensor], then: List[torch.Tensor]
    ) -> Optional[str]:
        if len(now) != len(then):
            return f"{len(now)} tensors, {len(then)} in the reference"
        for index, (a, b) in enumerate(zip(now, then)):
            rtol, atol = tolerance(b.dtype)
            gap = difference(a, b, rtol, atol)
            if gap is not None:
                return f"tensor {index}: {gap.describe(rtol, atol)}"
        return None
