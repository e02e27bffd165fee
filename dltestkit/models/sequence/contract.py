"""The sequence contract: positions, and the helpers of the causality and padding checks.

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

from typing import Any, ClassVar, Collection, Dict, List, Optional, Sequence, Tuple

import torch

from ...core.compare import mismatch, summary
from ...core.messages import listed
from ...core.options import REQUIRED, UNSET, ContractError, option
from ...core.seeds import derived_seed
from ...core.validators import is_bool, is_key, is_keys, is_positive_int
from ..dependence import Dependence
from ..probes import Probe
from ..tensors import (
    Key,
    batched_entries,
    describe_input,
    input_entries,
    replace_entries,
)

__all__ = ["SEQUENCE", "SequenceContract", "output_difference", "positions_text"]

_NO_GRADIENT = (
    "No gradient shows it: that input reaches the output without a differentiable path "
    "(token ids changed before their embedding, a step without gradient). "
)


def _is_mask_key(value: Any) -> Optional[str]:
    return "is None; leave it unset instead" if value is None else is_key(value)


def _is_padded_value(value: Any) -> Optional[str]:
    if isinstance(value, (bool, int, float)):
        return None
    return f"is {value!r}, not a bool or a number"


def output_difference(actual: torch.Tensor, expected: torch.Tensor) -> Optional[str]:
    """None if ``torch.testing.assert_close`` (the dtype's default tolerances, NaN equal to
    NaN) finds the tensors equal, else how they differ, in a few words."""
    report = mismatch(actual, expected)
    return None if report is None else summary(report)


def positions_text(positions: Sequence[int]) -> str:
    return f"position {positions[0]}" if len(positions) == 1 else f"positions {list(positions)}"


#: The options both sequence checks read.
SEQUENCE = (
    "model",
    "inputs",
    "unbatched_inputs",
    "output_key",
    "cross_sample_outputs",
    "sequence_dim",
    "causal",
    "sequence_inputs",
    "padding_mask",
    "padded_value",
)


class SequenceContract(Dependence):
    """The options of the sequence checks, and what they share: positions along
    ``sequence_dim``, inputs replaced at some positions, outputs compared.

    Positions run along ``sequence_dim`` of the inputs and of the checked output (1 for
    ``(batch, seq, ...)``). Keep sequences short in tests (8 to 16 positions): the sequence
    checks back-propagate and run the model once per position.
    """

    _suite: ClassVar[str] = "SequenceModelTests"
    #: The parts skipped while a check tries a first way (a list), reported only if the
    #: second way is not taken (see Causality._causality_by_values); None: report at once.
    _held_skips: Optional[List[Tuple[str, str]]] = None

    sequence_dim: int = option(REQUIRED, is_positive_int, example="1")
    """The position dimension of the inputs and of the checked output.

    1 for `(batch, seq, ...)` and for token ids `(batch, seq)`; 2 for `(batch, channels, seq)`."""
    causal: bool = option(False, is_bool, example="True")
    """Whether the output at position t may only depend on inputs at positions up to t.

    True for language models and causal convolutions; `test_causality` skips while it is False."""
    padding_mask: Key = option(UNSET, _is_mask_key, example='"attention_mask"')
    """The index or key in self.inputs of the padding mask.

    A `(batch, seq)` tensor. Without padded positions in it, the check pads each sample itself (on
    the right; on the left for a causal model, then on the right to compare with the samples run
    alone)."""
    padded_value: Any = option(0, _is_padded_value, example="True")
    """The value of padding_mask at padded positions.

    0/False (transformers' `attention_mask`: 1 marks real tokens), or True for PyTorch's
    `key_padding_mask`, where True marks padding."""
    sequence_inputs: Collection[Key] = option(
        UNSET,
        is_keys,
        example='["decoder_input_ids"]',
        default_text="every batched input but the padding mask that has the "
        "output's number of positions at `sequence_dim`",
    )
    """The keys or indices of the inputs whose positions are the output's.

    Set it for an encoder-decoder model, whose encoder inputs are not positions of the decoder's
    output."""

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
            self._validate_mask(mask)
        if self._is_set("sequence_inputs"):
            unknown = [key for key in self.sequence_inputs if key not in keys]
            if unknown:
                raise self._contract_error(
                    "sequence_inputs",
                    f"names {unknown}, which self.inputs does not have (it has {keys})",
                )

    def _validate_mask(self, mask: torch.Tensor) -> None:
        """The padding mask has the inputs' positions, marks padding with padded_value and
        real positions with one other value (1 or 0 for a mask of 0 and 1): a mask that does
        not is a setUp problem, which the model would be blamed for (a broadcasting error,
        a model that "sees the future")."""
        dim = self.sequence_dim
        lengths = sorted(
            {
                int(tensor.shape[dim])
                for _, tensor in batched_entries(
                    self.inputs, (*self.unbatched_inputs, self.padding_mask)
                )
                if tensor.dim() > dim
            }
        )
        if lengths and mask.shape[1] not in lengths:
            raise self._contract_error(
                "padding_mask",
                f"selects a mask of {mask.shape[1]} positions, but the inputs have "
                f"{' or '.join(map(str, lengths))} at sequence_dim={dim}: it must mark each "
                "position of the inputs as real or padded",
            )
        values = torch.unique(mask.detach()).tolist()
        shown = listed([repr(value) for value in values], 5)
        padded = self.padded_value
        if isinstance(padded, bool) or padded in (0, 1):
            other = [value for value in values if value not in (0, 1)]
            if other:
                raise self._contract_error(
                    "padding_mask",
                    f"selects a mask holding values other than 0 and 1 ({shown}): "
                    f"with padded_value={padded!r} the checks read {padded!r} as padding and "
                    f"{int(not padded)} as a real position. Make it a mask of 0 and 1 (or "
                    "bool)",
                )
        elif len(values) > 2:
            raise self._contract_error(
                "padding_mask",
                f"selects a mask holding {len(values)} values ({shown}): one marks "
                f"padding (padded_value={padded!r}), one real positions",
            )
        if values and all(value == padded for value in values):
            raise self._contract_error(
                "padding_mask",
                f"selects a mask that marks every position as padding (every value is "
                f"padded_value={padded!r}): an inverted mask? Set self.padded_value to the "
                "value that marks padding (True for PyTorch's key_padding_mask, where True "
                "marks padding; 0 for transformers' attention_mask)",
            )

    def _unprobed_inputs(self) -> Collection[Key]:
        mask = (self.padding_mask,) if self._is_set("padding_mask") else ()
        return (*super()._unprobed_inputs(), *mask)

    def _padded_elements(self, tensor: torch.Tensor) -> Optional[torch.Tensor]:
        """True at the elements of a batched input that lie at padded positions: those with the
        padding mask's batch and positions (at sequence_dim)."""
        if not self._is_set("padding_mask"):
            return None
        padded = self._mask() == self.padded_value
        dim = self.sequence_dim
        if tensor.dim() <= dim or tuple(padded.shape) != (tensor.shape[0], tensor.shape[dim]):
            return None
        shape = [1] * tensor.dim()
        shape[0], shape[dim] = padded.shape
        elements: torch.Tensor = padded.reshape(shape).expand(tensor.shape)
        return elements

    # -- what the checks look at -----------------------------------------------------------
    def _sequence_probe(self, inputs: Any) -> Tuple[Any, torch.Tensor, List[Probe]]:
        """Eval-mode output, checked output and probes of self.model on ``inputs`` (``_probe``,
        which does not skip here without probes: the value comparisons need none)."""
        output, probes = self._probe(self.model, inputs, required=False)
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

    def _other_values(
        self, tensor: torch.Tensor, real: torch.Tensor, salt: int, keep_counted: bool = False
    ) -> torch.Tensor:
        """Other values, taken from the batch itself, for every position of an input (so that
        they stay in the input's domain: no log of a negative number). Token ids (integer and
        bool tensors): for every entry, another id that the batch holds at a real position,
        each one different from the id it replaces where the batch holds more than one; with
        ``keep_counted``, the ids that every sample holds equally often (_counted_ids) keep
        their places and are not drawn. Floats: for every position, the values of another
        real position of the batch (its features at sequence_dim, all of them), different
        where the batch allows."""
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
        kept = self._counted_ids(ids, real) if keep_counted else None
        if kept is not None:
            pool = pool[~torch.isin(pool, kept)]
        if pool.numel() < 2:
            return tensor.clone()
        index = torch.searchsorted(pool, ids.contiguous()).clamp(max=pool.numel() - 1)
        offset = torch.randint(1, pool.numel(), tensor.shape, generator=generator)
        others: torch.Tensor = pool[(index + offset) % pool.numel()].to(tensor.dtype)
        return others if kept is None else torch.where(torch.isin(ids, kept), tensor, others)

    def _counted_ids(self, ids: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """The ids that every sample of the batch holds equally often at its real positions
        (a multimodal model's image placeholders, a start token): ids a model may count, and
        refuse in another number (LLaVA's image features must match its placeholders)."""
        moved = ids.movedim(self.sequence_dim, 1)
        counted: Optional[torch.Tensor] = None
        for sample in range(moved.shape[0]):
            values, counts = torch.unique(moved[sample][real[sample]], return_counts=True)
            if counted is None:
                counted, times = values, counts
                continue
            common = torch.isin(counted, values)
            counted, times = counted[common], times[common]
            same = counts[torch.searchsorted(values, counted)] == times
            counted, times = counted[same], times[same]
        return counted if counted is not None else ids.new_zeros(0)

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
        subtest (or holding it in _held_skips, where that is a list), when the model raises on
        them."""
        try:
            return self._run(inputs)
        except ContractError:
            raise
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            reason = (
                f"{part}: not compared, the model raises {type(exc).__name__} on the "
                f"changed inputs ({first})"
            )
            if self._held_skips is not None:
                self._held_skips.append((part, reason))
            else:
                self._skip_part(part, reason)
            return None

    @staticmethod
    def _kind(tensor: torch.Tensor) -> str:
        return (
            "values from other positions of the batch"
            if tensor.is_floating_point()
            else "other ids of the batch"
        )

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
