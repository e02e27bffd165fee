"""Results the meta device would compute slowly, made directly: empty tensors of the shape and
dtype an operation gives, for the watched meta runs of ``test_device_moving``.

Many of PyTorch's meta kernels are Python decompositions: a training-mode ``batch_norm`` costs
about a millisecond a call, more than a CPU convolution of a small image, and an element-wise
product of two tensors, a concatenation, a linear layer or even ``torch.empty_like`` about 0.1
ms, so that a small transformer's pass on ``meta`` costs more than on the CPU. What the device
check looks at, the devices of the arguments, is judged before the call; the result only has
to have the shape and dtype (and layout, where the operation keeps its input's) the operation
gives. Made only where every tensor argument is a
tensor on ``meta`` (floating-point, for the arithmetic) and the arguments are of the forms
whose result is known (no ``out=``, no ``dtype=``, reductions over given dimensions, shapes
that fit: where they do not, the kernel says so); anything else runs the meta kernel."""

from __future__ import annotations

import functools
import inspect
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..core.watch import tensors_in

__all__ = ["meta_result"]

#: Normalisations: their result has the shape, dtype and layout of their input.
_NORMS = frozenset(
    getattr(module, name)
    for module in (torch, F)
    for name in ("batch_norm", "instance_norm", "layer_norm", "group_norm", "rms_norm")
    if hasattr(module, name)
)
#: Element-wise operations of one argument (and nothing else: no out=).
_UNARY = frozenset(
    getattr(owner, name)
    for owner in (torch, torch.Tensor)
    for name in ("neg", "rsqrt", "exp", "sigmoid", "tanh", "cos", "sin")
)
#: Activations and other element-wise operations of one tensor and numbers (a slope, bounds,
#: ``approximate="tanh"``), whose meta kernels are Python decompositions of 0.3 to 2 ms a call
#: (``F.hardswish``, ``F.relu``, ``torch.clamp``): their result has the input's shape, dtype
#: and layout; an in-place call (``inplace=True``) returns its input.
_ELEMENTWISE = frozenset(
    [
        *(
            getattr(F, name)
            for name in (
                "relu",
                "relu6",
                "hardswish",
                "hardsigmoid",
                "hardtanh",
                "gelu",
                "silu",
                "mish",
                "elu",
                "selu",
                "celu",
                "leaky_relu",
                "softplus",
                "softsign",
                "logsigmoid",
                "tanhshrink",
                "log_softmax",
                "dropout",
            )
            if hasattr(F, name)
        ),
        *(
            getattr(owner, name)
            for owner in (torch, torch.Tensor)
            for name in ("relu", "clamp", "clip", "erf", "sqrt", "abs", "square", "log_softmax")
            if hasattr(owner, name)
        ),
    ]
)
_NUMBERS = (int, float, str, type(None))
#: Element-wise operations of two arguments (broadcast, with PyTorch's type promotion).
_BINARY = frozenset(
    getattr(owner, name)
    for owner in (torch, torch.Tensor)
    for name in ("add", "sub", "mul", "div", "pow")
)
_BINARY_KEYWORDS = frozenset({"other", "exponent", "alpha"})
#: Means over given dimensions (or all).
_MEANS = frozenset({torch.mean, torch.Tensor.mean})
#: Concatenations, and linear layers.
_CATS = frozenset({torch.cat, torch.concat, torch.concatenate})
_LINEAR = frozenset({torch.nn.functional.linear, torch._C._nn.linear})


def _like(tensor: torch.Tensor) -> torch.Tensor:
    """``torch.empty_like(tensor)`` on meta, made by ``torch.empty_strided`` with the strides
    of ``tensor`` where it is dense (empty_like keeps them then): empty_like's meta kernel is a
    Python decomposition that costs more than the CPU kernel of a small element-wise product."""
    if tensor.is_contiguous():
        return torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
    expected = 1  # dense: each stride, smallest first, the product of the sizes below it
    for stride, size in sorted((st, n) for st, n in zip(tensor.stride(), tensor.shape) if n != 1):
        if stride != expected:
            return torch.empty_like(tensor)
        expected *= size
    return torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device="meta")


