"""What the training-stack checks share: the tolerance of their comparisons, one forward and
backward pass with every generator seeded alike, the comparison of two runs, and the submodule
where two runs first part.

Each check of ``TrainingStackTests`` and ``ExportTests`` runs the model twice in two ways that
must agree (eager and compiled, contiguous and channels_last, float32 and autocast, with and
without activation checkpointing, eager and exported) and compares what the two give.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, ContextManager, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from ...core.compare import dense, largest_difference, mismatch, same
from ...core.options import option
from ...core.paths import floating_tensors, map_tensors, named_tensors
from ...core.seeds import all_generators_seeded, derived_seed, seed_torch
from ...core.validators import is_positive_number, optional
from ..backward import compared_backward
from ..contract import ModelContract
from ..copies import gradients_set_aside, mode
from ..randomness import RandomDraw, watching_randomness
from ..tensors import call_model

__all__ = [
    "ModuleOutputs",
    "Run",
    "StackContract",
    "all_generators_seeded",
    "differences",
    "gradient_differences",
    "model_dtype",
    "recording_module_outputs",
    "without_fast_path",
]


@contextlib.contextmanager
def without_fast_path() -> Iterator[None]:
    """nn.MultiheadAttention's and nn.TransformerEncoder's fast path off while the block runs,
    and restored after. The fast path (eval mode, no gradient) returns nested tensors, zeros at
    the padded positions, where a compiled or exported graph, which does not take it, computes
    values: the eager reference runs without it too."""
    mha = getattr(torch.backends, "mha", None)
    getter = getattr(mha, "get_fastpath_enabled", None)
    if mha is None or getter is None:
        yield
        return
    before = bool(getter())
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(before)


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter or buffer (float32 without)."""
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


@dataclass
class Run:
    """What one pass gave: the output, each trainable parameter's gradient (by name), and the
    gradient of each floating-point input (by its path in the inputs)."""

    output: Any
    gradients: List[Tuple[str, Optional[torch.Tensor]]]
    input_gradients: List[Tuple[str, Optional[torch.Tensor]]]


def differences(
    actual: Any, expected: Any, tolerance: float, exact_integers: bool = True
) -> List[str]:
    """The tensors of two outputs that differ, each with how: floating-point ones beyond
    ``tolerance`` relative to the largest value of the expected tensor (and elementwise),
    others exactly (unless ``exact_integers`` is False)."""
    found = []
    pairs = zip(named_tensors(actual), named_tensors(expected))
    for (path, a), (_, b) in pairs:
        if a.shape != b.shape or a.dtype != b.dtype:
            found.append(
                f"{path} has shape {tuple(a.shape)} and dtype {a.dtype} instead of "
                f"{tuple(b.shape)} and {b.dtype}"
            )
        elif a.is_floating_point() or a.is_complex():
            text = _close(a, b, tolerance, _scale([b]))
            if text:
                found.append(f"{path}: {text}")
        elif exact_integers and not same(a, b):
            changed = int((a != b).sum())
            found.append(f"{path}: {changed} of {a.numel()} values differ")
    if len(list(named_tensors(actual))) != len(list(named_tensors(expected))):
        found.append("the outputs hold different numbers of tensors")
    return found


def gradient_differences(
    actual: List[Tuple[str, Optional[torch.Tensor]]],
    expected: List[Tuple[str, Optional[torch.Tensor]]],
    tolerance: float,
    what: str = "the gradient of",
) -> List[str]:
    """The gradients that differ beyond ``tolerance`` relative to the largest value of all the
    expected gradients together (a gradient that is zero up to rounding, such as a BatchNorm
    bias's before another BatchNorm, is compared with the scale of the others), and those
    present in one run only."""
    scale = _scale([g for _, g in expected if g is not None])
    found = []
    for (name, a), (_, b) in zip(actual, expected):
        a, b = dense(a), dense(b)
        if (a is None) != (b is None):
            found.append(f"{what} {name} is {'missing' if a is None else 'present'} only here")
        elif a is not None and b is not None:
            text = _close(a, b, tolerance, scale)
            if text:
                found.append(f"{what} {name}: {text}")
    return found


