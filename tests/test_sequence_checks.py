"""SequenceModelTests: causality and padding invariance, on correct and broken sequence models."""

from __future__ import annotations

import math
import unittest
from types import SimpleNamespace
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from checkrunner import CheckTestCase, make_case, run_check
from torch import nn

from dltestkit import ModelTests, SequenceModelTests
from dltestkit.core.contract import checks_of

BATCH, LENGTH, VOCAB, WIDTH = 4, 6, 20, 8


class Attention(nn.Module):
    """Token ids -> (batch, seq, width) through one self-attention layer, masked the
    transformers way: ``attention_mask`` is 1 for real tokens and 0 for padding."""

    def __init__(self, causal: bool = False) -> None:
        super().__init__()
        self.causal = causal
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.out = nn.Linear(WIDTH, WIDTH)

    def hidden_positions(self, length: int, device: torch.device) -> torch.Tensor:
        """True where key j is hidden from query i (i, j)."""
        return torch.triu(torch.ones(length, length, dtype=torch.bool, device=device), diagonal=1)

    def keep(self, attention_mask: torch.Tensor) -> torch.Tensor:
        return attention_mask.bool()

    def fill(self, scores: torch.Tensor) -> float:
        """The score of a hidden position."""
        return float("-inf")

    def forward(
        self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        x = self.embed(input_ids)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        scores = q @ k.transpose(1, 2) / math.sqrt(WIDTH)
        if self.causal:
            hidden = self.hidden_positions(x.shape[1], x.device)
            scores = scores.masked_fill(hidden, self.fill(scores))
        if attention_mask is not None:
            scores = scores.masked_fill(~self.keep(attention_mask)[:, None, :], self.fill(scores))
        return self.out(torch.softmax(scores, dim=-1) @ v)


class CausalConv(nn.Module):
    """(batch, channels, seq) -> same, padded on the left only."""

    def __init__(self, same_padding: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 3, kernel_size=3, padding="same" if same_padding else 0)
        self.same_padding = same_padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x if self.same_padding else F.pad(x, (2, 0)))


class MaskedMeanPool(nn.Module):
    """(batch, seq, features) and a mask -> (batch, 3): mean over the real positions."""

    def __init__(self, over_padding: bool = False) -> None:
        super().__init__()
        self.linear = nn.Linear(5, 3)
        self.over_padding = over_padding

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.linear(features)
        if self.over_padding:
            return hidden.mean(dim=1)
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1)


# -- one bug each ------------------------------------------------------------------------
class OffByOneCausalMask(Attention):
    def hidden_positions(self, length: int, device: torch.device) -> torch.Tensor:
        return torch.triu(torch.ones(length, length, dtype=torch.bool, device=device), diagonal=2)


