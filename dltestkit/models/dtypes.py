"""test_dtype_moving: a copy moved to bfloat16 or float64 runs and returns that dtype."""

from __future__ import annotations

import unittest
from typing import Any, Dict, NoReturn, Optional, Sequence

import torch
from torch import nn

from ..core.contract import check
from ..core.messages import error_text
from ..core.options import option
from ..core.paths import floating_tensors, map_tensors
from ..core.validators import is_bool
from .contract import ModelContract
from .copies import describe_mode
from .dtype_watch import DtypeWatch, watching_dtypes

__all__ = ["DtypeMoving"]


def _is_dtypes(value: Any) -> Optional[str]:
    if isinstance(value, (list, tuple)) and all(
        isinstance(d, torch.dtype) and d.is_floating_point for d in value
    ):
        return None
    return f"is {value!r}, not a list of floating-point torch dtypes"


class DtypeMoving(ModelContract):
    """The model moves to another floating-point dtype as a whole."""

    moved_dtypes: Sequence[torch.dtype] = option(
        (torch.bfloat16, torch.float64), _is_dtypes, example="[torch.bfloat16]"
    )
    """The floating-point dtypes a copy of the model is moved to."""
    strict_output_dtypes: bool = option(False, is_bool, example="True")
    """Whether every floating-point output must have the moved dtype, also one the model makes with
    a fixed dtype beside its computation.

    `False`: an output made with a fixed dtype that no tensor of the model's dtype flows into (a
    float32 mask of 0s and 1s, as transformers' ViTMAE returns) makes that dtype's part of
    `test_dtype_moving` skip, naming it and its line; an output that such a tensor promoted fails
    either way."""

    @check(reads=("model", "inputs", "unbatched_inputs", "moved_dtypes", "strict_output_dtypes"))
    def test_dtype_moving(self) -> None:
        """Check that a copy moved to each of ``moved_dtypes`` runs and returns that dtype.

        Catches tensors created with a fixed dtype (torch.randn(shape), x.float()) that
        break or upcast a model moved to bfloat16 or float64, named with the line that makes
        them.

        Every floating-point output must have the moved dtype, except a 0-dim one (a loss,
        a metric), which may be float32 instead, and must then be finite: losses are reduced
        in float32 on purpose (``torch.autocast`` does it, and transformers' losses cast the
        logits with ``.float()``, which gives a float32 loss for a float64 model too).
        """
        unrunnable = []  # the dtypes the model could not run in on this platform
        for dtype in self.moved_dtypes:
            with self.subTest(dtype=str(dtype)):
                try:
                    self._check_dtype(dtype)
                except _CannotRun as skip:
                    unrunnable.append(f"{dtype}: {skip}")
                    raise
        if unrunnable and len(unrunnable) == len(self.moved_dtypes):
            self.skipTest(f"no dtype could be checked. {' '.join(unrunnable)}")

    def _check_dtype(self, dtype: torch.dtype) -> None:
        """Check ``dtype`` in each mode on one sample of self.inputs (where a dtype comes from
        does not depend on the batch, and a float64 or bfloat16 pass on the CPU costs several
        float32 ones), in training mode on two where one does not pass (batch statistics of
        a single value); on all of them when that does not pass either, so that what is
        reported is what self.inputs shows. A training pass on fewer samples that raises is
        not judged (that takes a float32 copy and its pass) but tried on more samples,
        unless it lacks a ``dtype`` kernel, which no batch has either. One copy serves every
        pass but the one on all samples after a failure, which gets a fresh copy."""
        batch = self._batch_size()
        moved: Optional[nn.Module] = None
        failed = False  # a pass on fewer samples failed (it may have left its copy changed)
        constants: Dict[str, str] = {}  # outputs made beside the computation
        for training in (False, True):
            counts = [n for n in ((1, 2) if training else (1,)) if n < batch]
            for count in [*counts, batch]:
                if moved is None or (count == batch and failed):
                    # (the pass whose failure is reported runs on a copy no failed pass ran on)
                    moved = self._copy_model(dtype=dtype)
                given = self.inputs if count == batch else self._inputs_of(range(count))
                seen: Dict[str, str] = {}
                try:
                    # (in training mode, batch statistics of a single value are what fails on
                    # fewer samples: such an error is tried on more before it is judged)
                    judged = count == batch or not training
                    self._check_pass(dtype, moved, training, given, seen, judged)
                except _CannotRun:
                    raise
                except Exception:
                    if count == batch:
                        raise
                    failed = True
                    continue
                constants.update(seen)
                break
        if constants:
            self.skipTest(
                f"a copy moved with .to({dtype}) returns {', '.join(constants.values())}: "
                "made with a fixed dtype beside the model's computation (no tensor of the "
                f"model's dtype flows into it: a mask of 0s and 1s, a constant), so it "
                "promotes nothing the model computes; everything else has the moved dtype. "
                "Set strict_output_dtypes = True to make such an output a failure (create it "
                "with dtype=x.dtype to pass then)."
            )

    def _check_pass(
        self,
        dtype: torch.dtype,
        moved: nn.Module,
        training: bool,
        given: Any,
        constants: Dict[str, str],
        judged: bool,
    ) -> None:
        """Check one pass of ``moved`` (converted to ``dtype``) on ``given`` in one mode,
        noting in ``constants`` the outputs made with a fixed dtype beside the computation.
        An exception is judged (``_dtype_error``) if ``judged``, or if it looks like a
        missing kernel; raised as it is otherwise."""
        mode = describe_mode(training)
        inputs = map_tensors(lambda t: t.to(dtype) if t.is_floating_point() else t, given)
        raised: Optional[Exception] = None
        with watching_dtypes(dtype, moved) as watch:
            try:
                with torch.no_grad():
                    output = self._forward(moved, inputs, training)
            except Exception as exc:
                raised = exc
        if raised is not None:  # judged unwatched (it copies and runs the model again)
            if judged or _no_kernel(raised):
                self._dtype_error(raised, watch, dtype, training, given, moved)
            raise raised
        wrong = []
        for path, tensor in floating_tensors(output):
            if tensor.dtype == dtype:
                continue
            if tensor.dim() == 0 and tensor.dtype == torch.float32:  # a loss, on purpose
                if not torch.isfinite(tensor):
                    self.fail(
                        f"a copy moved with .to({dtype}) returns {path} = {float(tensor)} "
                        f"in {mode} mode: a scalar (a loss) may be computed in float32, "
                        f"but it must be finite. Look for values that overflow {dtype} "
                        "before the cast to float32 (exp, large logits), or compute them "
                        "in float32 too."
                    )
                continue
            origin = watch.origin(tensor)
            if origin is not None and origin.deliberate:
                continue  # an explicit cast (logits.float()): a choice of precision
            if origin is not None and not origin.mixed and not self.strict_output_dtypes:
                constants.setdefault(path, f"{path} ({tensor.dtype}, made by {origin.text})")
                continue
            wrong.append(f"{path} ({tensor.dtype}{', made by ' + origin.text if origin else ''})")
        if wrong:
            found = _mix_text(watch, moved, dtype)
            self.fail(
                f"a copy moved with .to({dtype}) returns {', '.join(wrong)} in {mode} "
                f"mode.{found} {_DTYPE_ADVICE}"
            )

    def _dtype_error(
        self,
        exc: Exception,
        watch: DtypeWatch,
        dtype: torch.dtype,
        training: bool,
        given: Any,
        moved: nn.Module,
    ) -> NoReturn:
        """Report an exception of the moved copy for what it is: an operation without a kernel
        for ``dtype`` (skip), a mix of dtypes (fail), or an error of the model's own (fail,
        as it is)."""
        mode = describe_mode(training)
        text = error_text(exc)
        first_line = text.splitlines()[0] if text else ""
        failed = watch.failure(exc)
        try:  # an error that the unmoved model raises too is no dtype problem: report it
            with torch.no_grad():
                self._forward(self._copy_model(), given, training)
        except Exception:
            raise exc from None
        if _no_kernel(exc):
            where = f" ({failed.describe()})" if failed is not None else ""
            raise _CannotRun(
                f"an operation of the model{where} has no {dtype} kernel on the CPU "
                f"({type(exc).__name__}: {first_line}); the other dtypes and checks ran"
            )
        if failed is not None and failed.dtypes and set(failed.dtypes) <= {dtype}:
            raise _CannotRun(
                f"{failed.describe()} cannot run in {dtype} on this platform although every "
                f"floating-point tensor it was given is {dtype} ({type(exc).__name__}: "
                f"{first_line}): an operation without a {dtype} kernel here, not a bug of the "
                "model; the other dtypes and checks ran"
            )
        lead = f"a copy moved with .to({dtype}) raises in {mode} mode: {type(exc).__name__}: "
        mix = _mix_text(watch, moved, dtype)
        if failed is None:
            self.fail(
                f"{lead}{text.strip()}, raised by the model's own code, not by a torch "
                f"operation.{mix} A model moved with .to({dtype}) must run in {dtype}; if it "
                "supports only some dtypes, set self.moved_dtypes to those."
            )
        given = (
            f", given {' and '.join(map(str, failed.dtypes))} tensors"
            if failed.dtypes
            else ", given no floating-point tensor"
        )
        self.fail(f"{lead}{text.strip()}, in {failed.describe()}{given}.{mix} {_DTYPE_ADVICE}")


