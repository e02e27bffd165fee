"""What a training run does, seen from outside the trainer: each backward call (its loss, and
what it added to each parameter's gradient), each optimizer step (the gradients and learning
rates it used, the weights it left), and the precision of the forward passes.

The trainer's code is not touched: the optimizer step hooks of ``torch.optim``, tensor hooks on
the model's parameters, forward pre-hooks, and ``torch.autograd.backward`` (which
``loss.backward()`` calls) wrapped for the time of the run. Used by the checks that compare two
runs of a trainer: accumulated with whole batches, two loss scales, bfloat16 with float32.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple
from unittest import mock

import torch
from torch import nn

__all__ = ["Backward", "Recording", "Step", "recording"]


@dataclass
class Backward:
    """One backward call: its loss (unscaled when a GradScaler scaled it; None when it was no
    single number) and what it added to each parameter's gradient (when recorded)."""

    loss: Optional[float]
    scale: Optional[float] = None
    added: Dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Step:
    """One optimizer step of the model's optimizer."""

    #: the backward calls since the step before (or since the run began)
    backwards: int
    #: each parameter's gradient as the optimizer used it (unscaled by a GradScaler)
    gradients: Dict[str, torch.Tensor]
    #: the learning rate of each parameter group
    learning_rates: Tuple[float, ...]
    #: the parameters after the step
    weights: Dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Recording:
    """What one run recorded."""

    backwards: List[Backward] = field(default_factory=list)
    steps: List[Step] = field(default_factory=list)
    #: the autocast dtypes of the forward passes with gradients (None: no autocast)
    autocast: Set[Optional[torch.dtype]] = field(default_factory=set)
    #: the dtypes of the parameters in those forward passes
    parameter_dtypes: Set[torch.dtype] = field(default_factory=set)
    #: the scales GradScaler.scale multiplied a loss by
    scales: List[float] = field(default_factory=list)

    @property
    def losses(self) -> List[Optional[float]]:
        return [backward.loss for backward in self.backwards]


def _number(value: Any) -> Optional[float]:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point():
        return float(value.detach().float().reshape(()))
    return None


def _learning_rates(optimizer: Any) -> Tuple[float, ...]:
    rates = []
    for group in getattr(optimizer, "param_groups", ()):
        rate = group.get("lr")
        rates.append(float(rate) if rate is not None else float("nan"))
    return tuple(rates)


@contextlib.contextmanager
def recording(
    model: nn.Module,
    *,
    steps: bool = True,
    added: bool = False,
    precision: bool = False,
) -> Iterator[Recording]:
    """Record a training run of ``model``: the backward calls (and, with ``added``, what each
    added to every parameter's gradient); with ``steps``, every step of an optimizer that holds
    a parameter of the model; with ``precision``, the autocast dtype and the parameters' dtypes
    of its forward passes with gradients. Every hook and wrapper is removed on exit."""
    record = Recording()
    parameters = dict(model.named_parameters())
    ids = {id(p) for p in parameters.values()}
    modules = {id(m) for m in model.modules()}
    pending: Dict[str, torch.Tensor] = {}
    scaled: Dict[int, Tuple[float, float]] = {}  # id(scaled loss) -> (loss, scale)
    since_step = [0]
    backward = torch.autograd.backward
    scale = torch.amp.GradScaler.scale

    def recorded_backward(tensors: Any, *args: Any, **kwargs: Any) -> Any:
        loss = tensors[0] if isinstance(tensors, (list, tuple)) and len(tensors) == 1 else tensors
        value, factor = scaled.get(id(loss), (None, None))
        if value is None:
            value = _number(loss)
        pending.clear()
        try:
            return backward(tensors, *args, **kwargs)
        finally:
            record.backwards.append(Backward(value, factor, dict(pending)))
            pending.clear()
            since_step[0] += 1

    def recorded_scale(scaler: Any, outputs: Any) -> Any:
        result = scale(scaler, outputs)
        if isinstance(outputs, torch.Tensor) and isinstance(result, torch.Tensor):
            factor = scaler.get_scale() if scaler.is_enabled() else 1.0
            record.scales.append(float(factor))
            value = _number(outputs)
            if value is not None:
                scaled[id(result)] = (value, float(factor))
        return result

    def ours(optimizer: Any) -> bool:
        groups = getattr(optimizer, "param_groups", ())
        return any(id(p) in ids for group in groups for p in group["params"])

    def after_step(optimizer: Any, args: Any, kwargs: Any) -> None:
        # After the step: an optimizer stepped with a closure (Lightning's) runs the last
        # backward inside step(), after its pre-hooks. The step leaves the gradients alone.
        if not ours(optimizer):
            return
        # (a fused optimizer that a GradScaler handed the scaled gradients and the scale
        # has unscaled them in place by now)
        gradients = {
            name: p.grad.detach().double().cpu()
            for name, p in parameters.items()
            if p.grad is not None
        }
        weights = {name: p.detach().double().cpu().clone() for name, p in parameters.items()}
        record.steps.append(Step(since_step[0], gradients, _learning_rates(optimizer), weights))
        since_step[0] = 0

    def note_precision(module: nn.Module, _: Any) -> None:
        if id(module) not in modules or not torch.is_grad_enabled():
            return
        devices = {p.device.type for p in module.parameters(recurse=False)} or {"cpu"}
        for device in devices:
            enabled = torch.is_autocast_enabled(device)
            record.autocast.add(torch.get_autocast_dtype(device) if enabled else None)
        record.parameter_dtypes.update(
            p.dtype for p in module.parameters(recurse=False) if p.is_floating_point()
        )

    def note_added(name: str) -> Any:
        def hook(gradient: torch.Tensor) -> None:
            value = gradient.detach().double().cpu()
            pending[name] = pending[name] + value if name in pending else value

        return hook

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(torch.autograd, "backward", recorded_backward))
        stack.enter_context(mock.patch.object(torch.amp.GradScaler, "scale", recorded_scale))
        if steps:
            from torch.optim.optimizer import register_optimizer_step_post_hook

            stack.callback(register_optimizer_step_post_hook(after_step).remove)
        if precision:
            handle = nn.modules.module.register_module_forward_pre_hook(note_precision)
            stack.callback(handle.remove)
        if added:
            for name, p in parameters.items():
                if p.requires_grad:
                    handle = p.register_hook(note_added(name))  # type: ignore[no-untyped-call]
                    stack.callback(handle.remove)
        yield record