def _scale(tensors: List[torch.Tensor]) -> float:
    """The largest finite absolute value of the tensors (0 without one)."""
    largest = 0.0
    for tensor in tensors:
        values = tensor.detach()
        if not values.numel():
            continue
        if values.is_floating_point():  # one pass, nothing allocated, when all are finite
            least, greatest = torch.aminmax(values)
            if bool(torch.isfinite(least)) and bool(torch.isfinite(greatest)):
                largest = max(largest, abs(float(least)), abs(float(greatest)))
                continue
        values = values.abs()
        values = values[torch.isfinite(values)]
        if values.numel():
            largest = max(largest, float(values.max()))
    return largest


def _clearly_close(a: torch.Tensor, b: torch.Tensor, rtol: float, atol: float) -> bool:
    """Whether every value of ``a`` is within half the tolerance of ``b``'s, computed in their
    own dtype (no copy of either in float64): what the comparison in float64 accepts then,
    whatever this one rounds. NaN, infinities and values near the bound are left to it."""
    if not a.is_floating_point() or a.dtype != b.dtype or a.shape != b.shape:
        return False
    difference = torch.sub(a, b).abs_()
    bound = b.abs().mul_(rtol / 2).add_(atol / 2)
    return bool(difference.le_(bound).all())


def _close(a: torch.Tensor, b: torch.Tensor, tolerance: float, scale: float) -> Optional[str]:
    """None when ``a`` is within ``tolerance`` of ``b`` (elementwise, and relative to
    ``scale``), else how many values differ and by how much."""
    a, b = a.detach(), b.detach()
    if _clearly_close(a, b, tolerance, tolerance * scale):
        return None
    a, b = a.double(), b.double()
    report = mismatch(a, b, rtol=tolerance, atol=tolerance * scale)
    if report is None:
        return None
    counted = re.search(r"Mismatched elements: (\d+) / (\d+)", report)
    count = f"{counted.group(1)} of {counted.group(2)} values" if counted else "values"
    return f"{count} differ beyond the tolerance, by up to {largest_difference(a, b)}"


@dataclass
class ModuleOutputs:
    """The floating-point outputs of every submodule call of a pass, in the order the calls
    ended (a submodule before the module that called it)."""

    calls: List[Tuple[str, List[torch.Tensor]]]

    def by_call(self) -> Dict[str, List[torch.Tensor]]:
        return dict(self.calls)


@contextlib.contextmanager
def recording_module_outputs(model: nn.Module) -> Iterator[ModuleOutputs]:
    """Record a copy of every submodule's floating-point outputs while the block runs; a
    submodule called several times is named with the call ("encoder (Linear), call 2")."""
    record = ModuleOutputs([])
    counts: Dict[str, int] = {}
    handles = []

    def hook(label: str) -> Callable[..., None]:
        def keep(module: nn.Module, args: Any, output: Any) -> None:
            counts[label] = counts.get(label, 0) + 1
            name = label if counts[label] == 1 else f"{label}, call {counts[label]}"
            tensors = [t.detach().float().clone() for _, t in floating_tensors(output)]
            record.calls.append((name, tensors))

        return keep

    for name, module in model.named_modules():
        if isinstance(module, torch.jit.ScriptModule):
            continue
        label = f"{name} ({type(module).__name__})" if name else type(model).__name__
        handles.append(module.register_forward_hook(hook(label)))
    try:
        yield record
    finally:
        for handle in handles:
            handle.remove()


