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

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..core.paths import map_tensors
from ..core.watch import (
    FailedOperation,
    ModuleTracker,
    TensorNotes,
    Watch,
    op_name,
    raised_by,
    tensors_in,
    user_code_location,
)
from .meta_results import meta_result
from .twins import Twins

__all__ = [
    "DeviceProblem",
    "MetaCannotRun",
    "NeedsCpuRun",
    "ReplayMismatch",
    "available_accelerators",
    "watch_meta_forward",
]


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


def _cpu_by_design(name: str, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> List[torch.Tensor]:
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
    #: False: the CPU tensor was made with ``device=None`` passed explicitly, a device the
    #: model chose (code that picks none while its weights are on ``meta``), which a GPU
    #: may not see; the rest of the pass was watched with the tensor moved to ``meta``
    certain: bool = True

    def describe(self) -> str:
        return f"{self.what}, in {self.where}, at {self.location}"


@dataclass(frozen=True)
class _CpuOrigin:
    """Where a CPU tensor of a meta run was made."""

    text: str
    #: made with ``device=None`` passed explicitly
    chosen: bool


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


def _on_meta(shapes: List[Tuple[torch.Size, torch.dtype]], single: bool) -> Any:
    """Empty meta tensors of ``shapes`` (and dtypes): the one tensor if ``single``, else a
    tuple of them."""
    made = [torch.empty(shape, dtype=dtype, device="meta") for shape, dtype in shapes]
    return made[0] if single else tuple(made)


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


def _key(func: Any) -> Any:
    """The operation ``func`` as a key (itself; its name if it cannot be hashed)."""
    try:
        hash(func)
    except TypeError:
        return op_name(func)
    return func


class Recorder(Watch):
    """Run on the CPU, noting what each data-dependent step returned, and the shapes and
    dtypes of what every operation returned."""

    def __init__(self) -> None:
        super().__init__()
        self.log: List[Tuple[str, Any]] = []
        self.results: List[Tuple[Any, Optional[List[Tuple[torch.Size, torch.dtype]]], bool]] = []

    def handle(self, func: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        result = func(*args, **kwargs)
        self.results.append((_key(func), _shapes(result), isinstance(result, torch.Tensor)))
        if _reads_data(func):
            # (a .to() without a CPU device among its arguments, .to(torch.float32), moves
            # to no CPU on meta either: its result is never replayed, only its place noted)
            value = result
            if isinstance(result, torch.Tensor):
                moves = getattr(func, "__name__", "") != "to" or _to_cpu(args, kwargs)
                value = result.clone() if moves else None
            self.log.append((op_name(func), value))
        elif _shape_from_data(func, args, kwargs):
            self.log.append((op_name(func), [(t.shape, t.dtype) for t in tensors_in(result)]))
        return result


class DeviceWatch(Watch):
    """Run on ``meta``: stop at the first operation that mixes in a CPU tensor, and replay
    the data-dependent steps a ``Recorder`` saw on the CPU. An operation that the meta
    device cannot run (no meta kernel, or one stricter than the CPU's) gives empty meta
    tensors of the shapes the CPU run returned, so the rest of the forward pass is watched
    too; where that is impossible, the operation is noted as the failure."""

    def __init__(
        self, modules: ModuleTracker, recorder: Optional[Recorder], twins: Optional[Twins] = None
    ) -> None:
        super().__init__(modules)
        #: without a recorder (no CPU run yet), a step that needs what the CPU run returned
        #: stops the meta run (``NeedsCpuRun``), to be run again with one, unless the CPU
        #: twins of the tensors computed from the inputs alone give it
        self.recorded = recorder is not None
        self.twins = twins if recorder is None else None
        self.needs_cpu_run = False
        self.log = recorder.log if recorder is not None else []
        # what each operation returned in the CPU run, by operation, in the order of its
        # calls (by operation, not by position: the first run of a process makes one-time
        # calls of its own, torch.device among them)
        self.results: Dict[Any, List[Tuple[Optional[List[Any]], bool]]] = {}
        for key, shapes, single in recorder.results if recorder is not None else ():
            self.results.setdefault(key, []).append((shapes, single))
        self.calls: Dict[Any, int] = {}
        self.position = 0
        self.problem: Optional[DeviceProblem] = None
        #: the first CPU tensor made with device=None explicitly that met the model's
        #: (moved to meta, so that the rest of the pass is watched)
        self.chosen: Optional[DeviceProblem] = None
        self.stood_in: List[str] = []  # the operations whose results came from the CPU run
        #: where the CPU tensors this run made were made
        self._origins: TensorNotes[_CpuOrigin] = TensorNotes()

    def _stand_in(self, index: int, func: Any, args: Tuple[Any, ...]) -> Any:
        """Meta tensors standing in for the result of the ``index``-th call of ``func`` (the
        CPU run's shapes), or ``_NONE`` if the CPU run made fewer such calls or its call
        returned no tensors."""
        calls = self.results.get(_key(func), [])
        if index >= len(calls):
            return _NONE
        shapes, single = calls[index]
        if shapes is None:
            return _NONE
        if getattr(func, "__name__", "").endswith("_") and args and single:
            return args[0]  # an in-place operation returns what it changed
        return _on_meta(shapes, single)

    def _need_cpu_run(self) -> None:
        self.needs_cpu_run = True
        raise NeedsCpuRun

    def _replay(self, func: Any) -> Any:
        if not self.recorded:
            self._need_cpu_run()
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

    def _note_origins(
        self, func: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any], result: Any
    ) -> None:
        """Note where the CPU tensors ``result`` holds were made: by this call if it was
        handed no tensor (a factory), else where the CPU tensors it was handed were."""
        made = [t for t in tensors_in(result) if t.device.type == "cpu"]
        if not made:
            return
        given = tensors_in(args) + tensors_in(kwargs)
        if given:
            origin = next((o for o in map(self._origins.get, given) if o is not None), None)
        else:
            chosen = "device" in kwargs and kwargs["device"] is None
            how = "given device=None" if chosen else "without device="
            origin = _CpuOrigin(f"{op_name(func)} {how} {self.where()}", chosen)
        if origin is not None:
            for tensor in made:
                self._origins[tensor] = origin

    def handle(self, func: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        twins = self.twins
        if twins is None or not twins.active:
            return self._handle(func, args, kwargs)
        name = getattr(func, "__name__", "")
        if name not in ("numpy", "__array__") and any(
            t.is_meta for t in tensors_in(args) + tensors_in(kwargs)
        ):
            if _reads_data(func) and (name != "to" or _to_cpu(args, kwargs)):
                done, value = twins.value(func, args, kwargs)
                if done:
                    return value
            elif _shape_from_data(func, args, kwargs):
                done, values = twins.repeated(func, args, kwargs)
                shapes = _shapes(values) if done else None
                if shapes is not None:
                    made = _on_meta(shapes, isinstance(values, torch.Tensor))
                    twins.note(made, values)
                    return made
        arguments = twins.arguments(func, args, kwargs)
        result = self._handle(func, args, kwargs)
        twins.follow(func, args, kwargs, arguments, result)
        return result

    def _handle(self, func: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        key = _key(func)
        index = self.calls.get(key, 0)
        self.calls[key] = index + 1
        tensors = tensors_in(args) + tensors_in(kwargs)
        on_meta = any(t.is_meta for t in tensors)
        name = getattr(func, "__name__", "")
        if on_meta and name not in _MIXING_ALLOWED:
            allowed = _cpu_by_design(name, args, kwargs)
            # An empty CPU tensor handed to one of torch's Python functions is not judged:
            # such a function may leave an argument unused (F.multi_head_attention_forward
            # ignores in_proj_weight when given separate projections; transformers' WavLM,
            # which runs on GPUs, hands it torch.empty([0])). A builtin operation is.
            composite = inspect.isfunction(func)
            stray = [
                t
                for t in tensors
                if t.device.type == "cpu"
                and t.dim() > 0
                and not (composite and t.numel() == 0)
                and not any(t is a for a in allowed)
            ]
            if stray:
                origins = [self._origins.get(t) for t in stray]
                made_by = f", made by {origins[0].text}" if origins[0] is not None else ""
                what = (
                    f"{op_name(func)} combines a CPU tensor of shape "
                    f"{tuple(stray[0].shape)} ({stray[0].dtype}) with tensors on the "
                    f"model's device{made_by}"
                )
                if not all(origin is not None and origin.chosen for origin in origins):
                    self._stop(what)
                if self.chosen is None:
                    self.chosen = DeviceProblem(
                        what, self.modules.current(), user_code_location(), certain=False
                    )
                moved = {id(t) for t in stray}
                args, kwargs = map_tensors(
                    lambda t: t.to("meta") if id(t) in moved else t, (args, kwargs)
                )
        if name in ("numpy", "__array__") and on_meta:
            how = "Tensor.numpy()" if name == "numpy" else "np.asarray(tensor)"
            self._stop(
                f"{how} is called on a tensor on the model's device (on a GPU that fails; "
                "use .cpu().numpy())"
            )
        if on_meta:
            made = meta_result(func, args, kwargs)
            if made is not None:
                return made
        if _reads_data(func):
            if not self.recorded and not (on_meta and (name != "to" or _to_cpu(args, kwargs))):
                return func(*args, **kwargs)  # what the CPU run returned is not needed
            recorded = self._replay(func)
            if name == "to" and not (on_meta and _to_cpu(args, kwargs)):
                return func(*args, **kwargs)
            return recorded if on_meta else func(*args, **kwargs)
        if _shape_from_data(func, args, kwargs):
            if not self.recorded and not on_meta:
                return func(*args, **kwargs)
            recorded = self._replay(func)
            if not on_meta:
                return func(*args, **kwargs)
            return _on_meta(recorded, len(recorded) == 1)
        try:
            result = func(*args, **kwargs)
        except (_Stop, NeedsCpuRun):
            raise
        except Exception as exc:
            if raised_by(exc, self._failure):
                raise
            if on_meta and not self.recorded:
                self._need_cpu_run()  # the CPU run's results may stand in
            if on_meta:
                stand_in = self._stand_in(index, func, args)
                if stand_in is not _NONE:
                    self.stood_in.append(f"{op_name(func)} {self.where()}")
                    return stand_in
            self.note_failure(func, exc, tensors)
            raise
        if not on_meta:
            self._note_origins(func, args, kwargs, result)
        return result


class _Stop(Exception):
    """Raised to stop a watched forward pass at the first problem."""


class NeedsCpuRun(BaseException):
    """Raised to stop a meta run made without a CPU run at a step that needs what the CPU run
    returned (a BaseException, so that the model's own ``except Exception`` lets it pass)."""


_NONE = object()


class MetaCannotRun(RuntimeError):
    """An operation of the forward pass the meta device cannot run, and whose result the CPU
    run cannot stand in for."""

    def __init__(self, failed: FailedOperation) -> None:
        super().__init__(failed.describe())
        self.failed = failed


def watch_meta_forward(
    run_cpu: Optional[Callable[[], Any]],
    run_meta: Callable[[ModuleTracker], Any],
    model: nn.Module,
    twins: Optional[Twins] = None,
) -> Tuple[Any, Optional[DeviceProblem]]:
    """Run ``run_cpu()`` recording, then ``run_meta(...)`` on ``model`` (the meta copy)
    watching; return the meta output and the first device problem (output None then), or
    the output and a problem that is not ``certain`` (a CPU tensor the model made with
    ``device=None`` passed explicitly, the rest of the pass watched), or None.

    Without ``run_cpu``, the meta run goes without what a CPU run returned: at the first
    step that needs it (a data-dependent step, an operation without a meta kernel) it stops
    and ``NeedsCpuRun`` is raised, so that the caller runs both on fresh copies, unless
    ``twins`` (of the meta inputs) give the values it reads. A model without such steps (most
    convolutional networks), or whose steps read only what it computes from the inputs alone
    (transformers' ``padding_mask.all()``), is checked without any CPU run."""
    recorder = None
    if run_cpu is not None:
        recorder = Recorder()
        with recorder:
            run_cpu()
    modules = ModuleTracker(model)
    watch = DeviceWatch(modules, recorder, twins)
    try:
        with watch:
            output = run_meta(modules)
    except BaseException as exc:  # _Stop, or what wraps it (TorchScript: a RuntimeError)
        if watch.needs_cpu_run:
            raise NeedsCpuRun from None
        if not isinstance(exc, Exception):
            raise
        if watch.problem is not None:
            return None, watch.problem
        failed = watch.failure(exc)
        if failed is not None and set(failed.devices) <= {"meta"}:
            raise MetaCannotRun(failed) from exc
        raise
    finally:
        modules.remove()
    if watch.needs_cpu_run:  # stopped, but the model went on (it caught the exception)
        raise NeedsCpuRun
    if watch.problem is not None:  # (the same)
        return None, watch.problem
    return output, watch.chosen
