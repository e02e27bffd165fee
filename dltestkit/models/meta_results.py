"""Results the meta device would compute slowly, made directly: empty tensors of the shape and
dtype an operation gives, for the watched meta runs of ``test_device_moving``.

Many of PyTorch's meta kernels are Python decompositions: a training-mode ``batch_norm`` costs
about a millisecond a call, more than a CPU convolution of a small image, and an element-wise
product of two tensors about 0.1 ms, so that a small transformer's pass on ``meta`` costs more
than on the CPU. What the device check looks at, the devices of the arguments, is judged
before the call; the result only has to have the shape and dtype (and layout, where the
operation keeps its input's) the operation gives. Made only where every tensor argument is a
floating-point tensor on ``meta`` and the arguments are of the forms whose result is known
(no ``out=``, no ``dtype=``, reductions over given dimensions); anything else runs the meta
kernel as before."""

from __future__ import annotations

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
#: Element-wise operations of two arguments (broadcast, with PyTorch's type promotion).
_BINARY = frozenset(
    getattr(owner, name)
    for owner in (torch, torch.Tensor)
    for name in ("add", "sub", "mul", "div", "pow")
)
_BINARY_KEYWORDS = frozenset({"other", "exponent", "alpha"})
#: Means over given dimensions (or all).
_MEANS = frozenset({torch.mean, torch.Tensor.mean})


def meta_result(func: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
    """An empty meta tensor of the shape and dtype of ``func``'s result, for the operations
    this module knows, where every tensor argument is on meta (and, for the element-wise
    operations and means, floating-point); None otherwise."""
    tensors = tensors_in(args) + tensors_in(kwargs)
    if not tensors or not all(t.is_meta for t in tensors):
        return None
    first = args[0] if args else kwargs.get("input")
    elementwise = func in _UNARY or func in _BINARY or func in _MEANS
    if elementwise and not all(t.is_floating_point() for t in tensors):
        return None
    if func in _NORMS:
        made = torch.empty_like(first) if isinstance(first, torch.Tensor) else None
    elif func in _UNARY:
        made = torch.empty_like(args[0]) if len(args) == 1 and not kwargs else None
    elif func in _BINARY:
        made = _binary(args, kwargs)
    elif func in _MEANS:
        made = _mean(args, kwargs)
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


def _binary(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Optional[torch.Tensor]:
    if len(args) > 2 or set(kwargs) - _BINARY_KEYWORDS:
        return None
    first = args[0] if args else None  # (input= is not among the keywords taken)
    second = args[1] if len(args) > 1 else kwargs.get("other", kwargs.get("exponent"))
    if not isinstance(first, torch.Tensor):
        return None
    if isinstance(second, torch.Tensor):
        shape = torch.broadcast_shapes(first.shape, second.shape)  # type: ignore[no-untyped-call]
    elif isinstance(second, (int, float)) and not isinstance(second, bool):
        shape = first.shape
    else:
        return None
    dtype = torch.result_type(first, second)
    if shape == first.shape and dtype == first.dtype:
        return torch.empty_like(first)  # (its layout, as the element-wise kernels keep it)
    return torch.empty(shape, dtype=dtype, device="meta")


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
