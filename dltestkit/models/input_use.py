"""test_all_inputs_used: every element of the inputs influences some output.

Exactly, by gradients, where an input can be differentiated (floats, and token ids through
their embeddings): one eval-mode pass over the probes of the inputs, and one backward pass
from every floating-point output weighted at random. An element whose gradient is exactly
zero is no proof that it is unread (max-pooling, a ReLU that is off, a gate that starts at
zero), so only structure is suspected: a whole input, or an index along one dimension (a
channel, a feature, a position) that no output depends on in any sample. The suspects are
then judged by what can be observed:

- behind a zero-initialised parameter (ReZero, LoRA's B, a zero-initialised head), an input
  is read as soon as the parameter trains: a copy whose zero parameters are made small and
  random shows it (one more pass);
- by values: the suspected elements are changed (to other values of the input, and far up
  and down) and the outputs compared exactly; under other seeds too when the model draws
  random numbers in eval mode (random masking);
- an input that eval mode does not read may be read in training only (targets that only a
  loss reads);
- an end of a dimension left unread by a strided convolution or pooling (a size the strides
  do not cover) and positions that a mask input marks in every sample (padding) are designs:
  skipped parts that name them.

Inputs that cannot be differentiated (integer inputs no embedding reads: masks, labels,
position ids read through arithmetic) are judged as a whole, by values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Collection, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..core.contract import check
from ..core.messages import listed
from ..core.options import option
from ..core.paths import floating_tensors, map_tensors, named_tensors
from ..core.seeds import derived_seed
from ..core.validators import is_keys
from ..core.watch import ModuleTracker, Watch, op_name, user_code_location, watching
from .dependence import Dependence
from .probes import Probe
from .randomness import RandomnessWatch
from .tensors import (
    Key,
    batched_entries,
    describe_input,
    input_entries,
    replace_entries,
    sample_lists,
)

__all__ = ["InputUse"]

#: Slabs judged one by one by values, at most, for one input (beyond: a skipped part).
_SLABS_BY_VALUE = 16


@dataclass
class _Target:
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
class _Slabs:
    """Elements of a target suspected unread: the indices ``indices`` along ``dim`` (every
    element when ``dim`` is None)."""

    target: _Target
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
        index[self.dim] = _indices_text(self.indices)
        return f"{self.target.describe()}[{', '.join(index)}]"


def _narrowed(group: List[_Slabs], again: List[_Slabs]) -> List[_Slabs]:
    """The slabs of ``group`` (one target) that the suspects ``again`` (of another pass)
    still hold: the indices both suspect, dimension by dimension."""
    ident = group[0].target.ident()
    theirs = [s for s in again if s.target.ident() == ident]
    if any(s.dim is None for s in theirs):
        return group  # all of it unread there too
    kept = []
    for slabs in group:
        indices = set().union(*(set(s.indices) for s in theirs if s.dim == slabs.dim))
        common = [i for i in slabs.indices if i in indices]
        if common:
            kept.append(_Slabs(slabs.target, slabs.dim, common))
    return kept


def _indices_text(indices: Sequence[int]) -> str:
    """``3``, ``8:16`` for a run, ``[1, 4, 6]`` otherwise."""
    if len(indices) == 1:
        return str(indices[0])
    if list(indices) == list(range(indices[0], indices[-1] + 1)):
        return f"{indices[0]}:{indices[-1] + 1}"
    return str(list(indices))


class _CoverageWatch(Watch):
    """Note the convolutions and poolings whose windows leave the end of their input unread
    (its size minus the window is no multiple of the stride)."""

    def __init__(self, modules: ModuleTracker) -> None:
        super().__init__(modules)
        self.dropping: List[str] = []

    def handle(self, func: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        windows = _windows(func, args, kwargs)
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


def _tuple(value: Any, n: int) -> Tuple[int, ...]:
    if isinstance(value, (tuple, list)):
        return tuple(int(v) for v in value) if len(value) == n else (int(value[0]),) * n
    return (int(value),) * n


def _windows(
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
            kernel = _tuple(bound["kernel_size"], n)
            stride = bound.get("stride") or kernel
            padding, dilation = bound.get("padding", 0), bound.get("dilation", 1)
        else:
            return None
        sizes = tuple(bound["input"].shape[-n:])
        return sizes, kernel, _tuple(stride, n), _tuple(padding, n), _tuple(dilation, n)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError):
        return None


class _Judge:
    """Changes elements of self.inputs and compares the outputs of one model (the model under
    test, or a copy whose zero parameters are random): exactly, under the seeds that tell a
    model reading at random."""

    def __init__(self, test: "InputUse", model: nn.Module) -> None:
        self.test = test
        self.model = model
        self.seeds = test._seeds_for_values(model)
        self.bases = {seed: test._outputs(model, test.inputs, seed) for seed in self.seeds}

    def changes(self, changes: List[Tuple[_Target, torch.Tensor]]) -> Optional[bool]:
        """Whether changing the elements ``changes`` (target, mask) changes some output, under
        any seed and any way of changing them; None when there is nothing to change (empty
        tensors). A model that raises on the changed values reads them."""
        changes = [(target, mask) for target, mask in changes if _changeable(target.tensor)]
        if not changes:
            return None
        for way in _ways(changes):
            inputs = self.test._changed_inputs(changes, way)
            for seed in self.seeds:
                try:
                    outputs = self.test._outputs(self.model, inputs, seed)
                except Exception:  # the model checks the values: it reads them
                    return True
                if not _same_outputs(outputs, self.bases[seed]):
                    return True
        return False

    def reads_whole(self, group: List[_Slabs]) -> Optional[bool]:
        """Whether the model reads an input (its targets ``group``) in eval mode, or else in
        training mode (targets that only a loss reads); None when it has no element."""
        changes = [(slabs.target, slabs.target.judged()) for slabs in group]
        changed = self.changes(changes)
        if changed is not False:
            return changed
        test = self.test
        changes = [(target, mask) for target, mask in changes if _changeable(target.tensor)]
        for way in _ways(changes):
            inputs = test._changed_inputs(changes, way)
            copy = test._copy_model() if self.model is test.model else self.model
            trained = test._outputs(copy, test.inputs, test.seed, training=True)
            copy = test._copy_model() if self.model is test.model else self.model
            try:
                again = test._outputs(copy, inputs, test.seed, training=True)
            except Exception:  # the model checks the values: it reads them
                return True
            if not _same_outputs(trained, again):
                return True
        return False

    def unread_slabs(self, group: List[_Slabs]) -> List[_Slabs]:
        """The slabs of one target (``group``) that change no output: all of them at once
        first, then one group of indices at a time, then one index at a time (at most
        _SLABS_BY_VALUE of them; beyond, a skipped part)."""
        target = group[0].target
        together = torch.zeros(target.tensor.shape, dtype=torch.bool)
        for slabs in group:
            together |= slabs.mask()
        changed = self.changes([(target, together)])
        if changed is None:
            return []
        if not changed:
            return group
        unread = []
        for slabs in group:
            if len(group) > 1 and self.changes([(target, slabs.mask())]) is False:
                unread.append(slabs)
                continue
            if len(slabs.indices) > _SLABS_BY_VALUE:
                self.test._skip_part(
                    slabs.describe(),
                    f"{slabs.describe()}: no output depends on these {len(slabs.indices)} "
                    "indices through a gradient, but changing them changes the outputs; "
                    f"which of them are read was not worked out (more than {_SLABS_BY_VALUE})",
                )
                continue
            alone = [
                index
                for index in slabs.indices
                if self.changes([(target, _Slabs(target, slabs.dim, [index]).mask())]) is False
            ]
            if alone:
                unread.append(_Slabs(target, slabs.dim, alone))
        return unread


class _Judges:
    """The judge of the model under test, then, if the model has trainable parameters that
    are exactly zero, of a copy whose zero parameters are random (made when first needed)."""

    def __init__(self, test: "InputUse") -> None:
        self.test = test

    def __iter__(self) -> Iterator[_Judge]:
        yield _Judge(self.test, self.test.model)
        if _has_zero_parameters(self.test.model):
            yield _Judge(self.test, self.test._with_zero_parameters_made_random())


class InputUse(Dependence):
    """Every element of the inputs is read."""

    unread_inputs: Collection[Key] = option((), is_keys, example='["token_type_ids"]')
    """The keys or indices of inputs the model may leave unread by design.

    `test_all_inputs_used` does not judge them: an argument accepted for compatibility and ignored,
    a feature the model leaves out on purpose."""

    def _validate_combination(self) -> None:
        super()._validate_combination()
        keys = [key for key, _ in input_entries(self.inputs)]
        unknown = [key for key in self.unread_inputs if key not in keys]
        if unknown:
            raise self._contract_error(
                "unread_inputs", f"names {unknown}, which self.inputs does not have (it has {keys})"
            )

    @check(reads=("model", "inputs", "unbatched_inputs", "unread_inputs"))
    def test_all_inputs_used(self) -> None:
        """Check that every element of the inputs influences some output.

        Catches inputs the model does not read: a feature slice reused where another was
        meant (x[:, :8] twice), a channel or column never read, a token position cut off
        (ids[:, 1:]), an argument accepted and never used; zero-initialised layers, strided
        convolutions that leave the last pixels unread and padding are no false alarm.

        Exact where gradients reach the inputs (float inputs, token ids through their
        embeddings): an index of a dimension (a channel, a feature, a position) that no output
        depends on in any sample, or a whole input, is suspected, then judged by values (the
        elements changed, the outputs compared exactly). Inputs no gradient reaches (masks,
        labels) are judged as a whole, by values, in eval mode, then in training mode.
        """
        targets = self._targets()
        if not targets:
            self.skipTest(
                "no input is judged: every batched input is in unbatched_inputs or "
                "unread_inputs (or is the padding mask)"
            )
        suspects = self._suspects(self._read_by_gradient(self.model, targets))
        if suspects:
            self._judge_by_values(suspects)

    # -- what is judged ----------------------------------------------------------------------
    def _targets(self) -> List[_Target]:
        """Every tensor of self.inputs that carries the batch, but those that are not judged
        (unbatched_inputs, unread_inputs, the padding mask)."""
        skip = (*self._unprobed_inputs(), *self.unread_inputs)
        targets = [
            _Target(key, tensor, batched=True, excluded=self._padded_elements(tensor))
            for key, tensor in batched_entries(self.inputs, skip)
            if not tensor.is_complex()
        ]
        for key, samples in sample_lists(self.inputs, skip):
            for index, item in enumerate(samples):
                for path, tensor in named_tensors(item, prefix=""):
                    targets.append(_Target(key, tensor, False, sample=index, within=path))
        return targets

    def _read_by_gradient(self, model: nn.Module, targets: List[_Target]) -> List[_Target]:
        """The targets with what an eval-mode pass over the probes and one backward pass
        from every floating-point output show them read."""
        output, probes = self._probe(model, required=False)
        tensors = [t for _, t in floating_tensors(output) if t.requires_grad]
        grads: List[Optional[torch.Tensor]] = [None] * len(probes)
        if tensors and probes:
            weights = self._weights(tensors)
            value = torch.stack([(t * w).sum() for t, w in zip(tensors, weights)]).sum()
            grads = self._probe_gradients(value, probes)
        judged = []
        for target in targets:
            read, somewhere = None, False
            for probe, grad in zip(probes, grads):
                if not _probe_of(probe, target):
                    continue
                nonzero = (
                    torch.zeros(probe.tensor.shape, dtype=torch.bool)
                    if grad is None
                    else grad.ne(0) & grad.isfinite()
                )
                somewhere = somewhere or bool(nonzero.any())
                found = _elements(probe, nonzero, target.tensor)
                if found is not None:
                    read = found if read is None else read | found
            judged.append(
                _Target(
                    target.key,
                    target.tensor,
                    target.batched,
                    target.sample,
                    target.within,
                    read,
                    somewhere or (read is not None and bool(read.any())),
                    target.excluded,
                )
            )
        return judged

    def _suspects(self, judged: List[_Target]) -> List[_Slabs]:
        """What the gradients leave suspected unread: whole inputs that no output depends on
        (and those no gradient could judge), and the indices along a dimension that no output
        depends on in any sample."""
        found: List[_Slabs] = []
        by_key: Dict[Key, List[_Target]] = {}
        for target in judged:
            by_key.setdefault(target.key, []).append(target)
        for group in by_key.values():
            if not any(t.read_somewhere for t in group):
                found.extend(_Slabs(t, None, []) for t in group)  # judged as a whole
                continue
            for target in group:
                if target.read is None:
                    continue
                unread = ~target.read & target.judged()
                if not unread.any():
                    continue
                for dim in target.dims():
                    moved = unread.movedim(dim, 0).reshape(unread.shape[dim], -1)
                    judged_along = target.judged().movedim(dim, 0).reshape(unread.shape[dim], -1)
                    whole = (moved | ~judged_along).all(1) & judged_along.any(1)
                    indices = [int(i) for i in whole.nonzero().flatten()]
                    if indices:
                        found.append(_Slabs(target, dim, indices))
        return found

    # -- design: zero-initialised parameters -------------------------------------------------
    def _with_zero_parameters_made_random(self) -> nn.Module:
        """A copy of the model whose trainable parameters that are exactly zero (a ReZero
        gate, LoRA's B, a zero-initialised head) are small random numbers: an input behind
        such a parameter is read as soon as it trains."""
        copy = self._copy_model()
        generator = torch.Generator().manual_seed(derived_seed(self.seed, 4099))
        with torch.no_grad():
            for parameter in copy.parameters():
                if parameter.requires_grad and parameter.is_floating_point():
                    zero = parameter == 0
                    if zero.any():
                        noise = torch.randn(
                            parameter.shape, generator=generator, dtype=torch.float64
                        )
                        parameter[zero] = (0.1 * noise).to(parameter.dtype)[zero]
        return copy

    # -- by values ---------------------------------------------------------------------------
    def _judge_by_values(self, suspects: List[_Slabs]) -> None:
        """Change the suspected elements and compare the outputs, on the model; then, for
        what that leaves unread, on a copy whose zero parameters are made random (its
        gradients first); fail on the elements that change no output (but for designs,
        skipped parts that name them)."""
        wholes: Dict[Key, List[_Slabs]] = {}
        parts: Dict[Tuple[Key, Optional[int], str], List[_Slabs]] = {}
        for slabs in suspects:
            if slabs.dim is None:
                wholes.setdefault(slabs.target.key, []).append(slabs)
            else:
                parts.setdefault(slabs.target.ident(), []).append(slabs)
        integers_only = False
        for index, judge in enumerate(_Judges(self)):
            if index:  # another model: what its gradients show read is read
                again = self._suspects(self._read_by_gradient(judge.model, self._targets()))
                wholes = {k: g for k, g in wholes.items() if any(s.target.key == k for s in again)}
                parts = {
                    ident: narrowed
                    for ident, group in parts.items()
                    if (narrowed := _narrowed(group, again))
                }
            else:
                integers_only = not any(
                    t.is_floating_point() for _, t in judge.bases[judge.seeds[0]]
                )
            for key, group in list(wholes.items()):
                if judge.reads_whole(group) is not False:
                    del wholes[key]
            for ident, group in list(parts.items()):
                parts[ident] = judge.unread_slabs(group)
                if not parts[ident]:
                    del parts[ident]
            if not wholes and not parts:
                return
        found = [describe_input(key) for key in wholes] + [
            slabs.describe() for group in parts.values() for slabs in group
        ]
        if integers_only:
            self.skipTest(
                f"changing {listed(found)} changes no output, but the model's outputs hold no "
                "floating-point tensor (integers only: class indices, an argmax), which a "
                "change of the inputs may leave as they are: not judged. Set self.output_key "
                "and have the model return its scores to have the inputs checked"
            )
        for group in wholes.values():
            self.fail(self._never_read_message(group))
        unread = [slabs for group in parts.values() for slabs in group]
        reported = [slabs for slabs in unread if not self._designed(slabs)]
        if reported:
            self.fail(self._unread_message(reported))

    def _seeds_for_values(self, model: nn.Module) -> List[int]:
        """The seed of the check, and two more when eval mode draws random numbers (which
        elements a randomly masking model reads changes with the seed)."""
        with torch.no_grad(), watching(model, RandomnessWatch) as watch:
            self._forward(model, self.inputs)
        if not watch.draws:
            return [self.seed]
        return [self.seed, derived_seed(self.seed, 1), derived_seed(self.seed, 2)]

    def _outputs(
        self, model: nn.Module, inputs: Any, seed: int, training: bool = False
    ) -> List[Tuple[str, torch.Tensor]]:
        with torch.no_grad():
            return list(named_tensors(self._forward(model, inputs, training=training, seed=seed)))

    def _changed_inputs(self, changes: List[Tuple[_Target, torch.Tensor]], way: str) -> Any:
        """self.inputs with the elements ``changes`` changed ``way``."""
        new: Dict[Key, Any] = {}
        for target, mask in changes:
            value = _changed(target.tensor, mask, way, self.seed)
            if target.batched:
                new[target.key] = value
                continue
            samples = list(new.get(target.key, dict(input_entries(self.inputs))[target.key]))
            samples[target.sample or 0] = map_tensors(
                _swap(target.tensor, value), samples[target.sample or 0]
            )
            new[target.key] = samples
        return replace_entries(self.inputs, new)

    def _never_read_message(self, group: List[_Slabs]) -> str:
        name = describe_input(group[0].target.key)
        return (
            f"{name} is not read: no output depends on it in eval mode or in training mode "
            "(no gradient reaches it, and changed to other values it changes no output). "
            "Usual causes: an argument accepted and never used (a mask or a condition not "
            "passed on to the layer that needs it), the input overwritten or replaced by a "
            "constant before use. If the model ignores it by design, list it in "
            "self.unread_inputs (or leave it out of self.inputs)."
        )

    # -- designs that leave elements unread ------------------------------------------------
    def _designed(self, slabs: _Slabs) -> bool:
        """Whether a design explains the unread slabs: then report them as a skipped part
        that names it."""
        reason = self._masked_reason(slabs) or self._strided_reason(slabs)
        if not reason:
            return False
        self._skip_part(slabs.describe(), f"{slabs.describe()} is read by no output: {reason}")
        return True

    def _masked_reason(self, slabs: _Slabs) -> str:
        """Positions that another input (a mask) marks with one value in every sample, where
        no element of the input that the mask marks so is read: padding, by the look of it."""
        target, dim = slabs.target, slabs.dim
        if not target.batched or dim is None or target.read is None:
            return ""
        for key, mask in batched_entries(self.inputs, self.unbatched_inputs):
            if key == target.key or mask.is_floating_point() or mask.is_complex():
                continue
            if tuple(mask.shape) != tuple(target.tensor.shape[: dim + 1]):
                continue
            values = mask.movedim(dim, 0)[slabs.indices].flatten()
            if not values.numel() or not bool((values == values[0]).all()):
                continue
            marked = (mask == values[0]).reshape(
                *mask.shape, *[1] * (target.tensor.dim() - dim - 1)
            )
            if bool((mask != values[0]).any()) and not bool((target.read & marked).any()):
                return (
                    f"{describe_input(key)} is {values[0].item()!r} there in every sample, and "
                    "no element where it is so is read (padding, by the look of it), which a "
                    "model ignores by design. SequenceModelTests with padding_mask set leaves "
                    "padding out of this check and checks it with test_padding_invariance"
                )
        return ""

    def _strided_reason(self, slabs: _Slabs) -> str:
        """The last indices of a dimension, left unread by a strided convolution or pooling
        whose windows do not reach the end of its input."""
        dim, indices = slabs.dim, slabs.indices
        if dim is None:
            return ""
        size = slabs.target.tensor.shape[dim]
        if list(indices) != list(range(size - len(indices), size)):
            return ""
        with torch.no_grad(), watching(self.model, _CoverageWatch) as watch:
            self._forward(self.model, self.inputs)
        if not watch.dropping:
            return ""
        return (
            f"the last {len(indices)} of {size} along dimension {dim}, and "
            f"{watch.dropping[0]}: a design of strided layers (the input's size is not one "
            "their windows cover). Give the inputs a size the strides cover to have them "
            "checked"
        )

    def _unread_message(self, reported: List[_Slabs]) -> str:
        first = reported[0]
        more = (
            f" Also read by no output: {listed([s.describe() for s in reported[1:]])}."
            if len(reported) > 1
            else ""
        )
        dim = first.dim
        what = "" if dim is None else f" (dimension {dim}, in every sample)"
        return (
            f"{first.describe()} is read by no output{what}: no gradient reaches it from any "
            "output, and changing it (to other values of the input, far up and far down) "
            f"changes no output.{more} Usual causes: a slice reused where another was meant "
            "(x[:, :8] twice instead of x[:, 8:16]), a channel, column or position dropped by "
            "a wrong index or a cut (ids[:, 1:], x[..., :-1]), a reshape that leaves part of "
            "the input out. If the model ignores these elements by design, list the input in "
            "self.unread_inputs."
        )


def _probe_of(probe: Probe, target: _Target) -> bool:
    if probe.key != target.key:
        return False
    if target.batched:
        return probe.sample is None
    return probe.sample == target.sample and probe.within == target.within


def _elements(probe: Probe, nonzero: torch.Tensor, tensor: torch.Tensor) -> Optional[torch.Tensor]:
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


def _has_zero_parameters(model: nn.Module) -> bool:
    return any(
        p.requires_grad and p.is_floating_point() and bool((p == 0).any())
        for p in model.parameters()
    )


def _swap(old: torch.Tensor, new: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function that gives ``new`` for ``old`` and any other tensor as it is."""
    return lambda tensor: new if tensor is old else tensor


def _changeable(tensor: torch.Tensor) -> bool:
    """Whether a tensor has elements to change."""
    return tensor.numel() > 0


def _ways(changes: List[Tuple[_Target, torch.Tensor]]) -> List[str]:
    """How the elements can be changed: to other values of the input (for every input), and
    far up and down (floats)."""
    tensors = [target.tensor for target, _ in changes]
    ways = ["others"]
    if all(t.is_floating_point() for t in tensors):
        ways += ["up", "down"]
    return ways


def _changed(tensor: torch.Tensor, mask: torch.Tensor, way: str, seed: int) -> torch.Tensor:
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


def _same_outputs(
    first: List[Tuple[str, torch.Tensor]], second: List[Tuple[str, torch.Tensor]]
) -> bool:
    """Exactly the same tensors at the same paths (NaN equal to NaN)."""
    from ..core.compare import same

    if [path for path, _ in first] != [path for path, _ in second]:
        return False
    return all(same(a, b) for (_, a), (_, b) in zip(first, second))
