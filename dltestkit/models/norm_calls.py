"""What a training-mode forward pass shows of its normalisation with running statistics: each
call of ``F.batch_norm`` and ``F.instance_norm`` (and ``torch.batch_norm``,
``torch.instance_norm``) with the names of the buffers it was handed, every submodule's mode,
and the buffers the pass changed; whether it drew random numbers; and which calls are
degenerate at the size of their input (a softmax over one element). The first training
step the checks share notes it (plain data, kept with the shared pass), so that
test_running_statistics needs no training pass of its own, and test_train_matches_eval none
where the modes agree; the layers are found by what they do, not by their type."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..core.paths import map_tensors
from ..core.watch import ModuleTracker, op_name, user_code_location, watching
from .randomness import _ABSENT, RandomnessWatch, _argument

__all__ = [
    "Degenerate",
    "NORMS",
    "NORM_DEFAULTS",
    "ForwardObservation",
    "NormCall",
    "NormWatch",
    "TrainingForward",
    "buffer_names",
]

#: The normalisation functions: (position and keyword of the running mean, of the flag that
#: selects batch statistics)
NORMS: Dict[Any, Tuple[int, str, int, str]] = {
    F.batch_norm: (1, "running_mean", 5, "training"),
    torch.batch_norm: (3, "running_mean", 5, "training"),
    F.instance_norm: (1, "running_mean", 5, "use_input_stats"),
    torch.instance_norm: (3, "running_mean", 5, "use_input_stats"),
}
#: The flag's default when not passed (F.instance_norm uses the input's statistics by default).
NORM_DEFAULTS = {F.batch_norm: False, F.instance_norm: True}

_SOFTMAXES = frozenset(
    {
        F.softmax,
        F.log_softmax,
        torch.softmax,
        torch.log_softmax,
        torch.Tensor.softmax,
        torch.Tensor.log_softmax,
    }
)


def _size(value: Any) -> int:
    """How many elements a shape (an int or a sequence of ints) holds."""
    return value if isinstance(value, int) else math.prod(int(size) for size in value)


def degenerate(func: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Optional[str]:
    """What makes a call degenerate at the size of its input, so that its input gets an
    exactly zero gradient however the parameters are (a softmax over one element is 1, a
    normalisation over one element gives its bias); None for any other call."""
    first = args[0] if args else None
    if not isinstance(first, torch.Tensor) or first.numel() == 0:
        return None
    if func in _SOFTMAXES:
        dim = _argument(args, kwargs, 1, "dim")
        if isinstance(dim, int) and first.dim() > 0 and first.shape[dim] == 1:
            return f"a softmax over a dimension of size 1 (dim={dim}) is constant"
    elif func is F.scaled_dot_product_attention:
        key = _argument(args, kwargs, 1, "key")
        if isinstance(key, torch.Tensor) and key.dim() >= 2 and key.shape[-2] == 1:
            return "attention over a single key returns its value, whatever the query and key"
    elif func is F.layer_norm:
        shape = _argument(args, kwargs, 1, "normalized_shape")
        if shape is not _ABSENT and _size(shape) == 1:
            return "a layer norm over a single element gives its bias"
    elif func is F.group_norm:
        groups = _argument(args, kwargs, 1, "num_groups")
        if isinstance(groups, int) and first.dim() > 1 and first[0].numel() == groups:
            return "a group norm over a single element per group gives its bias"
    return None


@dataclass(frozen=True)
class Degenerate:
    """A call of the training pass that is degenerate at the size of its input (its input
    gets an exactly zero gradient): what, the operation, the module (label and name), where
    (the line of the model's code)."""

    what: str
    operation: str
    module: str
    name: str
    location: str

    def explains(self, parameter: str) -> bool:
        """Whether a zero gradient of ``parameter`` may come from this call: the parameter
        belongs to the module that made the call or to one inside it (an attention module's
        query and key projections)."""
        return not self.name or parameter.startswith(self.name + ".")


@dataclass(frozen=True)
class NormCall:
    """One call of a normalisation function that can be handed running statistics."""

    operation: str
    module: str
    location: str
    #: the name of the model's buffer handed as running mean, "" for a tensor that is not one
    #: of its buffers, None when none was handed
    running_mean: Optional[str]
    #: (the same, for the running variance)
    running_var: Optional[str]
    batch_statistics: bool
    momentum: Any
    #: whether it was handed an affine weight or bias, none of which trains
    affine_frozen: bool

    @property
    def statistics(self) -> Tuple[str, ...]:
        """The names of the model's buffers it was handed as running statistics."""
        return tuple(name for name in (self.running_mean, self.running_var) if name)

    def describe(self) -> str:
        return f"{self.operation} in {self.module}, at {self.location}"


def _name(value: Any, buffers: Dict[int, str]) -> Optional[str]:
    if not isinstance(value, torch.Tensor):
        return None
    return buffers.get(id(value), "")


class NormWatch(RandomnessWatch):
    """Note every call of a normalisation function that can use running statistics, naming
    the buffers of ``buffers`` (name by the tensor's id) it is handed; and every random draw
    (as RandomnessWatch does)."""

    def __init__(self, modules: ModuleTracker, buffers: Dict[int, str]) -> None:
        super().__init__(modules)
        self.buffers = buffers
        self.calls: List[NormCall] = []
        self.degenerate: List[Degenerate] = []

    def handle(self, func: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        what = degenerate(func, args, kwargs)
        if what is not None:
            self.degenerate.append(
                Degenerate(
                    what,
                    op_name(func),
                    self.modules.current(),
                    self.modules.current_name(),
                    user_code_location(),
                )
            )
        if func in NORMS:
            stats_at, _, flag_at, flag = NORMS[func]
            functional = func in NORM_DEFAULTS  # F.batch_norm, F.instance_norm
            on = _argument(args, kwargs, flag_at, flag)
            affine = [
                value
                for at, name in (
                    ((3, "weight"), (4, "bias")) if functional else ((1, "weight"), (2, "bias"))
                )
                if isinstance(value := _argument(args, kwargs, at, name), torch.Tensor)
            ]
            self.calls.append(
                NormCall(
                    op_name(func),
                    self.modules.current(),
                    user_code_location(),
                    _name(_argument(args, kwargs, stats_at, "running_mean"), self.buffers),
                    _name(_argument(args, kwargs, stats_at + 1, "running_var"), self.buffers),
                    NORM_DEFAULTS.get(func, False) if on is _ABSENT else bool(on),
                    _argument(args, kwargs, 6, "momentum"),
                    bool(affine) and not any(t.requires_grad for t in affine),
                )
            )
        return super().handle(func, args, kwargs)


def buffer_names(model: nn.Module) -> Dict[int, str]:
    """The name of each buffer of ``model``, by the tensor's id."""
    return {id(buffer): name for name, buffer in model.named_buffers()}


@dataclass(frozen=True)
class TrainingForward:
    """What a training-mode forward pass of a copy of the model showed: its output (detached),
    its normalisation calls, every submodule's mode once the model was put in training mode,
    the buffers the pass changed, and how many random draws torch's functions made."""

    output: Any
    norm_calls: Tuple[NormCall, ...]
    #: (name, training) of every submodule
    modes: Tuple[Tuple[str, bool], ...]
    changed_buffers: Tuple[str, ...]
    draws: int
    #: calls degenerate at the inputs' size (a softmax over one element)
    degenerate: Tuple[Degenerate, ...] = ()
    #: the parameters the pass wrote (in place, through .data, or replaced)
    written_parameters: Tuple[str, ...] = ()


class ForwardObservation:
    """Made once ``model`` (a copy) is in training mode, just before its forward pass: notes
    the modules' modes and the buffers' values; entered, it watches the pass; ``result``
    says what the pass showed."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modes = tuple((name, module.training) for name, module in model.named_modules())
        self._before = {name: b.detach().clone() for name, b in model.named_buffers()}
        self._parameters = {name: _written(p) for name, p in model.named_parameters()}
        self._stack = contextlib.ExitStack()
        self.watch: Optional[NormWatch] = None

    def __enter__(self) -> "ForwardObservation":
        names = buffer_names(self.model)
        self.watch = self._stack.enter_context(
            watching(self.model, lambda modules: NormWatch(modules, names))
        )
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()

    def result(self, output: Any) -> TrainingForward:
        """What the pass that returned ``output`` showed."""
        after = dict(self.model.named_buffers())
        changed = tuple(
            name
            for name, value in self._before.items()
            if name in after and not torch.equal(after[name], value)
        )
        assert self.watch is not None, "result() of an observation that was not entered"
        return TrainingForward(
            map_tensors(lambda t: t.detach(), output),
            tuple(self.watch.calls),
            self.modes,
            changed,
            len(self.watch.draws),
            tuple(self.watch.degenerate),
            tuple(
                name
                for name, parameter in self.model.named_parameters()
                if self._parameters.get(name) != _written(parameter)
            ),
        )


def _written(parameter: torch.Tensor) -> Tuple[int, int, int]:
    """What changes when a parameter is written: its version (in place), where its data
    lies (``.data =``), and which tensor it is (replaced)."""
    where = parameter.data_ptr() if parameter.layout == torch.strided else 0
    return parameter._version, where, id(parameter)
