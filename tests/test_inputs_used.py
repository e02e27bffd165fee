"""test_all_inputs_used (ModelTests) passes on models that read every element of their inputs,
or leave some unread by design, and fails, with its message, on models that leave a slice, a
channel, a position or a whole argument unread; and test_causality's previous position
(SequenceModelTests' sees_previous)."""

from __future__ import annotations

import importlib.util
import unittest
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn.functional as F
from checkrunner import CheckTestCase, make_case, run_check, with_class_attributes
from torch import nn

from dltestkit import ModelTests, SequenceModelTests
from dltestkit.core.options import ContractError

USED = "test_all_inputs_used"
ZOO = importlib.util.find_spec("transformers") is not None
VOCAB = 30


def case(
    build: Callable[[], nn.Module],
    inputs: Callable[[], Any],
    mixin: type = ModelTests,
    **extra: Any,
) -> type:
    def set_up(self: Any) -> None:
        self.model, self.inputs = build(), inputs()
        for name, value in extra.items():
            setattr(self, name, value)

    return make_case(mixin, set_up)


def features() -> torch.Tensor:
    return torch.randn(4, 16)


def images() -> torch.Tensor:
    return torch.randn(4, 3, 8, 8)


def token_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, 6), generator=torch.Generator().manual_seed(0))


class TwoTowers(nn.Module):
    """Features 0:8 to one tower, 8:16 to the other; ``bug`` feeds 0:8 to both."""

    def __init__(self, bug: bool = False) -> None:
        super().__init__()
        self.bug = bug
        self.a, self.b, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        second = x[:, :8] if self.bug else x[:, 8:]
        return self.head(torch.cat([torch.relu(self.a(x[:, :8])), torch.relu(self.b(second))], 1))


class RGBNet(nn.Module):
    """A convolution over the image's channels; ``bug`` reads the first two only; a max-pool
    first (most pixels get no gradient)."""

    def __init__(self, bug: bool = False) -> None:
        super().__init__()
        self.bug = bug
        self.conv, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(x, 2)
        if self.bug:
            x = torch.cat([x[:, :2], torch.zeros_like(x[:, 2:])], 1)
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))


class BagOfTokens(nn.Module):
    """Mean of token embeddings; ``bug`` cuts the first token off (ids[:, 1:])."""

    def __init__(self, bug: bool = False) -> None:
        super().__init__()
        self.bug = bug
        self.embed, self.head = nn.Embedding(VOCAB, 8), nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids[:, 1:] if self.bug else ids).mean(1))


class Conditioned(nn.Module):
    """Takes (x, condition); ``bug`` forgets the condition."""

    def __init__(self, bug: bool = False) -> None:
        super().__init__()
        self.bug = bug
        self.net, self.condition = nn.Linear(16, 3), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return out if self.bug else out + self.condition(condition)


def conditioned_inputs() -> Any:
    return features(), torch.randn(4, 5)


class ZeroInitialisedHint(nn.Module):
    """ControlNet's zero convolution: the hint enters through a layer that starts at zero."""

    def __init__(self) -> None:
        super().__init__()
        self.main, self.hint, self.head = nn.Conv2d(3, 4, 3), nn.Conv2d(1, 4, 3), nn.Linear(4, 2)
        nn.init.zeros_(self.hint.weight)
        nn.init.zeros_(self.hint.bias)

    def forward(self, x: torch.Tensor, hint: torch.Tensor) -> torch.Tensor:
        return self.head((self.main(x) + self.hint(hint)).mean((2, 3)))


class MasksFeaturesAtRandom(nn.Module):
    """Correct: reads a random three quarters of the features, in eval mode too (a masked
    autoencoder's encoder), through a layer whose bias starts at zero. Under the checks' seed
    it leaves features 1 and 7 unread in every sample, and feature 7 under the second seed
    too; the third reads it (under seed 3, feature 9 is read under none of the first three
    seeds). With ``bug``, it never reads the last feature."""

    def __init__(self, bug: bool = False) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 4)
        nn.init.zeros_(self.linear.bias)
        self.bug = bug

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = torch.rand(x.shape[-1]) < 0.75
        if self.bug:
            keep[-1] = False
        return self.linear(x * keep)


