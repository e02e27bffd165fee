"""test_all_inputs_used: every element of the inputs influences some output.

Exactly, by gradients, where an input can be differentiated (floats, and token ids through
their embeddings): one eval-mode pass over the probes of the inputs, and one backward pass
from every floating-point output weighted at random (the probed pass test_batch_independence
shares). Behind a parameter that is exactly zero (ReZero, LoRA's B, a zero-initialised head
or bias, a padding embedding), an input is read as soon as the parameter trains, so what the
model's pass leaves suspected is looked at again in the same pass on a copy whose zero
parameters are made small and random (it shows read all that the model's own pass would, and
what lies behind them). An element whose gradient is exactly zero is no proof
that it is unread (max-pooling, a ReLU that is off), so only structure is suspected: a whole
input, or an index along one dimension (a channel, a feature, a position) that no output
depends on in any sample. The suspects are then judged by what can be observed:

- by values, on the model, then on the copy: the suspected elements are changed (to other
  values of the input, and far up and down) and the outputs compared exactly; under other
  seeds too when the model draws random numbers in eval mode (random masking);
- an input that eval mode does not read may be read in training only (targets that only a
  loss reads);
- an end of a dimension left unread by a strided convolution or pooling (a size the strides
  do not cover) and positions that a mask input marks in every sample (padding) are designs:
  skipped parts that name them.

Inputs that cannot be differentiated (integer inputs no embedding reads: masks, labels,
position ids read through arithmetic) are judged as a whole, by values.
"""

from __future__ import annotations

from typing import (
    Any,
    Callable,
    Collection,
    Dict,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Union,
)

import torch
from torch import nn

from ..core.contract import check
from ..core.messages import listed
from ..core.options import option
from ..core.paths import floating_tensors, map_tensors, named_tensors
from ..core.seeds import derived_seed
from ..core.validators import is_keys_or_parts
from ..core.watch import watching
from .dependence import Dependence, GradientsRefused
from .input_judge import Judge
from .input_parts import (
    CoverageWatch,
    Slabs,
    Target,
    change_elements,
    elements,
    probe_of,
    swap,
)
from .probes import Probe
from .randomness import RandomDraw, RandomnessWatch, describe_draws
from .tensors import (
    Key,
    batched_entries,
    describe_input,
    input_entries,
    replace_entries,
    sample_lists,
)

__all__ = ["InputUse"]

#: The seeds the outputs are compared under when the model draws random numbers in eval mode
#: (the check's and the others), each tried only while a change has made no difference: an
#: element such a model reads at random is unread under all of them by chance alone only if it
#: is read very rarely, which the elements read under a later seed than the check's measure.
_RANDOM_SEEDS = 24

#: The chance below which elements unread under every seed are reported as unread, for a
#: model that reads at random; above it, they are a skipped part.
_CHANCE = 1e-4
Made = Callable[[], Optional[nn.Module]]  # a copy of the model, made when needed


def _part_mask(tensor: torch.Tensor, part: Any) -> torch.Tensor:
    """True at the elements of ``tensor`` that indexing it with ``part`` selects."""
    mask = torch.zeros(tensor.shape, dtype=torch.bool)
    mask[part] = True
    return mask


