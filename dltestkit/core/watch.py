"""Watching a forward pass: what the model's torch calls do, which submodule makes them, and
at which line of the model's code.

Each watch is a ``Watch``, a ``TorchFunctionMode`` that sees the torch calls the model makes
(and not those that torch's own Python implementations of operators make inside them) and
hands each to ``handle``. ``watching(model, watch)`` runs one with the model's submodules
tracked, so that messages can name the submodule whose forward made a call.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import linecache
import os
import re
import sys
import weakref
from dataclasses import dataclass
from types import FrameType
from typing import Any, Callable, Dict, FrozenSet, Generic, Iterator, List, Optional, Tuple, TypeVar

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = [
    "TRACEBACK_FRAME",
    "FailedOperation",
    "ModuleTracker",
    "TensorNotes",
    "Watch",
    "called_by_a_kernel",
    "op_name",
    "raised_by",
    "raising_user_line",
    "tensors_in",
    "user_code_location",
    "watching",
]

_TORCH_DIR = os.path.dirname(torch.__file__)
_OWN_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# PyTorch's Python implementations of operators (meta kernels, decompositions). Their torch
# calls are part of the operation that runs them, not of the model: the watches see them only
# when the operation itself was called from C++, as TorchScript calls every operation.
_KERNEL_FILES = tuple(
    os.path.join(_TORCH_DIR, name)
    for name in ("_decomp", "_refs", "_prims", "_prims_common", "_meta_registrations.py")
)
# What lies between a call and the watch: torch.ops.* calls, Python functions' overrides.
_PLUMBING_FILES = tuple(os.path.join(_TORCH_DIR, name) for name in ("_ops.py", "overrides.py"))


def tensors_in(obj: Any) -> List[torch.Tensor]:
    """Every tensor in nested arguments (tuples, lists, dicts)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = obj.values()
    elif not isinstance(obj, (list, tuple)):
        return []
    found: List[torch.Tensor] = []
    for item in obj:  # (the watches call this at every operation: no call per number)
        if isinstance(item, torch.Tensor):
            found.append(item)
        elif isinstance(item, (list, tuple, dict)):
            found.extend(tensors_in(item))
    return found


def op_name(func: Any) -> str:
    """How messages name a torch operation: Tensor.add, F.dropout, torch.randn,
    torch.ops.mylib.double."""
    if isinstance(func, (torch._ops.OpOverloadPacket, torch._ops.OpOverload)):
        return f"torch.ops.{func}"
    name = getattr(func, "__name__", repr(func))
    owner = getattr(func, "__qualname__", name).split(".")[0]
    if owner in ("TensorBase", "Tensor"):
        return f"Tensor.{name}"
    module = getattr(func, "__module__", None) or ""
    if module.startswith("torch.nn.functional"):
        return f"F.{name}"
    return f"torch.{name}"


def called_by_a_kernel() -> bool:
    """Whether the torch call the watch handles comes from a Python operator implementation
    (asked from ``Watch.__torch_function__``)."""
    frame: Optional[FrameType] = sys._getframe(2)  # 0: here, 1: __torch_function__
    while frame is not None and frame.f_code.co_filename.startswith(_PLUMBING_FILES):
        frame = frame.f_back
    return frame is not None and frame.f_code.co_filename.startswith(_KERNEL_FILES)


@functools.lru_cache(maxsize=4096)
def _absolute(path: str) -> str:
    """``os.path.abspath(path)``, kept: the dtype watch asks for it at every tensor it notes,
    for each frame of the stack (a code file's relative name is resolved once)."""
    return os.path.abspath(path)


def user_code_location() -> str:
    """``file:line in function`` of the innermost frame outside torch and dltestkit.

    Walks the frames from the innermost out and stops at the first one found, reading no
    source lines: the dtype watch asks for it at every tensor it notes. When every frame
    between the model's caller (dltestkit) and the operation is torch's own (an operation
    called by a hook torch installed: a quantisation observer), the innermost torch frame
    that is no dispatch plumbing is named instead, by its path inside torch."""
    frame = inspect.currentframe()
    inside_own = True  # the watch's own frames come first
    innermost_torch: Optional[FrameType] = None
    while frame is not None:
        path = _absolute(frame.f_code.co_filename)
        own = path.startswith(_OWN_DIR)
        if own and not inside_own:  # back at the call of the model: no user frame between
            break
        inside_own = inside_own and own
        if path.startswith(_TORCH_DIR):
            if innermost_torch is None and not path.startswith(_PLUMBING_FILES):
                innermost_torch = frame
        elif not own and "unittest" not in path:
            return f"{os.path.basename(path)}:{frame.f_lineno} in {frame.f_code.co_name}"
        frame = frame.f_back
    if innermost_torch is not None:
        inside = os.path.relpath(innermost_torch.f_code.co_filename, os.path.dirname(_TORCH_DIR))
        return f"{inside}:{innermost_torch.f_lineno} in {innermost_torch.f_code.co_name}"
    return "an unknown place"


