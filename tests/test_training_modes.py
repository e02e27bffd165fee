"""ModelTests' training-mode checks: test_train_matches_eval and test_running_statistics pass on
correct models (dropout, drop-path, BatchNorm, recurrent and attention dropout, frozen
BatchNorm) and fail, with their message, on broken ones, real models among them."""

from __future__ import annotations

import collections
import importlib.util
import types
import unittest
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from checkrunner import CheckTestCase, make_case
from torch import nn

from dltestkit import ModelTests

TRAIN_EVAL = "test_train_matches_eval"
STATISTICS = "test_running_statistics"
ZOO = all(importlib.util.find_spec(name) for name in ("torchvision", "transformers"))


#: Whether the test classes' setUp runs the passes the checks share first (the eval pass and
#: the first training step), as the checks that run before these ones in a class do.
SHARED_FIRST = False


def case(build: Callable[[], nn.Module], inputs: Any = None, **attributes: Any) -> type:
    def set_up(self: Any) -> None:
        self.model = build()
        self.inputs = torch.randn(4, 1, 4, 4) if inputs is None else inputs()
        for name, value in attributes.items():
            setattr(self, name, value)
        if SHARED_FIRST:
            self._eval_pass()
            self._training_pass()

    return make_case(ModelTests, set_up)


class AfterTheSharedPasses(CheckTestCase):
    """Runs the tests of the class it is mixed into with the shared passes computed first:
    test_running_statistics then reads the first training step's forward pass, and
    test_train_matches_eval compares its outputs with the eval pass first."""

    def setUp(self) -> None:
        global SHARED_FIRST
        SHARED_FIRST = True

        def reset() -> None:
            global SHARED_FIRST
            SHARED_FIRST = False

        self.addCleanup(reset)


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """timm's drop_path: a Bernoulli mask per sample, scaled by the keep probability."""
    if not training or p == 0:
        return x
    keep = 1 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask.div_(keep)


class EveryModeDependentLayer(nn.Module):
    """Correct: nn.Dropout, F.dropout with training=self.training, a drop-path, BatchNorm,
    dropout between LSTM layers and inside nn.MultiheadAttention, attention dropout in
    F.scaled_dot_product_attention, F.rrelu."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(16, 8)
        self.norm = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(0.3)
        self.lstm = nn.LSTM(2, 2, num_layers=2, dropout=0.5, batch_first=True)
        self.attention = nn.MultiheadAttention(2, 1, dropout=0.5, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(self.norm(self.inp(x.flatten(1))))
        h = F.dropout(h, 0.2, training=self.training)
        h = h + drop_path(torch.tanh(h), 0.5, self.training)
        sequence = h.view(-1, 4, 2)
        sequence = self.lstm(sequence)[0] + self.attention(sequence, sequence, sequence)[0]
        q = sequence[:, None]
        sequence = F.scaled_dot_product_attention(q, q, q, dropout_p=0.4 if self.training else 0.0)[
            :, 0
        ]
        return self.head(F.rrelu(sequence.flatten(1), training=self.training))


class ScaledInEvalOnly(nn.Module):
    """A branch on self.training that changes the arithmetic: halves the features at
    evaluation only."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh())
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x)
        if not self.training:
            h = h * 0.5
        return self.head(h)


