"""test_state_dict_round_trip: a fresh model loaded with the state dict gives equal outputs."""

from __future__ import annotations

import contextlib
import io
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Tuple

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..core.contract import check
from ..core.options import UNSET, option
from ..core.paths import named_tensors
from ..core.seeds import derived_seed, seed_torch
from ..core.validators import is_callable
from .contract import ModelContract

__all__ = ["StateDictRoundTrip"]


class StateDictRoundTrip(ModelContract):
    """No state lost by a saved and reloaded model."""

    make_model: Callable[[], nn.Module] = option(
        UNSET, is_callable, example="lambda: MyModel()", factory="self"
    )
    """A zero-argument callable that builds a fresh model of the same architecture."""

    @check(reads=("model", "inputs", "make_model"))
    def test_state_dict_round_trip(self) -> None:
        """Check that ``make_model()`` loaded with the saved ``state_dict`` gives equal outputs.

        Catches state that a saved and reloaded model loses: plain tensor attributes,
        non-persistent buffers that matter, statistics kept in Python attributes.
        """
        make_model: Callable[[], nn.Module] = self._get_or_skip("make_model")
        saved = _Saved(self.model.state_dict())
        try:
            state = _load(saved)
        except Exception as exc:
            self.fail(
                f"torch.load(..., weights_only=True) cannot read the saved state_dict "
                f"({type(exc).__name__}: {exc}). Keep only tensors and plain Python "
                "values in the state dict (get_extra_state)."
            )
        expected = self._eval_pass()
        try:  # first without the random initialisation, which the state dict overwrites
            fresh, differing = self._load_fresh(make_model, state, expected, skip_init=True)
        except Exception:
            differing = ["(again)"]
        if differing:  # what is reported is what make_model() builds, initialised
            fresh, differing = self._load_fresh(make_model, state, expected, skip_init=False)
        if differing:
            suspects = _state_outside_state_dict(self.model, fresh)
            self.fail(
                f"a model built by make_model() and loaded with self.model's state dict gives "
                f"other eval outputs ({', '.join(differing)}): part of the model's state is not "
                "in its state dict, so a saved and reloaded model behaves differently."
                + (
                    f" Tensors outside the state dict that differ: {', '.join(suspects)}."
                    if suspects
                    else ""
                )
                + " Register tensors with self.register_buffer(name, tensor) (persistent), "
                "keep statistics in buffers, not in Python attributes."
            )

    def _load_fresh(
        self,
        make_model: Callable[[], nn.Module],
        state: Dict[str, Any],
        expected: Any,
        skip_init: bool,
    ) -> Tuple[nn.Module, List[str]]:
        """A model built by make_model() under another seed, loaded with ``state``, and the
        paths of the outputs where it differs from ``expected``. ``skip_init``: without the
        random initialisation of its parameters, which ``state`` overwrites (building a large
        model spends its time there); that changes nothing else but what the random draws
        after it give, which a seed of its own would give, so that a model that differs is
        built again in full before anything is reported."""
        with torch.random.fork_rng(devices=[]), contextlib.ExitStack() as stack:
            # another seed: state missing from the state dict shows up
            seed_torch(derived_seed(self.seed, 1))
            if skip_init:
                stack.enter_context(_SkipParameterInit())
            fresh = make_model()
        if not isinstance(fresh, nn.Module):
            raise self._contract_error(
                "make_model", f"returned a {type(fresh).__name__}, not an nn.Module"
            )
        try:
            fresh.load_state_dict(state)
        except RuntimeError as exc:
            self.fail(
                f"the model built by make_model() does not load self.model's state dict: "
                f"{exc}. make_model must build the same architecture as setUp."
            )
        with torch.no_grad():
            loaded = self._forward(fresh, self.inputs)
        differing = [
            path
            for (path, a), (_, b) in zip(named_tensors(expected), named_tensors(loaded))
            if a.shape != b.shape or not torch.equal(a.nan_to_num(), b.nan_to_num())
        ]
        return fresh, differing


class _Saved:
    """A state dict saved with ``torch.save``, the values of its plain tensors set aside.

    The values of plain tensors come back from ``torch.load`` exactly as they were saved, so
    only their dtype goes into the file (an empty tensor of that dtype); what
    ``torch.load(..., weights_only=True)`` may refuse is everything else (a tensor subclass,
    an extra state that is no plain Python value), which is saved as it is. Writing and
    reading a large model's weights would cost more than a forward pass of it."""

    def __init__(self, state: Dict[str, Any]) -> None:
        self.aside = {
            name: value
            for name, value in state.items()
            if type(value) is torch.Tensor and value.layout == torch.strided
        }
        light = OrderedDict(
            (name, torch.empty(0, dtype=value.dtype) if name in self.aside else value)
            for name, value in state.items()
        )
        metadata = getattr(state, "_metadata", None)
        if metadata is not None:
            light._metadata = metadata  # type: ignore[attr-defined]
        self.file = io.BytesIO()
        torch.save(light, self.file)


def _load(saved: _Saved) -> Dict[str, Any]:
    """The state dict as ``torch.load(..., weights_only=True)`` reads it back."""
    saved.file.seek(0)
    read = torch.load(saved.file, weights_only=True)
    loaded = OrderedDict((name, saved.aside.get(name, value)) for name, value in read.items())
    if hasattr(read, "_metadata"):
        loaded._metadata = read._metadata  # type: ignore[attr-defined]
    return loaded


class _SkipParameterInit(TorchFunctionMode):
    """Skip the random initialisation of parameters: each call of a random initialiser
    (``nn.init.kaiming_uniform_``, ``Tensor.normal_``, ...) on an ``nn.Parameter`` leaves it
    as it is. Anything else runs, random draws into other tensors included."""

    def __torch_function__(
        self, func: Any, types: Any, args: Tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in _RANDOM_FILLS:
            # (nn.init's functions are handed the tensor as a keyword)
            target = args[0] if args else kwargs.get("tensor")
            if isinstance(target, nn.Parameter):
                return target
        return func(*args, **kwargs)


_RANDOM_FILLS = frozenset(
    {
        "uniform_",
        "normal_",
        "trunc_normal_",
        "kaiming_uniform_",
        "kaiming_normal_",
        "xavier_uniform_",
        "xavier_normal_",
        "orthogonal_",
        "sparse_",
        "exponential_",
        "random_",
        "bernoulli_",
        "cauchy_",
        "log_normal_",
        "geometric_",
    }
)


def _state_outside_state_dict(model: nn.Module, other: nn.Module) -> List[str]:
    """Names of tensors of ``model`` not in its state dict that differ in ``other``."""
    in_state = set(model.state_dict())
    found = []
    others = dict(other.named_modules())
    for prefix, module in model.named_modules():
        twin = others.get(prefix)
        if twin is None:
            continue
        for name, value in vars(module).items():
            if name.startswith("_"):
                continue
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
                theirs = getattr(twin, name, None)
                if not isinstance(theirs, torch.Tensor) or not torch.equal(value, theirs):
                    found.append(f"{prefix + '.' if prefix else ''}{name} (plain attribute)")
        for name, buffer in module.named_buffers(recurse=False):
            full = f"{prefix + '.' if prefix else ''}{name}"
            theirs = getattr(twin, name, None)
            if full not in in_state and (
                theirs is None or buffer is None or not torch.equal(buffer, theirs)
            ):
                found.append(f"{full} (buffer with persistent=False)")
    return found