class ReadsSomeFeaturesRarely(nn.Module):
    """Correct: reads features 8 to 15 always and each of features 0 to 7 in a random tenth of
    its passes, in eval mode too. Under most seeds, one of the rare ones stays unread under
    all of the check's seeds, and the later seeds that the others took show it could be
    chance."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = torch.cat([torch.rand(8) < 0.1, torch.ones(8, dtype=torch.bool)])
        return self.linear(x * keep)


class NoisyWithoutFeature15(nn.Module):
    """Broken: never reads the last feature; draws random numbers in eval mode too (noise on
    its outputs, as a VAE samples), which change nothing of what it reads. Counts its passes."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(15, 4)
        self.passes = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.passes += 1
        out = self.linear(x[:, :15])
        return out + 0.1 * torch.randn_like(out)


class LabelsInTraining(nn.Module):
    """Reads its labels for a loss in training mode only."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> Dict[str, torch.Tensor]:
        scores = self.net(x)
        if self.training:
            return {"scores": scores, "loss": F.cross_entropy(scores, labels)}
        return {"scores": scores}


class Frozen(nn.Module):
    """A backbone under torch.no_grad: no gradient reaches the input."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone, self.head = nn.Conv2d(3, 4, 3), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            h = self.backbone(x).mean((2, 3))
        return self.head(h)


class FrozenZeroGate(nn.Module):
    """Features 8:16 reach the output only through a branch scaled by a frozen zero (a buffer,
    as FrozenBatchNorm2d holds a zero-initialised BatchNorm weight): never read, ever."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)
        self.register_buffer("gate", torch.zeros(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.a(x[:, :8])) + self.gate * self.b(x[:, 8:]))


class Strided(nn.Module):
    """A stride-2 convolution without padding over 8 pixels: the last row and column are in
    no window, by design."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 4, 3, stride=2), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).mean((2, 3)))


class PooledAtFirstToken(nn.Module):
    """Attends from the first token over the real ones only: padding is unread."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(VOCAB, 8), nn.Linear(8, 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        scores = (x[:, :1] * x).sum(-1).masked_fill(attention_mask == 0, float("-inf"))
        return self.head((scores.softmax(-1)[..., None] * x).sum(1))


def padded_to_max_length() -> Dict[str, torch.Tensor]:
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[:, -2:] = 0  # padding="max_length": the last positions are padding in every sample
    mask[0, 2:] = 0
    return {"input_ids": token_ids(), "attention_mask": mask}


class Alarm(nn.Module):
    """Returns a class index only: 1 for an extreme input, which no change made by the check
    reaches."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.net(x)[:, 0] > 1e6).long()