class MaskAcceptedNotApplied(Attention):
    def forward(
        self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        return super().forward(input_ids)  # the mask is dropped on the way


class ConvolvesOverPadding(Attention):
    """Attention masked as it should be, then a convolution over the positions that reads
    the padded ones (as transformers' ConvBERT's span convolution does)."""

    def __init__(self, zero_padding_first: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv1d(WIDTH, WIDTH, 3, padding=1)
        self.zero_padding_first = zero_padding_first

    def forward(
        self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        hidden = super().forward(input_ids, attention_mask)
        if self.zero_padding_first and attention_mask is not None:
            hidden = hidden * attention_mask.unsqueeze(-1).to(hidden.dtype)
        return hidden + self.conv(hidden.transpose(1, 2)).transpose(1, 2)


class InvertedMask(Attention):
    def keep(self, attention_mask: torch.Tensor) -> torch.Tensor:
        return attention_mask == 0  # treats 1 as padding


class HidesThePresent(Attention):
    """triu(diagonal=0): position t attends to earlier positions only, not to itself."""

    def hidden_positions(self, length: int, device: torch.device) -> torch.Tensor:
        return torch.triu(torch.ones(length, length, dtype=torch.bool, device=device), diagonal=0)


class SeqFirstLM(nn.Module):
    """A correct LSTM language model run sequence-first, as PyTorch's word_language_model
    example, that clamps its ids first: the embedding sees a new tensor, which no probe can
    follow, so the sequence checks compare values only."""

    def __init__(self, shift: int = 0) -> None:
        super().__init__()
        self.shift = shift
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.lstm = nn.LSTM(WIDTH, WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.shift < 0:  # the wrong way: position t is given the token at t + 1
            ids = torch.roll(ids, -1, dims=1)
        elif self.shift > 0:  # right, behind a start token: position t sees tokens before t
            ids = torch.cat([torch.zeros_like(ids[:, :1]), ids[:, :-1]], dim=1)
        hidden, _ = self.lstm(self.embed(ids.clamp(0, VOCAB - 1).t()))
        return self.head(hidden).transpose(0, 1)


class PositionsLM(Attention):
    """Causal attention with learned absolute positions, counted from column 0
    (torch.arange) or, with ``from_mask``, from each sample's first real token."""

    def __init__(self, from_mask: bool = False) -> None:
        super().__init__(causal=True)
        self.from_mask = from_mask
        self.positions = nn.Embedding(16, WIDTH)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        assert attention_mask is not None
        if self.from_mask:
            positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        else:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.embed(input_ids) + self.positions(positions)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        scores = q @ k.transpose(1, 2) / math.sqrt(WIDTH)
        hidden = self.hidden_positions(x.shape[1], x.device)
        scores = scores.masked_fill(hidden, torch.finfo(scores.dtype).min)
        scores = scores.masked_fill(
            ~attention_mask.bool()[:, None, :], torch.finfo(scores.dtype).min
        )
        return self.out(torch.softmax(scores, dim=-1) @ v)


def token_inputs(padding: bool = True) -> Dict[str, torch.Tensor]:
    mask = torch.ones(BATCH, LENGTH, dtype=torch.long)
    if padding:
        mask[0, -2:] = 0
        mask[2, -1:] = 0
    return {"input_ids": torch.randint(0, VOCAB, (BATCH, LENGTH)), "attention_mask": mask}


def sequence_case(model_type: Any, inputs: Any = token_inputs, **attributes: Any) -> type:
    def set_up(self: Any) -> None:
        self.model = model_type()
        self.inputs = inputs()
        self.sequence_dim = 1
        for name, value in attributes.items():
            setattr(self, name, value)

    return make_case(SequenceModelTests, set_up)


def causal_lm(**attributes: Any) -> type:
    return sequence_case(lambda: Attention(causal=True), causal=True, **attributes)


class Checks(CheckTestCase):
    def test_every_model_check_is_included(self) -> None:
        names = sorted(checks_of(sequence_case(Attention)))
        self.assertIn("test_batch_independence", names)
        model_checks = unittest.TestLoader().getTestCaseNames(ModelTests)
        self.assertEqual(
            names, sorted([*model_checks, "test_causality", "test_padding_invariance"])
        )
        self.assertEqual(unittest.TestLoader().getTestCaseNames(sequence_case(Attention)), names)

    def test_correct_sequence_models_pass_every_check(self) -> None:
        cases = {
            "bidirectional attention": sequence_case(
                Attention, padding_mask="attention_mask", expected_output_shape=(4, 6, 8)
            ),
            "causal attention": causal_lm(
                padding_mask="attention_mask", expected_output_shape=(4, 6, 8)
            ),
            "causal convolution": sequence_case(
                CausalConv,
                causal=True,
                sequence_dim=2,
                inputs=lambda: torch.randn(BATCH, 3, LENGTH),
            ),
            "masked mean pooling": sequence_case(
                MaskedMeanPool,
                padding_mask=1,
                expected_output_shape=(4, 3),
                inputs=lambda: (torch.randn(BATCH, LENGTH, 5), token_inputs()["attention_mask"]),
            ),
        }
        for label, case in cases.items():
            for name in checks_of(case):
                with self.subTest(label, check=name):
                    if name in _RUNS[label]:
                        self.assertPasses(case, name)
                    else:
                        self.assertSkipsWith(case, name)


_ALL_MODEL = {
    "test_output_shape",
    "test_device_moving",
    "test_batch_independence",
    "test_all_parameters_updated",
    "test_finite_outputs_and_gradients",
    "test_eval_deterministic",
    "test_dtype_moving",
    "test_device_moving_on_gpu",
    "test_train_matches_eval",
    "test_all_inputs_used",
    "test_inputs_unchanged",
}  # test_running_statistics skips: no BatchNorm
_RUNS = {  # the checks that run (the others skip: no make_model, causal False, no mask)
    "bidirectional attention": _ALL_MODEL | {"test_padding_invariance"},
    "causal attention": _ALL_MODEL | {"test_padding_invariance", "test_causality"},
    "causal convolution": _ALL_MODEL | {"test_causality"},
    "masked mean pooling": _ALL_MODEL | {"test_padding_invariance"},
}


class Causality(CheckTestCase):
    def test_a_causal_mask_off_by_one_fails_naming_the_first_leak(self) -> None:
        self.assertFailsWith(
            sequence_case(lambda: OffByOneCausalMask(causal=True), causal=True),
            "test_causality",
            "the output at position 0 depends on "
            "self.inputs['input_ids'] (through its embedding) at position 1, a "
            "later position: the model sees the future",
            "diagonal=1",
        )

    def test_a_same_padded_convolution_fails(self) -> None:
        self.assertFailsWith(
            sequence_case(
                lambda: CausalConv(same_padding=True),
                causal=True,
                sequence_dim=2,
                inputs=lambda: torch.randn(BATCH, 3, LENGTH),
            ),
            "test_causality",
            "the output at position 0 depends on self.inputs at position 1",
            "pad kernel_size - 1 on the left only",
        )

    def test_a_bidirectional_layer_fails(self) -> None:
        class BiGRU(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.gru = nn.GRU(5, 4, batch_first=True, bidirectional=True)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.gru(x)[0]

        self.assertFailsWith(
            sequence_case(BiGRU, causal=True, inputs=lambda: torch.randn(BATCH, LENGTH, 5)),
            "test_causality",
            "at position 0 depends on self.inputs at position 1",
            "bidirectional=True",
        )

    def test_outputs_at_padded_positions_are_not_checked(self) -> None:
        class FullyMaskedRowsAttendEverywhere(Attention):
            """With left padding and a finite fill value, a padded query that sees no real key
            attends uniformly to every position, the future included: harmless, never used."""

            def fill(self, scores: torch.Tensor) -> float:
                return torch.finfo(scores.dtype).min

        def left_padded() -> Dict[str, torch.Tensor]:
            inputs = token_inputs(padding=False)
            inputs["attention_mask"][0, :3] = 0
            return inputs

        case = sequence_case(
            lambda: FullyMaskedRowsAttendEverywhere(causal=True),
            left_padded,
            causal=True,
            padding_mask="attention_mask",
        )
        self.assertPasses(case, "test_causality")
        self.assertPasses(case, "test_padding_invariance")

    def test_it_skips_for_a_model_not_declared_causal(self) -> None:
        self.assertSkipsWith(
            sequence_case(Attention), "test_causality", "self.causal is False; set causal = True"
        )

    def test_every_position_is_checked_not_only_the_first(self) -> None:
        class LastSeesPastTheEnd(CausalConv):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                out = super().forward(x)
                return torch.cat([out[..., :3], out[..., 3:4] + x[..., 5:6], out[..., 4:]], -1)

        self.assertFailsWith(
            sequence_case(
                LastSeesPastTheEnd,
                causal=True,
                sequence_dim=2,
                inputs=lambda: torch.randn(BATCH, 3, LENGTH),
            ),
            "test_causality",
            "the output at position 3 depends on self.inputs at position 5",
        )


class CausalityByValues(CheckTestCase):
    """Inputs replaced after each position: no gradient needed."""

    def test_token_ids_that_reach_no_embedding_directly_are_compared_by_values(self) -> None:
        def ids() -> torch.Tensor:
            return token_inputs()["input_ids"]

        self.assertPasses(sequence_case(SeqFirstLM, ids, causal=True), "test_causality")
        self.assertFailsWith(
            sequence_case(lambda: SeqFirstLM(shift=-1), ids, causal=True),
            "test_causality",
            "the output at position 0 changes when self.inputs at position 1, a later "
            "position, is replaced by other ids of the batch: the model sees the future",
            "torch.roll(ids, -1, dims=1) gives position t the token at t + 1",
            "The outputs at position 0: ",
        )

    def test_a_leak_beside_the_gradients_is_found_by_values(self) -> None:
        class NextTokenThroughACopy(Attention):
            def forward(
                self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None
            ) -> torch.Tensor:
                out = super().forward(input_ids, attention_mask)
                return out + self.embed(torch.roll(input_ids, -1, dims=1))  # the next token

        self.assertFailsWith(
            sequence_case(lambda: NextTokenThroughACopy(causal=True), causal=True),
            "test_causality",
            "the output at position 0 changes when self.inputs['input_ids'] at position 1, "
            "a later position, is replaced by other ids of the batch",
            "No gradient shows it",
        )

    def test_float_inputs_are_replaced_by_values_of_the_batch(self) -> None:
        class LogMagnitudes(nn.Module):
            """Causal attention over the log of positive features (a spectrogram): noise
            there would give NaN, which a masked attention weight of 0 spreads back."""

            def __init__(self) -> None:
                super().__init__()
                self.causal = Attention(causal=True)
                self.qkv = nn.Linear(5, 3 * WIDTH)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                q, k, v = self.qkv(torch.log(x)).chunk(3, dim=-1)
                hidden = self.causal.hidden_positions(x.shape[1], x.device)
                scores = (q @ k.transpose(1, 2)).masked_fill(hidden, float("-inf"))
                return torch.softmax(scores, dim=-1) @ v

        self.assertPasses(
            sequence_case(
                LogMagnitudes, lambda: torch.rand(BATCH, LENGTH, 5) * 0.5 + 0.02, causal=True
            ),
            "test_causality",
        )

    def test_ids_read_by_other_samples_when_they_change_are_no_leak(self) -> None:
        # BLIP-2: ids replaced at later positions (an image placeholder made text, text made
        # a placeholder) shift which image features the next samples' placeholders get
        for name in ("test_causality", "test_batch_independence"):
            self.assertPasses(
                sequence_case(
                    Placeholders, with_images, causal=True, sequence_inputs=["input_ids"]
                ),
                name,
            )
        self.assertFailsWith(
            sequence_case(
                lambda: Placeholders(peeks=True),
                with_images,
                causal=True,
                sequence_inputs=["input_ids"],
            ),
            "test_causality",
            "the output at position 0 changes when self.inputs['input_ids'] at position 1, a "
            "later position, is replaced by other ids of the batch",
            "No gradient shows it",
        )

    def test_ids_counted_by_the_model_keep_their_places_when_it_refuses_another_count(
        self,
    ) -> None:
        # LLaVA: other ids at later positions may change the number of image placeholders,
        # which the model refuses; the placeholders, held equally often by every sample, then
        # keep their places and the other ids are compared
        def model(peeks: bool) -> Placeholders:
            return Placeholders(peeks=peeks, counts=True)

        case = sequence_case(
            lambda: model(False), with_images, causal=True, sequence_inputs=["input_ids"]
        )
        self.assertPasses(case, "test_causality")  # compared: no part skipped
        self.assertFailsWith(
            sequence_case(
                lambda: model(True), with_images, causal=True, sequence_inputs=["input_ids"]
            ),
            "test_causality",
            "the output at position 2 changes when self.inputs['input_ids'] at position 3, a "
            "later position, is replaced by other ids of the batch",
        )

    def test_a_model_that_refuses_every_replacement_is_a_skipped_part(self) -> None:
        class RefusesOtherIds(Placeholders):
            def forward(self, input_ids: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
                if not torch.equal(input_ids[:, 3:].sort(dim=1).values, self.text):
                    raise ValueError("unknown tokens")
                return super().forward(input_ids, images)

        inputs = with_images()

        def refusing() -> Placeholders:
            model = RefusesOtherIds()
            model.text = inputs["input_ids"][:, 3:].sort(dim=1).values
            return model

        self.assertSkipsWith(
            sequence_case(refusing, lambda: inputs, causal=True, sequence_inputs=["input_ids"]),
            "test_causality",
            "inputs at later positions replaced: not compared, the model raises ValueError on "
            "the changed inputs (unknown tokens)",
        )

    def test_a_float_input_that_leaks_without_a_gradient_is_found(self) -> None:
        class PeeksWithoutGradient(CausalConv):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return super().forward(x) + x.roll(-1, dims=-1).detach()

        self.assertFailsWith(
            sequence_case(
                PeeksWithoutGradient,
                causal=True,
                sequence_dim=2,
                inputs=lambda: torch.randn(BATCH, 3, LENGTH),
            ),
            "test_causality",
            "the output at position 0 changes when self.inputs at position 1, a later "
            "position, is replaced by values from other positions of the batch",
        )


class Placeholders(nn.Module):
    """Fills the placeholder ids (0) of the whole batch, in the order the batch holds them, with
    the features of each sample's image, as BLIP-2 fills its image placeholders
    (masked_scatter), then reads the tokens with a GRU; ``peeks``: and adds the next token's
    embedding to each, a leak that only values show; ``counts``: and refuses a sample without
    exactly 3 placeholders, as LLaVA refuses image features that its placeholders do not match."""

    def __init__(self, peeks: bool = False, counts: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.image = nn.Linear(5, 3 * WIDTH)
        self.rnn = nn.GRU(WIDTH, WIDTH, batch_first=True)
        self.out = nn.Linear(WIDTH, 4)
        self.peeks = peeks
        self.counts = counts

    def forward(self, input_ids: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        placeholders = input_ids == 0
        if self.counts and not bool((placeholders.sum(dim=1) == 3).all()):
            raise ValueError("Image features and image tokens do not match")
        features = self.image(images).reshape(-1, WIDTH)  # 3 per sample
        missing = int(placeholders.sum()) - features.shape[0]  # (other ids: more or fewer)
        features = torch.cat([features, features.new_zeros(max(missing, 0), WIDTH)])
        tokens = self.embed(input_ids).masked_scatter(placeholders[..., None], features)
        out = self.out(self.rnn(tokens)[0])
        if self.peeks:
            out = out + self.embed(torch.roll(input_ids, -1, dims=1))[..., :4]
        return out


def with_images() -> Dict[str, torch.Tensor]:
    ids = torch.randint(1, VOCAB, (BATCH, LENGTH))
    ids[:, :3] = 0  # each sample's 3 image placeholders, then its text
    return {"input_ids": ids, "images": torch.randn(BATCH, 5)}


class SeesPresent(CheckTestCase):
    """The output at position t depends on the input at t (sees_present True, the default),
    or must not (False)."""

    def test_a_causal_mask_that_hides_the_present_fails(self) -> None:
        self.assertFailsWith(
            sequence_case(
                lambda: HidesThePresent(causal=True), causal=True, padding_mask="attention_mask"
            ),
            "test_causality",
            "the output at position 1 does not depend on self.inputs['input_ids'] at "
            "position 1, its own position, though it depends on earlier positions",
            "torch.triu(..., diagonal=0) where diagonal=1 is meant",
            "set self.sees_present = False",
        )

    def test_a_strictly_causal_model_sets_sees_present_false(self) -> None:
        class Shifted(CausalConv):
            """WaveNet's first layer: the output at t from the inputs before t."""

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.conv(F.pad(x, (3, 0))[..., :-1])

        def inputs() -> torch.Tensor:
            return torch.randn(BATCH, 3, LENGTH)

        self.assertPasses(
            sequence_case(Shifted, inputs, causal=True, sequence_dim=2, sees_present=False),
            "test_causality",
        )
        self.assertFailsWith(
            sequence_case(Shifted, inputs, causal=True, sequence_dim=2),
            "test_causality",
            "the output at position 1 does not depend on self.inputs at position 1",
            "WaveNet's shifted input",
        )
        # the present let through where it must not be (PixelCNN's mask B for mask A)
        self.assertFailsWith(
            sequence_case(CausalConv, inputs, causal=True, sequence_dim=2, sees_present=False),
            "test_causality",
            "the output at position 0 depends on self.inputs at position 0, its own "
            "position, but self.sees_present is False",
            "PixelCNN's mask B in the first layer",
        )

    def test_without_gradients_the_present_is_checked_by_values(self) -> None:
        def ids() -> torch.Tensor:
            return token_inputs()["input_ids"]

        shifted = sequence_case(lambda: SeqFirstLM(shift=1), ids, causal=True)
        self.assertFailsWith(
            shifted,
            "test_causality",
            "the output at position 1 does not depend on self.inputs at position 1, its own "
            "position",
        )
        self.assertPasses(
            sequence_case(lambda: SeqFirstLM(shift=1), ids, causal=True, sees_present=False),
            "test_causality",
        )
        self.assertFailsWith(
            sequence_case(SeqFirstLM, ids, causal=True, sees_present=False),
            "test_causality",
            "the output at position 0 changes when self.inputs at position 0, its own "
            "position, is replaced by other ids of the batch, but self.sees_present is False",
        )

    def test_an_output_that_depends_on_nothing_yet_passes(self) -> None:
        def zero_initialised() -> nn.Module:  # its output starts constant
            model = CausalConv()
            nn.init.zeros_(model.conv.weight)
            return model

        self.assertPasses(
            sequence_case(
                zero_initialised,
                causal=True,
                sequence_dim=2,
                inputs=lambda: torch.randn(BATCH, 3, LENGTH),
            ),
            "test_causality",
        )


class PaddingInvariance(CheckTestCase):
    def test_a_mask_accepted_but_not_applied_fails(self) -> None:
        self.assertFailsWith(
            sequence_case(MaskAcceptedNotApplied, padding_mask="attention_mask"),
            "test_padding_invariance",
            "sample 0: its output at real position 0 "
            "depends on self.inputs['input_ids'] (through its embedding) at "
            "padded positions [4, 5]: padding leaks into the real positions",
            "accepted but not applied",
        )

    def test_pooling_over_padding_fails(self) -> None:
        case = sequence_case(
            lambda: MaskedMeanPool(over_padding=True),
            padding_mask=1,
            inputs=lambda: (torch.randn(BATCH, LENGTH, 5), token_inputs()["attention_mask"]),
        )
        self.assertFailsWith(
            case,
            "test_padding_invariance",
            "sample 0: its output depends on self.inputs[0] at padded positions [4, 5]",
            "pooling",
        )

    def test_a_convolution_that_reads_the_padded_positions_fails(self) -> None:
        self.assertFailsWith(
            sequence_case(ConvolvesOverPadding, padding_mask="attention_mask"),
            "test_padding_invariance",
            "sample 0: its output at real position 3 depends on self.inputs['input_ids'] "
            "(through its embedding) at padded positions [4]",
            "a convolution or a recurrence over the positions that reads the padded ones "
            "(zero them first; a causal model never reads right padding)",
        )
        self.assertPasses(
            sequence_case(
                lambda: ConvolvesOverPadding(zero_padding_first=True),
                padding_mask="attention_mask",
            ),
            "test_padding_invariance",
        )

    def test_a_model_that_raises_says_how_it_was_called(self) -> None:
        class Raises(Attention):
            def forward(
                self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None
            ) -> torch.Tensor:
                raise ValueError("the mask does not fit")

        for name in ("test_padding_invariance", "test_causality"):
            with self.subTest(name):
                outcome = run_check(
                    sequence_case(Raises, padding_mask="attention_mask", causal=True), name
                )
                self.assertEqual(len(outcome.errors), 1, outcome.failures)
                self.assertIn("ValueError: the mask does not fit", outcome.errors[0])
                self.assertIn(
                    "[dltestkit] raised by the model in eval mode, called as model(**inputs)",
                    outcome.errors[0],
                )

    def test_an_inverted_mask_fails(self) -> None:
        self.assertFailsWith(
            sequence_case(InvertedMask, padding_mask="attention_mask"),
            "test_padding_invariance",
            "padding leaks into the real positions",
            "inverted meaning",
        )

    def test_without_padding_in_the_inputs_the_check_pads_itself(self) -> None:
        def unpadded() -> Dict[str, torch.Tensor]:
            return token_inputs(padding=False)

        self.assertPasses(
            sequence_case(Attention, unpadded, padding_mask="attention_mask"),
            "test_padding_invariance",
        )
        self.assertFailsWith(
            sequence_case(MaskAcceptedNotApplied, unpadded, padding_mask="attention_mask"),
            "test_padding_invariance",
            "sample 0: its output at real position 0 "
            "depends on self.inputs['input_ids'] (through its embedding) at "
            "padded positions [5]",
        )
        # a causal model is padded on the left, where padding could leak into it
        self.assertFailsWith(
            sequence_case(
                lambda: MaskAcceptedNotApplied(causal=True),
                unpadded,
                causal=True,
                padding_mask="attention_mask",
            ),
            "test_padding_invariance",
            "at padded positions [0]",
        )

    def test_a_mask_where_true_marks_padding_is_declared_with_padded_value(self) -> None:
        def encoder() -> nn.Module:
            return nn.TransformerEncoder(
                nn.TransformerEncoderLayer(8, 2, 16, batch_first=True),
                1,
                enable_nested_tensor=False,
            )

        def inputs() -> Dict[str, torch.Tensor]:
            return {
                "src": torch.randn(BATCH, LENGTH, 8),
                "src_key_padding_mask": token_inputs()["attention_mask"] == 0,
            }

        case = sequence_case(
            encoder, inputs, padding_mask="src_key_padding_mask", padded_value=True
        )
        self.assertPasses(case, "test_padding_invariance")
        wrong = sequence_case(encoder, inputs, padding_mask="src_key_padding_mask")
        self.assertFailsWith(wrong, "test_padding_invariance", "set self.padded_value = True")

    def test_positions_counted_from_column_zero_fail_with_left_padding(self) -> None:
        def left_padded() -> Dict[str, torch.Tensor]:
            inputs = token_inputs(padding=False)
            inputs["attention_mask"][0, :3] = 0
            return inputs

        self.assertFailsWith(
            sequence_case(PositionsLM, left_padded, causal=True, padding_mask="attention_mask"),
            "test_padding_invariance",
            "sample 0: its outputs at its real positions [3, 4, 5] change with the padding: "
            "run alone without its padding (3 positions, a batch of 1, the mask all real) it "
            "gives other outputs",
            "The padding is on the left",
            "Pass position_ids computed from the mask",
        )
        self.assertPasses(
            sequence_case(
                lambda: PositionsLM(from_mask=True),
                left_padded,
                causal=True,
                padding_mask="attention_mask",
            ),
            "test_padding_invariance",
        )

    def test_in_bfloat16_positions_from_column_zero_still_fail_and_correct_ones_pass(
        self,
    ) -> None:
        # half precision compares with an absolute tolerance scaled to the largest output:
        # rounding that differs with the length passes, a shifted position does not
        def left_padded() -> Dict[str, torch.Tensor]:
            inputs = token_inputs(padding=False)
            inputs["attention_mask"][0, :3] = 0
            return inputs

        def case(from_mask: bool) -> type:
            return sequence_case(
                lambda: PositionsLM(from_mask=from_mask).to(torch.bfloat16),
                left_padded,
                causal=True,
                padding_mask="attention_mask",
            )

        self.assertFailsWith(
            case(from_mask=False),
            "test_padding_invariance",
            "sample 0: its outputs at its real positions [3, 4, 5] change with the padding",
            "The padding is on the left",
        )
        self.assertPasses(case(from_mask=True), "test_padding_invariance")

    def test_padding_made_by_the_check_is_compared_on_the_right_for_a_causal_model(self) -> None:
        # on the left to find leaks (a causal model's padding can only leak there), on the right
        # to compare with each sample alone: the user did not say where the padding goes
        self.assertPasses(
            sequence_case(
                PositionsLM,
                lambda: token_inputs(padding=False),
                causal=True,
                padding_mask="attention_mask",
            ),
            "test_padding_invariance",
        )

    def test_a_mean_over_the_padded_length_fails(self) -> None:
        class MeanOverThePaddedLength(MaskedMeanPool):
            def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
                return (self.linear(features) * mask.unsqueeze(-1)).mean(dim=1)

        self.assertFailsWith(
            sequence_case(
                MeanOverThePaddedLength,
                padding_mask=1,
                inputs=lambda: (torch.randn(BATCH, LENGTH, 5), token_inputs()["attention_mask"]),
            ),
            "test_padding_invariance",
            "sample 0: its output changes with the padding: run alone without its padding (4 "
            "positions, a batch of 1, the mask all real) it gives other outputs",
            "(h * mask).mean(1) instead of (h * mask).sum(1) / mask.sum(1)",
        )

    def test_padding_that_leaks_without_a_gradient_is_found_by_values(self) -> None:
        class ClampedIdsMaskDropped(Attention):
            def forward(
                self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None
            ) -> torch.Tensor:
                return super().forward(input_ids.clamp(0, VOCAB - 1))  # a copy; mask dropped

        self.assertFailsWith(
            sequence_case(ClampedIdsMaskDropped, padding_mask="attention_mask"),
            "test_padding_invariance",
            "sample 0: its output at real position 0 changes when self.inputs['input_ids'] at "
            "its padded positions [4, 5] is replaced by other ids of the batch: padding leaks "
            "into the real positions",
        )

        class SummaryOverEveryPosition(Attention):
            def forward(
                self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None
            ) -> torch.Tensor:
                out = super().forward(input_ids, attention_mask)
                return out + self.embed(input_ids.clamp(0, VOCAB - 1)).mean(1, keepdim=True)

        self.assertFailsWith(
            sequence_case(SummaryOverEveryPosition, padding_mask="attention_mask"),
            "test_padding_invariance",
            "is replaced by other ids of the batch",
            "No gradient shows it",
        )

    def test_an_embedding_bag_is_compared_by_values(self) -> None:
        class Bag(nn.Module):
            def __init__(self, weighted: bool = True) -> None:
                super().__init__()
                self.bag = nn.EmbeddingBag(VOCAB, WIDTH, mode="sum")
                self.weighted = weighted

            def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
                weights = attention_mask.to(torch.float32) if self.weighted else None
                return self.bag(input_ids, per_sample_weights=weights)

        self.assertPasses(
            sequence_case(Bag, padding_mask="attention_mask"), "test_padding_invariance"
        )
        self.assertFailsWith(
            sequence_case(lambda: Bag(weighted=False), padding_mask="attention_mask"),
            "test_padding_invariance",
            "sample 0: its output changes when self.inputs['input_ids'] at its padded "
            "positions [4, 5] is replaced by other ids of the batch",
        )

    def test_a_model_for_one_length_is_compared_with_its_padding_replaced_only(self) -> None:
        class Flattened(nn.Module):
            """Scores from the features of every position at once: one length only."""

            def __init__(self) -> None:
                super().__init__()
                self.embed = nn.Embedding(VOCAB, 4)
                self.head = nn.Linear(LENGTH * 4, 3)

            def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
                features = self.embed(input_ids) * attention_mask.unsqueeze(-1)
                return self.head(features.flatten(1))

        self.assertSkipsWith(
            sequence_case(Flattened, padding_mask="attention_mask"),
            "test_padding_invariance",
            "each padded sample alone, without its padding: not compared, sample 0 with its "
            "4 real positions only (a batch of 1) makes the model raise RuntimeError",
            "a model for one fixed length?",
        )

    def test_a_model_that_pads_to_one_length_itself_is_compared_in_the_batch_only(self) -> None:
        class PadsToItsLength(Attention):
            def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
                missing = LENGTH - input_ids.shape[1]
                return super().forward(
                    F.pad(input_ids, (0, missing)), F.pad(attention_mask, (0, missing))
                )

        self.assertSkipsWith(
            sequence_case(PadsToItsLength, padding_mask="attention_mask"),
            "test_padding_invariance",
            "sample 0 with its 4 real positions only (a batch of 1) gives an output of shape "
            "(1, 6, 8), not (1, 4, 8): a model for one fixed length",
        )

    def test_padding_the_check_makes_holds_the_models_pad_token(self) -> None:
        class LastTokenClassifier(nn.Module):
            """Scores from the last real token, found from the pad token, the way
            transformers' GPT2ForSequenceClassification finds it."""

            def __init__(self, pad_token_id: Optional[int] = 0) -> None:
                super().__init__()
                self.config = SimpleNamespace(pad_token_id=pad_token_id)
                self.inner = Attention(causal=True)
                self.head = nn.Linear(WIDTH, 3)

            def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
                hidden = self.inner(input_ids, attention_mask)
                columns = torch.arange(input_ids.shape[1], device=input_ids.device)
                last = ((input_ids != 0).long() * columns).argmax(-1)
                return self.head(hidden[torch.arange(len(input_ids)), last])

        def unpadded() -> Dict[str, torch.Tensor]:
            inputs = token_inputs(padding=False)
            inputs["input_ids"] = torch.randint(1, VOCAB, (BATCH, LENGTH))
            return inputs

        def right_padded() -> Dict[str, torch.Tensor]:  # as a tokenizer pads: id 0 there
            inputs = token_inputs()
            inputs["input_ids"] = (
                torch.randint(1, VOCAB, (BATCH, LENGTH)) * inputs["attention_mask"]
            )
            return inputs

        self.assertPasses(
            sequence_case(LastTokenClassifier, unpadded, padding_mask="attention_mask"),
            "test_padding_invariance",
        )
        self.assertPasses(
            sequence_case(
                lambda: LastTokenClassifier(None), right_padded, padding_mask="attention_mask"
            ),
            "test_padding_invariance",
        )
        # without a pad token in its config the check cannot know it, and says it padded
        self.assertFailsWith(
            sequence_case(
                lambda: LastTokenClassifier(None), unpadded, padding_mask="attention_mask"
            ),
            "test_padding_invariance",
            "(self.inputs has no padding: the check padded the samples itself, on the right)",
        )

    def test_an_output_without_a_batch_dimension_fails_with_a_hint(self) -> None:
        class WithLoss(Attention):
            def forward(
                self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None
            ) -> Any:
                out = super().forward(input_ids, attention_mask)
                return {"loss": out.square().mean(), "logits": out}

        case = sequence_case(
            lambda: WithLoss(causal=True), causal=True, padding_mask="attention_mask"
        )
        for name in ("test_padding_invariance", "test_causality"):
            with self.subTest(name):
                self.assertFailsWith(
                    case,
                    name,
                    "the checked output has shape (), whose first dimension is not the batch "
                    "size 4",
                    "set self.output_key to check another",
                )

    def test_an_output_with_positions_of_its_own_is_refused(self) -> None:
        class VirtualTokens(Attention):
            """Prompt tuning: two learned positions before the tokens' own."""

            def __init__(self) -> None:
                super().__init__()
                self.prompt = nn.Parameter(torch.randn(2, WIDTH))

            def forward(
                self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None
            ) -> torch.Tensor:
                out = super().forward(input_ids, attention_mask)
                return torch.cat([self.prompt.expand(len(out), -1, -1), out], dim=1)

        self.assertErrorsWith(
            sequence_case(VirtualTokens, padding_mask="attention_mask"),
            "test_padding_invariance",
            "the checked output has 8 positions at sequence_dim=1, more than the 6 of the "
            "padding mask self.inputs['attention_mask']: the model adds positions of its own",
            "logits[:, num_virtual_tokens:]",
        )

        class WideFeatures(MaskedMeanPool):  # pooled: (batch, 16), more features than positions
            def __init__(self) -> None:
                super().__init__()
                self.linear = nn.Linear(5, 16)

        self.assertPasses(
            sequence_case(
                WideFeatures,
                padding_mask=1,
                inputs=lambda: (torch.randn(BATCH, LENGTH, 5), token_inputs()["attention_mask"]),
            ),
            "test_padding_invariance",
        )

    def test_it_skips_without_a_padding_mask(self) -> None:
        self.assertSkipsWith(
            sequence_case(Attention), "test_padding_invariance", "self.padding_mask is not set"
        )

    def test_a_single_position_cannot_be_padded(self) -> None:
        def one() -> Dict[str, torch.Tensor]:
            return {
                "input_ids": torch.randint(0, VOCAB, (BATCH, 1)),
                "attention_mask": torch.ones(BATCH, 1, dtype=torch.long),
            }

        self.assertSkipsWith(
            sequence_case(Attention, one, padding_mask="attention_mask"),
            "test_padding_invariance",
            "at least 2 are needed",
        )


class Contract(CheckTestCase):
    def test_sequence_dim_is_required(self) -> None:
        def set_up(self: Any) -> None:
            self.model, self.inputs = Attention(), token_inputs()

        self.assertErrorsWith(
            make_case(SequenceModelTests, set_up),
            "test_causality",
            "Case.setUp must set self.sequence_dim: SequenceModelTests needs "
            "the position dimension",
        )

    def test_an_unknown_padding_mask_is_refused(self) -> None:
        self.assertErrorsWith(
            sequence_case(Attention, padding_mask="mask"),
            "test_output_shape",
            "self.padding_mask set in Case.setUp is 'mask', which self.inputs does not have",
        )

    def test_a_padding_mask_that_is_not_batch_by_seq_is_refused(self) -> None:
        def inputs() -> Any:
            return {
                "input_ids": torch.randint(0, VOCAB, (BATCH, LENGTH)),
                "attention_mask": torch.ones(BATCH, 1, 1, LENGTH),
            }

        self.assertErrorsWith(
            sequence_case(Attention, inputs, padding_mask="attention_mask"),
            "test_padding_invariance",
            "selects (4, 1, 1, 6), not a (batch, seq) tensor",
        )

    def test_unknown_sequence_inputs_are_refused(self) -> None:
        self.assertErrorsWith(
            causal_lm(sequence_inputs=["decoder_input_ids"]),
            "test_causality",
            "names ['decoder_input_ids'], which self.inputs does not have",
        )

    def test_sequence_inputs_without_the_outputs_positions_are_refused(self) -> None:
        # the padding mask says where the positions are padded; it is no sequence input
        self.assertErrorsWith(
            causal_lm(sequence_inputs=["attention_mask"], padding_mask="attention_mask"),
            "test_causality",
            "names ['attention_mask'], which are no batched inputs with 6 positions at "
            "sequence_dim=1 (the padding mask and unbatched inputs are none either)",
        )

    def test_a_sequence_dim_where_no_input_has_the_positions_is_refused(self) -> None:
        case = sequence_case(
            lambda: nn.Conv1d(3, 3, kernel_size=2, stride=2),
            causal=True,
            sequence_dim=2,
            inputs=lambda: torch.randn(BATCH, 3, LENGTH),
        )
        self.assertErrorsWith(
            case,
            "test_causality",
            "self.sequence_dim set in Case.setUp is 2, but no input has 3 positions there",
        )

    def test_a_padding_mask_without_the_outputs_positions_is_refused(self) -> None:
        class Halves(CausalConv):
            def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
                return super().forward(x)[..., ::2]

        case = sequence_case(
            Halves,
            causal=True,
            sequence_dim=2,
            padding_mask=1,
            inputs=lambda: (torch.randn(BATCH, 3, LENGTH), torch.ones(BATCH, LENGTH)),
        )
        self.assertErrorsWith(
            case,
            "test_causality",
            "self.padding_mask set in Case.setUp has 6 positions, but the checked output has 3",
        )

    def test_an_output_without_positions_is_refused_for_causality(self) -> None:
        case = sequence_case(
            lambda: MaskedMeanPool(),
            causal=True,
            sequence_dim=2,
            inputs=lambda: (torch.randn(BATCH, LENGTH, 5), torch.ones(BATCH, LENGTH)),
        )
        self.assertErrorsWith(
            case,
            "test_causality",
            "is 2, but the checked output has shape "
            "(4, 3): test_causality needs an output with a position dimension",
        )


if __name__ == "__main__":
    unittest.main()