#: The file names Python gives code typed in: a doctest's examples, a notebook's cells.
_TYPED_IN = ("<doctest ", "<ipython-input-")


def raising_user_line(exc: BaseException) -> Optional[str]:
    """``file:line in function: `code``` of the innermost frame of ``exc``'s traceback that
    is outside torch and dltestkit (the line of the model's code that made the call that
    raised), or None when every frame is torch's or dltestkit's. Code that torch generates
    (FX graphs, ``<eval_with_key>``) counts as torch's, but the operation of such a graph that
    raised names the line of the model it was traced from (what torch.compile keeps of each
    operation), found before the frames around the graph; code typed in a doctest or a
    notebook cell (``<doctest ...>``, ``<ipython-input-...>``) as the user's."""
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append((tb.tb_frame, tb.tb_lineno))
        tb = tb.tb_next
    for frame, lineno in reversed(frames):
        filename = frame.f_code.co_filename
        typed = filename.startswith(_TYPED_IN)
        if filename.startswith("<") and not typed:
            traced = _traced_from(frame, lineno)
            if traced is not None:
                return traced
            continue
        line = _user_line(filename, lineno, frame.f_code.co_name, typed)
        if line is not None:
            return line
    return None


def _user_line(filename: str, lineno: int, function: str, typed: bool = False) -> Optional[str]:
    """``file:line in function: `code``` for a line outside torch and dltestkit, else None."""
    path = filename if typed else os.path.abspath(filename)
    inside = (os.path.join(_TORCH_DIR, ""), os.path.join(_OWN_DIR, ""))
    if path.startswith(inside) or "unittest" in path:
        return None
    text = linecache.getline(filename, lineno).strip()
    code = f": `{text}`" if text else ""
    return f"{os.path.basename(path)}:{lineno} in {function}{code}"


#: A frame of a Python traceback's text (a rank's traceback, the stack trace torch.compile
#: keeps of each graph node).
TRACEBACK_FRAME = re.compile(
    r'^\s+File "(?P<path>.*)", line (?P<line>\d+), in (?P<function>.*)$', re.M
)


def _traced_from(frame: FrameType, lineno: int) -> Optional[str]:
    """For a frame of an FX graph's generated code (a graph torch.compile traced): the line of
    the model's code that the graph's operation at ``lineno`` was traced from, from the stack
    trace torch keeps of it; None when there is none."""
    graph_module = frame.f_locals.get("self")
    graph = getattr(graph_module, "graph", None)
    statement = linecache.getline(frame.f_code.co_filename, lineno).strip()
    if graph is None or " = " not in statement:
        return None
    targets = {name.strip() for name in statement.split(" = ")[0].split(",")}
    for node in graph.nodes:
        if node.name in targets:
            found = None
            for entry in TRACEBACK_FRAME.finditer(node.meta.get("stack_trace") or ""):
                where = (entry["path"], int(entry["line"]), entry["function"])
                found = _user_line(*where) or found
            return found
    return None


class ModuleTracker:
    """Which submodule's forward is running (for messages). TorchScript modules take no
    hooks: inside one, messages name the innermost Python module around it, or "forward"."""

    def __init__(self, model: Optional[nn.Module] = None) -> None:
        self.stack: List[str] = []
        self._names: List[str] = []
        self._handles: List[Any] = []
        for name, module in model.named_modules() if model is not None else ():
            if isinstance(module, torch.jit.ScriptModule):
                continue
            label = f"{name} ({type(module).__name__})" if name else type(model).__name__
            self._handles.append(module.register_forward_pre_hook(self._enter(label, name)))
            self._handles.append(module.register_forward_hook(self._leave))

    def _enter(self, label: str, name: str) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            self.stack.append(label)
            self._names.append(name)

        return hook

    def _leave(self, *_: Any) -> None:  # a forward hook that returns None keeps the output
        if self.stack:
            self.stack.pop()
            self._names.pop()

    def current(self) -> str:
        return self.stack[-1] if self.stack else "forward"

    def current_name(self) -> str:
        """The running submodule's name in the model ("" for the model itself)."""
        return self._names[-1] if self._names else ""

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@dataclass(frozen=True)
class FailedOperation:
    """The torch operation that raised during a watched forward pass."""

    operation: str
    where: str
    location: str
    exception: BaseException
    #: the dtypes of its floating-point tensor arguments with a dimension
    dtypes: Tuple[torch.dtype, ...] = ()
    #: the devices of its tensor arguments with a dimension
    devices: Tuple[str, ...] = ()

    def describe(self) -> str:
        return f"{self.operation} in {self.where}, at {self.location}"


