"""Watching a forward pass for dtype bugs: where floating-point tensors of another dtype than
the model's are made (a factory without ``dtype=``, a cast), which operation first combines
one with the model's tensors, and which operation raised."""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, replace
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from ..core.watch import (
    ModuleTracker,
    TensorNotes,
    Watch,
    op_name,
    tensors_in,
    user_code_location,
    watching,
)

__all__ = ["DtypeWatch", "Origin", "watching_dtypes"]


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

#: The products and convolutions, whose bfloat16 kernels on a CPU without bfloat16 arithmetic
#: take 3 to 10 times as long as their float32 ones (a ResNet-50's bfloat16 pass on one image
#: takes as long as its float32 forward and backward pass on four). In a watched pass without
#: gradients whose every tensor argument is a bfloat16 CPU tensor, they are computed in float32
#: and rounded to bfloat16: the same dtype, device and shape, values as close as the bfloat16
#: kernel's (which accumulate in float32 too), and every bfloat16 CPU kernel of these exists
#: since torch 2.0, so that no missing kernel is hidden. Any other argument (another dtype, a
#: subclass, ``out=``) goes to the real kernel, which raises what it raises.
_IN_FLOAT32 = frozenset(
    {
        "linear",
        "matmul",
        "__matmul__",
        "__rmatmul__",
        "mm",
        "bmm",
        "addmm",
        "baddbmm",
        "einsum",
        "conv1d",
        "conv2d",
        "conv3d",
        "conv_transpose1d",
        "conv_transpose2d",
        "conv_transpose3d",
    }
)


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
    #: made by a factory given its dtype (torch.zeros(..., dtype=torch.float32)): tensors of
    #: the model's dtype written into it in place are kept in that precision by choice (a
    #: recurrent state kept in float32), not rounded by mistake
    chosen: bool = False