class InputsUsed(CheckTestCase):
    def test_models_that_read_every_element_pass(self) -> None:
        passing = {
            "features": case(TwoTowers, features),
            "channels after a max-pool": case(RGBNet, images),
            "token ids": case(BagOfTokens, token_ids),
            "two arguments": case(Conditioned, conditioned_inputs),
            "a hint behind a zero-initialised layer": case(
                ZeroInitialisedHint, lambda: (images(), torch.randn(4, 1, 8, 8))
            ),
            "features masked at random, behind a bias that starts at zero": case(
                MasksFeaturesAtRandom, features
            ),
            "labels read in training only": case(
                LabelsInTraining, lambda: (features(), torch.tensor([0, 1, 2, 1]))
            ),
            "a backbone under torch.no_grad": case(Frozen, images),
            "padding, declared": case(
                PooledAtFirstToken,
                padded_to_max_length,
                SequenceModelTests,
                sequence_dim=1,
                padding_mask="attention_mask",
            ),
        }
        for label, passing_case in passing.items():
            with self.subTest(label):
                self.assertPasses(passing_case, USED)

    def test_a_slice_reused_fails(self) -> None:
        self.assertFailsWith(
            case(lambda: TwoTowers(bug=True), features),
            USED,
            "self.inputs[:, 8:16] is read by no output (dimension 1, in every sample): no "
            "gradient reaches it from any output, and changing it",
            "a slice reused where another was meant (x[:, :8] twice instead of x[:, 8:16])",
            "list the input in self.unread_inputs",
        )

    def test_a_channel_never_read_fails(self) -> None:
        self.assertFailsWith(
            case(lambda: RGBNet(bug=True), images),
            USED,
            "self.inputs[:, 2] is read by no output (dimension 1, in every sample)",
        )

    def test_a_branch_behind_a_frozen_zero_fails_naming_that_cause(self) -> None:
        self.assertFailsWith(
            case(FrozenZeroGate, features),
            USED,
            "self.inputs[:, 8:16] is read by no output (dimension 1, in every sample)",
            "a branch multiplied by a zero that never trains (a frozen normalisation whose "
            "weight is zero",
        )

    def test_a_feature_never_read_by_a_model_that_masks_at_random_fails(self) -> None:
        self.assertFailsWith(
            case(lambda: MasksFeaturesAtRandom(bug=True), features),
            USED,
            "self.inputs[:, 15] is read by no output (dimension 1, in every sample)",
        )

    def test_features_read_rarely_at_random_are_not_judged_where_chance_explains_it(
        self,
    ) -> None:
        skipped = []
        for seed in (0, 14, 44):  # under 14 and 44, a rare one is read under none of 24 seeds
            with self.subTest(seed=seed):
                seeded = with_class_attributes(case(ReadsSomeFeaturesRarely, features), seed=seed)
                outcome = run_check(seeded, USED)
                self.assertEqual((outcome.failures, outcome.errors), ([], []))
                skipped += outcome.skips
        self.assertTrue(skipped)
        self.assertIn(
            "is read by no output under any of 24 seeds, but the model reads at random in eval "
            "mode (torch.rand compared with a threshold (a mask) in ReadsSomeFeaturesRarely, at "
            "test_inputs_used.py:",
            skipped[0],
        )
        self.assertIn("indices it left unread under the check's seed were read under", skipped[0])
        self.assertIn("not judged. To have them judged, make what eval mode reads", skipped[0])

    def test_a_model_that_samples_without_reading_at_random_is_judged_under_three_seeds(
        self,
    ) -> None:
        model = NoisyWithoutFeature15()
        self.assertFailsWith(
            case(lambda: model, features),
            USED,
            "self.inputs[:, 15] is read by no output (dimension 1, in every sample)",
        )
        # the gradient pass, the eval pass, the watched pass, then per seed the base and
        # three ways of changing feature 15: 3 seeds make 15 passes, 24 would make 99
        self.assertEqual(model.passes, 15)

    def test_a_token_position_cut_off_fails(self) -> None:
        self.assertFailsWith(
            case(lambda: BagOfTokens(bug=True), token_ids),
            USED,
            "self.inputs[:, 0] is read by no output (dimension 1, in every sample)",
        )

    def test_an_argument_never_used_fails(self) -> None:
        self.assertFailsWith(
            case(lambda: Conditioned(bug=True), conditioned_inputs),
            USED,
            "self.inputs[1] is not read: no output depends on it in eval mode or in training mode",
        )

    def test_inputs_unread_by_design_are_declared(self) -> None:
        self.assertPasses(
            case(lambda: Conditioned(bug=True), conditioned_inputs, unread_inputs=[1]), USED
        )
        self.assertErrorsWith(
            case(Conditioned, conditioned_inputs, unread_inputs=["condition"]),
            USED,
            ContractError.__name__,
            "self.unread_inputs set in Case.setUp names ['condition'], which self.inputs does "
            "not have (it has [0, 1])",
        )

    def test_a_part_unread_by_design_is_declared_and_the_rest_judged(self) -> None:
        class Lagged(nn.Module):
            """A series of 8 steps whose last 6 are predicted from, with time features read at
            those 6 only (the first 2 serve the lags of the values): TimeSeriesTransformer."""

            def __init__(self, skips: int = 0) -> None:
                super().__init__()
                self.head = nn.Linear(2, 1)
                self.skips = skips  # (a bug: one more step of the features left unread)

            def forward(self, values: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
                lagged = torch.stack([values[:, 2:], values[:, :-2]], -1)  # (batch, 6, 2)
                read = features[:, 2:].clone()
                if self.skips:
                    read[:, self.skips] = 0.0
                return self.head(lagged + read).squeeze(-1)

        def series() -> Dict[str, torch.Tensor]:
            return {"values": torch.randn(4, 8), "features": torch.randn(4, 8, 2)}

        history = {"features": (slice(None), slice(0, 2))}
        self.assertFailsWith(
            case(Lagged, series),
            USED,
            "self.inputs['features'][:, 0:2] is read by no output (dimension 1, in every sample)",
            "or map it to the part it leaves unread",
        )
        self.assertPasses(case(Lagged, series, unread_inputs=history), USED)
        self.assertFailsWith(
            case(lambda: Lagged(skips=3), series, unread_inputs=history),
            USED,
            "self.inputs['features'][:, 5] is read by no output (dimension 1, in every sample)",
        )
        self.assertPasses(case(Lagged, series, unread_inputs={"features": None}), USED)
        self.assertErrorsWith(
            case(Lagged, series, unread_inputs={"features": (slice(None), 9)}),
            USED,
            ContractError.__name__,
            "self.unread_inputs set in Case.setUp gives self.inputs['features'] the part "
            "(slice(None, None, None), 9), which does not index a tensor of shape (4, 8, 2)",
        )

    def test_designs_are_skipped_parts_that_name_them(self) -> None:
        self.assertSkipsWith(
            case(Strided, images),
            USED,
            "self.inputs[:, :, 7] is read by no output: the last 1 of 8 along dimension 2, "
            "and torch.conv2d in conv (Conv2d), at test_inputs_used.py:",
            "leaves the last 1 of 8 positions of its input unread (stride 2, window 3)",
        )
        self.assertSkipsWith(
            case(PooledAtFirstToken, padded_to_max_length),
            USED,
            "self.inputs['input_ids'][:, 4:6] is read by no output: "
            "self.inputs['attention_mask'] is 0 there in every sample, and no element where "
            "it is so is read: padding, or positions whose values the model replaces",
            "declare them in unread_inputs ({'input_ids': (slice(None), slice(4, 6))}), and "
            "this part is no longer reported; SequenceModelTests with padding_mask set",
        )
        self.assertPasses(  # as the message says
            case(
                PooledAtFirstToken,
                padded_to_max_length,
                unread_inputs={"input_ids": (slice(None), slice(4, 6))},
            ),
            USED,
        )
        self.assertSkipsWith(
            case(Alarm, features),
            USED,
            "changing self.inputs changes no output, but the model's outputs hold no "
            "floating-point tensor (integers only: class indices, an argmax)",
        )

    @unittest.skipUnless(ZOO, "needs transformers")
    def test_a_bert_encoder_that_drops_the_last_token_fails(self) -> None:
        from test_zoo import bert, token_batch

        class DropsTheLastToken(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.bert = bert()

            def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
                hidden = self.bert(input_ids[:, :-1], attention_mask=attention_mask[:, :-1])
                return hidden.last_hidden_state[:, 0]

        self.assertFailsWith(
            case(DropsTheLastToken, token_batch),
            USED,
            "self.inputs['input_ids'][:, 7] is read by no output (dimension 1, in every sample)",
        )


class CausalConvolution(nn.Module):
    """Token ids -> scores through two causal convolutions (kernel 2), the second dilated by
    2; ``dilation`` of the first: 2 skips the previous position."""

    def __init__(self, dilation: int = 1, zero_head: bool = False) -> None:
        super().__init__()
        self.dilation = dilation
        self.embed = nn.Embedding(VOCAB, 8)
        self.first, self.second = nn.Conv1d(8, 8, 2, dilation=dilation), nn.Conv1d(8, 8, 2, 1, 0, 2)
        self.head = nn.Linear(8, 5)
        if zero_head:
            nn.init.zeros_(self.head.weight)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids).transpose(1, 2)
        h = torch.tanh(self.first(F.pad(h, (self.dilation, 0))))
        h = torch.tanh(self.second(F.pad(h, (2, 0))))
        return self.head(h.transpose(1, 2))


class BandAttention(nn.Module):
    """One causal attention layer whose keys are the last ``window`` positions."""

    def __init__(self, window: int) -> None:
        super().__init__()
        self.window = window
        self.embed, self.qkv, self.head = nn.Embedding(VOCAB, 8), nn.Linear(8, 24), nn.Linear(8, 5)

    def forward(self, ids: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        q, k, v = self.qkv(self.embed(ids)).chunk(3, -1)
        ones = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool)
        allowed = ones.tril() & ~ones.tril(-self.window)  # window 1: the diagonal alone
        scores = (q @ k.transpose(1, 2)).masked_fill(~allowed, float("-inf"))
        return self.head(scores.softmax(-1) @ v)


def causal(build: Callable[[], nn.Module], **extra: Any) -> type:
    return case(build, token_ids, SequenceModelTests, sequence_dim=1, causal=True, **extra)


class PreviousPosition(CheckTestCase):
    def test_models_that_see_the_previous_position_pass(self) -> None:
        for label, build in {
            "causal convolutions": CausalConvolution,
            "attention over the last 3 positions": lambda: BandAttention(3),
            "a zero-initialised head (depends on nothing)": lambda: CausalConvolution(2, True),
        }.items():
            with self.subTest(label):
                self.assertPasses(causal(build), "test_causality")

    def test_a_window_of_one_position_fails(self) -> None:
        self.assertFailsWith(
            causal(lambda: BandAttention(1)),
            "test_causality",
            "the output at position 1 does not depend on self.inputs at position 0; it "
            "depends on self.inputs at position 1, its own position, and on no earlier "
            "position: the model reads each position alone (a window of one position)",
            "set self.sees_previous = False",
        )

    def test_a_convolution_dilated_in_its_first_layer_fails(self) -> None:
        self.assertFailsWith(
            causal(lambda: CausalConvolution(2)),
            "test_causality",
            "the output at position 2 does not depend on self.inputs at position 1; it "
            "depends on self.inputs at earlier positions but not at position 1, the one "
            "before it: the model skips the previous position",
        )

    def test_sees_previous_false_declares_the_design(self) -> None:
        self.assertPasses(causal(lambda: BandAttention(1), sees_previous=False), "test_causality")

    @unittest.skipUnless(ZOO, "needs transformers")
    def test_gpt2_with_a_local_mask_of_width_one_fails(self) -> None:
        from test_zoo import gpt2

        class LocalGPT2(nn.Module):
            """GPT-2 given a 4D local-attention mask built as tril(m) - tril(m, -w): w = 1
            keeps the diagonal alone."""

            def __init__(self) -> None:
                super().__init__()
                self.gpt2 = gpt2()

            def forward(self, ids: torch.Tensor) -> torch.Tensor:
                ones = torch.ones(ids.shape[1], ids.shape[1])
                allowed = (ones.tril() - ones.tril(-1)).bool()
                mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo().min)
                expanded = mask.expand(ids.shape[0], 1, *allowed.shape)
                return self.gpt2(input_ids=ids, attention_mask=expanded).logits

        self.assertFailsWith(
            causal(LocalGPT2),
            "test_causality",
            "the output at position 1 does not depend on self.inputs at position 0",
            "(a window of one position)",
        )


if __name__ == "__main__":
    unittest.main()