def _broadcast(first: Sequence[int], second: Sequence[int]) -> Optional[Tuple[int, ...]]:
    """The shape two shapes broadcast to; None if they do not (the kernel then says so)."""
    rank = max(len(first), len(second))
    shape = []
    for a, b in zip(
        (1,) * (rank - len(first)) + tuple(first), (1,) * (rank - len(second)) + tuple(second)
    ):
        if a != b and 1 not in (a, b):
            return None
        shape.append(b if a == 1 else a)
    return tuple(shape)


def meta_result(func: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
    """An empty meta tensor of the shape and dtype of ``func``'s result, for the operations
    this module knows, where every tensor argument is on meta (and, for the element-wise
    operations and means, floating-point); None otherwise."""
    tensors = tensors_in(args) + tensors_in(kwargs)
    if not tensors or not all(t.is_meta for t in tensors):
        return None
    first = args[0] if args else kwargs.get("input")
    computed = (
        func in _UNARY
        or func in _ELEMENTWISE
        or func in _BINARY
        or func in _MEANS
        or func in _LINEAR
    )
    if computed and not all(t.is_floating_point() for t in tensors):
        return None
    if func in _NORMS:
        made = _like(first) if isinstance(first, torch.Tensor) else None
    elif func in _UNARY:
        made = _like(args[0]) if len(args) == 1 and not kwargs else None
    elif func in _ELEMENTWISE:
        if not isinstance(first, torch.Tensor) or not _numbers_besides(
            first, tensors, args, kwargs
        ):
            return None
        in_place = _in_place(func, args, kwargs)
        if in_place is None:
            return None
        if not in_place:
            made = _like(first)
        elif first.is_leaf and first.requires_grad and torch.is_grad_enabled():
            return None  # the kernel raises: a leaf that requires grad changed in place
        else:
            return first  # what an in-place operation returns: its input, changed
    elif func in _BINARY:
        made = _binary(args, kwargs)
    elif func in _MEANS:
        made = _mean(args, kwargs)
    elif func in _CATS:
        made = _cat(args, kwargs)
    elif func in _LINEAR:
        made = _linear(args, kwargs)
    elif func is F.scaled_dot_product_attention:
        named = dict(zip(("query", "key", "value"), args), **kwargs)
        query, value = named.get("query"), named.get("value")
        if not (isinstance(query, torch.Tensor) and isinstance(value, torch.Tensor)):
            return None
        made = query.new_empty((*query.shape[:-1], value.shape[-1]))
    else:
        return None
    if made is None:
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        made = made.requires_grad_().clone()  # not a leaf, as the result (in-place ops pass)
    return made


def _numbers_besides(
    first: Any, tensors: Sequence[torch.Tensor], args: Tuple[Any, ...], kwargs: Dict[str, Any]
) -> bool:
    """Whether ``first`` is the call's only tensor, the other arguments numbers (a slope,
    bounds, ``approximate="tanh"``), with no out= or dtype=."""
    if len(tensors) != 1 or first is not tensors[0] or {"out", "dtype"} & set(kwargs):
        return False
    others = [*args[1:], *(value for key, value in kwargs.items() if key != "input")]
    return all(isinstance(value, _NUMBERS) for value in others)


@functools.lru_cache(maxsize=None)
def _signature(func: Any) -> Optional[inspect.Signature]:
    """The signature of one of torch's Python functions (None for a builtin)."""
    if not inspect.isfunction(func):
        return None
    return inspect.signature(func)


def _in_place(func: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Optional[bool]:
    """Whether a call of ``func`` asks for ``inplace=True`` (by keyword or position); None
    if ``func`` does not take these arguments (its kernel says so)."""
    signature = _signature(func)
    if signature is None:
        return False
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError:
        return None
    return bool(bound.arguments.get("inplace", False))


def _binary(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Optional[torch.Tensor]:
    if len(args) > 2 or set(kwargs) - _BINARY_KEYWORDS:
        return None
    first = args[0] if args else None  # (input= is not among the keywords taken)
    second = args[1] if len(args) > 1 else kwargs.get("other", kwargs.get("exponent"))
    if not isinstance(first, torch.Tensor):
        return None
    if isinstance(second, torch.Tensor):
        shape = _broadcast(first.shape, second.shape)
    elif isinstance(second, (int, float)) and not isinstance(second, bool):
        shape = tuple(first.shape)
    else:
        return None
    if shape is None:
        return None
    dtype = torch.result_type(first, second)
    if shape == tuple(first.shape) and dtype == first.dtype:
        return _like(first)  # (its layout, as the element-wise kernels keep it)
    return torch.empty(shape, dtype=dtype, device="meta")


def _cat(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Optional[torch.Tensor]:
    """torch.cat of tensors of one dtype and rank (no out=), none in the channels-last
    layout (whose concatenation keeps it): the result is contiguous."""
    if len(args) > 2 or set(kwargs) - {"dim"}:
        return None
    tensors = args[0] if args else None
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    if not isinstance(tensors, (list, tuple)) or not tensors or not isinstance(dim, int):
        return None
    if not all(isinstance(t, torch.Tensor) and t.dtype == tensors[0].dtype for t in tensors):
        return None
    # tensors of shape (0,) are left out, as cat does (transformers starts caches with them)
    tensors = [t for t in tensors if t.shape != (0,)] or tensors
    first = tensors[0]
    rank = first.dim()
    if (
        not all(
            t.dim() == rank
            and not (
                rank == 4
                and t.is_contiguous(memory_format=torch.channels_last)
                and not t.is_contiguous()
            )
            for t in tensors
        )
        or not -rank <= dim < rank
    ):
        return None
    dim %= rank
    if any(
        t.shape[:dim] != first.shape[:dim] or t.shape[dim + 1 :] != first.shape[dim + 1 :]
        for t in tensors
    ):
        return None
    shape = list(first.shape)
    shape[dim] = sum(t.shape[dim] for t in tensors)
    return torch.empty(shape, dtype=first.dtype, device="meta")


def _linear(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Optional[torch.Tensor]:
    """F.linear(input, weight, bias) of one dtype, a 2-D weight and a 1-D bias that fit."""
    named = dict(zip(("input", "weight", "bias"), args), **kwargs)
    if len(args) > 3 or set(named) - {"input", "weight", "bias"}:
        return None
    x, weight, bias = named.get("input"), named.get("weight"), named.get("bias")
    if not (isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor)):
        return None
    fits = weight.dim() == 2 and x.dim() >= 1 and x.shape[-1] == weight.shape[1]
    if bias is not None:
        fits = fits and isinstance(bias, torch.Tensor) and tuple(bias.shape) == (weight.shape[0],)
    if not fits or any(t.dtype != x.dtype for t in (weight, bias) if t is not None):
        return None
    return torch.empty((*x.shape[:-1], weight.shape[0]), dtype=x.dtype, device="meta")


def _mean(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Optional[torch.Tensor]:
    if set(kwargs) - {"dim", "keepdim"} or len(args) > 3:
        return None
    first = args[0] if args else None
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
    if not isinstance(first, torch.Tensor) or not isinstance(keepdim, bool):
        return None
    rank = first.dim()
    if dim is None:
        dims: Sequence[int] = range(rank)
    elif isinstance(dim, int) and not isinstance(dim, bool):
        dims = [dim]
    elif isinstance(dim, (list, tuple)) and dim and all(isinstance(d, int) for d in dim):
        dims = list(dim)
    else:
        return None
    if rank == 0 or any(not -rank <= d < rank for d in dims):
        return None
    reduced = {d % rank for d in dims}
    if len(reduced) != len(dims):
        return None
    shape = [
        1 if i in reduced else n for i, n in enumerate(first.shape) if keepdim or i not in reduced
    ]
    return torch.empty(shape, dtype=first.dtype, device="meta")