class StackContract(ModelContract):
    """What the checks of TrainingStackTests and ExportTests share: the tolerance of their
    comparisons and how they run the model."""

    _suite: ClassVar[str] = "TrainingStackTests"

    stack_tolerance: Optional[float] = option(None, optional(is_positive_number), example="1e-3")
    """The relative tolerance of the comparisons of compiled, exported and re-laid-out runs with
    eager ones.

    `None`: the square root of the machine epsilon of the model's dtype (3.5e-4 for float32),
    relative to the largest value of each output, and of all the gradients together, and
    elementwise. Running the same computation with its additions in another order (fused kernels,
    another memory layout) changes a small network's values by about 1e-6 of their size; the bugs
    these checks find change them by percents or more."""

    def _tolerance(self, model: nn.Module) -> float:
        if self.stack_tolerance is not None:
            return float(self.stack_tolerance)
        return math.sqrt(torch.finfo(model_dtype(model)).eps)

    def _step_run(
        self,
        model: nn.Module,
        inputs: Any,
        *,
        training: bool,
        call: Optional[Callable[..., Any]] = None,
        step: int = 0,
        context: Callable[[], ContextManager[Any]] = contextlib.nullcontext,
        float_loss: bool = False,
    ) -> Run:
        """One forward pass of ``model`` on ``inputs`` (or of ``call``, a compiled stand-in
        for it, whose modes are the model's, if given) in the given mode and inside
        ``context()``, then the backward pass of the loss (made outside ``context``, from
        outputs in float32 if ``float_loss``). Python's, NumPy's and torch's generators are
        seeded alike for every run with the same ``step``; ``.grad`` of the parameters and
        inputs are cleared first and read after."""
        trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        leaves = [
            (path, t)
            for path, t in named_tensors(inputs, prefix="self.inputs")
            if t.requires_grad and t.is_leaf
        ]
        for _, tensor in (*trainable, *leaves):
            tensor.grad = None
        seed = derived_seed(self.seed, step)
        with all_generators_seeded(seed), mode(model, training=training):
            with context():
                output = self._call(model, inputs, training, call, seed)
            loss_input = (
                map_tensors(lambda t: t.float() if t.is_floating_point() else t, output)
                if float_loss
                else output
            )
            loss = self._loss(loss_input)
            if loss.requires_grad:
                seed_torch(seed)  # reentrant checkpointing reruns forward here
                comparison = "the comparison runs the model in eval mode (its dropout off)"
                if not compared_backward(self, loss, training, comparison):
                    return Run(output, [], [])
        return Run(
            output,
            [(name, dense(p.grad)) for name, p in trainable],
            [(path, t.grad) for path, t in leaves],
        )

    def _forward_only(
        self,
        model: nn.Module,
        inputs: Any,
        *,
        training: bool,
        call: Optional[Callable[..., Any]] = None,
        step: int = 0,
        context: Callable[[], ContextManager[Any]] = contextlib.nullcontext,
    ) -> Any:
        """The output of a forward pass as ``_run`` makes it, without gradients."""
        seed = derived_seed(self.seed, step)
        with all_generators_seeded(seed), mode(model, training=training), torch.no_grad():
            with context():
                return self._call(model, inputs, training, call, seed)

    def _call(
        self,
        model: nn.Module,
        inputs: Any,
        training: bool,
        call: Optional[Callable[..., Any]],
        seed: int,
    ) -> Any:
        if call is None:
            return self._forward(model, inputs, training=training, seed=seed)
        return call_model(call, inputs)  # a stand-in, in the modes of the model

    def _fresh_run(self, inputs: Any, training: bool, step: int = 0) -> Any:
        """The output of an eager forward pass of a fresh copy (no gradient)."""
        return self._forward_only(self._copy_model(), inputs, training=training, step=step)

    def _random_draws(self, inputs: Any, training: bool) -> Optional[List[RandomDraw]]:
        """The operations that draw random numbers in a forward pass of a fresh copy, if the
        outputs change with the seed (None if they do not: the model is not random)."""
        first = self._fresh_run(inputs, training, step=0)
        second = self._fresh_run(inputs, training, step=1)
        if not differences(second, first, tolerance=0.0):
            return None
        model = self._copy_model()
        with torch.no_grad(), watching_randomness(model) as watch:
            self._forward(model, inputs, training=training)
        return list(watch.draws)

    def _input_leaves_of(self, inputs: Any) -> Any:
        """``inputs`` with every floating-point tensor a leaf that requires a gradient (a view
        of the same memory: the layout is kept)."""
        return map_tensors(
            lambda t: t.detach().requires_grad_(True) if t.is_floating_point() else t, inputs
        )

    def _kept_input_gradients(self) -> ContextManager[None]:
        return gradients_set_aside(self._input_leaves())
