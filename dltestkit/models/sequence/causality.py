"""test_causality: the output at a position depends on no later input (and on its own)."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ...core.contract import check
from ...core.options import option
from ...core.validators import is_bool
from ..dependence import GradientsRefused
from ..probes import Probe
from ..tensors import Key, describe_input, input_entries
from .contract import _NO_GRADIENT, SEQUENCE, SequenceContract, output_difference

__all__ = ["Causality"]

_FUTURE_CAUSES = (
    "Usual causes: a causal mask off by one (torch.triu(..., diagonal=1) marks the positions "
    "to hide), a convolution padded on both sides ('same' padding; pad kernel_size - 1 on "
    "the left only), a bidirectional layer (bidirectional=True, attention without a causal "
    "mask)"
)


class Causality(SequenceContract):
    """A causal model sees no future position."""

    sees_present: bool = option(True, is_bool, example="False")
    """Whether the output at position t depends on the input at position t.

    False for a model that predicts position t from earlier positions only: PixelCNN's masks (type A
    first), WaveNet's shifted input, targets shifted right inside the model (a transformers
    encoder-decoder called with `labels` only). With True, an output that depends on earlier inputs
    but not on its own position fails; with False, one that depends on its own position fails."""
    sees_previous: bool = option(True, is_bool, example="False")
    """Whether the output at position t depends on the input at position t - 1 (for a causal model).

    With True, an output that depends on other positions but not on the one before it fails (a
    causal mask shifted by one, a window of one position, a causal convolution dilated in its first
    layer); an output that depends on no input passes (a zero-initialised head). False for a model
    that reads each position alone or skips the previous one by design: then it is not required."""

    # -- causality -------------------------------------------------------------------------
    @check(reads=(*SEQUENCE, "sees_present", "sees_previous"))
    def test_causality(self) -> None:
        """Check that the output at each position depends on no input at a later position.

        Catches a causal model that sees the future: a causal mask off by one, a convolution
        padded on both sides, a bidirectional layer, inputs shifted the wrong way; names the
        first leaking pair of positions. Also an output that does not see its own position (a
        mask that hides the present), or sees it though sees_present is False, and one that
        does not see the position before it (a causal mask shifted by one, a window of one).
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
        suspects: Optional[List[int]] = None
        blind: Optional[List[int]] = None
        try:
            if probes:
                suspects, blind = self._causality_by_gradient(checked, probes, real)
        except GradientsRefused as exc:  # the values decide, at every position
            self._judged_by_values(exc, "causality was judged by values only")
        self._causality_by_values(entries, real, length, suspects, blind)

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

    def _previous_message(self, t: int, names: Sequence[str], sees: str) -> str:
        what = " or ".join(names)
        if sees == "present":
            seen = (
                f"depends on {what} at position {t}, its own position, and on no earlier "
                "position: the model reads each position alone (a window of one position)"
            )
        else:
            seen = (
                f"depends on {what} at earlier positions but not at position {t - 1}, the one "
                "before it: the model skips the previous position"
            )
        return (
            f"the output at position {t} does not depend on {what} at position {t - 1}; it "
            f"{seen}. A causal sequence model sees the position before the one it predicts "
            "for. Usual causes: a causal mask shifted by one, or built as a band of width 1 "
            "(torch.tril(m) - torch.tril(m, -1) keeps the diagonal alone), a sliding window of "
            "1, a causal convolution dilated in its first layer, inputs shifted by two "
            "positions where one is meant. If the model reads each position alone or skips "
            "the previous one by design, set self.sees_previous = False."
        )

    def _causality_by_gradient(
        self, checked: torch.Tensor, probes: Sequence[Probe], real: torch.Tensor
    ) -> Tuple[List[int], List[int]]:
        """Fail at the first output that depends on a later input (or on its own, with
        sees_present False). Returns the positions whose output shows no gradient from its
        own position (with sees_present True), and those whose output shows none from the
        position before it (with sees_previous True), for the values to decide."""
        dim = self.sequence_dim
        length = checked.shape[dim]
        first = 1 if self.sees_present else 0  # inputs from t + first on must not matter
        weights = self._weights([checked])[0]
        suspects, blind = [], []
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
            if (
                self.sees_previous
                and t > 0
                and bool((rows & real[:, t - 1]).any())
                and not any(bool(where[t - 1]) for where in per_position)
            ):
                blind.append(t)
        return suspects, blind

    def _changes_within_a_sample(
        self,
        base: torch.Tensor,
        others: Dict[Key, torch.Tensor],
        compared: torch.Tensor,
        start: int,
        part: str,
    ) -> Optional[bool]:
        """Whether replacing the inputs of one sample at a time, from position ``start`` on,
        changes that sample's own ``compared`` outputs (a (batch, seq) bool); None where the
        model raises on the inputs so changed (the part is then reported as skipped)."""
        later = torch.arange(compared.shape[1]) >= start
        samples = torch.arange(compared.shape[0])[:, None]
        for sample in range(compared.shape[0]):
            if not compared[sample].any():
                continue
            alone = (samples == sample) & later
            changed = self._try_run(self._replaced(self.inputs, others, alone), part)
            if changed is None:
                return None
            own = compared & (samples == sample)
            if output_difference(self._at(changed, own), self._at(base, own)) is not None:
                return True
        return False

    def _causality_by_values(
        self,
        entries: Sequence[Tuple[Key, torch.Tensor]],
        real: torch.Tensor,
        length: int,
        suspects: Optional[List[int]],
        blind: Optional[List[int]],
    ) -> None:
        """Replace the inputs after each position t and compare the outputs up to t; then,
        with sees_present True, check that the outputs depend on their own position (at the
        ``suspects`` the gradients found; everywhere without gradients, ``suspects`` None),
        and with sees_previous True, on the position before (at the ``blind`` positions the
        gradients found; everywhere without gradients).

        Where the model raises on some replaced inputs (a multimodal model given another
        number of image placeholders), it is judged again with the ids that every sample
        holds equally often kept in their places, if that changes anything: the positions
        they hold are then not judged."""
        base = self._run(self.inputs)

        def drawn(keep_counted: bool) -> Dict[Key, torch.Tensor]:
            return {
                key: self._other_values(tensor, real, salt, keep_counted)
                for salt, (key, tensor) in enumerate(entries)
            }

        others = drawn(False)
        self._held_skips = []
        try:
            self._compare_replaced(base, entries, others, real, length, suspects, blind)
        finally:
            held, self._held_skips = self._held_skips, None
        if not held:
            return
        kept = drawn(True)
        if any(not torch.equal(kept[key], others[key]) for key in others):
            self._compare_replaced(base, entries, kept, real, length, suspects, blind)
        else:
            self._skip_part(*held[0])

    def _compare_replaced(
        self,
        base: torch.Tensor,
        entries: Sequence[Tuple[Key, torch.Tensor]],
        others: Dict[Key, torch.Tensor],
        real: torch.Tensor,
        length: int,
        suspects: Optional[List[int]],
        blind: Optional[List[int]],
    ) -> None:
        """_causality_by_values with the other values ``others``; it stops at the first
        replaced inputs that the model raises on."""
        part = "inputs at later positions replaced"
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
            if output_difference(self._at(changed, compared), self._at(base, compared)) is None:
                continue
            within = self._changes_within_a_sample(base, others, compared, t + first, part)
            if within is None:
                return
            if not within:
                # each sample's own outputs keep still when only its later inputs change: the
                # change crosses samples (an input read by other samples when it changes, as
                # BLIP-2 fills its image placeholders across the batch), which is no leak from
                # the future; test_batch_independence judges the batch on the real inputs
                continue
            at = next(  # the first output position that changed
                s
                for s in range(t + 1)
                if output_difference(
                    self._at(changed, real & (positions == s)),
                    self._at(base, real & (positions == s)),
                )
                is not None
            )
            where = real & (positions == at)
            difference = output_difference(self._at(changed, where), self._at(base, where))
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
        names = [describe_input(key) for key, _ in entries]
        part = "the inputs at each position replaced"
        replaceable = self._replaced_at(others, length)  # (positions kept are not judged)
        if self.sees_present:
            for t in suspects if suspects is not None else range(1, length):
                ignores = self._ignores_present(t, base, others, real & replaceable, part)
                if ignores is None:
                    return
                if ignores:
                    self.fail(self._present_message(t, names))
        if self.sees_previous:
            alone = None  # the first position whose output sees its own input only
            for t in blind if blind is not None else range(1, length):
                sees = self._sees_before(t, base, others, real, replaceable, part)
                if sees is None:
                    return
                if sees == "earlier":  # the more telling case: fail at once
                    self.fail(self._previous_message(t, names, sees))
                if sees == "present" and alone is None:
                    alone = t
            if alone is not None:
                self.fail(self._previous_message(alone, names, "present"))

    def _replaced_at(self, others: Dict[Key, torch.Tensor], length: int) -> torch.Tensor:
        """(batch, length): True at the positions where some input has another value."""
        changed = torch.zeros(self._batch_size(), length, dtype=torch.bool)
        for key, tensor in input_entries(self.inputs):
            if key in others:
                differs = (others[key] != tensor).movedim(self.sequence_dim, 1)
                changed |= differs.reshape(*differs.shape[:2], -1).any(dim=2)
        return changed

    def _sees_before(
        self,
        t: int,
        base: torch.Tensor,
        others: Dict[Key, torch.Tensor],
        real: torch.Tensor,
        replaceable: torch.Tensor,
        part: str,
    ) -> Optional[str]:
        """Whether the outputs at position t stay the same when the inputs at t - 1 are
        replaced: "" if they change (or cannot be judged: t - 1 padded, or kept as it is in
        ``others``, where t is real),
        "earlier" if they change with the inputs before t - 1, "present" if only with the
        input at t, "" if with none (an output that depends on no input); None when the
        model raised."""
        positions = torch.arange(base.shape[self.sequence_dim])
        rows = real[:, t] & real[:, t - 1] & replaceable[:, t - 1]
        where = rows[:, None] & (positions == t)
        if not where.any():
            return ""
        for replaced, verdict in (
            (positions == t - 1, ""),
            (positions < t - 1, "earlier"),
            (positions == t, "present"),
        ):
            if verdict == "earlier" and t < 2:
                continue
            changed = self._try_run(self._replaced(self.inputs, others, replaced), part)
            if changed is None:
                return None
            if output_difference(self._at(changed, where), self._at(base, where)) is not None:
                return verdict
        return ""

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
                if changed is not None and output_difference(
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
        if output_difference(self._at(present, where), self._at(base, where)) is not None:
            return False
        earlier = self._try_run(self._replaced(self.inputs, others, positions < t), part)
        if earlier is None:
            return None
        return output_difference(self._at(earlier, where), self._at(base, where)) is not None
