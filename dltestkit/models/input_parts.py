"""The parts of inputs that test_all_inputs_used judges (an input, slabs along a dimension),
what a layer's windows cover, and how an input is changed to see whether an output reads it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..core.seeds import derived_seed
from ..core.watch import ModuleTracker, Watch, op_name, user_code_location
from .probes import Probe
from .tensors import (
    Key,
    describe_input,
)


@dataclass
class Target:
    """One input tensor judged element by element: a batched input (batch first), or one
    tensor of one sample of a list of samples."""

    key: Key
    tensor: torch.Tensor
    batched: bool
    sample: Optional[int] = None
    within: str = ""
    #: True where an output depends on the element (None: not known element by element)
    read: Optional[torch.Tensor] = None
    #: an output depends on some element (known where ``read`` is not)
    read_somewhere: bool = False
    #: True where the element is not judged (padding)
    excluded: Optional[torch.Tensor] = None

    def describe(self) -> str:
        name = describe_input(self.key)
        return f"{name}[{self.sample}]{self.within}" if self.sample is not None else name

    def ident(self) -> Tuple[Key, Optional[int], str]:
        return self.key, self.sample, self.within

    def dims(self) -> range:
        return range(1 if self.batched else 0, self.tensor.dim())

    def judged(self) -> torch.Tensor:
        ones = torch.ones(self.tensor.shape, dtype=torch.bool)
        return ones if self.excluded is None else ~self.excluded


@dataclass
class Slabs:
    """Elements of a target suspected unread: the indices ``indices`` along ``dim`` (every
    element when ``dim`` is None)."""

    target: Target
    dim: Optional[int]
    indices: List[int]

    def mask(self) -> torch.Tensor:
        shape = self.target.tensor.shape
        if self.dim is None:
            return self.target.judged()
        along = torch.zeros(shape[self.dim], dtype=torch.bool)
        along[self.indices] = True
        view = [1] * len(shape)
        view[self.dim] = shape[self.dim]
        return along.view(view).expand(shape) & self.target.judged()

    def describe(self) -> str:
        if self.dim is None:
            return f"all of {self.target.describe()}"
        index = [":"] * (self.dim + 1)
        index[self.dim] = indices_text(self.indices)
        return f"{self.target.describe()}[{', '.join(index)}]"


def indices_text(indices: Sequence[int]) -> str:
    """``3``, ``8:16`` for a run, ``[1, 4, 6]`` otherwise."""
    if len(indices) == 1:
        return str(indices[0])
    if list(indices) == list(range(indices[0], indices[-1] + 1)):
        return f"{indices[0]}:{indices[-1] + 1}"
    return str(list(indices))


class CoverageWatch(Watch):
    """Note the convolutions and poolings whose windows leave the end of their input unread
    (its size minus the window is no multiple of the stride)."""

    def __init__(self, modules: ModuleTracker) -> None:
        super().__init__(modules)
        self.dropping: List[str] = []

    def handle(self, func: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        windows = conv_windows(func, args, kwargs)
        if windows is not None:
            sizes, kernel, stride, padding, dilation = windows
            for size, k, s, p, d in zip(sizes, kernel, stride, padding, dilation):
                span = size + 2 * p - d * (k - 1) - 1
                if span >= 0 and span % s:
                    self.dropping.append(
                        f"{op_name(func)} in {self.modules.current()}, at "
                        f"{user_code_location()}, leaves the last {span % s} of {size} "
                        f"positions of its input unread (stride {s}, window {d * (k - 1) + 1})"
                    )
                    break
        return func(*args, **kwargs)


_CONVOLUTIONS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_CONVOLUTION_ARGUMENTS = ("input", "weight", "bias", "stride", "padding", "dilation")
_MAX = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode")
_AVERAGE = ("input", "kernel_size", "stride", "padding", "ceil_mode")
_POOLINGS: Dict[Any, Tuple[int, Tuple[str, ...]]] = {
    F.max_pool1d: (1, _MAX),
    F.max_pool2d: (2, _MAX),
    F.max_pool3d: (3, _MAX),
    F.avg_pool1d: (1, _AVERAGE),
    F.avg_pool2d: (2, _AVERAGE),
    F.avg_pool3d: (3, _AVERAGE),
}


def as_tuple(value: Any, n: int) -> Tuple[int, ...]:
    if isinstance(value, (tuple, list)):
        return tuple(int(v) for v in value) if len(value) == n else (int(value[0]),) * n
    return (int(value),) * n


def conv_windows(
    func: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]
) -> Optional[Tuple[Tuple[int, ...], ...]]:
    """(sizes, kernel, stride, padding, dilation) of a convolution or pooling call over its
    spatial dimensions, or None for another call (or one that covers its input: 'same')."""
    try:
        if func in _CONVOLUTIONS:
            n = _CONVOLUTIONS[func]
            bound = dict(zip(_CONVOLUTION_ARGUMENTS, args), **kwargs)
            padding = bound.get("padding", 0)
            if isinstance(padding, str):
                if padding == "same":
                    return None
                padding = 0
            kernel = tuple(bound["weight"].shape[2:])
            stride, dilation = bound.get("stride", 1), bound.get("dilation", 1)
        elif func in _POOLINGS:
            n, names = _POOLINGS[func]
            bound = dict(zip(names, args), **kwargs)
            if bound.get("ceil_mode", False):
                return None
            kernel = as_tuple(bound["kernel_size"], n)
            stride = bound.get("stride") or kernel
            padding, dilation = bound.get("padding", 0), bound.get("dilation", 1)
        else:
            return None
        sizes = tuple(bound["input"].shape[-n:])
        return sizes, kernel, as_tuple(stride, n), as_tuple(padding, n), as_tuple(dilation, n)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError):
        return None


def probe_of(probe: Probe, target: Target) -> bool:
    if probe.key != target.key:
        return False
    if target.batched:
        return probe.sample is None
    return probe.sample == target.sample and probe.within == target.within


def elements(probe: Probe, nonzero: torch.Tensor, tensor: torch.Tensor) -> Optional[torch.Tensor]:
    """Where ``tensor`` is read, from the non-zero gradient ``nonzero`` of its probe: the leaf
    itself for a float input, the ids whose embeddings get a gradient for token ids; None
    when the leaf does not tell elements apart (a bag of embeddings)."""
    if not probe.embedded:
        return nonzero if nonzero.shape == tensor.shape else None
    if probe.positions is None:
        return None
    lead = probe.positions.dim()
    per_id = nonzero.reshape(*nonzero.shape[:lead], -1).any(-1) if nonzero.dim() > lead else nonzero
    read = torch.zeros(tensor.numel(), dtype=torch.bool)
    read[probe.positions[per_id].flatten()] = True
    return read.view(tensor.shape)


def swap(old: torch.Tensor, new: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function that gives ``new`` for ``old`` and any other tensor as it is."""
    return lambda tensor: new if tensor is old else tensor


