"""test_autocast: a training step under torch.autocast is finite and as close to float32's as
rounding to the low-precision dtype explains."""

from __future__ import annotations

import contextlib
import math
import re
import unittest
from typing import (
    Any,
    Callable,
    ContextManager,
    Dict,
    FrozenSet,
    List,
    NoReturn,
    Optional,
    Tuple,
)

import torch
from torch import nn

from ...core.contract import check
from ...core.messages import exception_text, listed
from ...core.options import option
from ...core.paths import floating_tensors, map_tensors
from ...core.validators import is_bool
from ...core.watch import (
    ModuleTracker,
    Watch,
    op_name,
    raising_user_line,
    watching,
)
from ..dtype_watch import watching_dtypes
from ..infinities import InfinityWatch
from .contract import ModuleOutputs, Run, StackContract, model_dtype, recording_module_outputs

__all__ = ["Autocast"]

#: How many times farther from float32's a result may be than rounding the weights and inputs
#: moves it (the zoo's results are within 3 times, a precision bug's tens to thousands).
RATIO = 16.0
#: The least distance allowed, in units of the dtype's machine epsilon, relative to the size
#: of the result (1/8 for bfloat16, 1/64 for float16).
FLOOR = 16.0


#: What an operation without a kernel for the dtype on this platform raises.
_NO_KERNEL = re.compile(
    r"not implemented for|Unsupported dtype|unsupported dtype|could not create a primitive"
)


def _is_low_precision(value: Any) -> Optional[str]:
    if value in (torch.bfloat16, torch.float16):
        return None
    return f"is {value!r}, not torch.bfloat16 or torch.float16"


def _norm(tensor: torch.Tensor, finite: Optional[torch.Tensor]) -> float:
    """The norm of ``tensor`` (in float64) where ``finite`` is True (everywhere if None)."""
    values = tensor.detach().double()
    if finite is not None:  # (zeros elsewhere, rather than a copy of the rest)
        values = torch.where(finite, values, 0.0)
    return float(torch.linalg.vector_norm(values))


def _distance(
    low: torch.Tensor, rounded: torch.Tensor, exact: torch.Tensor, eps: float
) -> Optional[Tuple[float, float]]:
    """How far ``low`` (autocast's) is from ``exact`` (float32's), relative to its size, and
    how far it may be: RATIO times as far as ``rounded`` (float32 with the weights and inputs
    rounded) is, and at least FLOOR machine epsilons; None when within that."""
    is_finite = torch.isfinite(exact)
    if low.shape != exact.shape or not is_finite.any():
        return None
    finite = None if bool(is_finite.all()) else is_finite
    exact64 = exact.double()
    size = _norm(exact64, finite)
    off = _norm(low.double() - exact64, finite)
    allowed = max(RATIO * _norm(rounded.double() - exact64, finite), FLOOR * eps * size)
    if off <= allowed:
        return None
    return off / size if size else math.inf, allowed / size if size else 0.0


def _non_finite(low: torch.Tensor, exact: torch.Tensor) -> bool:
    """NaN or Inf in ``low`` where ``exact`` is finite."""
    return bool((torch.isfinite(exact) & ~torch.isfinite(low)).any())


def _rounded(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype).to(tensor.dtype) if tensor.dtype == torch.float32 else tensor


def _torch_calls(*names: str) -> FrozenSet[Any]:
    """The functions of torch and the methods of tensors of these names."""
    return frozenset(getattr(owner, name) for owner in (torch, torch.Tensor) for name in names)


#: The selections that give the values they choose as well as where they are.
_EXTREMES = _torch_calls("max", "min", "kthvalue")
#: The torch calls that select among values by their order: the elements they choose change
#: when rounding reorders values closer together than the dtype resolves.
_SELECTIONS = _EXTREMES | _torch_calls("topk", "sort", "argsort", "argmax", "argmin")


def _chosen(result: Any) -> Optional[torch.Tensor]:
    """The indices a selection returns (topk's and sort's .indices, argmax's result), or None
    for a call that returns values only (max of a whole tensor, max of two tensors)."""
    indices = getattr(result, "indices", result)
    if isinstance(indices, torch.Tensor) and indices.dtype == torch.int64:
        return indices
    return None


