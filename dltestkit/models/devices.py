"""test_device_moving (on the meta device, no GPU needed) and test_device_moving_on_gpu."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..core.contract import check
from ..core.messages import error_text
from ..core.options import UNSET, option
from ..core.paths import map_tensors, named_tensors
from ..core.seeds import derived_seed
from ..core.validators import is_names, is_number, optional
from .contract import ModelContract
from .copies import describe_mode
from .meta import (
    MetaCannotRun,
    NeedsCpuRun,
    ReplayMismatch,
    available_accelerators,
    watch_meta_forward,
)
from .twins import Twins

__all__ = ["DeviceMoving"]

_DEVICE_MIXING = (
    "is not on the expected device",
    "to be on the same device",
    "Expected all tensors to be on the same device",
)


class DeviceMoving(ModelContract):
    """The model moves to another device as a whole."""

    accelerators: Sequence[str] = option(
        UNSET,
        is_names,
        example='["cuda"]',
        default_text="the accelerator torch finds (CUDA, MPS, XPU, ...), if any",
    )
    """The devices whose outputs are compared with the CPU's."""
    device_rtol: Optional[float] = option(None, optional(is_number), example="1e-4")
    """The relative tolerance comparing GPU and CPU outputs.

    `None`: the default of `torch.testing.assert_close` for the dtype."""
    device_atol: Optional[float] = option(None, optional(is_number), example="1e-5")
    """The absolute tolerance comparing GPU and CPU outputs."""

    @check(reads=("model", "inputs"))
    def test_device_moving(self) -> None:
        """Check that the model moves to another device as a whole (on ``meta``, no GPU needed).

        Catches a model that does not move to another device as a whole: tensors created
        without device= (position ids, noise), unregistered tensor attributes, layers in a
        plain list, outputs left on the CPU; found on the meta device, without a GPU.
        """
        on_meta: Optional[nn.Module] = self._copy_model("meta")
        unchecked: Dict[str, str] = {}  # mode: why it could not be checked
        for training in (False, True):  # eval first: only training mode updates BatchNorm
            why, on_meta = self._check_meta(on_meta, training)
            if why is not None:
                unchecked[describe_mode(training)] = why
        if len(unchecked) == 2:
            reasons = list(dict.fromkeys(unchecked.values()))
            self.skipTest(
                (
                    f"in eval and training mode, {reasons[0]}"
                    if len(reasons) == 1
                    else "; ".join(f"in {mode} mode, {why}" for mode, why in unchecked.items())
                )
                + ", so device bugs could not all be checked without a GPU"
            )
        for mode, why in unchecked.items():  # the other mode was checked: report this one
            with self.subTest(mode=mode):
                self.skipTest(
                    f"in {mode} mode, {why}, so device bugs could not all be checked in "
                    f"{mode} mode without a GPU (the other mode was checked)"
                )

    @check(reads=("model", "inputs", "accelerators", "device_rtol", "device_atol"))
    def test_device_moving_on_gpu(self) -> None:
        """Check that a copy moved to each GPU (CUDA, MPS, XPU) and back gives the CPU's outputs.

        Catches outputs that change when the model is moved to a real GPU and back (skips
        without one).
        """
        found = self.accelerators if self._is_set("accelerators") else available_accelerators()
        if not found:
            self.skipTest(
                "no CUDA, MPS or other accelerator: outputs on a GPU were not "
                "compared; test_device_moving checked device bugs on the meta device"
            )
        for device in found:
            with self.subTest(device=device):
                self._check_accelerator(device)

    def _check_meta(
        self, on_meta: Optional[nn.Module], training: bool
    ) -> Tuple[Optional[str], Optional[nn.Module]]:
        """Run ``on_meta`` (a copy moved to meta) watched; when it reaches a step that needs
        the data (``.item()``, ``nonzero()``, an operation without a meta kernel), or at once
        if ``on_meta`` is None (the other mode needed it), run a fresh meta copy, replaying the
        data reads of the model run on the CPU (a copy in training mode, which updates
        BatchNorm's statistics).

        Fails on a device bug; returns why this mode could not be checked on meta, or None,
        and the copy for the next mode (None once a CPU run was needed)."""
        mode = describe_mode(training)
        pairs: List[Tuple[torch.Tensor, torch.Tensor]] = []  # each meta input, its values

        def to_meta(tensor: torch.Tensor) -> torch.Tensor:
            made = tensor.to("meta")
            pairs.append((made, tensor.detach().clone()))
            return made

        inputs = map_tensors(to_meta, self.inputs)
        problem_text: Optional[str] = None
        try:
            try:
                if on_meta is None:
                    raise NeedsCpuRun
                unrecorded = on_meta
                output, problem = watch_meta_forward(  # (the inputs made for this run)
                    None,
                    lambda _: self._forward(unrecorded, inputs, training, copied=True),
                    unrecorded,
                    Twins(pairs),
                )
            except NeedsCpuRun:
                on_cpu = self._copy_model() if training else self.model
                replayed, fresh = self._copy_model("meta"), self._on("meta")
                on_meta = None
                output, problem = watch_meta_forward(
                    lambda: self._forward(on_cpu, self.inputs, training),
                    lambda _: self._forward(replayed, fresh, training),
                    replayed,
                )
        except ReplayMismatch as exc:
            why = f"the forward pass takes another path on the meta device than on the CPU ({exc})"
            return why, on_meta
        except MetaCannotRun as exc:
            cause = exc.failed.exception
            text = error_text(cause)
            why = (
                f"the model uses an operation the meta device cannot run, "
                f"{exc.failed.describe()} ({type(cause).__name__}: "
                f"{text.splitlines()[0] if text else ''})"
            )
            return why, on_meta
        except Exception as exc:
            text = error_text(exc)
            if isinstance(exc, RuntimeError) and any(s in text for s in _DEVICE_MIXING):
                problem_text = f"its forward combines a tensor left on the CPU ({text})"
            elif isinstance(exc, NotImplementedError) or "meta" in text.lower():
                why = (
                    "the model uses an operation the meta device cannot run "
                    f"({type(exc).__name__}: {text.splitlines()[0] if text else ''})"
                )
                return why, on_meta
            else:
                raise
        else:
            if problem is None or not problem.certain:
                self._assert_outputs_on(output, "meta", mode)
            if problem is not None and not problem.certain:
                why = (
                    f"{problem.describe()}: a device the model chose (device=None passed "
                    "explicitly, as code does that picks no device while its weights are on "
                    "meta: transformers' LongT5), which cannot be judged on meta; the rest of "
                    "the forward pass moved as a whole"
                )
                return why, on_meta
            if problem is not None:
                problem_text = problem.describe()
        if problem_text is not None:
            self.fail(
                f"the model does not move to another device as a whole: after .to('meta'), in "
                f"{mode} mode, {problem_text}. Usual causes: a tensor created without device= "
                "in forward (torch.arange(n) -> torch.arange(n, device=x.device), "
                "torch.randn(shape) -> torch.randn_like(x)), a tensor attribute that is not "
                "registered (self.register_buffer), layers kept in a plain Python list "
                "(nn.ModuleList). The same code fails on a GPU."
            )
        return None, on_meta

    def _assert_outputs_on(self, output: Any, device: str, mode: str) -> None:
        """Every output tensor of the model's copy on ``device`` is on ``device``."""
        stray = [
            f"{path} (on {tensor.device})"
            for path, tensor in named_tensors(output)
            if tensor.device.type != device
        ]
        if stray:
            self.fail(
                f"after .to({device!r}) the model returns {', '.join(stray)} in {mode} "
                "mode; create outputs on the inputs' device (no fixed device, no tensor "
                "made without device= in forward)"
            )

    def _assert_same_outputs(
        self, actual: Any, expected: Any, differs: str, rtol: Optional[float], atol: Optional[float]
    ) -> None:
        """Compare every output tensor of ``actual`` with the tensor at the same path in
        ``expected`` (``differs`` begins the message); outputs that are no tensor (a
        transformers cache object) are not compared."""
        got, wanted = list(named_tensors(actual)), list(named_tensors(expected))
        if [path for path, _ in got] != [path for path, _ in wanted]:
            self.fail(
                f"{differs}: it returns {', '.join(path for path, _ in got) or 'no tensor'} "
                f"instead of {', '.join(path for path, _ in wanted) or 'no tensor'}"
            )
        for (path, a), (_, b) in zip(got, wanted):

            def message(report: str, path: str = path) -> str:
                return f"{differs} ({path}):\n{report}"

            torch.testing.assert_close(a, b, rtol=rtol, atol=atol, equal_nan=True, msg=message)

    def _check_accelerator(self, device: str) -> None:
        with torch.no_grad():
            reference = self._forward(self.model, self.inputs)
            again = self._forward(self.model, self.inputs, seed=derived_seed(self.seed, 1))
            deterministic = all(
                torch.equal(a, b)
                for (_, a), (_, b) in zip(named_tensors(reference), named_tensors(again))
            )
            moved = self._copy_model(device)
            on_device = self._forward(moved, self._on(device))
            self._assert_outputs_on(on_device, device, "eval")
            on_device = map_tensors(lambda t: t.cpu(), on_device)
            if deterministic:
                self._assert_same_outputs(
                    on_device,
                    reference,
                    f"the model on {device} gives other outputs than on the CPU",
                    rtol=self.device_rtol,
                    atol=self.device_atol,
                )
            else:  # random even in eval mode: GPU noise differs from CPU noise
                for (path, a), (_, b) in zip(named_tensors(on_device), named_tensors(reference)):
                    self.assertEqual(a.shape, b.shape, f"{path} has another shape on {device}")
                    self.assertTrue(torch.isfinite(a).all(), f"{path} is not finite on {device}")
            # Back before any training-mode pass: that one updates BatchNorm's running
            # statistics, which would change the eval outputs of a correct model.
            back = self._forward(moved.to("cpu"), self.inputs)
            self._assert_same_outputs(
                back,
                reference,
                f"the model moved to {device} and back gives other outputs than before",
                rtol=0,
                atol=0,
            )
            in_training = self._copy_model(device)
            self._assert_outputs_on(
                self._forward(in_training, self._on(device), training=True), device, "training"
            )