def changeable(tensor: torch.Tensor) -> bool:
    """Whether a tensor has elements to change."""
    return tensor.numel() > 0


def ways(changes: List[Tuple[Target, torch.Tensor]]) -> List[str]:
    """How the elements can be changed: to other values of the input (for every input), and
    far up and down (floats)."""
    tensors = [target.tensor for target, _ in changes]
    ways = ["others"]
    if all(t.is_floating_point() for t in tensors):
        ways += ["up", "down"]
    return ways


def change_elements(tensor: torch.Tensor, mask: torch.Tensor, way: str, seed: int) -> torch.Tensor:
    """``tensor`` with the elements where ``mask`` is True changed: to other values of the
    tensor ("others": a random permutation of its values, for ids another id it holds, for an
    integer tensor of one value v, v - 1 or 1 for 0), or by a large step up or down
    (floats)."""
    if tensor.dtype == torch.bool:
        return torch.where(mask, ~tensor, tensor)
    generator = torch.Generator().manual_seed(derived_seed(seed, 7907))
    if tensor.is_floating_point():
        if way == "others":
            flat = tensor.detach().flatten()
            other = flat[torch.randperm(flat.numel(), generator=generator)].view(tensor.shape)
        else:
            step = 1 + 2 * float(tensor.detach().double().std()) if tensor.numel() > 1 else 1.0
            other = tensor.detach() + (step if way == "up" else -step)
        return torch.where(mask, other.to(tensor.dtype), tensor.detach())
    pool = torch.unique(tensor)
    if pool.numel() == 1:  # a single value v: v - 1, or 1 for 0 (a mask of ones, zero type ids)
        value = int(pool[0])
        return torch.where(
            mask, torch.full_like(tensor, value - 1 if value > 0 else value + 1), tensor
        )
    index = torch.searchsorted(pool, tensor.contiguous()).clamp(max=pool.numel() - 1)
    offset = torch.randint(1, pool.numel(), tensor.shape, generator=generator)
    return torch.where(mask, pool[(index + offset) % pool.numel()].to(tensor.dtype), tensor)


def same_outputs(
    first: List[Tuple[str, torch.Tensor]], second: List[Tuple[str, torch.Tensor]]
) -> bool:
    """Exactly the same tensors at the same paths (NaN equal to NaN)."""
    from ..core.compare import same

    if [path for path, _ in first] != [path for path, _ in second]:
        return False
    return all(same(a, b) for (_, a), (_, b) in zip(first, second))
