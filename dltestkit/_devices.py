"""Devices and dtypes: which GPUs there are, and watching a forward pass for device and dtype bugs.

Device bugs are found without a GPU by running a copy of the model on the ``meta`` device
(tensors with a shape but no data). Two things make that as strict as a real GPU:

- ``DeviceWatch`` reports any operation that combines a tensor of the model's device with a
  non-scalar CPU tensor, including the operations that ``meta`` silently accepts (an
  ``nn.Embedding`` looked up with CPU position ids fails on a GPU, not on ``meta``);
- data-dependent steps (``if mask.all():``, ``.item()``, ``.tolist()``, ``nonzero()``,
  boolean indexing, ``.cpu()``) cannot run on ``meta``: the same forward pass is first run on
  the CPU by a ``Recorder``, and the meta run replays what those steps returned there.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import re
import sys
import weakref
from dataclasses import dataclass
from types import FrameType
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = [
    "DeviceProblem",
    "DtypeWatch",
    "FailedOperation",
    "MetaCannotRun",
    "Origin",
    "ModuleTracker",
    "ReplayMismatch",
    "available_accelerators",
    "called_by_a_kernel",
    "error_text",
    "op_name",
    "tensors_in",
    "user_code_location",
    "watch_meta_forward",
    "watching_dtypes",
]

_T = torch.Tensor


def available_accelerators() -> List[str]:
    """The GPU-like devices present: the current ``torch.accelerator`` (CUDA, XPU, ...), or,
    on older torch, CUDA and MPS."""
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        if not accelerator.is_available():
            return []
        current = accelerator.current_accelerator()
        return [current.type] if current is not None else []
    found = []
    if torch.cuda.is_available():
        found.append("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    return found


def tensors_in(obj: Any) -> List[torch.Tensor]:
    """Every tensor in nested arguments (tuples, lists, dicts)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in tensors_in(item)]
    if isinstance(obj, dict):
        return [t for item in obj.values() for t in tensors_in(item)]
    return []


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


_TORCH_DIR = os.path.dirname(torch.__file__)
_OWN_DIR = os.path.dirname(os.path.abspath(__file__))
# PyTorch's Python implementations of operators (meta kernels, decompositions). Their torch
# calls are part of the operation that runs them, not of the model: the watches see them only
# when the operation itself was called from C++, as TorchScript calls every operation.
_KERNEL_FILES = tuple(
    os.path.join(_TORCH_DIR, name)
    for name in ("_decomp", "_refs", "_prims", "_prims_common", "_meta_registrations.py")
)
# What lies between a call and the watch: torch.ops.* calls, Python functions' overrides.
_PLUMBING_FILES = tuple(os.path.join(_TORCH_DIR, name) for name in ("_ops.py", "overrides.py"))


def called_by_a_kernel() -> bool:
    """Whether the torch call the watch handles comes from a Python operator implementation
    (asked from the watch's ``__torch_function__``)."""
    frame: Optional[FrameType] = sys._getframe(2)  # 0: here, 1: __torch_function__
    while frame is not None and frame.f_code.co_filename.startswith(_PLUMBING_FILES):
        frame = frame.f_back
    return frame is not None and frame.f_code.co_filename.startswith(_KERNEL_FILES)


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
        path = os.path.abspath(frame.f_code.co_filename)
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


_SCRIPT_FRAME = re.compile(r'^\s*File "(?P<path>[^"]*)", line (?P<line>\d+), in (?P<function>\S+)')
_ERROR_PREFIX = re.compile(r"^[A-Za-z_.]*(Error|Exception|Stop): ")


