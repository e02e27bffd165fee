"""Fully sharded data parallel (FSDP2, ``torch.distributed.fsdp.fully_shard``) on CPU processes:
which modules become units, sharding a model with them, and gathering sharded state back into
whole tensors.

``fully_shard`` replaces every parameter of the modules it wraps by a ``DTensor`` that holds the
rank's shard; a unit's parameters are gathered before its forward and freed (resharded) after
it. So a unit must be a module whose ``forward`` is called, that uses its parameters only inside
that forward and shares none with a module outside it. ``default_units`` finds such modules
from one watched forward pass, as the checks' documented default; ``gathered`` turns the
sharded tensors of a state back into whole ones (a collective: every rank calls it the same
way).
"""

from __future__ import annotations

import fnmatch
from typing import Any, Collection, Dict, List, NamedTuple, Optional, Sequence, Set, Tuple

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..core.watch import METADATA, op_name, reads_metadata, tensors_in, user_code_location

__all__ = [
    "Misuse",
    "changed_in_forward",
    "default_units",
    "fsdp_unavailable",
    "gathered",
    "is_sharded",
    "shard",
    "sharded_names",
    "units_matching",
    "watch_parameters",
]


def fsdp_unavailable() -> Optional[str]:
    """Why FSDP2 cannot run here (a skip reason), or None."""
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
        from torch.distributed.tensor import DTensor  # noqa: F401
    except ImportError:
        return (
            f"needs torch.distributed.fsdp.fully_shard (FSDP2, PyTorch 2.6 or later; this is "
            f"{torch.__version__})"
        )
    return None


def is_sharded(value: Any) -> bool:
    """Whether ``value`` is a tensor sharded over the ranks (a DTensor)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(value, DTensor)


def sharded_names(model: nn.Module) -> List[str]:
    """The names of the model's parameters that are DTensors (sharded by fully_shard)."""
    return [name for name, p in model.named_parameters() if is_sharded(p)]


