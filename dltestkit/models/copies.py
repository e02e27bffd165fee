"""Copies of a model that the checks train, move or convert, and the train/eval mode they
run it in, restored afterwards; copies of the inputs the model is called on, and which of
them a pass changed."""

from __future__ import annotations

import contextlib
import copy
import io
import warnings
from collections import OrderedDict
from typing import Any, Dict, Iterable, Iterator, Optional, Tuple, cast

import torch
from torch import nn

from ..core.compare import same
from ..core.paths import map_tensors, named_tensors

__all__ = [
    "changed_copies",
    "copy_module",
    "describe_mode",
    "gradients_set_aside",
    "input_copies",
    "mode",
    "plain_values",
]


@contextlib.contextmanager
def mode(model: nn.Module, training: bool) -> Iterator[nn.Module]:
    """Put every submodule in train or eval mode; restore each one's own mode after."""
    modes = {module: module.training for module in model.modules()}
    model.train(training)
    try:
        yield model
    finally:
        for module, was_training in modes.items():
            module.training = was_training


def _copy_script_module(
    module: torch.jit.ScriptModule, device: Optional[str]
) -> torch.jit.ScriptModule:
    """A copy through ``torch.jit.save`` and ``torch.jit.load`` in memory, loaded onto
    ``device`` if given."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the user chose TorchScript; the checks only copy it
        warnings.filterwarnings("ignore", r"`torch\.jit\.(save|load)` is deprecated", FutureWarning)
        torch.jit.save(module, buffer)
        buffer.seek(0)
        copied: torch.jit.ScriptModule = torch.jit.load(  # type: ignore[no-untyped-call]
            buffer, map_location=device
        )
    return copied


def _outermost_script_modules(module: nn.Module) -> Iterator[torch.jit.ScriptModule]:
    for child in module.children():
        if isinstance(child, torch.jit.ScriptModule):
            yield child
        else:
            yield from _outermost_script_modules(child)


def copy_module(
    model: nn.Module,
    device: Optional[str] = None,
    dtype: Optional[torch.dtype] = None,
    given: Optional[Dict[int, Any]] = None,
) -> nn.Module:
    """A deep copy of ``model``; its TorchScript modules are loaded onto ``device`` if given.

    TorchScript modules (``torch.jit.script``, ``torch.jit.trace``) are copied through
    ``torch.jit.save``/``load``: ``copy.deepcopy`` gives them parameters that are no leaf
    tensors (no optimiser takes them, ``.to()`` refuses them). The parameters of a loaded
    TorchScript module are plain tensors, which ``.to("meta")`` refuses, so they are loaded
    onto the device the copy is meant for; move the copy there afterwards as usual.

    For ``device="meta"``, the parameters and buffers are made on ``meta`` directly, and
    for a floating-point ``dtype`` the floating-point ones in that dtype, rather than copied
    first and converted after (as ``.to()`` would convert them, one by one): the copy costs
    no copy of the weights. Move or convert the copy afterwards as usual (``.to()``), so
    that a model's own ``_apply`` does what else it does.

    ``given``: what the copy holds instead of some of the model's objects (by ``id``, as
    ``copy.deepcopy``'s memo takes them), e.g. the model's own parameters, shared."""
    if isinstance(model, torch.jit.ScriptModule):
        return _copy_script_module(model, device)
    memo: Dict[int, Any] = {
        id(scripted): _copy_script_module(scripted, device)
        for scripted in _outermost_script_modules(model)
    }
    if not memo and (device == "meta" or dtype is not None):
        memo.update(_converted_tensors(model, device, dtype))
    memo.update(given or {})
    copied: nn.Module = _deepcopy_module(model, memo)
    return copied


#: The methods by which ``copy.deepcopy`` copies an ``nn.Module``; a class that defines any of
#: them otherwise (or ``__deepcopy__``, or ``__slots__``) is copied by ``copy.deepcopy``.
_COPY_METHODS = ("__reduce_ex__", "__reduce__", "__getstate__", "__setstate__")
#: The containers of a module's state copied here: its children, and its empty hook ones.
_CONTAINERS = (dict, OrderedDict, set)


def _copies_as_modules_do(cls: type) -> bool:
    return (
        not hasattr(cls, "__deepcopy__")
        and all(getattr(cls, name) is getattr(nn.Module, name) for name in _COPY_METHODS)
        and not any("__slots__" in vars(base) for base in cls.__mro__)
    )


def _deepcopy_module(module: nn.Module, memo: Dict[int, Any]) -> nn.Module:
    """``copy.deepcopy(module, memo)``, done for the module tree as ``copy.deepcopy`` does it
    (``cls.__new__``, the deep-copied ``__getstate__()`` given to ``__setstate__``, the copy
    in ``memo`` before its state is copied), without ``copy.deepcopy``'s generic steps for
    each module and each of its empty hook dictionaries, which cost most of the copy of a
    large module tree whose weights are made beforehand (on meta, in another dtype)."""
    found = memo.get(id(module))
    if found is not None:
        return cast(nn.Module, found)
    cls = type(module)
    if not _copies_as_modules_do(cls):
        return copy.deepcopy(module, memo)
    copied = cls.__new__(cls)
    memo[id(module)] = copied
    memo.setdefault(id(memo), []).append(module)  # kept alive, as copy.deepcopy does
    state = {}
    for name, value in cast(Any, module).__getstate__().items():
        kind = type(value)
        if name == "_modules" and kind in _CONTAINERS:
            state[name] = kind(
                (key, None if child is None else _deepcopy_module(child, memo))
                for key, child in value.items()
            )
        elif kind in _CONTAINERS and not value:
            made = memo.get(id(value))
            if made is None:
                made = memo[id(value)] = kind()
                memo[id(memo)].append(value)
            state[name] = made
        else:
            state[name] = copy.deepcopy(value, memo)
    cast(Any, copied).__setstate__(state)
    return copied


def _converted_tensors(
    model: nn.Module, device: Optional[str], dtype: Optional[torch.dtype]
) -> Dict[int, Any]:
    """For ``copy.deepcopy``'s memo: the model's parameters and buffers (plain tensors)
    made on ``meta`` (if ``device`` is) and, if floating-point, in ``dtype`` (if given)."""
    memo: Dict[int, Any] = {}

    def converted(tensor: torch.Tensor) -> Optional[torch.Tensor]:
        if tensor.layout != torch.strided or tensor.is_quantized:
            return None
        to = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        if device == "meta":
            return torch.empty_like(tensor, device="meta", dtype=to)
        if to == tensor.dtype:
            return None  # copied as it is
        return tensor.detach().to(to)

    for parameter in model.parameters():
        if type(parameter) is nn.Parameter and id(parameter) not in memo:
            made = converted(parameter)
            if made is not None:
                memo[id(parameter)] = nn.Parameter(made, requires_grad=parameter.requires_grad)
    for buffer in model.buffers():
        if type(buffer) is torch.Tensor and id(buffer) not in memo:
            made = converted(buffer)
            if made is not None:
                memo[id(buffer)] = made
    return memo


def describe_mode(training: bool) -> str:
    return "training" if training else "eval"


@contextlib.contextmanager
def gradients_set_aside(tensors: Iterable[torch.Tensor]) -> Iterator[None]:
    """Keep the ``.grad`` of ``tensors`` out of the way of a backward pass, and put them back
    after: a backward pass that is not about these tensors leaves no gradient on them."""
    saved = [(tensor, tensor.grad) for tensor in tensors]
    for tensor, _ in saved:
        tensor.grad = None
    try:
        yield
    finally:
        for tensor, grad in saved:
            tensor.grad = grad


def input_copies(inputs: Any) -> Any:
    """``inputs`` with each plain tensor cloned (out of sight of the checks' watches): a model
    that changes its inputs in place changes a copy, and every call sees the inputs of setUp
    (test_inputs_unchanged names such a model). Tensor subclasses are passed as they are."""
    with torch._C.DisableTorchFunction():
        return map_tensors(lambda t: _strided_copy(t) if type(t) is torch.Tensor else t, inputs)


def _strided_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of ``tensor`` with its strides, also where they are not dense (a slice, a
    transposed view): code that reads the layout (``.view()``, ``is_contiguous()``) sees the
    caller's. clone() makes such a tensor contiguous; overlapping strides (an expanded
    tensor) cannot be written, and are cloned."""
    if tensor.is_contiguous() or tensor.is_contiguous(memory_format=torch.channels_last):
        return tensor.clone()
    copied = torch.empty_strided(
        tensor.size(), tensor.stride(), dtype=tensor.dtype, device=tensor.device
    )
    try:
        return copied.copy_(tensor)
    except RuntimeError:  # overlapping memory
        return tensor.clone()


def plain_values(copies: Any) -> Dict[str, torch.Tensor]:
    """The values of the plain (strided ``torch.Tensor``) tensors of ``copies`` (made by
    ``input_copies``), by path (as ``named_tensors(copies, prefix="")`` names them)."""
    with torch.no_grad():
        return {
            path: t.detach().clone()
            for path, t in named_tensors(copies, prefix="")
            if type(t) is torch.Tensor and t.layout == torch.strided
        }


def changed_copies(copies: Any, before: Dict[str, torch.Tensor]) -> Tuple[str, ...]:
    """The paths of the tensors of ``copies`` whose values differ from ``before``
    (``plain_values``): the copies of the inputs that a pass changed in place."""
    return tuple(
        path
        for path, t in named_tensors(copies, prefix="")
        if path in before and not same(t.detach(), before[path])
    )