def error_text(exc: BaseException) -> str:
    """The message of ``exc``. An error raised inside TorchScript code comes as a long
    report of the interpreter (both tracebacks, then the Python frames of the kernel that
    raised); it is shortened to the error and the scripted line that raised it."""
    text = str(exc).strip()
    if "TorchScript interpreter" not in text:
        return text
    lines = text.splitlines()
    errors = [i for i, line in enumerate(lines) if _ERROR_PREFIX.match(line)]
    if not errors:
        return text
    message = lines[errors[-1]]
    while _ERROR_PREFIX.match(message):  # "RuntimeError: RuntimeError: ..."
        message = message.split(": ", 1)[1]
    start = next((i for i, line in enumerate(lines) if "original code" in line), 0)
    frames = [i for i in range(start, errors[-1]) if _SCRIPT_FRAME.match(lines[i])]
    if not frames:
        return message
    frame = _SCRIPT_FRAME.match(lines[frames[-1]])
    assert frame is not None
    marker = next((i for i in range(frames[-1], errors[-1]) if "<--- HERE" in lines[i]), None)
    code = f": {lines[marker - 1].strip()}" if marker is not None else ""
    return (
        f"{message} (in TorchScript code, at {os.path.basename(frame['path'])}:"
        f"{frame['line']} in {frame['function']}{code})"
    )


class ModuleTracker:
    """Which submodule's forward is running (for messages). TorchScript modules take no
    hooks: inside one, messages name the innermost Python module around it, or "forward"."""

    def __init__(self, model: nn.Module) -> None:
        self.stack: List[str] = []
        self._handles = []
        for name, module in model.named_modules():
            if isinstance(module, torch.jit.ScriptModule):
                continue
            label = f"{name} ({type(module).__name__})" if name else type(model).__name__
            self._handles.append(module.register_forward_pre_hook(self._enter(label)))
            self._handles.append(module.register_forward_hook(self._leave))

    def _enter(self, label: str) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            self.stack.append(label)

        return hook

    def _leave(self, *_: Any) -> None:  # a forward hook that returns None keeps the output
        if self.stack:
            self.stack.pop()

    def current(self) -> str:
        return self.stack[-1] if self.stack else "forward"

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


# -- device mixing ------------------------------------------------------------------------
# Operations that accept a CPU tensor next to a GPU tensor: indexing with CPU indices, copies
# between devices, shape-only arguments.
_MIXING_ALLOWED = frozenset(
    {
        "__getitem__",
        "__setitem__",
        "index_put",
        "index_put_",
        "_index_put_impl_",
        "to",
        "copy_",
        "type_as",
        "view_as",
        "reshape_as",
        "expand_as",
        "new_tensor",
        "tensor_split",
        "__get__",
        "__repr__",
        "__format__",
        "size",
        "dim",
        "numel",
        "is_floating_point",
        "is_complex",
    }
)
# Integer arguments that are on the CPU by design, by operation: (position, keyword). Packed
# sequences keep their lengths and batch sizes on the CPU (pack_padded_sequence requires CPU
# lengths on a GPU too; PackedSequence.batch_sizes is always a CPU tensor, which the packed
# forms of the RNN operations take as their second argument), and ctc_loss takes its targets
# and lengths on the CPU (cuDNN's CTC needs them there). Any other CPU tensor in these
# operations is still a device bug.
_CPU_BY_DESIGN: Dict[str, Tuple[Tuple[int, str], ...]] = {
    "pack_padded_sequence": ((1, "lengths"),),
    "_pack_padded_sequence": ((1, "lengths"),),
    "_pad_packed_sequence": ((1, "batch_sizes"),),
    "lstm": ((1, "batch_sizes"),),
    "gru": ((1, "batch_sizes"),),
    "rnn_tanh": ((1, "batch_sizes"),),
    "rnn_relu": ((1, "batch_sizes"),),
    "ctc_loss": ((1, "targets"), (2, "input_lengths"), (3, "target_lengths")),
}