def gathered(state: Any) -> Any:
    """``state`` (nested dicts, lists, tuples) with every tensor copied to the CPU, detached,
    and every DTensor gathered whole first (``full_tensor()``: a collective every rank must
    call in the same order)."""
    if is_sharded(state):
        return state.full_tensor().detach().cpu().clone()
    if isinstance(state, torch.Tensor):
        return state.detach().cpu().clone()
    if isinstance(state, dict):
        return {key: gathered(value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(gathered(value) for value in state)
    return state


def units_matching(model: nn.Module, patterns: Collection[str]) -> List[str]:
    """The names of the submodules whose names match one of ``patterns`` (not the root)."""
    return [
        name
        for name, _ in model.named_modules()
        if name and any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)
    ]


def shard(
    model: nn.Module, units: Sequence[str], world_size: int, mp_policy: Any = None
) -> nn.Module:
    """Wrap each of ``units`` (submodule names), the deepest first, then ``model`` with
    ``fully_shard`` on a device mesh of ``world_size`` CPU ranks; return ``model``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh("cpu", (world_size,))
    policy = mp_policy if mp_policy is not None else MixedPrecisionPolicy()
    modules = dict(model.named_modules())
    for name in sorted(units, key=lambda n: -n.count(".")):
        fully_shard(modules[name], mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


class Misuse(NamedTuple):
    """A parameter used outside the forward of a module that holds it."""

    parameter: str
    unit: str
    #: the module whose forward was running then ("" outside any)
    running: str
    #: the line of the model's code that used it
    location: str


#: The tensor attributes that say what a tensor is, not what it holds: reading them is no use
#: of the values (.T, .data, .real are); its gradient and its base, which a parameter's use
#: does not read either, included.
_METADATA = METADATA | {"grad", "_base"}


def _metadata(func: Any) -> bool:
    """Whether ``func`` reads an attribute of a tensor that says what it is (its shape, ...)."""
    return reads_metadata(func, _METADATA)


class _ParameterWatch(TorchFunctionMode):
    """Notes, for every torch call that takes a parameter, which modules' forwards were
    running (by name), how often each module's forward ran, and which parameters a call
    changed in place."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.stack: List[str] = []
        self.calls: Dict[str, int] = {}
        self.owners = {id(p): name for name, p in model.named_parameters()}
        #: each parameter's uses: (the modules running, the innermost one, the line)
        self.uses: Dict[str, List[Tuple[Tuple[str, ...], str, str]]] = {}
        #: the parameters the pass changed in place: the operation and the line, the first
        #: time (Embedding's max_norm renormalises the rows it looks up)
        self.changed: Dict[str, str] = {}
        self.handles: List[Any] = []
        for name, module in model.named_modules():
            self.handles.append(module.register_forward_pre_hook(self._enter(name)))
            self.handles.append(module.register_forward_hook(self._leave))

    def _enter(self, name: str) -> Any:
        def hook(*_: Any) -> None:
            self.stack.append(name)
            self.calls[name] = self.calls.get(name, 0) + 1

        return hook

    def _leave(self, *_: Any) -> None:
        if self.stack:
            self.stack.pop()

    def __torch_function__(
        self, func: Any, types: Any, args: Tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        if _metadata(func):
            return func(*args, **kwargs)
        owned = []
        for tensor in tensors_in(args) + tensors_in(kwargs):
            name = self.owners.get(id(tensor))
            if name is not None:
                owned.append((name, tensor, tensor._version))
                uses = self.uses.setdefault(name, [])
                if len(uses) < 64:
                    innermost = self.stack[-1] if self.stack else ""
                    uses.append((tuple(self.stack), innermost, user_code_location()))
        result = func(*args, **kwargs)
        for name, tensor, version in owned:
            if tensor._version != version and name not in self.changed:
                self.changed[name] = f"{op_name(func)}, at {user_code_location()}"
        return result

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def watch_parameters(model: nn.Module, run: Any) -> _ParameterWatch:
    """Run ``run()`` (a forward pass of ``model``) watching where its parameters are used."""
    watch = _ParameterWatch(model)
    try:
        with watch, torch.no_grad():
            run()
    finally:
        watch.remove()
    return watch


def changed_in_forward(changed: Dict[str, str], fsdp: bool) -> str:
    """Why a model whose forward changes parameters in place (``changed``, from
    ``watch_parameters``) trains otherwise under DDP or (``fsdp``) fully_shard."""
    if not changed:
        return (
            "Look for a parameter changed in forward or in a hook (through .data, or under "
            "torch.no_grad())."
        )
    name, how = next(iter(changed.items()))
    more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
    embedding = (
        " nn.Embedding(max_norm=...) does so: it renormalises, in place, the rows of its weight "
        "that the batch looks up."
        if how.startswith(("F.embedding", "torch.embedding_renorm_"))
        else ""
    )
    why = (
        "under fully_shard, forward runs on a gathered copy of the parameters that is freed "
        "afterwards, so the change never reaches the rank's shard, whereas one process keeps it"
        if fsdp
        else "under DDP, each rank changes it by its own shard of the batch, whereas one "
        "process changes it by the whole batch"
    )
    return (
        f"The model's forward changes {name}{more} in place ({how}).{embedding} But {why}. "
        "Leave the parameters unchanged in forward (compute the changed values into a new "
        "tensor), or make the change in the training step, after optimizer.step(), alike on "
        "every rank."
    )


def _inside(name: str, unit: str) -> bool:
    return unit == "" or name == unit or name.startswith(unit + ".")


def misuses(model: nn.Module, watch: _ParameterWatch, unit: str) -> List[Misuse]:
    """The uses of ``unit``'s parameters outside its forward, seen by ``watch``."""
    found = []
    for name, uses in watch.uses.items():
        if not _inside(name, unit):
            continue
        for stack, innermost, location in uses:
            if unit not in stack:
                found.append(Misuse(name, unit, innermost, location))
                break
    return found


def _shared_outside(model: nn.Module, unit: str) -> bool:
    """Whether a parameter of ``unit`` is also registered in a module outside it (tied)."""
    names: Dict[int, Set[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), set()).add(name)
    return any(
        any(_inside(n, unit) for n in found) and not all(_inside(n, unit) for n in found)
        for found in names.values()
    )


def _qualifies(model: nn.Module, watch: _ParameterWatch, name: str, module: nn.Module) -> bool:
    return (
        any(True for _ in module.parameters())
        and watch.calls.get(name, 0) == 1
        and not misuses(model, watch, name)
        and not _shared_outside(model, name)
    )


def default_units(model: nn.Module, watch: _ParameterWatch) -> List[str]:
    """The default units: from the root down, each child module that qualifies (it holds
    parameters, its forward ran once, it uses its parameters only inside its forward and
    shares none with another module); a child that does not is looked into for its own
    children that do. Where that finds one unit holding every parameter, its children are
    taken instead."""

    def walk(prefix: str, module: nn.Module) -> List[str]:
        found: List[str] = []
        for child_name, child in module.named_children():
            name = f"{prefix}.{child_name}" if prefix else child_name
            if _qualifies(model, watch, name, child):
                found.append(name)
            else:
                found.extend(walk(name, child))
        return found

    units = walk("", model)
    total = sum(1 for _ in model.parameters())
    while len(units) == 1:
        single = units[0]
        inner = dict(model.named_modules())[single]
        if sum(1 for _ in inner.parameters()) != total:
            break
        deeper = walk(single, inner)
        if not deeper:
            break
        units = deeper
    return units