class DtypeWatch(Watch):
    """Note where floating-point tensors of another dtype than ``target`` are made, the first
    operation that combines one with a ``target`` tensor, and the operation that raised."""

    def __init__(self, target: torch.dtype, modules: ModuleTracker) -> None:
        super().__init__(modules)
        self.target = target
        self.origins: TensorNotes[Origin] = TensorNotes()
        self.first_mix: Optional[str] = None
        #: the first combination with a tensor that was not made by a deliberate cast
        self.first_undeliberate_mix: Optional[str] = None
        #: that tensor, when this pass did not make it (state kept on the model: a cache)
        self._unmade: Optional["weakref.ref[torch.Tensor]"] = None

    def origin(self, tensor: torch.Tensor) -> Optional[Origin]:
        return self.origins.get(tensor)

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
                if source is None:
                    self._unmade = weakref.ref(other)
                return

    def kept_on(self, model: nn.Module) -> Optional[str]:
        """Where ``model`` keeps the tensor of the first mix worth reporting, when the pass did
        not make it: an attribute of a submodule that is no parameter or buffer (a cache),
        which ``.to()`` does not convert, named with the module's class; None if not found."""
        tensor = self._unmade() if self._unmade is not None else None
        if tensor is None:
            return None
        for name, module in model.named_modules():
            for attribute, value in vars(module).items():
                if attribute in ("_parameters", "_buffers", "_modules"):
                    continue
                path = _path_to(tensor, value, attribute)
                if path is not None:
                    where = f"{name}.{path}" if name else path
                    return f"{where} of {type(module).__name__}"
        return None

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
        where = self.where()
        if name in _CASTS and cast is not None and cast.is_floating_point():
            return Origin(f"{op_name(func)} with a fixed dtype {where}", deliberate=True)
        if name in _CASTS and cast is not None:
            return Origin(
                f"{op_name(func)} of a {cast.dtype} tensor, with a fixed dtype {where}",
                deliberate=False,
            )
        if name in _FACTORIES or name in _CASTS:
            how = "with a fixed dtype" if "dtype" in kwargs or name in _CASTS else "without dtype="
            chosen = name in _FACTORIES and kwargs.get("dtype") is not None
            return Origin(f"{op_name(func)} {how} {where}", deliberate=False, chosen=chosen)
        # a view or a result of such tensors: it comes from the same place, and from a
        # deliberate cast only if every tensor of another dtype it comes from does
        found = [origin for origin in map(self.origin, floats) if origin is not None]
        origin = next((o for o in found if not o.deliberate), found[0] if found else None)
        mixed = any(o.mixed for o in found) or any(
            t.dtype == self.target and t.dim() > 0 for t in floats
        )
        if origin is None or origin.mixed == mixed:
            return origin
        return replace(origin, mixed=mixed)

    def handle(self, func: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        name = getattr(func, "__name__", "")
        tensors = tensors_in(args) + tensors_in(kwargs)
        floats = [t for t in tensors if t.is_floating_point()]
        if name not in _CASTS and name != "__get__":
            self._note_mix(func, floats)
        try:
            result = self._call(name, func, args, kwargs, tensors)
        except BaseException as exc:
            self.note_failure(func, exc, tensors)
            raise
        self._note_written(name, args, floats)
        made = [t for t in tensors_in(result) if t.is_floating_point() and t.dtype != self.target]
        if made:
            origin = self._origin_of_result(func, args, kwargs, made[0])
            if origin is not None:
                for tensor in made:
                    self.origins[tensor] = origin
        return result

    def _note_written(self, name: str, args: Tuple[Any, ...], floats: List[torch.Tensor]) -> None:
        """An in-place call (``out[..., :n] = scores``, ``out.copy_(scores)``) that writes
        tensors of the model's dtype into a tensor of another one made without a dtype chosen
        for it: that tensor now holds what the model computes, rounded to its dtype (mixed)."""
        written = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if not name.endswith("_") or written is None or written.dtype == self.target:
            return
        origin = self.origin(written)
        if origin is None or origin.mixed or origin.chosen:
            return
        if any(t.dtype == self.target and t.dim() > 0 for t in floats if t is not written):
            self.origins[written] = replace(origin, mixed=True)

    def _call(
        self,
        name: str,
        func: Any,
        args: Tuple[Any, ...],
        kwargs: Dict[str, Any],
        tensors: List[torch.Tensor],
    ) -> Any:
        """``func(*args, **kwargs)``, computed in float32 where ``_IN_FLOAT32`` allows (by the
        real kernel where that raises: its error is the one to report)."""
        if name in _IN_FLOAT32 and self._in_float32(tensors, kwargs):
            try:
                return func(*_float32(args), **_float32(kwargs)).to(self.target)
            except Exception:
                pass
        return func(*args, **kwargs)

    def _in_float32(self, tensors: List[torch.Tensor], kwargs: Dict[str, Any]) -> bool:
        """Whether a product or convolution on ``tensors`` may be computed in float32 for
        the bfloat16 pass (see ``_IN_FLOAT32``)."""
        return (
            self.target == torch.bfloat16
            and not torch.is_grad_enabled()
            and "out" not in kwargs
            and bool(tensors)
            and all(
                type(t) in (torch.Tensor, nn.Parameter)
                and t.dtype == torch.bfloat16
                and t.device.type == "cpu"
                and t.layout == torch.strided
                for t in tensors
            )
        )


def _float32(value: Any) -> Any:
    """``value`` with its tensors (at the top, or in a list, tuple or dict) in float32."""
    if isinstance(value, torch.Tensor):
        return value.float()
    if type(value) in (list, tuple):
        return type(value)(map(_float32, value))
    if isinstance(value, dict):
        return {key: _float32(item) for key, item in value.items()}
    return value


def _path_to(tensor: torch.Tensor, value: Any, path: str, depth: int = 2) -> Optional[str]:
    """``path`` extended to where ``value`` (an attribute, or a dict, list or tuple in one, up
    to ``depth`` levels) holds ``tensor`` or a tensor sharing its memory; None if it does not."""
    if isinstance(value, torch.Tensor):
        return path if value is tensor or _shares_memory(value, tensor) else None
    if depth == 0:
        return None
    items: Any = ()
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    for key, item in items:
        found = _path_to(tensor, item, f"{path}[{key!r}]", depth - 1)
        if found is not None:
            return found
    return None


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two strided tensors with data (not on meta) share their memory (one is a view
    of the other, a slice of a cache)."""
    if a.device != b.device or a.device.type == "meta" or a.layout != torch.strided:
        return False
    try:
        pointer = a.untyped_storage().data_ptr()
        return pointer != 0 and pointer == b.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # a tensor subclass without storage
        return False


@contextlib.contextmanager
def watching_dtypes(target: torch.dtype, model: nn.Module) -> Iterator[DtypeWatch]:
    with watching(model, lambda modules: DtypeWatch(target, modules)) as watch:
        yield watch