class InputUse(Dependence):
    """Every element of the inputs is read."""

    unread_inputs: Union[Collection[Key], Mapping[Key, Any]] = option(
        (), is_keys_or_parts, example='["token_type_ids"]'
    )
    """The inputs, or the parts of them, the model may leave unread by design.

    `test_all_inputs_used` does not judge them: an argument accepted for compatibility and
    ignored, a feature the model leaves out on purpose. A list names whole inputs (keys or
    indices); a dict maps an input to the part it leaves unread, as an index of the input
    tensor (batch first), or to `None` for all of it: `{"past_time_features": (slice(None),
    slice(0, 7))}` for the first 7 positions of every sample, the history that a time-series
    transformer reads for its lagged values only."""

    def _validate_combination(self) -> None:
        super()._validate_combination()
        entries = dict(input_entries(self.inputs))
        keys = list(entries)
        unknown = [key for key in self.unread_inputs if key not in keys]
        if unknown:
            raise self._contract_error(
                "unread_inputs", f"names {unknown}, which self.inputs does not have (it has {keys})"
            )
        for key, part in self._unread_parts().items():
            tensor = entries[key]
            if part is None:
                continue
            if not isinstance(tensor, torch.Tensor):
                raise self._contract_error(
                    "unread_inputs", f"gives a part of {describe_input(key)}, which is no tensor"
                )
            try:
                _part_mask(tensor, part)
            except (IndexError, TypeError, ValueError) as exc:
                raise self._contract_error(
                    "unread_inputs",
                    f"gives {describe_input(key)} the part {part!r}, which does not index a "
                    f"tensor of shape {tuple(tensor.shape)} ({exc})",
                ) from None

    def _unread_parts(self) -> Dict[Key, Any]:
        """The inputs the model may leave unread, each with its part (None: all of it)."""
        if isinstance(self.unread_inputs, Mapping):
            return {key: None if part is ... else part for key, part in self.unread_inputs.items()}
        return dict.fromkeys(self.unread_inputs)

    @check(
        reads=(
            "model",
            "inputs",
            "unbatched_inputs",
            "unread_inputs",
            "output_key",
            "cross_sample_outputs",
        )
    )
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
        # First the gradients of the probed pass the checks share. A model with trainable
        # parameters that are exactly zero (a ReZero gate, LoRA's B, a zero-initialised head or
        # bias, a padding embedding) reads what lies behind them as soon as they train: what
        # the model's gradients leave suspected is looked at again on a copy whose zero
        # parameters are small random numbers (what the model reads, the copy reads too).
        shared = self._probed_pass()
        if shared.refused is not None:  # every input is judged as a whole, by values
            refused = GradientsRefused(shared.refused)
            self._judged_by_values(refused, "each input was judged as a whole, by values")
        read = shared.read or (None,) * len(shared.probes)
        suspects = self._suspects(self._judged(shared.probes, read, targets))
        probed = any(probe_of(p, s.target) for s in suspects for p in shared.probes)
        randomised = self._with_zero_parameters_made_random() if probed else None
        if randomised is not None:  # (the copy's gradients judge probed ones only)
            suspects = self._suspects(self._read_by_gradient(randomised, targets))
        if suspects:  # (the copy made only once the model leaves something unread)
            self._judge_by_values(suspects, (lambda: randomised) if probed else None)

    # -- what is judged ----------------------------------------------------------------------
    def _targets(self) -> List[Target]:
        """Every tensor of self.inputs that carries the batch, but those that are not judged
        (unbatched_inputs, unread_inputs, the padding mask)."""
        parts = self._unread_parts()
        skip = (*self._unprobed_inputs(), *[key for key, part in parts.items() if part is None])
        targets = []
        for key, tensor in batched_entries(self.inputs, skip):
            if tensor.is_complex():
                continue
            excluded = self._padded_elements(tensor)
            if parts.get(key) is not None:  # a part left unread by design is not judged
                declared = _part_mask(tensor, parts[key])
                excluded = declared if excluded is None else excluded | declared
            targets.append(Target(key, tensor, batched=True, excluded=excluded))
        for key, samples in sample_lists(self.inputs, skip):
            for index, item in enumerate(samples):
                for path, tensor in named_tensors(item, prefix=""):
                    targets.append(Target(key, tensor, False, sample=index, within=path))
        return targets

    def _read_by_gradient(self, model: nn.Module, targets: List[Target]) -> List[Target]:
        """The targets with what an eval-mode pass over the probes and one backward pass
        from every floating-point output show them read."""
        output, probes = self._probe(model, required=False)
        tensors = [t for _, t in floating_tensors(output) if t.requires_grad]
        grads: Optional[List[Optional[torch.Tensor]]] = None
        try:
            grads = self._read_gradients(tensors, probes)
        except GradientsRefused as exc:  # every input is judged as a whole, by values
            self._judged_by_values(exc, "each input was judged as a whole, by values")
        return self._judged(probes, grads or [None] * len(probes), targets)

    def _judged(
        self,
        probes: Sequence[Probe],
        grads: Sequence[Optional[torch.Tensor]],
        targets: List[Target],
    ) -> List[Target]:
        """The targets with what the gradients ``grads`` (of an output, by probe) show read."""
        judged = []
        for target in targets:
            read, somewhere = None, False
            for probe, grad in zip(probes, grads):
                if not probe_of(probe, target):
                    continue
                nonzero = (
                    torch.zeros(probe.tensor.shape, dtype=torch.bool)
                    if grad is None
                    else grad.ne(0) & grad.isfinite()
                )
                somewhere = somewhere or bool(nonzero.any())
                found = elements(probe, nonzero, target.tensor)
                if found is not None:
                    read = found if read is None else read | found
            judged.append(
                Target(
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

    def _suspects(self, judged: List[Target]) -> List[Slabs]:
        """What the gradients leave suspected unread: whole inputs that no output depends on
        (and those no gradient could judge), and the indices along a dimension that no output
        depends on in any sample."""
        found: List[Slabs] = []
        by_key: Dict[Key, List[Target]] = {}
        for target in judged:
            by_key.setdefault(target.key, []).append(target)
        for group in by_key.values():
            if not any(t.read_somewhere for t in group):
                found.extend(Slabs(t, None, []) for t in group)  # judged as a whole
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
                        found.append(Slabs(target, dim, indices))
        return found

    # -- by values ---------------------------------------------------------------------------
    def _judge_by_values(self, suspects: List[Slabs], randomised: Optional[Made] = None) -> None:
        """Change the suspected elements and compare the outputs, on the model, then, for what
        that leaves unread, on its copy with random zero parameters if it has any (made then,
        or ``randomised()``); fail on the elements that change no output (but designs)."""
        wholes: Dict[Key, List[Slabs]] = {}
        parts: Dict[Tuple[Key, Optional[int], str], List[Slabs]] = {}
        for slabs in suspects:
            if slabs.dim is None:
                wholes.setdefault(slabs.target.key, []).append(slabs)
            else:
                parts.setdefault(slabs.target.ident(), []).append(slabs)
        judges: List[Judge] = []
        make_copy = randomised or self._with_zero_parameters_made_random
        for made in (lambda: self.model, make_copy):  # then, for what it leaves unread, a copy
            if not wholes and not parts:
                return
            model = made()
            if model is None:
                break
            judge = Judge(self, model)
            judges.append(judge)
            for key, group in list(wholes.items()):
                if judge.reads_whole(group) is not False:
                    del wholes[key]
            for ident, group in list(parts.items()):
                parts[ident] = judge.unread_slabs(group)
                if not parts[ident]:
                    del parts[ident]
        if not wholes and not parts:
            return
        integers_only = not any(t.is_floating_point() for _, t in judges[0].base(self.seed))
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
            reported = self._unexplained_by_chance(judges, reported)
        if reported:
            self.fail(self._unread_message(reported))

    def _seeds_for_values(self, draws: bool) -> List[int]:
        """The seed of the check, and _RANDOM_SEEDS - 1 more when eval mode draws random
        numbers (which elements a randomly masking model reads changes with the seed)."""
        if not draws:
            return [self.seed]
        return [self.seed, *(derived_seed(self.seed, i) for i in range(1, _RANDOM_SEEDS))]

    def _draws_in_eval(self, model: nn.Module) -> List[RandomDraw]:
        """The random draws of an eval-mode pass of ``model`` over self.inputs."""
        with torch.no_grad(), watching(model, RandomnessWatch) as watch:
            self._forward(model, self.inputs)
        return list(watch.draws)

    def _unexplained_by_chance(self, judges: List[Judge], reported: List[Slabs]) -> List[Slabs]:
        """What of ``reported`` (unread under every seed compared) is unread. For a model
        that reads at random (indices unread under the check's seed were read under a later
        one), the reported indices are judged again under every seed (some were judged before
        that was seen, under the first seeds only), and those still unread are a skipped part
        when chance explains them, which says how likely that was. Without that evidence, an
        index that no seed shows read is unread."""
        judge = judges[-1]
        if not judge.draws or not any(each.read_after for each in judges):
            return reported
        judge.every_seed = True
        still = []
        for slabs in reported:
            if slabs.dim is None:
                still.append(slabs)
                continue
            unread = judge.unread_indices(slabs)
            if unread:
                still.append(Slabs(slabs.target, slabs.dim, unread))
        tries = [tried for each in judges for tried in each.read_after]
        seeds = len(judge.seeds)
        # the chance that an index read at random is read under one more seed, from the
        # seeds that the indices read later took, estimated low (one more seed counted as
        # unread), and that one of those left stays unread under all but the check's
        rate = len(tries) / (sum(tries) + 1)
        count = sum(len(slabs.indices) for slabs in still)
        chance = min(1.0, count * (1 - rate) ** (seeds - 1))
        if not still or chance < _CHANCE:
            return still
        for slabs in still:
            self._skip_part(
                slabs.describe(),
                f"{slabs.describe()} is read by no output under any of {seeds} seeds, but the "
                f"model reads at random in eval mode ({describe_draws(judge.draws)}): "
                f"{len(tries)} indices it left unread under the check's seed were read under "
                f"a later seed, after {sum(tries) / len(tries):.1f} more on average, so "
                f"indices read that rarely stay unread under all {seeds} with a chance of "
                f"about {chance:.1g}: not judged. To have them judged, make what eval mode "
                "reads deterministic (the masking switched off in eval mode, or its mask "
                "passed in as an input).",
            )
        return []

    def _outputs(
        self, model: nn.Module, inputs: Any, seed: int, training: bool = False
    ) -> List[Tuple[str, torch.Tensor]]:
        with torch.no_grad():
            return list(named_tensors(self._forward(model, inputs, training=training, seed=seed)))

    def _inputs_with_changes(self, changes: List[Tuple[Target, torch.Tensor]], way: str) -> Any:
        """self.inputs with the elements ``changes`` changed ``way``."""
        new: Dict[Key, Any] = {}
        for target, mask in changes:
            value = change_elements(target.tensor, mask, way, self.seed)
            if target.batched:
                new[target.key] = value
                continue
            samples = list(new.get(target.key, dict(input_entries(self.inputs))[target.key]))
            samples[target.sample or 0] = map_tensors(
                swap(target.tensor, value), samples[target.sample or 0]
            )
            new[target.key] = samples
        return replace_entries(self.inputs, new)

    def _never_read_message(self, group: List[Slabs]) -> str:
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
    def _designed(self, slabs: Slabs) -> bool:
        """Whether a design explains the unread slabs: then report them as a skipped part
        that names it."""
        reason = self._masked_reason(slabs) or self._strided_reason(slabs)
        if not reason:
            return False
        self._skip_part(slabs.describe(), f"{slabs.describe()} is read by no output: {reason}")
        return True

    def _masked_reason(self, slabs: Slabs) -> str:
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
                padding = (
                    ""
                    if getattr(self, "padding_mask", None) is not None
                    else "; SequenceModelTests with padding_mask set leaves padding out of "
                    "this check and checks it with test_padding_invariance"
                )
                return (
                    f"{describe_input(key)} is {values[0].item()!r} there in every sample, and "
                    "no element where it is so is read: padding, or positions whose values the "
                    "model replaces (image placeholders that it fills with image features), "
                    "by the look of it, which a model leaves unread by design. Where they "
                    "are, declare them in unread_inputs"
                    f"{_part_example(slabs)}, and this part is no longer reported{padding}"
                )
        return ""

    def _strided_reason(self, slabs: Slabs) -> str:
        """The last indices of a dimension, left unread by a strided convolution or pooling
        whose windows do not reach the end of its input."""
        dim, indices = slabs.dim, slabs.indices
        if dim is None:
            return ""
        size = slabs.target.tensor.shape[dim]
        if list(indices) != list(range(size - len(indices), size)):
            return ""
        with torch.no_grad(), watching(self.model, CoverageWatch) as watch:
            self._forward(self.model, self.inputs)
        if not watch.dropping:
            return ""
        return (
            f"the last {len(indices)} of {size} along dimension {dim}, and "
            f"{watch.dropping[0]}: a design of strided layers (the input's size is not one "
            "their windows cover). Give the inputs a size the strides cover to have them "
            "checked"
        )

    def _unread_message(self, reported: List[Slabs]) -> str:
        first, others = reported[0], [s.describe() for s in reported[1:]]
        more = f" Also read by no output: {listed(others)}." if others else ""
        what = "" if first.dim is None else f" (dimension {first.dim}, in every sample)"
        return (
            f"{first.describe()} is read by no output{what}: no gradient reaches it from any "
            "output, and changing it (to other values of the input, far up and far down) "
            f"changes no output.{more} Usual causes: a slice reused where another was meant "
            "(x[:, :8] twice instead of x[:, 8:16]), a channel, column or position dropped by "
            "a wrong index or a cut (ids[:, 1:], x[..., :-1]), a reshape that leaves part of "
            "the input out, a branch multiplied by a zero that never trains (a frozen "
            "normalisation whose weight is zero: timm's zero-initialised residual BatchNorm "
            "frozen into FrozenBatchNorm2d, as DETR's backbone without pretrained weights). If "
            "the model ignores these elements by design, list the input in self.unread_inputs, "
            "or map it to the part it leaves unread ({'x': (slice(None), slice(0, 2))})."
        )


def _part_example(slabs: Slabs) -> str:
    """unread_inputs' entry for the unread slabs, as the setUp would write it (in brackets,
    after a space), for an input with a key or index."""
    if slabs.target.key is None:
        return ""
    index = ["slice(None)"] * (slabs.dim or 0)
    first, last = slabs.indices[0], slabs.indices[-1]
    contiguous = list(slabs.indices) == list(range(first, last + 1))
    index.append(f"slice({first}, {last + 1})" if contiguous else repr(list(slabs.indices)))
    return f" ({{{slabs.target.key!r}: ({', '.join(index)})}})"