class SamplesInTrainingOnly(nn.Module):
    """A VAE bottleneck: mu + sigma * eps in training, mu at evaluation (correct)."""

    def __init__(self) -> None:
        super().__init__()
        self.mu, self.log_sigma = nn.Linear(16, 2), nn.Linear(16, 2)
        self.decoder = nn.Linear(2, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mu, log_sigma = self.mu(x.flatten(1)), self.log_sigma(x.flatten(1))
        z = mu + log_sigma.exp() * torch.randn_like(mu) if self.training else mu
        return self.decoder(z)


class GumbelInTrainingOnly(nn.Module):
    """Discrete codes: Gumbel-softmax samples in training, one-hot argmax at evaluation."""

    def __init__(self) -> None:
        super().__init__()
        self.logits, self.decoder = nn.Linear(16, 4), nn.Linear(4, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.logits(x.flatten(1))
        if self.training:
            code = F.gumbel_softmax(logits, tau=0.5)
        else:
            code = F.one_hot(logits.argmax(-1), 4).to(logits.dtype)
        return self.decoder(code)


class NumpyMaskInTraining(nn.Module):
    """SpecAugment as transformers' wav2vec2 draws it: NumPy's generator, in training only."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.net(x.flatten(1))
        if self.training:
            keep = torch.from_numpy(np.random.rand(*h.shape) > 0.3)
            h = h * keep
        return h


class MonteCarloDropout(nn.Module):
    """Dropout on in every mode by design (Monte Carlo dropout at evaluation)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(self.net(x.flatten(1)), 0.5, training=True)


class LossesInTraining(nn.Module):
    """Returns a dict of losses in training and predictions at evaluation."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> Any:
        scores = self.net(x.flatten(1))
        if self.training:
            return {"loss": scores.logsumexp(-1).mean()}
        return scores


class AuxiliaryLogits(nn.Module):
    """torchvision's Inception v3 and GoogLeNet: in training mode, a named tuple of the logits
    and an auxiliary classifier's logits (of the same shape); in eval mode, the logits alone.
    ``scaled_in_eval``: and the logits doubled in eval mode only (a bug)."""

    Outputs = collections.namedtuple("Outputs", ["logits", "aux_logits"])

    def __init__(self, scaled_in_eval: bool = False) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU())
        self.head, self.aux = nn.Sequential(nn.Dropout(0.3), nn.Linear(8, 3)), nn.Linear(8, 3)
        self.scaled_in_eval = scaled_in_eval

    def forward(self, x: torch.Tensor) -> Any:
        hidden = self.body(x)
        logits = self.head(hidden)
        if self.training:
            return self.Outputs(logits, self.aux(hidden))
        return logits * 2 if self.scaled_in_eval else logits


def spectral_norm() -> nn.Module:
    """Power iteration in training mode only, updating its buffers (correct). Its weights are
    drawn under a seed of their own: the 15 power iterations made when the layer is built
    leave so little to do that under some weights (those of seed 11) the one iteration of a
    training pass moves the outputs by less than the check's tolerance (7e-6), and the modes
    agree, as they should."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        linear = nn.utils.parametrizations.spectral_norm(nn.Linear(16, 64))
    return nn.Sequential(nn.Flatten(), linear)


class TrainEvalMatch(CheckTestCase):
    def test_dropout_drop_path_and_batch_norm_are_no_false_alarm(self) -> None:
        self.assertPasses(case(EveryModeDependentLayer), TRAIN_EVAL)

    def test_a_scale_applied_in_eval_mode_only_fails(self) -> None:
        self.assertFailsWith(
            case(ScaledInEvalOnly),
            TRAIN_EVAL,
            "output differs between training and eval mode (",
            "with dropout switched off and normalisation reading its running statistics in "
            "training mode: nothing in the training pass explains it",
            "The first layer whose output differs is head (Linear), whose inputs already "
            "differ: the difference is made in the model's forward, before it calls head.",
            "Look for a branch on self.training",
        )

    def test_sampling_in_training_only_is_compared_at_its_mean(self) -> None:
        self.assertPasses(case(SamplesInTrainingOnly), TRAIN_EVAL)

    def test_designs_that_explain_a_difference_skip_naming_them(self) -> None:
        designs = {
            GumbelInTrainingOnly: "random numbers drawn in training only: F.gumbel_softmax in "
            "GumbelInTrainingOnly, at test_training_modes.py:",
            NumpyMaskInTraining: "NumPy's global generator (np.random) drawn from in training only",
            spectral_norm: "buffers updated by the training pass only: "
            "1.parametrizations.weight.0._u, 1.parametrizations.weight.0._v",
            MonteCarloDropout: "random numbers drawn in eval mode only: F.dropout in "
            "MonteCarloDropout",
            LossesInTraining: "the model returns other outputs in training mode "
            "(output['loss']) than in eval mode (output)",
        }
        for build, fragment in designs.items():
            with self.subTest(getattr(build, "__name__", "")):
                self.assertSkipsWith(case(build), TRAIN_EVAL, fragment)

    def test_auxiliary_logits_in_training_are_compared_with_eval_modes_logits(self) -> None:
        self.assertPasses(case(AuxiliaryLogits), TRAIN_EVAL)  # compared: no skip
        self.assertSkipsWith(
            case(lambda: AuxiliaryLogits(scaled_in_eval=True)),
            TRAIN_EVAL,
            "the model returns other outputs in training mode (output[0], output[1]) than in "
            "eval mode (output); none of output[0], output[1], of its shape, equals it, and "
            "which of them eval mode returns is not known",
        )

    @unittest.skipUnless(ZOO, "needs torchvision and transformers")
    def test_a_bert_layer_whose_attention_is_off_in_eval_mode_fails(self) -> None:
        from test_zoo import bert, token_batch

        def attention_off_in_eval() -> nn.Module:
            model = bert()
            attention = model.encoder.layer[0].attention.self
            forward = attention.forward

            def off_in_eval(self: nn.Module, hidden: torch.Tensor, *args: Any, **kw: Any) -> Any:
                out = forward(hidden, *args, **kw)
                return out if self.training else (torch.zeros_like(out[0]), *out[1:])

            attention.forward = types.MethodType(off_in_eval, attention)
            return model

        self.assertFailsWith(
            case(attention_off_in_eval, token_batch, output_key="last_hidden_state"),
            TRAIN_EVAL,
            "output.last_hidden_state differs between training and eval mode",
            "The first layer whose output differs is encoder.layer.0.attention.self "
            "(BertSelfAttention), with the same inputs in both modes",
        )


class WrongTrainingFlag(nn.BatchNorm1d):
    """Passes the flag the wrong way round into F.batch_norm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias,
            not self.training, self.momentum, self.eps,
        )  # fmt: skip


def with_norm(norm: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), norm, nn.ReLU(), nn.Linear(8, 3))


def momentum_zero() -> nn.Module:
    model = with_norm(nn.BatchNorm1d(8))
    model[2].momentum = 0.0
    return model


def stops_tracking() -> nn.Module:
    model = with_norm(nn.BatchNorm1d(8))
    model[2].track_running_stats = False  # after the layer was built: the buffers stay
    return model


class KeepsNormInEval(nn.Module):
    """Frozen by design: train() keeps the normalisation in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.net = with_norm(nn.BatchNorm1d(8))

    def train(self, mode: bool = True) -> "KeepsNormInEval":
        super().train(mode)
        self.net[2].eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def frozen_affine() -> nn.Module:
    """Frozen by design: the normalisation's weight and bias do not train (and it is called
    with momentum 0)."""
    model = momentum_zero()
    model[2].requires_grad_(False)
    return model


class RunningStatistics(CheckTestCase):
    def test_batch_and_instance_norm_pass(self) -> None:
        self.assertPasses(case(lambda: with_norm(nn.BatchNorm1d(8))), STATISTICS)
        self.assertPasses(
            case(lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.InstanceNorm2d(2, affine=True,
                                       track_running_stats=True))),
            STATISTICS,
        )  # fmt: skip

    def test_momentum_zero_fails(self) -> None:
        self.assertFailsWith(
            case(momentum_zero),
            STATISTICS,
            "2 (BatchNorm1d) does not update its running statistics (running_mean, "
            "running_var) in training mode: F.batch_norm normalises with the batch's statistics "
            "but is called with momentum=0.0, which leaves them as they are",
            "list it in self.frozen_norm_layers",
        )

    def test_running_statistics_no_longer_tracked_fail(self) -> None:
        self.assertFailsWith(
            case(stops_tracking),
            STATISTICS,
            "2 (BatchNorm1d) does not update its running statistics (running_mean, "
            "running_var) in training mode: F.batch_norm is called without them",
            "(running_mean=None: track_running_stats is False in training",
        )

    def test_a_wrong_training_flag_fails(self) -> None:
        self.assertFailsWith(
            case(lambda: with_norm(WrongTrainingFlag(8))),
            STATISTICS,
            "2 (WrongTrainingFlag) normalises with its running statistics (running_mean, "
            "running_var) in training mode instead of the batch's statistics, and does not "
            "update them: F.batch_norm is called with training=False",
            "at test_training_modes.py:",
        )

    def test_frozen_normalisation_is_told_apart(self) -> None:
        frozen = {
            "kept in eval mode": (case(KeepsNormInEval), "net.2 (BatchNorm1d) (kept in eval "),
            "weight and bias frozen": (case(frozen_affine), "its weight and bias do not train"),
            "listed": (
                case(momentum_zero, frozen_norm_layers=["2"]),
                "2 (BatchNorm1d) (listed in frozen_norm_layers)",
            ),
        }
        for label, (frozen_case, fragment) in frozen.items():
            with self.subTest(label):
                self.assertSkipsWith(
                    frozen_case,
                    STATISTICS,
                    "every normalisation layer with running statistics is frozen by design: ",
                    fragment,
                )

    def test_models_without_running_statistics_skip(self) -> None:
        self.assertSkipsWith(
            case(lambda: with_norm(nn.LayerNorm(8))),
            STATISTICS,
            "no normalisation in eval mode is handed running statistics",
        )

    @unittest.skipUnless(ZOO, "needs torchvision and transformers")
    def test_real_models(self) -> None:
        import torchvision
        from torchvision.ops import FrozenBatchNorm2d

        def resnet(momentum: float) -> Callable[[], nn.Module]:
            def build() -> nn.Module:
                model = torchvision.models.resnet18(num_classes=10)
                model.layer2[0].bn1.momentum = momentum
                return model

            return build

        def images() -> torch.Tensor:
            return torch.randn(2, 3, 32, 32)

        self.assertPasses(case(resnet(0.1), images), STATISTICS)
        self.assertFailsWith(
            case(resnet(0.0), images),
            STATISTICS,
            "layer2.0.bn1 (BatchNorm2d) does not update its running statistics",
            "momentum=0.0",
        )
        frozen = torchvision.models.resnet18(num_classes=10, norm_layer=FrozenBatchNorm2d)
        self.assertSkipsWith(
            case(lambda: frozen, images), STATISTICS, "no normalisation in eval mode is handed"
        )


class TrainEvalMatchAfterTheSharedPasses(AfterTheSharedPasses, TrainEvalMatch):
    """TrainEvalMatch's verdicts, the shared passes computed first."""


class RunningStatisticsAfterTheSharedPasses(AfterTheSharedPasses, RunningStatistics):
    """RunningStatistics' verdicts, the shared passes computed first."""


if __name__ == "__main__":
    unittest.main()