def _mix_text(watch: DtypeWatch, moved: nn.Module, dtype: torch.dtype) -> str:
    """The first mix of dtypes worth reporting, for a message, and where the model keeps its
    tensor of another dtype when the pass did not make it (a cache that .to() missed)."""
    first = watch.mix()
    if not first:
        return ""
    kept = watch.kept_on(moved)
    where = (
        f" That tensor was not made by the forward pass: the model keeps it in {kept}, "
        f"which is no parameter or buffer, so .to({dtype}) did not convert it (a cache filled "
        "before the model was moved); register it with self.register_buffer(name, tensor, "
        "persistent=False), or rebuild the cache when the dtype or device changes."
        if kept
        else ""
    )
    return f" First mix of dtypes: {first}.{where}"


_DTYPE_ADVICE = (
    "A tensor created in forward with a fixed dtype or the default float32 "
    "(torch.randn(shape), torch.tensor([...]), mask.float()) promotes the rest, and a tensor "
    "cast with x.float() that meets the model's weights makes them disagree; create tensors "
    "from the inputs (torch.randn_like(x), x.new_tensor([...]), dtype=x.dtype) and cast back "
    "with .to(x.dtype) before combining. Explicit casts of a result (logits.float()) are fine."
)


def _no_kernel(exc: Exception) -> bool:
    """Whether ``exc`` says that an operation has no kernel (for a dtype)."""
    return isinstance(exc, NotImplementedError) or "not implemented for" in error_text(exc)


class _CannotRun(unittest.SkipTest):
    """A dtype the model cannot run in on this platform (an operation without its kernel)."""
