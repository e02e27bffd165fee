"""test_padding_invariance: the outputs at the real positions do not change with the padding."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Collection, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from ...core.contract import check
from ...core.options import ContractError
from ..dependence import GradientsRefused
from ..probes import Probe
from ..tensors import Key, batched_entries, describe_input, input_entries, replace_entries
from .contract import _NO_GRADIENT, SEQUENCE, SequenceContract, output_difference

__all__ = ["PaddingInvariance"]

_LEAK_CAUSES = (
    "Usual causes: an attention mask that is accepted but not applied (passed to the wrong "
    "argument, or dropped on the way to the attention layers), pooling (mean, sum, max) over "
    "all positions instead of the real ones, a convolution or a recurrence over the positions "
    "that reads the padded ones (zero them first; a causal model never reads right padding), "
    "a mask with inverted meaning (set self.padded_value = True if True marks padding in this "
    "mask)."
)


_STRIPPED = "each padded sample alone, without its padding"


@dataclass
class _Padding:
    """Inputs with padding, where it is, and whether the check made it."""

    inputs: Any
    #: (batch, seq): True at the padded positions.
    padded: torch.Tensor
    #: "left" or "right" when the check padded the samples itself, else None.
    made_on: Optional[str] = None
    #: The pad token written into the token ids at the padded positions the check made.
    pad_token: Optional[int] = None

    def note(self) -> str:
        """What the messages say about padding the check made itself."""
        if self.made_on is None:
            return ""
        written = (
            f", with the pad token {self.pad_token} in the token ids there"
            if self.pad_token is not None
            else ""
        )
        return (
            f" (self.inputs has no padding: the check padded the samples itself, on the "
            f"{self.made_on}{written})"
        )


class PaddingInvariance(SequenceContract):
    """Padding changes nothing at the real positions."""

    def _pad_token(self) -> Optional[int]:
        """The model's pad token id, when its config has one (transformers models)."""
        pad = getattr(getattr(self.model, "config", None), "pad_token_id", None)
        return pad if isinstance(pad, int) and not isinstance(pad, bool) else None

    def _token_inputs(self, shape: torch.Size) -> List[Tuple[Key, torch.Tensor]]:
        """The token ids among the inputs: integer (batch, seq) inputs named like
        ``input_ids`` (``decoder_input_ids``), or the only integer (batch, seq) input."""
        wanted = set(self.sequence_inputs) if self._is_set("sequence_inputs") else None
        integers = [
            (key, tensor)
            for key, tensor in batched_entries(self.inputs, self._unprobed_inputs())
            if (wanted is None or key in wanted)
            and tensor.shape == shape
            and not tensor.is_floating_point()
            and not tensor.is_complex()
            and tensor.dtype != torch.bool
        ]
        named: List[Tuple[Key, torch.Tensor]] = [
            (k, t) for k, t in integers if isinstance(k, str) and k.endswith("input_ids")
        ]
        return named or (integers if len(integers) == 1 else [])

    def _padded_inputs(self, side: str) -> _Padding:
        """self.inputs with padding: the user's, or made here on ``side``."""
        mask = self._mask()
        padded = ~self._real_positions(mask.shape[1])
        if padded.any():
            return _Padding(self.inputs, padded)
        batch, length = mask.shape
        if length < 2:
            self.skipTest(
                f"the padding mask has {length} position; at least 2 are needed to pad one"
            )
        padded = torch.zeros(batch, length, dtype=torch.bool)
        for sample in range(batch):
            count = 1 + sample % max(1, length // 2)
            if side == "left":
                padded[sample, :count] = True
            else:
                padded[sample, length - count :] = True
        made = mask.clone()
        made[padded] = torch.as_tensor(self.padded_value).to(made.dtype)
        new: Dict[Key, torch.Tensor] = {self.padding_mask: made}
        pad = self._pad_token()
        written = False
        if pad is not None:  # a model may find its padding from the pad token
            for key, ids in self._token_inputs(mask.shape):
                new[key] = ids.masked_fill(padded, pad)
                written = True
        return _Padding(replace_entries(self.inputs, new), padded, side, pad if written else None)

    @check(reads=SEQUENCE)
    def test_padding_invariance(self) -> None:
        """Check that the outputs at real positions do not depend on the padding.

        Catches padding that leaks into the real positions or changes them: an attention mask
        accepted but not applied, pooling over padding, a mask with inverted meaning,
        positions counted from the first column with left padding.
        """
        self._refuse_sample_lists("test_padding_invariance")
        self._get_or_skip("padding_mask")
        padding = self._padded_inputs("left" if self.causal else "right")
        output, checked, probes = self._sequence_probe(padding.inputs)
        self._check_per_sample(checked, output, "test_padding_invariance")
        length = padding.padded.shape[1]
        dim = self.sequence_dim
        entries = self._sequence_entries(padding.inputs, length)
        if self._adds_positions(padding.inputs, entries, checked, length):
            raise ContractError(
                f"the checked output has {checked.shape[dim]} positions at "
                f"sequence_dim={dim}, more than the {length} of the padding mask "
                f"self.inputs[{self.padding_mask!r}]: the model adds positions of its own "
                "(prompt tuning's virtual tokens, a prepended class token), so "
                "test_padding_invariance cannot tell which outputs belong to which input "
                "positions. Check an output with the inputs' positions (self.output_key), or "
                "test a wrapper that drops the added positions (for prompt tuning, "
                f"logits[:, num_virtual_tokens:]).{self._output_hint(output)}"
            )
        positional = checked.dim() > dim and checked.shape[dim] == length
        probes = self._positional_probes(probes, entries, length)
        try:
            if probes:
                self._padding_by_gradient(checked, probes, padding, positional)
        except GradientsRefused as exc:  # the values decide
            self._judged_by_values(exc, "the padding was judged by values only")
            probes = []
        base = self._run(padding.inputs)
        replaced = self._padding_by_values(base, entries, padding, positional, bool(probes))
        if padding.made_on == "left":  # compare where a causal model's padding can go
            padding = self._padded_inputs("right")
            base = self._run(padding.inputs)
        compared = self._padding_by_stripping(base, padding, positional, length)
        if not (probes or replaced or compared):
            self.skipTest(
                "nothing could be compared: no input reaches the output through a gradient, "
                "the token ids at the padded positions all hold one id (a pad token the model "
                f"may rely on), and {_STRIPPED} could not be run"
            )

    def _adds_positions(
        self,
        inputs: Any,
        entries: Sequence[Tuple[Key, torch.Tensor]],
        checked: torch.Tensor,
        length: int,
    ) -> bool:
        """Whether an output with more entries at sequence_dim than the mask has positions
        has positions of its own (its count follows the inputs' length, as with prompt
        tuning's virtual tokens), rather than pooled features (batch, features): the first
        sample is run with one position fewer."""
        dim = self.sequence_dim
        if checked.dim() <= dim or checked.shape[dim] <= length:
            return False
        keep = torch.arange(length) < length - 1
        try:
            shorter = self._run(self._stripped(inputs, 0, keep, [key for key, _ in entries]))
        except ContractError:
            raise
        except Exception:  # the model needs its length: judge from the shape
            return checked.dim() > dim + 1
        return shorter.dim() > dim and shorter.shape[dim] == checked.shape[dim] - 1

    def _padding_by_gradient(
        self, checked: torch.Tensor, probes: Sequence[Probe], padding: _Padding, positional: bool
    ) -> None:
        padded = padding.padded
        length = padded.shape[1]
        dim = self.sequence_dim
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
                f"{positions}{padding.note()}: padding leaks into the real positions. "
                f"{_LEAK_CAUSES}"
            )

    def _samples(self, padded: torch.Tensor) -> Iterator[int]:
        """The samples with both padded and real positions."""
        both = padded.any(1) & (~padded).any(1)
        yield from both.nonzero().flatten().tolist()

    def _padding_by_values(
        self,
        base: torch.Tensor,
        entries: Sequence[Tuple[Key, torch.Tensor]],
        padding: _Padding,
        positional: bool,
        exact: bool,
    ) -> bool:
        """Replace the inputs at the padded positions; the outputs at the real positions (or
        the pooled outputs) must stay the same. Token ids that hold one id at every padded
        position (a pad token, which a model may use to find its padding) are kept. Returns
        whether anything was replaced and compared."""
        padded, real = padding.padded, ~padding.padded
        others: Dict[Key, torch.Tensor] = {}
        for salt, (key, tensor) in enumerate(entries):
            at_padding = self._at(tensor, padded)
            if not tensor.is_floating_point() and bool(
                (at_padding == at_padding.flatten()[0]).all()
            ):
                continue
            others[key] = self._other_values(tensor, real, salt)
        if not others:
            return False
        changed = self._try_run(
            self._replaced(padding.inputs, others, padded), "inputs at padded positions replaced"
        )
        if changed is None:
            return False

        def differs(output: torch.Tensor, sample: int, t: Optional[int] = None) -> Optional[str]:
            if not positional:
                return output_difference(output[sample], base[sample])
            where = torch.zeros_like(padded)
            where[sample] = real[sample] if t is None else torch.arange(padded.shape[1]) == t
            return output_difference(self._at(output, where), self._at(base, where))

        for sample in self._samples(padded):
            difference = differs(changed, sample)
            if difference is None:
                continue
            where, at = "its output", None
            if positional:
                at = next(
                    t
                    for t in real[sample].nonzero().flatten().tolist()
                    if differs(changed, sample, t)
                )
                where = f"its output at real position {at}"
                difference = differs(changed, sample, at)
            culprits = list(others)
            if len(others) > 1:  # name the input whose padding changes it
                for key in others:
                    alone = self._try_run(
                        self._replaced(padding.inputs, {key: others[key]}, padded),
                        "naming the input",
                    )
                    if alone is not None and differs(alone, sample, at):
                        culprits = [key]
                        break
            named = " and ".join(describe_input(key) for key in culprits)
            kinds = " and ".join(sorted({self._kind(others[key]) for key in culprits}))
            positions = padded[sample].nonzero().flatten().tolist()
            self.fail(
                f"sample {sample}: {where} changes when {named} at its padded positions "
                f"{positions} {'is' if len(culprits) == 1 else 'are'} replaced by {kinds}"
                f"{padding.note()}: padding leaks into the real positions ({difference}). "
                + (_NO_GRADIENT if exact else "")
                + _LEAK_CAUSES
            )
        return True

    def _stripped(self, inputs: Any, sample: int, keep: torch.Tensor, keys: Collection[Key]) -> Any:
        """One sample of ``inputs`` (a batch of 1) with its real positions only: the sequence
        inputs (``keys``) at sequence_dim, the padding mask at dim 1, and the (seq, seq) of an
        unbatched attention mask."""
        index = keep.nonzero().flatten()
        length = keep.shape[0]
        new = {}
        for key, value in input_entries(inputs):
            if not isinstance(value, torch.Tensor) or value.dim() == 0:
                continue
            if key in self.unbatched_inputs:
                if value.dim() >= 2 and value.shape[-2:] == (length, length):
                    new[key] = value.index_select(-1, index).index_select(-2, index)
                continue
            one = value[sample : sample + 1]
            if key == self.padding_mask:
                one = one.index_select(1, index)
            elif key in keys:
                one = one.index_select(self.sequence_dim, index)
            new[key] = one
        return replace_entries(inputs, new)

    def _padding_by_stripping(
        self, base: torch.Tensor, padding: _Padding, positional: bool, length: int
    ) -> bool:
        """Run each padded sample alone, with its real positions only: its outputs there
        (or its pooled output) must be the padded batch's. Returns whether any was run."""
        padded = padding.padded
        keys = [key for key, _ in self._sequence_entries(padding.inputs, length)]
        dim = self.sequence_dim
        compared = False
        with self.subTest(part=_STRIPPED):
            for sample in self._samples(padded):
                keep = ~padded[sample]
                index = keep.nonzero().flatten()
                try:
                    alone = self._run(self._stripped(padding.inputs, sample, keep, keys))
                except ContractError:
                    raise
                except Exception as exc:
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                    self.skipTest(
                        f"{_STRIPPED}: not compared, sample {sample} with its {len(index)} "
                        f"real positions only (a batch of 1) makes the model raise "
                        f"{type(exc).__name__} ({first}): a model for one fixed length? The "
                        "padding was checked in the padded batch only (gradients, values "
                        "replaced)"
                    )
                expected = base[sample].index_select(dim - 1, index) if positional else base[sample]
                got = alone[0] if alone.dim() > 0 and alone.shape[0] == 1 else alone
                if got.shape != expected.shape:
                    self.skipTest(
                        f"{_STRIPPED}: not compared, sample {sample} with its {len(index)} real "
                        f"positions only (a batch of 1) gives an output of shape "
                        f"{tuple(alone.shape)}, not (1, {', '.join(map(str, expected.shape))}): "
                        "a model for one fixed length, or a checked output whose positions are "
                        "not the padding mask's (a downsampling encoder's frames, a decoder's "
                        "output checked with its encoder's mask)? The padding was checked in "
                        "the padded batch only (gradients, values replaced)"
                    )
                compared = True
                difference = output_difference(got, expected)
                if difference is None:
                    continue
                real = index.tolist()
                left = bool(padded[sample, : real[-1]].any())
                hint = (
                    "The padding is on the left: a model that counts positions from the first "
                    "column (torch.arange(length), as transformers' GPT-2 does when "
                    "position_ids is not passed) gives the real tokens other positions than "
                    "without padding, which changes the result with absolute position "
                    "embeddings (rotary ones, as Llama's, are shift-invariant). Pass "
                    "position_ids computed from the mask (attention_mask.cumsum(-1) - 1, as "
                    "transformers' generate does), or pad on the right. "
                    if left
                    else ""
                )
                where = (
                    f"its outputs at its real positions {real} change"
                    if positional
                    else "its output changes"
                )
                self.fail(
                    f"sample {sample}: {where} with the padding{padding.note()}: run "
                    f"alone without its padding ({len(real)} positions, a batch of 1, the mask "
                    f"all real) it gives other outputs ({difference}). {hint}"
                    f"{'Other' if left else 'Usual'} causes: pooling that divides by the "
                    "padded length ((h * mask).mean(1) instead of (h * mask).sum(1) / "
                    "mask.sum(1)), a normalisation over all positions, padding that leaks into "
                    "the real positions."
                )
        return compared