def raised_by(exc: BaseException, failure: Optional[FailedOperation]) -> bool:
    """Whether ``exc`` is the exception ``failure`` noted, or was raised while handling it."""
    seen: List[BaseException] = []
    current: Optional[BaseException] = exc
    while current is not None and failure is not None and not any(current is s for s in seen):
        if current is failure.exception:
            return True
        seen.append(current)
        current = current.__cause__ or current.__context__
    return False


N = TypeVar("N")


class TensorNotes(Generic[N]):
    """A note about each of some tensors, kept by the tensor's identity for as long as it lives
    (a dead tensor's id may be reused by a new one, which then has no note)."""

    def __init__(self) -> None:
        self._notes: Dict[int, Tuple["weakref.ref[torch.Tensor]", N]] = {}

    def __setitem__(self, tensor: torch.Tensor, note: N) -> None:
        self._notes[id(tensor)] = (weakref.ref(tensor), note)

    def get(self, tensor: torch.Tensor) -> Optional[N]:
        found = self._notes.get(id(tensor))
        return found[1] if found is not None and found[0]() is tensor else None

    def pop(self, tensor: torch.Tensor) -> Optional[N]:
        found = self._notes.pop(id(tensor), None)
        return found[1] if found is not None and found[0]() is tensor else None


#: The attributes of a tensor that say what it is, not what it holds, and are no tensor:
#: reading one (``x.shape``, ``x.device``) is no operation a watch judges.
METADATA = frozenset(
    ("shape", "dtype", "device", "requires_grad", "is_leaf", "grad_fn", "ndim", "layout", "names")
    + ("is_cuda", "is_sparse", "is_quantized", "is_meta", "is_nested", "_version", "itemsize")
    + ("nbytes", "output_nr", "is_mkldnn", "is_xpu", "is_mps")
)


def reads_metadata(func: Any, names: FrozenSet[str] = METADATA) -> bool:
    """Whether ``func`` reads one of the attributes ``names`` of a tensor (``Tensor.shape``'s
    ``__get__``, as torch hands it to a ``TorchFunctionMode``)."""
    if getattr(func, "__name__", "") != "__get__":
        return False
    return getattr(getattr(func, "__self__", None), "__name__", "") in names


#: A tensor's copying (copy.deepcopy, pickling), passed through unwatched: its arguments
#: include deepcopy's memo of everything copied so far, which a watch would walk at every
#: tensor, and it is the checks' own work, not the model's computation.
_COPYING = (torch.Tensor.__deepcopy__, torch.Tensor.__reduce_ex__, torch.Tensor.__setstate__)


class Watch(TorchFunctionMode):
    """Base of the watches: ``handle`` sees each torch call of the forward pass, but for the
    calls torch's own operator implementations make; ``where`` says where a call is."""

    def __init__(self, modules: Optional[ModuleTracker] = None) -> None:
        super().__init__()
        self.modules = modules if modules is not None else ModuleTracker()
        self._failure: Optional[FailedOperation] = None

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: Tuple[Any, ...] = (),
        kwargs: Optional[Dict[str, Any]] = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func in _COPYING or reads_metadata(func) or called_by_a_kernel():  # (no hashing)
            return func(*args, **kwargs)
        return self.handle(func, args, kwargs)

    def handle(self, func: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        return func(*args, **kwargs)

    def where(self) -> str:
        """The submodule running and the line of the model's code, for a message."""
        return f"in {self.modules.current()}, at {user_code_location()}"

    def note_failure(self, func: Any, exc: BaseException, tensors: List[torch.Tensor]) -> None:
        """Note the innermost operation that raised ``exc`` (once: the outer calls it passes
        through raise it too)."""
        if raised_by(exc, self._failure):
            return
        shaped = [t for t in tensors if t.dim() > 0]
        self._failure = FailedOperation(
            op_name(func),
            self.modules.current(),
            user_code_location(),
            exc,
            dtypes=tuple(dict.fromkeys(t.dtype for t in shaped if t.is_floating_point())),
            devices=tuple(dict.fromkeys(t.device.type for t in shaped)),
        )

    def failure(self, exc: BaseException) -> Optional[FailedOperation]:
        """The torch operation that raised ``exc`` (innermost), if one did."""
        return self._failure if raised_by(exc, self._failure) else None


W = TypeVar("W", bound=Watch)


@contextlib.contextmanager
def watching(model: nn.Module, make: Callable[[ModuleTracker], W]) -> Iterator[W]:
    """Run ``make(modules)``, a watch, with ``model``'s submodules tracked; the hooks that
    track them are removed afterwards."""
    modules = ModuleTracker(model)
    try:
        with make(modules) as watch:
            yield watch
    finally:
        modules.remove()