def _cpu_by_design(name: str, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> List[_T]:
    """The arguments of operation ``name`` that may be integer tensors on the CPU."""
    found = []
    for position, keyword in _CPU_BY_DESIGN.get(name, ()):
        value = args[position] if position < len(args) else kwargs.get(keyword)
        if isinstance(value, torch.Tensor) and not value.is_floating_point():
            found.append(value)
    return found


# Steps that read data, which the meta device cannot do: replayed from the CPU run.
_READS = frozenset(
    {
        "__array__",
        "item",
        "__bool__",
        "__int__",
        "__float__",
        "__index__",
        "__complex__",
        "tolist",
        "numpy",
        "cpu",
        "equal",
        "allclose",
        # a bool from the mask's values: whether nn.TransformerEncoder may use nested tensors
        "_nested_tensor_from_mask_left_aligned",
    }
)
_SHAPE_FROM_DATA = frozenset(
    {
        "nonzero",
        "masked_select",
        "unique",
        "unique_consecutive",
        "argwhere",
        "nonzero_static",
        "repeat_interleave",
    }
)


@dataclass
class DeviceProblem:
    """The first place where a forward pass broke a device rule."""

    what: str
    where: str
    location: str

    def describe(self) -> str:
        return f"{self.what}, in {self.where}, at {self.location}"


class ReplayMismatch(RuntimeError):
    """The meta run took another path than the CPU run."""


def _is_bool_indexing(func: Any, args: Tuple[Any, ...]) -> bool:
    return getattr(func, "__name__", "") in ("__getitem__", "masked_select") and any(
        t.dtype == torch.bool and t.dim() > 0 for t in tensors_in(args[1:])
    )


def _reads_data(func: Any) -> bool:
    """A step whose result the meta device cannot compute. ``Tensor.to`` counts too: the CPU
    run cannot tell ``.to(x.device)`` from ``.to("cpu")``, so every call is noted, and the
    meta run takes the CPU's result where its own call moves to the CPU."""
    return getattr(func, "__name__", "") in _READS or getattr(func, "__name__", "") == "to"


def _to_cpu(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> bool:
    """Whether a ``Tensor.to`` call moves to the CPU."""
    targets = [*args[1:], kwargs.get("device")]
    return any(isinstance(a, (str, torch.device)) and str(a).startswith("cpu") for a in targets)


# Operations without a meta kernel whose results' shapes and dtypes do not depend on the data:
# on meta, tensors of the shapes and dtypes the CPU run returned stand in for their results.
_NO_META_KERNEL = frozenset({"ctc_loss"})


def _shape_from_data(func: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> bool:
    """A step whose results' shapes the meta device cannot compute: replayed from the CPU."""
    name = getattr(func, "__name__", "")
    if name in _NO_META_KERNEL:
        return True
    if name == "repeat_interleave":
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
        return isinstance(repeats, torch.Tensor) and repeats.dim() > 0
    if name == "where":  # torch.where(condition) alone is torch.nonzero(..., as_tuple=True)
        return len(args) + len(kwargs) == 1
    return name in _SHAPE_FROM_DATA or _is_bool_indexing(func, args)


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


def _raised_by(exc: BaseException, failure: Optional[FailedOperation]) -> bool:
    """Whether ``exc`` is the exception ``failure`` noted, or was raised while handling it."""
    seen: List[BaseException] = []
    current: Optional[BaseException] = exc
    while current is not None and failure is not None and not any(current is s for s in seen):
        if current is failure.exception:
            return True
        seen.append(current)
        current = current.__cause__ or current.__context__
    return False


def _shapes(result: Any) -> Optional[List[Tuple[torch.Size, torch.dtype]]]:
    """The shapes and dtypes of a result that is a tensor or a tuple or list of tensors."""
    if isinstance(result, torch.Tensor):
        return [(result.shape, result.dtype)]
    if (
        isinstance(result, (tuple, list))
        and result
        and all(isinstance(item, torch.Tensor) for item in result)
    ):
        return [(item.shape, item.dtype) for item in result]
    return None


class Recorder(TorchFunctionMode):
    """Run on the CPU, noting what each data-dependent step returned, and the shapes and
    dtypes of what every operation returned."""

    def __init__(self) -> None:
        super().__init__()
        self.log: List[Tuple[str, Any]] = []
        self.results: List[Tuple[str, Optional[List[Tuple[torch.Size, torch.dtype]]], bool]] = []

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: Tuple[Any, ...] = (),
        kwargs: Optional[Dict[str, Any]] = None,
    ) -> Any:
        kwargs = kwargs or {}
        if called_by_a_kernel():
            return func(*args, **kwargs)
        result = func(*args, **kwargs)
        self.results.append((op_name(func), _shapes(result), isinstance(result, torch.Tensor)))
        if _reads_data(func):
            self.log.append(
                (op_name(func), result.clone() if isinstance(result, torch.Tensor) else result)
            )
        elif _shape_from_data(func, args, kwargs):
            self.log.append((op_name(func), [(t.shape, t.dtype) for t in tensors_in(result)]))
        return result


class DeviceWatch(TorchFunctionMode):
    """Run on ``meta``: stop at the first operation that mixes in a CPU tensor, and replay
    the data-dependent steps a ``Recorder`` saw on the CPU. An operation that the meta
    device cannot run (no meta kernel, or one stricter than the CPU's) gives empty meta
    tensors of the shapes the CPU run returned, so the rest of the forward pass is watched
    too; where that is impossible, the operation is noted as the failure."""

    def __init__(self, modules: ModuleTracker, recorder: Recorder) -> None:
        super().__init__()
        self.modules = modules
        self.log = recorder.log
        # what each operation returned in the CPU run, by name, in the order of its calls
        # (by name, not by position: the first run of a process makes one-time calls of its
        # own, torch.device among them)
        self.results: Dict[str, List[Tuple[Optional[List[Any]], bool]]] = {}
        for name, shapes, single in recorder.results:
            self.results.setdefault(name, []).append((shapes, single))
        self.calls: Dict[str, int] = {}
        self.position = 0
        self.problem: Optional[DeviceProblem] = None
        self.stood_in: List[str] = []  # the operations whose results came from the CPU run
        self._failure: Optional[FailedOperation] = None

    def failure(self, exc: BaseException) -> Optional[FailedOperation]:
        """The torch operation that raised ``exc`` on meta (innermost), if one did."""
        return self._failure if _raised_by(exc, self._failure) else None

    def _stand_in(self, index: int, func: Any, args: Tuple[Any, ...]) -> Any:
        """Meta tensors standing in for the result of the ``index``-th call of ``func`` (the
        CPU run's shapes), or ``_NONE`` if the CPU run made fewer such calls or its call
        returned no tensors."""
        calls = self.results.get(op_name(func), [])
        if index >= len(calls):
            return _NONE
        shapes, single = calls[index]
        if shapes is None:
            return _NONE
        if getattr(func, "__name__", "").endswith("_") and args and single:
            return args[0]  # an in-place operation returns what it changed
        made = [torch.empty(shape, dtype=dtype, device="meta") for shape, dtype in shapes]
        return made[0] if single else tuple(made)

    def _replay(self, func: Any) -> Any:
        name = op_name(func)
        if self.position >= len(self.log) or self.log[self.position][0] != name:
            seen = self.log[self.position][0] if self.position < len(self.log) else "nothing"
            raise ReplayMismatch(
                f"{name} in {self.modules.current()}, where the CPU run called {seen}"
            )
        self.position += 1
        return self.log[self.position - 1][1]

    def _stop(self, what: str) -> None:
        self.problem = DeviceProblem(what, self.modules.current(), user_code_location())
        raise _Stop

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: Tuple[Any, ...] = (),
        kwargs: Optional[Dict[str, Any]] = None,
    ) -> Any:
        kwargs = kwargs or {}
        if called_by_a_kernel():
            return func(*args, **kwargs)
        name_of_call = op_name(func)
        index = self.calls.get(name_of_call, 0)
        self.calls[name_of_call] = index + 1
        tensors = tensors_in(args) + tensors_in(kwargs)
        on_meta = any(t.is_meta for t in tensors)
        name = getattr(func, "__name__", "")
        if on_meta and name not in _MIXING_ALLOWED:
            allowed = _cpu_by_design(name, args, kwargs)
            stray = [
                t
                for t in tensors
                if t.device.type == "cpu" and t.dim() > 0 and not any(t is a for a in allowed)
            ]
            if stray:
                self._stop(
                    f"{op_name(func)} combines a CPU tensor of shape "
                    f"{tuple(stray[0].shape)} ({stray[0].dtype}) with tensors on the "
                    "model's device"
                )
        if name in ("numpy", "__array__") and on_meta:
            how = "Tensor.numpy()" if name == "numpy" else "np.asarray(tensor)"
            self._stop(
                f"{how} is called on a tensor on the model's device (on a GPU that fails; "
                "use .cpu().numpy())"
            )
        if _reads_data(func):
            recorded = self._replay(func)
            if name == "to" and not (on_meta and _to_cpu(args, kwargs)):
                return func(*args, **kwargs)
            return recorded if on_meta else func(*args, **kwargs)
        if _shape_from_data(func, args, kwargs):
            recorded = self._replay(func)
            if not on_meta:
                return func(*args, **kwargs)
            made = [torch.empty(shape, dtype=dtype, device="meta") for shape, dtype in recorded]
            return made[0] if len(made) == 1 else tuple(made)
        try:
            return func(*args, **kwargs)
        except _Stop:
            raise
        except Exception as exc:
            if _raised_by(exc, self._failure):
                raise
            if on_meta:
                stand_in = self._stand_in(index, func, args)
                if stand_in is not _NONE:
                    self.stood_in.append(
                        f"{op_name(func)} in {self.modules.current()}, at {user_code_location()}"
                    )
                    return stand_in
            self._failure = FailedOperation(
                op_name(func),
                self.modules.current(),
                user_code_location(),
                exc,
                devices=tuple(dict.fromkeys(t.device.type for t in tensors if t.dim() > 0)),
            )
            raise


class _Stop(Exception):
    """Raised to stop a watched forward pass at the first problem."""


_NONE = object()


class MetaCannotRun(RuntimeError):
    """An operation of the forward pass the meta device cannot run, and whose result the CPU
    run cannot stand in for."""

    def __init__(self, failed: FailedOperation) -> None:
        super().__init__(failed.describe())
        self.failed = failed


def watch_meta_forward(
    run_cpu: Callable[[], Any], run_meta: Callable[[ModuleTracker], Any], model: nn.Module
) -> Tuple[Any, Optional[DeviceProblem]]:
    """Run ``run_cpu()`` recording, then ``run_meta(...)`` on ``model`` (the meta copy)
    watching; return the meta output and the first device problem (output None then)."""
    recorder = Recorder()
    with recorder:
        run_cpu()
    modules = ModuleTracker(model)
    watch = DeviceWatch(modules, recorder)
    try:
        with watch:
            return run_meta(modules), None
    except Exception as exc:  # _Stop, or what wraps it (TorchScript's interpreter: a RuntimeError)
        if watch.problem is not None:
            return None, watch.problem
        failed = watch.failure(exc)
        if failed is not None and set(failed.devices) <= {"meta"}:
            raise MetaCannotRun(failed) from exc
        raise
    finally:
        modules.remove()


# -- dtypes --------------------------------------------------------------------------------
_FACTORIES = frozenset(
    {
        "zeros",
        "ones",
        "empty",
        "full",
        "rand",
        "randn",
        "arange",
        "linspace",
        "logspace",
        "eye",
        "tensor",
        "as_tensor",
        "randint",
        "zeros_like",
        "ones_like",
        "full_like",
        "rand_like",
        "randn_like",
        "empty_like",
    }
)
_CASTS = frozenset({"float", "double", "half", "bfloat16", "to", "type"})


@dataclass(frozen=True)
class Origin:
    """Where a floating-point tensor of another dtype than the model's was made."""

    text: str
    #: an explicit cast of a floating-point tensor (x.float(), x.to(torch.float32)): a
    #: deliberate choice of precision, not a dtype bug
    deliberate: bool
    #: computed from a tensor of the model's dtype: the tensor was combined with the model's
    #: computation (promoted it), rather than made beside it (a constant mask)
    mixed: bool = False


class DtypeWatch(TorchFunctionMode):
    """Note where floating-point tensors of another dtype than ``target`` are made, the first
    operation that combines one with a ``target`` tensor, and the operation that raised."""

    def __init__(self, target: torch.dtype, modules: ModuleTracker) -> None:
        super().__init__()
        self.target = target
        self.modules = modules
        self.origins: Dict[int, Tuple["weakref.ref[torch.Tensor]", Origin]] = {}
        self.first_mix: Optional[str] = None
        #: the first combination with a tensor that was not made by a deliberate cast
        self.first_undeliberate_mix: Optional[str] = None
        self._failure: Optional[FailedOperation] = None

    def origin(self, tensor: torch.Tensor) -> Optional[Origin]:
        found = self.origins.get(id(tensor))
        return found[1] if found is not None and found[0]() is tensor else None

    def failure(self, exc: BaseException) -> Optional[FailedOperation]:
        """The torch operation that raised ``exc`` (innermost), if one did."""
        return self._failure if _raised_by(exc, self._failure) else None

    def mix(self) -> Optional[str]:
        """The first mix of dtypes worth reporting: one with a tensor that no deliberate cast
        made, else the first one."""
        return self.first_undeliberate_mix or self.first_mix

    def _note_mix(self, func: Any, floats: List[torch.Tensor]) -> None:
        shaped = [t for t in floats if t.dim() > 0]  # 0-dim tensors do not promote
        others = [t for t in shaped if t.dtype != self.target]
        if not others or not any(t.dtype == self.target for t in shaped):
            return
        for other in others:
            source = self.origin(other)
            text = (
                f"{op_name(func)} in {self.modules.current()}, at {user_code_location()}, "
                f"combines a {self.target} tensor with a {other.dtype} tensor of shape "
                f"{tuple(other.shape)}" + (f", made by {source.text}" if source else "")
            )
            if self.first_mix is None:
                self.first_mix = text
            if self.first_undeliberate_mix is None and not (source and source.deliberate):
                self.first_undeliberate_mix = text
                return

    def _origin_of_result(
        self, func: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any], made: torch.Tensor
    ) -> Optional[Origin]:
        name = getattr(func, "__name__", "")
        floats = [t for t in tensors_in(args) + tensors_in(kwargs) if t.is_floating_point()]
        cast = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if name in _CASTS and cast is not None and cast.dtype == made.dtype:
            # .to(device), .float() of a float32 tensor: no cast, so the tensor keeps
            # the origin it had (``to`` may even return the tensor itself)
            return self.origin(cast)
        where = f"in {self.modules.current()}, at {user_code_location()}"
        if name in _CASTS and cast is not None and cast.is_floating_point():
            return Origin(f"{op_name(func)} with a fixed dtype {where}", deliberate=True)
        if name in _CASTS and cast is not None:
            return Origin(
                f"{op_name(func)} of a {cast.dtype} tensor, with a fixed dtype {where}",
                deliberate=False,
            )
        if name in _FACTORIES or name in _CASTS:
            how = "with a fixed dtype" if "dtype" in kwargs or name in _CASTS else "without dtype="
            return Origin(f"{op_name(func)} {how} {where}", deliberate=False)
        # a view or a result of such tensors: it comes from the same place, and from a
        # deliberate cast only if every tensor of another dtype it comes from does
        found = [origin for origin in map(self.origin, floats) if origin is not None]
        origin = next((o for o in found if not o.deliberate), found[0] if found else None)
        mixed = any(o.mixed for o in found) or any(
            t.dtype == self.target and t.dim() > 0 for t in floats
        )
        if origin is None or origin.mixed == mixed:
            return origin
        return Origin(origin.text, origin.deliberate, mixed)

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: Tuple[Any, ...] = (),
        kwargs: Optional[Dict[str, Any]] = None,
    ) -> Any:
        kwargs = kwargs or {}
        if called_by_a_kernel():
            return func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        floats = [t for t in tensors_in(args) + tensors_in(kwargs) if t.is_floating_point()]
        if name not in _CASTS and name != "__get__":
            self._note_mix(func, floats)
        try:
            result = func(*args, **kwargs)
        except BaseException as exc:
            if not _raised_by(exc, self._failure):
                self._failure = FailedOperation(
                    op_name(func),
                    self.modules.current(),
                    user_code_location(),
                    exc,
                    dtypes=tuple(dict.fromkeys(t.dtype for t in floats if t.dim() > 0)),
                )
            raise
        made = [t for t in tensors_in(result) if t.is_floating_point() and t.dtype != self.target]
        if made:
            origin = self._origin_of_result(func, args, kwargs, made[0])
            if origin is not None:
                for tensor in made:
                    self.origins[id(tensor)] = (weakref.ref(tensor), origin)
        return result


@contextlib.contextmanager
def watching_dtypes(target: torch.dtype, model: nn.Module) -> Iterator[DtypeWatch]:
    modules = ModuleTracker(model)
    try:
        with DtypeWatch(target, modules) as watch:
            yield watch
    finally:
        modules.remove()