class _SelectionWatch(Watch):
    """Note each selection of floating-point values: where, what it chose among, what it chose."""

    def __init__(self, modules: ModuleTracker) -> None:
        super().__init__(modules)
        self.selections: List[Tuple[Any, str, torch.Tensor, torch.Tensor]] = []

    def handle(self, func: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        result = func(*args, **kwargs)
        if func in _SELECTIONS and args and isinstance(args[0], torch.Tensor):
            chosen = _chosen(result)
            if chosen is not None and args[0].is_floating_point():
                among = args[0].detach().float().clone()
                where = f"{op_name(func)} {self.where()}"
                self.selections.append((func, where, among, chosen.clone()))
        return result


class Autocast(StackContract):
    """A training step under autocast is finite and as exact as its dtype allows."""

    autocast_dtype: torch.dtype = option(
        torch.bfloat16, _is_low_precision, example="torch.float16", default_text="`torch.bfloat16`"
    )
    """The dtype test_autocast runs the model in, with `torch.autocast` on the CPU.

    bfloat16 has float32's range and 8 bits of precision; float16 has 11 bits but a range up to
    65504 only: for a model trained with float16 autocast on a GPU, set `torch.float16`, whose
    overflows the CPU shows as the GPU does."""
    autocast_strict: bool = option(False, is_bool, example="True")
    """Whether test_autocast fails when a selection chooses otherwise under autocast.

    A selection (`torch.topk`, `argmax`, `sort`: a detector's top-scoring queries, a router's
    experts) whose values are closer together than the dtype resolves may choose other elements
    under autocast than in float32, from values as close as rounding explains; everything after
    it then differs, and cannot be compared. `False`: the comparison skips, naming the
    selection and its line. `True`: it fails, as when no selection explains the difference."""

    @check(reads=("model", "inputs", "loss_fn", "autocast_dtype", "autocast_strict"))
    def test_autocast(self) -> None:
        """Check that a training step under torch.autocast is finite and as close to float32's
        as rounding to the autocast dtype explains.

        Catches computations that break in low precision: a mask filled with
        torch.finfo(torch.float32).min (-inf in bfloat16, NaN in a fully masked row), values
        over 65504 in float16, a variance computed as E[x²] - E[x]², a tensor of another
        dtype that an in-place or indexed operation refuses (out[idx] += expert(x)); named
        with the first submodule whose output leaves the range or the precision.

        One training-mode forward pass runs under ``torch.autocast("cpu", autocast_dtype)``
        and its backward pass after it, from outputs cast to float32, as a mixed-precision
        training step does; it is compared with the same step in float32, output by output
        and over all the gradients together, in norm. The allowed distance comes from the
        model itself: the same step in float32 with the weights and inputs rounded to
        ``autocast_dtype`` moves the results by the part of the difference that rounding
        explains; autocast may be 16 times as far, and always 16 machine epsilons of the
        dtype, relative to the results' size (1/8 for bfloat16).
        """
        dtype = self.autocast_dtype
        if model_dtype(self.model) != torch.float32:
            self.skipTest(
                f"the model is in {model_dtype(self.model)}: torch.autocast casts float32 "
                "computations only, so it would change nothing; test_dtype_moving checks a "
                "model moved to another dtype"
            )
        exact = self._step_run(self._copy_model(), self.inputs, training=True, float_loss=True)
        rounded = self._step_run(
            self._autocast_rounded_model(dtype),
            map_tensors(lambda t: _rounded(t, dtype), self.inputs),
            training=True,
            float_loss=True,
        )
        low = self._autocast_run(self._copy_model(), dtype)
        eps = torch.finfo(dtype).eps
        outputs = list(
            zip(
                floating_tensors(low.output),
                floating_tensors(rounded.output),
                floating_tensors(exact.output),
            )
        )
        gradients = [
            (name, a, r, e)
            for (name, a), (_, r), (_, e) in zip(low.gradients, rounded.gradients, exact.gradients)
            if a is not None and r is not None and e is not None
        ]
        broken = [path for (path, a), _, (_, e) in outputs if _non_finite(a, e)]
        broken += [f"the gradient of {name}" for name, a, _, e in gradients if _non_finite(a, e)]
        if broken:
            self._autocast_range(broken, dtype)
        far = []
        for (path, a), (_, r), (_, e) in outputs:
            distance = _distance(a, r, e, eps)
            if distance is not None:
                far.append(f"{path} by {distance[0]:.3g} (allowed {distance[1]:.3g})")
        if gradients:
            distance = _distance(
                torch.cat([a.flatten() for _, a, _, _ in gradients]),
                torch.cat([r.flatten() for _, _, r, _ in gradients]),
                torch.cat([e.flatten() for _, _, _, e in gradients]),
                eps,
            )
            if distance is not None:
                far.append(f"the gradients by {distance[0]:.3g} (allowed {distance[1]:.3g})")
        if far:
            if not self.autocast_strict:
                self._autocast_selection(far, dtype)
            self._autocast_precision(far, dtype)

    # -- the three runs -------------------------------------------------------------------------
    def _autocast_context(self, dtype: torch.dtype) -> Callable[[], ContextManager[Any]]:
        return lambda: torch.autocast("cpu", dtype=dtype)

    def _autocast_rounded_model(self, dtype: torch.dtype) -> nn.Module:
        model = self._copy_model()
        with torch.no_grad():
            for tensor in (*model.parameters(), *model.buffers()):
                tensor.copy_(_rounded(tensor, dtype))
        return model

    def _autocast_run(self, model: nn.Module, dtype: torch.dtype) -> Run:
        try:
            return self._step_run(
                model,
                self.inputs,
                training=True,
                float_loss=True,
                context=self._autocast_context(dtype),
            )
        except (AssertionError, unittest.SkipTest):
            raise
        except Exception as exc:
            self._autocast_raised(exc, dtype)

    def _autocast_raised(self, exc: Exception, dtype: torch.dtype) -> NoReturn:
        """Report an exception of the step under autocast: a failure for a mix of dtypes, a
        constant out of ``dtype``'s range or an error of the model's own code; a skip for an
        operation without a kernel for ``dtype`` here, or one that torch's own code calls
        (a layer that runs in float32 only)."""
        model = self._copy_model()
        failed = None
        with watching_dtypes(dtype, model) as watch:
            try:
                self._step_run(
                    model,
                    self.inputs,
                    training=True,
                    float_loss=True,
                    context=self._autocast_context(dtype),
                )
            except Exception as again:
                failed = watch.failure(again)
        line = raising_user_line(exc)
        text = exception_text(exc).rstrip(".")
        operation = f"{failed.operation} in {failed.where}" if failed is not None else "the model"
        lead = f"under torch.autocast('cpu', dtype={dtype}), {operation} raises"
        dtypes = sorted(map(str, set(failed.dtypes))) if failed is not None else []
        if line is not None and len(dtypes) > 1:
            self.fail(
                f"{lead}, given {' and '.join(dtypes)} tensors, at {line}: {text}. Under "
                f"autocast, matrix products and convolutions return {dtype}, while tensors the "
                "model makes (torch.zeros_like(x) of a float32 input, a buffer) stay float32; "
                "in-place and indexed operations (index_add_, masked_scatter_, out[idx] = ...) "
                "refuse the mix. Cast the value to the destination's dtype (.to(out.dtype)), as "
                "transformers' mixtures of experts do."
            )
        if line is not None and "overflow" in text:
            self.fail(
                f"{lead}, at {line}: {text}. A constant beyond {dtype}'s range (a mask value "
                "such as torch.finfo(torch.float32).min or -1e9 in float16) meets a tensor of "
                f"autocast's dtype; use the range of the tensor's own dtype "
                "(torch.finfo(x.dtype).min)."
            )
        if line is None or isinstance(exc, NotImplementedError) or _NO_KERNEL.search(text):
            self.skipTest(
                f"{lead}"
                + (f", at {line}" if line else ", inside torch's own code")
                + f": {text}. An operation without a {dtype} kernel on this platform, or a "
                "layer that PyTorch runs in float32 only (quantisation observers): a limit of "
                "the platform, not a bug of the model"
            )
        self.fail(
            f"{lead}, at {line}: {text}. With float32 the step runs: the model's code does not "
            f"take the {dtype} tensors that autocast makes."
        )

    # -- the reports ----------------------------------------------------------------------------
    def _autocast_range(self, broken: List[str], dtype: torch.dtype) -> None:
        first = self._autocast_first_module(
            dtype, lambda low, rounded, exact: _non_finite(low, exact)
        )
        model = self._copy_model()
        with watching(model, InfinityWatch) as watch:
            context = self._autocast_context(dtype)
            self._forward_only(model, self.inputs, training=True, context=context)
        where = ""
        if watch.made:
            where += (
                " The first operation that makes NaN or Inf of finite values: "
                f"{watch.made[0].where}."
            )
        if first is not None:
            where += (
                " The first submodule whose output holds NaN or Inf where float32's does "
                f"not: {first}."
            )
        self.fail(
            f"under torch.autocast('cpu', dtype={dtype}), one training step gives NaN or Inf "
            f"where float32 gives finite values: {listed(broken)}.{where} Usual causes: a mask "
            "filled with torch.finfo(torch.float32).min or -1e9 (-inf in bfloat16 and beyond "
            "float16's range; a fully masked row is then NaN: use torch.finfo(x.dtype).min), "
            "values over 65504 in float16 (a sum of squares, exp), an epsilon such as 1e-8 "
            "that is 0 in float16. Compute such steps in float32 (x.float(), or "
            "torch.autocast('cpu', enabled=False) around them)."
        )

    def _autocast_precision(self, far: List[str], dtype: torch.dtype) -> None:
        eps = torch.finfo(dtype).eps
        first = self._autocast_first_module(
            dtype, lambda low, rounded, exact: _distance(low, rounded, exact, eps) is not None
        )
        where = f" The first submodule whose output is off: {first}." if first else ""
        self.fail(
            f"under torch.autocast('cpu', dtype={dtype}), one training step is farther from "
            f"float32's than rounding to {dtype} explains (relative distances, in norm): "
            f"{listed(far)}. Rounding the weights and inputs to {dtype} moves the results "
            f"{RATIO:g} times less.{where} The model loses more precision in {dtype} than its "
            "dtype does: look for a variance computed as E[x²] - E[x]², long sums or "
            f"cumulative sums in {dtype}, large position indices or timesteps in {dtype}, "
            "and compute them in float32."
        )

    def _autocast_selection(self, far: List[str], dtype: torch.dtype) -> None:
        """Skip when the first selection that chooses otherwise under autocast than in float32
        chose among values as close to float32's as rounding explains (its choice, and all
        that follows it, then tells nothing of the model's precision)."""
        runs = []
        for model, inputs, context in self._autocast_runs(dtype):
            with watching(model, _SelectionWatch) as watch:
                self._forward_only(model, inputs, training=True, context=context)
            runs.append(watch.selections)
        eps = torch.finfo(dtype).eps
        differing = []  # (call, where, indices that differ, indices), before lost precision
        for (func, where, among, chosen), (_, _, rounded, _), (_, same, exact, expected) in zip(
            *runs
        ):
            if where != same or chosen.shape != expected.shape:
                break  # the two runs took other paths since
            if torch.equal(chosen, expected):
                continue
            if _distance(among, rounded, exact, eps) is not None:
                break  # the values it chose among had lost their precision before
            differing.append((func, where, int((chosen != expected).sum()), chosen.numel()))
        if not differing:
            return
        # (max and min give their values too, which are alike; a choice is what follows them)
        _, where, differ, total = next(
            (found for found in differing if found[0] not in _EXTREMES), differing[0]
        )
        self.skipTest(
            f"under torch.autocast('cpu', dtype={dtype}), {where} chooses other elements than "
            f"in float32 ({differ} of its {total} indices differ), among values as close to "
            f"float32's as rounding to {dtype} explains: values closer together than {dtype} "
            "resolves (ties of a model with random weights, say) are ordered otherwise, and all "
            f"that follows the choice differs ({listed(far)}), so the step cannot tell rounding "
            "from a loss of precision. Set autocast_strict = True to make this a failure."
        )

    def _autocast_runs(
        self, dtype: torch.dtype
    ) -> List[Tuple[nn.Module, Any, Callable[[], ContextManager[Any]]]]:
        """Autocast's run, the rounded model's and float32's: model, inputs and context."""
        return [
            (self._copy_model(), self.inputs, self._autocast_context(dtype)),
            (
                self._autocast_rounded_model(dtype),
                map_tensors(lambda t: _rounded(t, dtype), self.inputs),
                contextlib.nullcontext,
            ),
            (self._copy_model(), self.inputs, contextlib.nullcontext),
        ]

    def _autocast_first_module(
        self, dtype: torch.dtype, off: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], bool]
    ) -> Optional[str]:
        """The first submodule call (in the order calls end) one of whose outputs is ``off``
        (given autocast's, the rounded model's and float32's output)."""
        records: List[Dict[str, List[torch.Tensor]]] = []
        for model, inputs, context in self._autocast_runs(dtype):
            record: ModuleOutputs
            with recording_module_outputs(model) as record:
                self._forward_only(model, inputs, training=True, context=context)
            records.append(record.by_call())
        low, rounded, exact = records
        for name, tensors in low.items():
            if name not in rounded or name not in exact:
                continue
            for a, r, e in zip(tensors, rounded[name], exact[name]):
                if a.shape == e.shape and off(a, r, e):
                    return name
        return None
