"""Passes shared by the checks of a test class: the seeded eval-mode pass, the first training
step, or any pass a check declares, computed once per state of the model and inputs.

Each check is a separate ``TestCase`` instance with its own ``setUp``, so a pass is shared
through a small cache, keyed by

- the test class (passes are never shared between classes) and the pass's name;
- a *fingerprint* of the model: every submodule's class, mode and attributes (numbers,
  strings, containers, plain objects such as a config, hooks and functions by their code and
  the values they close over), every parameter's and buffer's name, shape, dtype, device and
  ``requires_grad``, and their values: every element of a tensor of up to ``SAMPLE``
  elements; of a larger one, ``SAMPLE`` elements in 64 runs spread evenly over it, and two
  elements of every row (the first, and one in a column that moves on from row to row);
- every element of every tensor of the inputs, and their structure;
- what else the pass depends on (``loss_fn``), the seed, and the global settings a pass can
  depend on (default dtype, threads, grad mode, deterministic algorithms, autocast).

So a model built once and assigned in every ``setUp``, and a model built anew in every
``setUp`` (seeded, so the same), both get the pass computed once; a model or inputs changed
in between (another ``setUp`` path, a weight changed, an attribute set, ``.eval()``) give
another key, and the pass is computed again. A pass that changes what the key covers (a
forward pass that counts its calls in an attribute or buffer, updates a statistic, or
writes into its inputs) is never shared: the model's state after it is not the state it was
computed from. Every caller gets its own copy of the result's tensors.

What the key cannot see is state outside the model and inputs (a global variable the
forward pass reads) and, in a tensor of more than ``SAMPLE`` elements, a change of elements
outside the sample between two instances of the model: a ``setUp`` that builds a different
model for one check of a class only by changing a few elements of a large weight (a whole
row is seen). Reading every element of every weight at every check would cost about a tenth
of a forward pass of a convolutional network, each time.
``SHARING = False`` (or the environment variable ``DLTESTKIT_SHARED_PASSES=0``) turns sharing
off: every check then computes every pass itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import gc
import os
import types
import unittest
import weakref
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, TypeVar

import torch
from torch import nn

from ..core.paths import map_tensors
from .norm_calls import TrainingForward

__all__ = [
    "SAMPLE",
    "SHARING",
    "GradientSummary",
    "TrainingPass",
    "finite_and_nonzero",
    "fingerprint",
    "forget_passes",
    "same_state",
    "shared_pass",
    "stored_pass",
]

T = TypeVar("T")

#: Tensors of up to this many elements are fingerprinted whole; larger ones by this many
#: elements spread evenly over them.
SAMPLE = 1024
#: Whether passes are shared between the checks of a test class.
SHARING = os.environ.get("DLTESTKIT_SHARED_PASSES", "1") != "0"
#: How many test classes keep their passes (the most recent ones).
KEEP = 2
#: How deep and how many values the fingerprint follows attributes; what lies beyond is
#: keyed by identity (never shared between two instances).
_DEPTH = 8
_BUDGET = 200_000

_SIMPLE = frozenset((type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device))


# -- the fingerprint ----------------------------------------------------------------------
#: What every module has: read from the state every module has, in a fixed way.
_MODULE_STATE = frozenset(vars(nn.Module()))
_HOOKS = tuple(sorted(_MODULE_STATE - {"_parameters", "_buffers", "_modules", "training"}))


def _sample(tensor: torch.Tensor) -> List[torch.Tensor]:
    """The tensor's elements, as parts to be joined flat: all of them, or a sample of them
    (see ``SAMPLE``, and ``_sampled_positions`` for which)."""
    count = tensor.numel()
    if count <= SAMPLE:
        return [tensor]  # (flattened when joined)
    flat = tensor.detach()
    flat = flat.view(-1) if flat.is_contiguous() else flat.reshape(-1)
    rows = tensor.shape[0] if tensor.dim() > 1 else 1
    return [flat.take(_sampled_positions(count, rows, flat.device))]


@functools.lru_cache(maxsize=512)
def _sampled_positions(count: int, rows: int, device: torch.device) -> torch.Tensor:
    """The positions in a flat tensor of ``count`` elements (``rows`` rows) that its sample
    holds: 64 runs of ``SAMPLE // 64`` elements spread evenly over it, and where it has
    rows, two elements of every row (the first, and one in a column that moves on), so that
    a change to one row (an embedding's) shows. Kept per shape: one ``take`` per tensor."""
    run = SAMPLE // 64
    runs = torch.arange(64).unsqueeze(1) * ((count - run) // 63) + torch.arange(run)
    parts = [runs.reshape(-1)]
    if rows > 1:
        columns = count // rows
        index = torch.arange(rows)
        parts += [index * columns, index * columns + (index * 7919 + 1) % columns]
    return torch.cat(parts).to(device)


def _crc(tensors: List[torch.Tensor]) -> int:
    """A CRC-32 of the bytes of the tensors, one after the other."""
    with torch.no_grad():
        joined = torch.cat([t.reshape(-1) for t in tensors]).cpu()
    if joined.dtype == torch.bool:
        joined = joined.to(torch.uint8)
    return zlib.crc32(joined.view(torch.uint8).numpy().data)


class _Fingerprint:
    """Describe a value as a nested tuple that compares equal for equal states; the values
    of plain tensors go into one CRC (``samples``), their place in the tuple says which."""

    def __init__(self) -> None:
        self.seen: Dict[int, int] = {}
        self.left = _BUDGET
        self.samples: Dict[Tuple[torch.dtype, torch.device], List[torch.Tensor]] = {}
        self.kept: List[Any] = []  # what was keyed by identity (kept alive by the cache)
        self.alive: List[Any] = []  # what was described, alive while describing (ids unique)

    def tensor(self, tensor: torch.Tensor) -> Any:
        meta = (
            type(tensor),
            tensor.shape,
            tensor.dtype,
            tensor.device,
            tensor.requires_grad,
        )
        if tensor.is_meta:
            return meta
        if (
            type(tensor) not in (torch.Tensor, nn.Parameter)
            or tensor.layout != torch.strided
            or tensor.is_quantized
            or tensor.is_nested
        ):
            return (*meta, tensor.layout, self.identity(tensor), tensor._version)
        self.samples.setdefault((tensor.dtype, tensor.device), []).extend(_sample(tensor))
        return meta

    def identity(self, value: Any) -> Any:
        self.kept.append(value)
        return ("id", type(value).__qualname__, id(value))

    def __call__(self, value: Any, depth: int = 0) -> Any:
        kind = type(value)
        if kind in _SIMPLE or value is None:
            return value if kind is not float or value == value else "nan"
        self.left -= 1
        if isinstance(value, torch.Tensor):
            return self.tensor(value)
        if kind in (tuple, list, dict) and not value:
            return kind.__name__
        if isinstance(value, (torch.Size, torch.memory_format, torch.layout, enum.Enum)):
            return (kind.__qualname__, repr(value))
        if depth > _DEPTH or self.left <= 0:
            return self.identity(value)
        if id(value) in self.seen:  # described already (a shared config, a cycle)
            return ("seen", self.seen[id(value)])
        self.seen[id(value)] = len(self.seen)
        self.alive.append(value)
        if isinstance(value, nn.Module):
            return self.module(value, depth)
        if isinstance(value, (list, tuple, set, frozenset)):
            items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
            return (kind.__qualname__, tuple([self(item, depth + 1) for item in items]))
        if isinstance(value, dict):
            return (
                kind.__qualname__,
                tuple([(self(k, depth + 1), self(v, depth + 1)) for k, v in value.items()]),
            )
        if isinstance(value, (types.FunctionType, types.MethodType, types.BuiltinFunctionType)):
            return self.function(value, depth)
        if isinstance(value, weakref.ref):
            return ("weakref", self(value(), depth + 1))
        if isinstance(value, torch.Generator):
            return ("generator", value.device, _crc([value.get_state()]))
        if isinstance(value, unittest.TestCase):  # a loss_fn closing over self: its options
            return (
                "testcase",
                kind,
                tuple(
                    (name, self(item, depth + 1))
                    for name, item in vars(value).items()
                    if not name.startswith("_")
                ),
            )
        if isinstance(value, type):
            return ("class", value)
        if hasattr(value, "__array__") and hasattr(value, "dtype") and hasattr(value, "shape"):
            try:  # a NumPy array
                return ("array", _crc([torch.as_tensor(value)]), str(value.dtype), value.shape)
            except (TypeError, RuntimeError, ValueError):
                return self.identity(value)
        if isinstance(value, functools.partial):
            return (
                "partial",
                self(value.func, depth + 1),
                self(value.args, depth + 1),
                self(value.keywords, depth + 1),
            )
        state = getattr(value, "__dict__", None)
        if isinstance(state, dict):
            return (kind, self(state, depth + 1))
        return (kind.__qualname__, repr(value)[:200], self.identity(value))

    def function(self, value: Any, depth: int) -> Any:
        function = getattr(value, "__func__", value)
        code = getattr(function, "__code__", None)
        bound = getattr(value, "__self__", None)
        if code is None:  # a builtin: its name and what it is bound to
            bound_to = None if isinstance(bound, types.ModuleType) else self(bound, depth + 1)
            return ("builtin", getattr(value, "__qualname__", repr(value)), bound_to)
        cells = tuple(
            self(cell.cell_contents, depth + 1) if _filled(cell) else "empty"
            for cell in function.__closure__ or ()
        )
        return (
            "function",
            code,
            self(function.__defaults__, depth + 1),
            self(function.__kwdefaults__, depth + 1),
            cells,
            None if bound is None else self(bound, depth + 1),
        )

    def module(self, module: nn.Module, depth: int) -> Any:
        state = module.__dict__
        parts: List[Any] = [type(module), module.training]
        parts.extend(
            (name, None if tensor is None else self.tensor(tensor))
            for name, tensor in module._parameters.items()
        )
        parts.append("buffers")
        parts.extend(
            (name, None if tensor is None else self.tensor(tensor))
            for name, tensor in module._buffers.items()
        )
        for name in _HOOKS:  # (dicts keyed by handle ids, which differ between instances)
            value = state.get(name)
            if value:
                parts.append(
                    (name, self(list(value.values()) if isinstance(value, dict) else value, depth))
                )
        for name, value in state.items():
            if name not in _MODULE_STATE:
                parts.append((name, self(value, depth + 1)))
        for name, child in module._modules.items():
            parts.append((name, None if child is None else self(child, depth)))
        return tuple(parts)


def _filled(cell: Any) -> bool:
    try:
        return cell.cell_contents is not _filled  # (reading it raises for an empty cell)
    except ValueError:
        return False


def _settings() -> Any:
    """The global settings a pass can depend on."""
    autocast = getattr(torch, "is_autocast_enabled", None)
    try:
        cpu_autocast = bool(autocast("cpu")) if autocast is not None else False
    except TypeError:  # older torch: no device argument
        cpu_autocast = bool(torch.is_autocast_cpu_enabled())
    return (
        torch.get_default_dtype(),
        torch.get_num_threads(),
        torch.is_grad_enabled(),
        torch.are_deterministic_algorithms_enabled(),
        cpu_autocast,
    )


def fingerprint(*values: Any) -> Tuple[Any, List[Any]]:
    """The key of a state (the model, the inputs, what else a pass depends on), and the
    objects keyed by identity, which the cache keeps alive so that their ids stay theirs."""
    describe = _Fingerprint()
    collecting = gc.isenabled()
    gc.disable()  # the many small tuples would set off collections of every object there is
    try:
        described = tuple(describe(value) for value in values)
    finally:
        if collecting:
            gc.enable()
    values_crc = tuple((kind, _crc(samples)) for kind, samples in describe.samples.items())
    return (_settings(), described, values_crc), describe.kept


# -- the cache ----------------------------------------------------------------------------
@dataclass
class _Entry:
    """The passes of one test class: by name, the key of the state each was computed from
    and its result."""

    owner: "weakref.ReferenceType[type]"
    results: Dict[str, Tuple[Any, List[Any], Any]] = dataclasses.field(default_factory=dict)


_ENTRIES: List[_Entry] = []


def forget_passes() -> None:
    """Drop every shared pass."""
    _ENTRIES.clear()


def _entry(owner: type) -> Optional[_Entry]:
    for entry in _ENTRIES:
        if entry.owner() is owner:
            return entry
    return None


def _store(owner: type, key: Any, kept: List[Any], name: str, result: Any) -> None:
    """Keep ``result``, computed from the state ``key``, as the pass ``name`` of ``owner``
    (replacing the one it had); keep the passes of the KEEP classes used last."""
    entry = _entry(owner)
    if entry is None:
        entry = _Entry(weakref.ref(owner))
    _ENTRIES[:] = [e for e in _ENTRIES if e.owner() is not None and e is not entry]
    _ENTRIES.append(entry)
    del _ENTRIES[:-KEEP]
    entry.results[name] = (key, kept, result)


def _copy(result: T) -> T:
    """The result with its tensors cloned (each caller may change its own)."""
    copied: T = map_tensors(lambda t: t.clone(), result)
    return copied


#: Within ``same_state()``: the keys computed, by the identities of the values keyed.
_MEMO: Optional[Dict[Tuple[int, ...], Tuple[Any, List[Any], List[Any]]]] = None


@contextlib.contextmanager
def same_state() -> Iterator[None]:
    """Within the block, each state is fingerprinted once: for a check that looks up several
    passes with nothing run in between (a pass computed in the block forgets what was
    kept, since it ran the model)."""
    global _MEMO
    outer, _MEMO = _MEMO, {}
    try:
        yield
    finally:
        _MEMO = outer


def _fingerprint_once(values: Sequence[Any]) -> Tuple[Any, List[Any]]:
    """``fingerprint(*values)``, kept within ``same_state()`` (with the values, so that
    their identities stay theirs)."""
    if _MEMO is None:
        return fingerprint(*values)
    ids = tuple(id(value) for value in values)
    if ids not in _MEMO:
        key, kept = fingerprint(*values)
        _MEMO[ids] = (key, kept, list(values))
    key, kept, _ = _MEMO[ids]
    return key, kept


def _key(state: Sequence[Any]) -> Tuple[Any, List[Any]]:
    """The key of ``state``: the model, the inputs and the seed (its first three values)
    are fingerprinted together, what else the pass depends on apart, so that passes that
    depend on more (loss_fn) share the fingerprint of the model's state."""
    head, rest = _fingerprint_once(state[:3]), _fingerprint_once(state[3:])
    return (head[0], rest[0]), head[1] + rest[1]


def shared_pass(
    owner: type,
    name: str,
    state: Sequence[Any],
    compute: Callable[[], T],
    recompute: bool = False,
    part: Optional[Tuple[str, Callable[[T], Any]]] = None,
) -> T:
    """``compute()``, or the result it gave for the same ``owner`` (the test class), ``name``
    and ``state`` (the model, the inputs, the seed, what else it depends on). ``recompute``:
    compute it anyway, and share the result. ``part``: (name, take), a part of the result
    that depends only on the model, the inputs and the seed (the first three values of
    ``state``), shared under its own name when the result is computed: ``stored_pass``
    finds it for those three, without what the rest depends on."""
    global _MEMO
    if not SHARING:
        return compute()
    key, kept = _key(state)
    entry = _entry(owner)
    if not recompute and entry is not None and name in entry.results:
        stored_key, _, stored = entry.results[name]
        if stored_key == key:
            found: T = _copy(stored)
            return found
    result = compute()
    if _MEMO is not None:
        _MEMO = {}  # (the model ran)
    after, _ = _key(state)
    if after == key:  # the pass left the state as it found it
        _store(owner, key, kept, name, _copy(result))
        if part is not None and (taken := part[1](result)) is not None:
            # keyed as its state alone is: the model's state (the first three values, the
            # same as the pass's), and nothing else
            nothing, _ = _fingerprint_once(())
            _store(owner, (key[0], nothing), kept, part[0], _copy(taken))
    return result


def stored_pass(owner: type, name: str, state: Sequence[Any]) -> Optional[Any]:
    """The result of the pass (or part of a pass) ``name`` that a check of ``owner`` computed
    for ``state``, if one did (a copy); None otherwise: nothing is computed."""
    entry = _entry(owner) if SHARING else None
    if entry is None or name not in entry.results:
        return None
    stored_key, _, stored = entry.results[name]
    key, _ = _key(state)
    return _copy(stored) if stored_key == key else None


# -- what the first training step shows ------------------------------------------------------
@dataclass(frozen=True)
class GradientSummary:
    """What one parameter's gradient was after the first training step."""

    #: Whether the backward pass reached the parameter (its ``.grad`` is set).
    connected: bool
    #: Whether every value of the gradient is finite.
    finite: bool
    #: Whether a value of the gradient is not zero (and every value finite).
    nonzero: bool

    @staticmethod
    def of(grad: Optional[torch.Tensor]) -> "GradientSummary":
        if grad is None:
            return GradientSummary(False, True, False)
        finite, nonzero = finite_and_nonzero(grad)
        return GradientSummary(True, finite, finite and nonzero)


@dataclass(frozen=True)
class TrainingPass:
    """One training-mode forward and backward pass of a copy of the model (the first step
    of training): the output (detached), the loss and each trainable parameter's gradient."""

    output: Any
    loss: Optional[torch.Tensor]
    #: The trainable parameters (``requires_grad``), by name, in the model's order.
    names: Tuple[str, ...]
    gradients: Tuple[GradientSummary, ...]
    #: The plain tensors of the copies of the inputs that the pass changed in place, by path
    #: (as ``named_tensors(inputs, prefix="")`` names them).
    changed_inputs: Tuple[str, ...] = ()
    #: What its forward pass showed (normalisation, modes, buffers changed), which depends
    #: on no loss: shared on its own as the part "training forward".
    forward: Optional[TrainingForward] = None

    @staticmethod
    def of(
        output: Any,
        loss: Optional[torch.Tensor],
        names: Sequence[str],
        grads: Sequence[Optional[torch.Tensor]],
        changed_inputs: Sequence[str] = (),
        forward: Optional[TrainingForward] = None,
    ) -> "TrainingPass":
        return TrainingPass(
            output=map_tensors(lambda t: t.detach(), output),
            loss=None if loss is None else loss.detach(),
            names=tuple(names),
            gradients=tuple(GradientSummary.of(grad) for grad in grads),
            changed_inputs=tuple(changed_inputs),
            forward=forward,
        )


def stored_values(tensor: torch.Tensor) -> torch.Tensor:
    """The values a tensor stores: of a sparse gradient (nn.Embedding(sparse=True)), its
    non-zero entries, on which elementwise tests such as ``ne`` have no kernel."""
    return tensor.coalesce().values() if tensor.is_sparse else tensor


def finite_and_nonzero(tensor: torch.Tensor) -> Tuple[bool, bool]:
    """Whether every value of ``tensor`` is finite, and whether one is not zero, read from
    its least and greatest value (one pass over it, nothing as large allocated; NaN makes
    both NaN)."""
    values = stored_values(tensor)
    if values.numel() == 0:
        return True, False
    if values.is_complex() or not values.is_floating_point():
        return bool(torch.isfinite(values).all()), bool(values.ne(0).any())
    least, greatest = torch.aminmax(values)
    finite = bool(torch.isfinite(least)) and bool(torch.isfinite(greatest))
    return finite, bool(least != 0) or bool(greatest != 0)
