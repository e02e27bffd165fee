"""SequenceModelTests: ModelTests plus the checks sequence models need (causality, padding).

Both checks ask which inputs an output depends on, in two complementary ways. Exactly, by
gradients: the output is back-propagated to the inputs (token ids: to their embeddings) and
the gradient must be exactly zero where the output must not depend on the input; this names
the first leaking pair of positions, but it sees only what reaches the output through a
differentiable path from an input or from an embedding of it. And by values: the inputs at
the positions that must not matter are replaced by values from the batch itself (token ids by
other ids, floats by the values of other positions) and the outputs must stay the same
(``torch.testing.assert_close``); this needs no gradient at all (ids transposed, clamped or
shifted before their embedding, ``nn.EmbeddingBag``), and each padded sample is also run
alone, without its padding, which catches padding that changes the result through its amount
(positions counted from the first column with left padding, a mean over the padded length).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar, Collection, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from ._base import (
    REQUIRED,
    Attribute,
    ContractError,
    check,
    is_bool,
    is_key,
    is_keys,
    is_positive_int,
)
from ._model_base import mode
from ._probes import Probe, probe_forward
from ._random import derived_seed
from ._tensors import (
    Key,
    batched_entries,
    call_model,
    describe_input,
    input_entries,
    replace_entries,
)
from .model import ModelTests

__all__ = ["SequenceModelTests"]

_FUTURE_CAUSES = (
    "Usual causes: a causal mask off by one (torch.triu(..., diagonal=1) marks the positions "
    "to hide), a convolution padded on both sides ('same' padding; pad kernel_size - 1 on "
    "the left only), a bidirectional layer (bidirectional=True, attention without a causal "
    "mask)"
)
_LEAK_CAUSES = (
    "Usual causes: an attention mask that is accepted but not applied (passed to the wrong "
    "argument, or dropped on the way to the attention layers), pooling (mean, sum, max) over "
    "all positions instead of the real ones, a mask with inverted meaning (set "
    "self.padded_value = True if True marks padding in this mask)."
)
_NO_GRADIENT = (
    "No gradient shows it: that input reaches the output without a differentiable path "
    "(token ids changed before their embedding, a step without gradient). "
)
_STRIPPED = "each padded sample alone, without its padding"


def _is_mask_key(value: Any) -> Optional[str]:
    return "is None; leave it unset instead" if value is None else is_key(value)


def _is_padded_value(value: Any) -> Optional[str]:
    if isinstance(value, (bool, int, float)):
        return None
    return f"is {value!r}, not a bool or a number"


def _difference(actual: torch.Tensor, expected: torch.Tensor) -> Optional[str]:
    """None if ``torch.testing.assert_close`` (the dtype's default tolerances, NaN equal to
    NaN) finds the tensors equal, else how they differ, in a few words."""
    try:
        torch.testing.assert_close(actual, expected, equal_nan=True)
    except AssertionError as exc:
        text = str(exc)
        counted = re.search(r"Mismatched elements: (\d+) / (\d+)", text)
        largest = re.search(r"Greatest absolute difference: (\S+)", text)
        if counted and largest:
            return (
                f"{counted.group(1)} of {counted.group(2)} values differ beyond "
                f"torch.testing.assert_close's tolerances, by up to {largest.group(1)}"
            )
        return " ".join(text.split())
    return None


def _positions_text(positions: Sequence[int]) -> str:
    return f"position {positions[0]}" if len(positions) == 1 else f"positions {list(positions)}"


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


class SequenceModelTests(ModelTests):
    """Checks for a model over sequences: every ``ModelTests`` check, plus causality and
    padding invariance.

    Positions run along ``sequence_dim`` of the inputs and of the checked output (1 for
    ``(batch, seq, ...)``). Keep sequences short in tests (8 to 16 positions): the sequence
    checks back-propagate and run the model once per position.
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
            read_by=("test_causality", "test_padding_invariance"),
            details="True for language models and causal convolutions; "
            "`test_causality` skips while it is False.",
        ),
        Attribute(
            "sees_present",
            "whether the output at position t depends on the input at position t",
            "False",
            default=True,
            validate=is_bool,
            read_by=("test_causality",),
            details="False for a model that predicts position t from earlier positions "
            "only: PixelCNN's masks (type A first), WaveNet's shifted input, targets "
            "shifted right inside the model (a transformers encoder-decoder called with "
            "`labels` only). With True, an output that depends on earlier inputs but not "
            "on its own position fails; with False, one that depends on its own position "
            "fails.",
        ),
        Attribute(
            "padding_mask",
            "the index or key in self.inputs of the padding mask",
            '"attention_mask"',
            validate=_is_mask_key,
            read_by=("test_padding_invariance",),
            details="A `(batch, seq)` tensor. Without padded positions in it, the check "
            "pads each sample itself (on the right; on the left for a causal "
            "model, then on the right to compare with the samples run alone).",
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
    sees_present: bool
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

    # -- what the checks look at -----------------------------------------------------------
    def _sequence_probe(self, inputs: Any) -> Tuple[Any, torch.Tensor, List[Probe]]:
        """Eval-mode output, checked output and probes of self.model on ``inputs``; unlike
        ``_probe`` it does not skip without probes (the value comparisons need none)."""
        with mode(self.model, training=False), torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            output, probes = probe_forward(
                lambda batch: call_model(self.model, batch),
                inputs,
                self._batch_size(),
                self._unprobed_inputs(),
            )
        return output, self._output(output), probes

    def _run(self, inputs: Any) -> torch.Tensor:
        """The checked output of one eval-mode forward pass (seeded, without gradients)."""
        with torch.no_grad():
            return self._output(self._forward(self.model, inputs))

    def _check_per_sample(self, checked: torch.Tensor, output: Any, check_name: str) -> None:
        batch = self._batch_size()
        if checked.dim() == 0 or checked.shape[0] != batch:
            self.fail(
                f"the checked output has shape {tuple(checked.shape)}, whose first "
                f"dimension is not the batch size {batch}: {check_name} compares the "
                f"outputs of each sample.{self._output_hint(output)}"
            )

    def _sequence_entries(self, inputs: Any, length: int) -> List[Tuple[Key, torch.Tensor]]:
        """The inputs whose positions are the output's (``length`` of them at sequence_dim)."""
        dim = self.sequence_dim
        wanted = set(self.sequence_inputs) if self._is_set("sequence_inputs") else None
        found = [
            (key, tensor)
            for key, tensor in batched_entries(inputs, self._unprobed_inputs())
            if (wanted is None or key in wanted)
            and not tensor.is_complex()
            and tensor.dim() > dim
            and tensor.shape[dim] == length
        ]
        if wanted is not None:
            missing = wanted - {key for key, _ in found}
            if missing:
                raise self._contract_error(
                    "sequence_inputs",
                    f"names {sorted(map(str, missing))}, which are no batched inputs with "
                    f"{length} positions at sequence_dim={dim} (the padding mask and "
                    "unbatched inputs are none either)",
                )
        if not found:
            shapes = {
                describe_input(k): tuple(t.shape)
                for k, t in batched_entries(inputs, self._unprobed_inputs())
            }
            raise self._contract_error(
                "sequence_dim",
                f"is {dim}, but no input has {length} positions there (inputs: {shapes})",
            )
        return found

    def _positional_probes(
        self, probes: Sequence[Probe], entries: Sequence[Tuple[Key, torch.Tensor]], length: int
    ) -> List[Probe]:
        """The probes of the sequence inputs whose positions are the inputs' own."""
        dim = self.sequence_dim
        keys = [key for key, _ in entries]
        return [
            p
            for p in probes
            if p.aligned
            and p.key in keys
            and p.tensor.dim() > dim
            and p.tensor.shape[dim] == length
        ]

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

    # -- changing inputs at some positions ---------------------------------------------------
    def _at(self, tensor: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        """The entries of ``tensor`` (batch first, positions at sequence_dim) at the positions
        where the (batch, seq) bool ``where`` is True, one row per position."""
        return tensor.movedim(self.sequence_dim, 1)[where]

    def _other_values(self, tensor: torch.Tensor, real: torch.Tensor, salt: int) -> torch.Tensor:
        """Other values, taken from the batch itself, for every position of an input (so that
        they stay in the input's domain: no log of a negative number). Token ids (integer and
        bool tensors): for every entry, another id that the batch holds at a real position,
        each one different from the id it replaces where the batch holds more than one.
        Floats: for every position, the values of another real position of the batch (its
        features at sequence_dim, all of them), different where the batch allows."""
        generator = torch.Generator().manual_seed(derived_seed(self.seed, 7919 * (salt + 1)))
        if tensor.is_floating_point():
            moved = tensor.detach().movedim(self.sequence_dim, 1)
            rows = moved.reshape(moved.shape[0] * moved.shape[1], -1)
            sources = rows[real.reshape(-1)] if real.any() else rows
            if sources.shape[0] < 2:
                return tensor.clone()
            choice = torch.randint(0, sources.shape[0], (rows.shape[0],), generator=generator)
            for _ in range(8):  # draw again where the value drawn is the one it replaces
                same = (sources[choice] == rows).all(dim=1)
                if not same.any():
                    break
                again = torch.randint(0, sources.shape[0], (rows.shape[0],), generator=generator)
                choice = torch.where(same, again, choice)
            taken: torch.Tensor = sources[choice].reshape(moved.shape).movedim(1, self.sequence_dim)
            return taken
        ids = tensor.long()
        pool = torch.unique(self._at(ids, real)) if real.any() else torch.unique(ids)
        if pool.numel() < 2:
            pool = torch.unique(ids)
        if pool.numel() < 2:
            return tensor.clone()
        index = torch.searchsorted(pool, ids.contiguous()).clamp(max=pool.numel() - 1)
        offset = torch.randint(1, pool.numel(), tensor.shape, generator=generator)
        others: torch.Tensor = pool[(index + offset) % pool.numel()].to(tensor.dtype)
        return others

    def _replaced(self, inputs: Any, others: Dict[Key, torch.Tensor], where: torch.Tensor) -> Any:
        """``inputs`` with the inputs in ``others`` replaced by them where ``where`` is True: a
        (batch, seq) or (seq,) bool over the positions."""
        dim = self.sequence_dim
        new = {}
        for key, tensor in input_entries(inputs):
            if key not in others:
                continue
            shape = [1] * tensor.dim()
            shape[dim] = where.shape[-1]
            if where.dim() == 2:
                shape[0] = where.shape[0]
            new[key] = torch.where(where.reshape(shape), others[key], tensor)
        return replace_entries(inputs, new)

    def _try_run(self, inputs: Any, part: str) -> Optional[torch.Tensor]:
        """The checked output on changed inputs, or None, reporting ``part`` as skipped in a
        subtest, when the model raises on them."""
        try:
            return self._run(inputs)
        except ContractError:
            raise
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            self._skip_part(
                part,
                f"{part}: not compared, the model raises {type(exc).__name__} on the "
                f"changed inputs ({first})",
            )
            return None

    def _skip_part(self, part: str, reason: str) -> None:
        """Report one part of a check as skipped (in a subtest); the check goes on."""
        with self.subTest(part=part):
            self.skipTest(reason)

    @staticmethod
    def _kind(tensor: torch.Tensor) -> str:
        return (
            "values from other positions of the batch"
            if tensor.is_floating_point()
            else "other ids of the batch"
        )

    # -- causality -------------------------------------------------------------------------
    @check
    def test_causality(self) -> None:
        """Check that the output at each position depends on no input at a later position.

        Catches a causal model that sees the future: a causal mask off by one, a convolution
        padded on both sides, a bidirectional layer, inputs shifted the wrong way; names the
        first leaking pair of positions. Also an output that does not see its own position (a
        mask that hides the present), or sees it though sees_present is False.
        """
        self._refuse_sample_lists("test_causality")
        if not self.causal:
            self.skipTest(
                "self.causal is False; set causal = True for a model whose output at "
                "position t must not depend on later inputs (a language model, a "
                "causal convolution)"
            )
        output, checked, probes = self._sequence_probe(self.inputs)
        self._check_per_sample(checked, output, "test_causality")
        length = self._positions(checked, output, "test_causality")
        real = self._real_positions(length)
        entries = self._sequence_entries(self.inputs, length)
        probes = self._positional_probes(probes, entries, length)
        suspects = self._causality_by_gradient(checked, probes, real) if probes else None
        self._causality_by_values(entries, real, length, suspects)

    def _future_message(
        self, t: int, what: str, leak: int, kind: Optional[str] = None, exact: bool = False
    ) -> str:
        """The output at position t sees the input ``what`` at position ``leak``: through a
        gradient, or (``kind`` given) when it is replaced by ``kind`` (``exact``: though no
        gradient showed it)."""
        where = "its own position" if leak == t else "a later position"
        seen = (
            f"depends on {what} at position {leak}, {where}"
            if kind is None
            else f"changes when {what} at position {leak}, {where}, is replaced by {kind}"
        )
        unseen = _NO_GRADIENT if exact else ""
        if leak == t:  # only with sees_present False
            return (
                f"the output at position {t} {seen}, but self.sees_present is False: the "
                f"output at position t must be computed from earlier positions only. {unseen}"
                "Usual causes: a mask that lets the present through (PixelCNN's mask B in the "
                "first layer, which needs mask A; torch.triu(..., diagonal=1) where "
                "diagonal=0 is needed), an input or convolution shifted by one position too "
                "few. Leave self.sees_present True for a model that is meant to see the "
                "present."
            )
        return (
            f"the output at position {t} {seen}: the model sees the future. {unseen}"
            f"{_FUTURE_CAUSES}, inputs shifted the wrong way before the model uses them "
            "(torch.roll(ids, -1, dims=1) gives position t the token at t + 1)."
        )

    def _present_message(self, t: int, names: Sequence[str]) -> str:
        return (
            f"the output at position {t} does not depend on {' or '.join(names)} at position "
            f"{t}, its own position, though it depends on earlier positions: the model hides "
            "the present from itself. Usual causes: a causal mask that hides the diagonal "
            "(torch.triu(..., diagonal=0) where diagonal=1 is meant), PixelCNN's mask A in a "
            "layer that needs mask B, an input shifted one position too far. If the model "
            "predicts position t from earlier positions only on purpose (PixelCNN, WaveNet's "
            "shifted input, targets shifted right inside the model, a transformers "
            "encoder-decoder called with labels only), set self.sees_present = False."
        )

    def _causality_by_gradient(
        self, checked: torch.Tensor, probes: Sequence[Probe], real: torch.Tensor
    ) -> List[int]:
        """Fail at the first output that depends on a later input (or on its own, with
        sees_present False). Returns the positions whose output shows no gradient from its
        own position, for the values to decide (with sees_present True)."""
        dim = self.sequence_dim
        length = checked.shape[dim]
        first = 1 if self.sees_present else 0  # inputs from t + first on must not matter
        weights = self._weights([checked])[0]
        suspects = []
        for t in range(length):
            rows = real[:, t]
            if not rows.any():
                continue
            # Outputs at padded positions are ignored: with left padding, a fully masked row
            # may attend anywhere, and its output is never used.
            value = (checked.select(dim, t) * weights.select(dim, t))[rows].sum()
            per_position = [
                depends.movedim(dim, 0).reshape(length, -1).any(1)
                for depends in self._dependence(value, probes)
            ]
            for probe, where in zip(probes, per_position):
                leaks = where[t + first :]
                if leaks.any():
                    self.fail(
                        self._future_message(
                            t, probe.describe(), t + first + int(leaks.nonzero()[0])
                        )
                    )
            # No gradient from the present (nor, maybe, from anywhere: a NaN of a fully masked
            # row spoils every gradient of its batch): the values decide.
            if self.sees_present and not any(bool(where[t]) for where in per_position):
                suspects.append(t)
        return suspects

    def _causality_by_values(
        self,
        entries: Sequence[Tuple[Key, torch.Tensor]],
        real: torch.Tensor,
        length: int,
        suspects: Optional[List[int]],
    ) -> None:
        """Replace the inputs after each position t and compare the outputs up to t; then,
        with sees_present True, check that the outputs depend on their own position (at the
        ``suspects`` the gradients found; everywhere without gradients, ``suspects`` None)."""
        part = "inputs at later positions replaced"
        base = self._run(self.inputs)
        others = {
            key: self._other_values(tensor, real, salt)
            for salt, (key, tensor) in enumerate(entries)
        }
        positions = torch.arange(length)
        first = 1 if self.sees_present else 0
        for t in range(length - first):
            compared = real & (positions <= t)
            if not compared.any():
                continue
            changed = self._try_run(
                self._replaced(self.inputs, others, positions >= t + first), part
            )
            if changed is None:
                return
            if _difference(self._at(changed, compared), self._at(base, compared)) is None:
                continue
            at = next(  # the first output position that changed
                s
                for s in range(t + 1)
                if _difference(
                    self._at(changed, real & (positions == s)),
                    self._at(base, real & (positions == s)),
                )
                is not None
            )
            where = real & (positions == at)
            difference = _difference(self._at(changed, where), self._at(base, where))
            culprit = self._culprit(base, entries, others, where, range(t + first, length))
            if culprit is None:
                key, leak = entries[0][0], t + first
                what = " and ".join(describe_input(key) for key, _ in entries)
                message = self._future_message(at, what, leak, "other values", suspects is not None)
                message = message.replace(f"at position {leak},", f"at positions {leak} and on,")
            else:
                key, leak = culprit
                kind = self._kind(dict(entries)[key])
                message = self._future_message(
                    at, describe_input(key), leak, kind, suspects is not None
                )
            self.fail(f"{message} The outputs at position {at}: {difference}.")
        if not self.sees_present:
            return
        part = "the inputs at each position replaced"
        for t in suspects if suspects is not None else range(1, length):
            ignores = self._ignores_present(t, base, others, real, part)
            if ignores is None:
                return
            if ignores:
                self.fail(self._present_message(t, [describe_input(key) for key, _ in entries]))

    def _culprit(
        self,
        base: torch.Tensor,
        entries: Sequence[Tuple[Key, torch.Tensor]],
        others: Dict[Key, torch.Tensor],
        where: torch.Tensor,
        candidates: Sequence[int],
    ) -> Optional[Tuple[Key, int]]:
        """The first input and position that, replaced alone, change the outputs at
        ``where`` (run only to name the culprit of a failure)."""
        length = where.shape[1]
        for position in candidates:
            for key, _ in entries:
                alone = self._replaced(
                    self.inputs, {key: others[key]}, torch.arange(length) == position
                )
                changed = self._try_run(alone, "naming the input position")
                if changed is not None and _difference(
                    self._at(changed, where), self._at(base, where)
                ):
                    return key, position
        return None

    def _ignores_present(
        self,
        t: int,
        base: torch.Tensor,
        others: Dict[Key, torch.Tensor],
        real: torch.Tensor,
        part: str,
    ) -> Optional[bool]:
        """Whether the outputs at position t stay the same when the inputs at t are replaced,
        though they change when the earlier inputs are (None: the model raised)."""
        positions = torch.arange(base.shape[self.sequence_dim])
        where = real & (positions == t)
        if t == 0 or not where.any():
            return False
        present = self._try_run(self._replaced(self.inputs, others, positions == t), part)
        if present is None:
            return None
        if _difference(self._at(present, where), self._at(base, where)) is not None:
            return False
        earlier = self._try_run(self._replaced(self.inputs, others, positions < t), part)
        if earlier is None:
            return None
        return _difference(self._at(earlier, where), self._at(base, where)) is not None

    # -- padding ---------------------------------------------------------------------------
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
            added = (
                " (a model that adds positions of its own, such as prompt tuning's virtual "
                "tokens, cannot be checked this way: check an output with the inputs' "
                "positions, or a wrapper that drops the added ones)"
                if mask.shape[1] < length
                else ""
            )
            raise self._contract_error(
                "padding_mask",
                f"has {mask.shape[1]} positions, but the checked output has {length}{added}",
            )
        real: torch.Tensor = mask != self.padded_value
        return real

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

    @check
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
        if probes:
            self._padding_by_gradient(checked, probes, padding, positional)
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
                return _difference(output[sample], base[sample])
            where = torch.zeros_like(padded)
            where[sample] = real[sample] if t is None else torch.arange(padded.shape[1]) == t
            return _difference(self._at(output, where), self._at(base, where))

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
                difference = _difference(got, expected)
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
