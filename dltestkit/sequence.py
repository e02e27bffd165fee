"""SequenceModelTests: ModelTests plus the checks sequence models need (causality, padding)."""

from __future__ import annotations

from typing import Any, ClassVar, Collection, List, Optional, Sequence, Tuple

import torch

from ._base import REQUIRED, Attribute, check, is_bool, is_key, is_keys, is_positive_int
from ._probes import Probe
from ._tensors import Key, batched_entries, describe_input, input_entries, replace_entries
from .model import ModelTests

__all__ = ["SequenceModelTests"]


def _is_mask_key(value: Any) -> Optional[str]:
    return "is None; leave it unset instead" if value is None else is_key(value)


def _is_padded_value(value: Any) -> Optional[str]:
    if isinstance(value, (bool, int, float)):
        return None
    return f"is {value!r}, not a bool or a number"


class SequenceModelTests(ModelTests):
    """Checks for a model over sequences: every ``ModelTests`` check, plus causality and
    padding invariance.

    Positions run along ``sequence_dim`` of the inputs and of the checked output (1 for
    ``(batch, seq, ...)``). Keep sequences short in tests (8 to 16 positions): the sequence
    checks back-propagate once per position.
    """

    _mixin_name: ClassVar[str] = "SequenceModelTests"
    _contract: ClassVar[Tuple[Attribute, ...]] = (
        Attribute(
            "sequence_dim",
            "the position dimension of the inputs and of the checked output",
            "1",
            default=REQUIRED,
            validate=is_positive_int,
            read_by=("test_causality", "test_padding_invariance"),
            details="1 for `(batch, seq, ...)` and for token ids `(batch, seq)`; 2 for "
            "`(batch, channels, seq)`.",
        ),
        Attribute(
            "causal",
            "whether the output at position t may only depend on inputs at positions up to t",
            "True",
            default=False,
            validate=is_bool,
            read_by=("test_causality",),
            details="True for language models and causal convolutions; "
            "`test_causality` skips while it is False.",
        ),
        Attribute(
            "padding_mask",
            "the index or key in self.inputs of the padding mask",
            '"attention_mask"',
            validate=_is_mask_key,
            read_by=("test_padding_invariance",),
            details="A `(batch, seq)` tensor. Without padded positions in it, the check "
            "pads each sample itself (on the right; on the left for a causal "
            "model).",
        ),
        Attribute(
            "padded_value",
            "the value of padding_mask at padded positions",
            "True",
            default=0,
            validate=_is_padded_value,
            read_by=("test_padding_invariance",),
            details="0/False (transformers' `attention_mask`: 1 marks real tokens), or "
            "True for PyTorch's `key_padding_mask`, where True marks padding.",
        ),
        Attribute(
            "sequence_inputs",
            "the keys or indices of the inputs whose positions are the output's",
            '["decoder_input_ids"]',
            validate=is_keys,
            read_by=("test_causality", "test_padding_invariance"),
            default_text="every batched input but the padding mask that has the "
            "output's number of positions at `sequence_dim`",
            details="Set it for an encoder-decoder model, whose encoder inputs are not "
            "positions of the decoder's output.",
        ),
    )

    sequence_dim: int
    causal: bool
    padding_mask: Key
    padded_value: Any
    sequence_inputs: Collection[Key]

    def _validate_combination(self) -> None:
        super()._validate_combination()
        keys = [key for key, _ in input_entries(self.inputs)]
        if self._is_set("padding_mask"):
            if self.padding_mask not in keys:
                raise self._contract_error(
                    "padding_mask",
                    f"is {self.padding_mask!r}, which self.inputs does not have (it has {keys})",
                )
            mask = dict(input_entries(self.inputs))[self.padding_mask]  # not yet validated
            if (
                not isinstance(mask, torch.Tensor)
                or mask.dim() != 2
                or mask.shape[0] != self._batch_size()
            ):
                shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask)
                raise self._contract_error(
                    "padding_mask", f"selects {shape}, not a (batch, seq) tensor"
                )
        if self._is_set("sequence_inputs"):
            unknown = [key for key in self.sequence_inputs if key not in keys]
            if unknown:
                raise self._contract_error(
                    "sequence_inputs",
                    f"names {unknown}, which self.inputs does not have (it has {keys})",
                )

    def _unprobed_inputs(self) -> Collection[Key]:
        mask = (self.padding_mask,) if self._is_set("padding_mask") else ()
        return (*super()._unprobed_inputs(), *mask)

    def _positional_probes(self, probes: Sequence[Probe], length: int) -> List[Probe]:
        """The probes whose positions are the output's (``length`` of them)."""
        dim = self.sequence_dim
        wanted = set(self.sequence_inputs) if self._is_set("sequence_inputs") else None
        found = [
            p
            for p in probes
            if p.aligned
            and (wanted is None or p.key in wanted)
            and p.tensor.dim() > dim
            and p.tensor.shape[dim] == length
        ]
        if wanted is not None:
            missing = wanted - {p.key for p in found}
            if missing:
                raise self._contract_error(
                    "sequence_inputs",
                    f"names {sorted(map(str, missing))}, which have no "
                    f"{length} positions at sequence_dim={dim} that can be differentiated "
                    "(a float tensor, or token ids that reach an embedding)",
                )
        if not found:
            shapes = {
                describe_input(k): tuple(t.shape)
                for k, t in batched_entries(self.inputs, self._unprobed_inputs())
            }
            raise self._contract_error(
                "sequence_dim",
                f"is {dim}, but no input has {length} positions there (inputs: {shapes})",
            )
        return found

    def _positions(self, checked: torch.Tensor, output: Any, check_name: str) -> int:
        dim = self.sequence_dim
        if checked.dim() <= dim:
            raise self._contract_error(
                "sequence_dim",
                f"is {dim}, but the checked output has shape "
                f"{tuple(checked.shape)}: {check_name} needs an output with a position "
                f"dimension.{self._output_hint(output)}",
            )
        return int(checked.shape[dim])

    @check
    def test_causality(self) -> None:
        """Check that the output at each position depends on no input at a later position.

        Catches a causal model that sees the future: a causal mask off by one, a convolution
        padded on both sides, a bidirectional layer; names the first leaking pair of
        positions.
        """
        if not self.causal:
            self.skipTest(
                "self.causal is False; set causal = True for a model whose output at "
                "position t must not depend on later inputs (a language model, a "
                "causal convolution)"
            )
        output, checked, probes = self._probe(self.model)
        length = self._positions(checked, output, "test_causality")
        real = self._real_positions(length)
        probes = self._positional_probes(probes, length)
        dim = self.sequence_dim
        weights = self._weights([checked])[0]
        for t in range(length - 1):
            # Outputs at padded positions are ignored: with left padding, a fully masked row
            # may attend anywhere, and its output is never used.
            value = (checked.select(dim, t) * weights.select(dim, t))[real[:, t]].sum()
            for probe, depends in zip(probes, self._dependence(value, probes)):
                later = depends.narrow(dim, t + 1, length - t - 1).movedim(dim, 0)
                leaks = later.reshape(length - t - 1, -1).any(dim=1)
                if leaks.any():
                    leak = t + 1 + int(leaks.nonzero()[0])
                    self.fail(
                        f"the output at position {t} depends on {probe.describe()} at position "
                        f"{leak}, a later position: the model sees the future. Usual causes: a "
                        "causal mask off by one (torch.triu(..., diagonal=1) marks the "
                        "positions to hide), a convolution padded on both sides ('same' "
                        "padding; pad kernel_size - 1 on the left only), a bidirectional layer "
                        "(bidirectional=True, attention without a causal mask)."
                    )

    def _mask(self) -> torch.Tensor:
        """The padding mask in self.inputs (the contract makes sure it is a tensor)."""
        mask: torch.Tensor = dict(input_entries(self.inputs))[self.padding_mask]
        return mask

    def _real_positions(self, length: int) -> torch.Tensor:
        """(batch, length): True at the positions that padding_mask marks real (all of them
        without a padding mask)."""
        if not self._is_set("padding_mask"):
            return torch.ones(self._batch_size(), length, dtype=torch.bool)
        mask = self._mask()
        if mask.shape[1] != length:
            raise self._contract_error(
                "padding_mask",
                f"has {mask.shape[1]} positions, but the checked output has {length}",
            )
        real: torch.Tensor = mask != self.padded_value
        return real

    def _padded_inputs(self) -> Tuple[Any, torch.Tensor]:
        """self.inputs with padding (the user's, or made here), and the padded positions."""
        key = self.padding_mask
        mask = self._mask()
        padded = ~self._real_positions(mask.shape[1])
        if padded.any():
            return self.inputs, padded
        batch, length = mask.shape
        if length < 2:
            self.skipTest(
                f"the padding mask has {length} position; at least 2 are needed to pad one"
            )
        padded = torch.zeros(batch, length, dtype=torch.bool)
        for sample in range(batch):
            count = 1 + sample % max(1, length // 2)
            if self.causal:  # right padding cannot leak into a causal model's real positions
                padded[sample, :count] = True
            else:
                padded[sample, length - count :] = True
        made = mask.clone()
        made[padded] = torch.as_tensor(self.padded_value).to(made.dtype)
        return replace_entries(self.inputs, {key: made}), padded

    @check
    def test_padding_invariance(self) -> None:
        """Check that the outputs at real positions do not depend on the inputs at padded positions.

        Catches padding that leaks into the real positions: an attention mask accepted but
        not applied, pooling over padding, a mask with inverted meaning.
        """
        self._get_or_skip("padding_mask")
        inputs, padded = self._padded_inputs()
        output, checked, probes = self._probe(self.model, inputs)
        length = padded.shape[1]
        probes = self._positional_probes(probes, length)
        dim = self.sequence_dim
        positional = checked.dim() > dim and checked.shape[dim] == length
        weights = self._weights([checked])[0]

        def leaks_into(value: torch.Tensor, sample: int) -> List[Tuple[Probe, List[int]]]:
            found = []
            for probe, depends in zip(probes, self._dependence(value, probes)):
                per_position = depends[sample].movedim(dim - 1, 0).reshape(length, -1).any(1)
                leaking = (per_position & padded[sample]).nonzero().flatten().tolist()
                if leaking:
                    found.append((probe, leaking))
            return found

        for sample in range(padded.shape[0]):
            real = ~padded[sample]
            if not padded[sample].any() or not real.any():
                continue
            # Select the real positions (multiplying by a 0/1 mask would spread a NaN of a
            # padded position, e.g. a fully masked attention row, into the sum).
            own = checked[sample] * weights[sample]
            value = own.movedim(dim - 1, 0)[real].sum() if positional else own.sum()
            leaks = leaks_into(value, sample)
            if not leaks:
                continue
            probe, positions = leaks[0]
            where = "its output"
            if positional:  # name the first real position that sees the padding
                where = "its outputs at real positions"
                for t in real.nonzero().flatten().tolist():
                    if leaks_into(own.select(dim - 1, t).sum(), sample):
                        where = f"its output at real position {t}"
                        break
            self.fail(
                f"sample {sample}: {where} {'depend' if where.endswith('s') else 'depends'} on "
                f"{probe.describe()} at padded positions "
                f"{positions}: padding leaks into the real positions. Usual causes: an "
                "attention mask that is accepted but not applied (passed to the wrong "
                "argument, or dropped on the way to the attention layers), pooling (mean, sum, "
                "max) over all positions instead of the real ones, a mask with inverted "
                "meaning (set self.padded_value = True if True marks padding in this mask)."
            )
