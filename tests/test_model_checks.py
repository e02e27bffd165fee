"""ModelTests passes on correct models and fails, with its message, on broken ones."""
from __future__ import annotations

import unittest
from typing import Any, Tuple
from unittest import mock

import torch
from torch import nn

from checkrunner import CheckTestCase, make_case
from dltestkit import ModelTests

SHAPE = (1, 4, 4)
FEATURES = 16


class AutoEncoder(nn.Module):
    """A correct deterministic model: (B, 1, 4, 4) -> (B, 1, 4, 4)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(FEATURES, 8), nn.Tanh())
        self.decoder = nn.Sequential(nn.Linear(8, FEATURES), nn.Unflatten(1, SHAPE))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class VAE(nn.Module):
    """A correct stochastic model (samples in eval mode too) returning a tuple."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(FEATURES, 8), nn.ReLU())
        self.mu = nn.Linear(8, 2)
        self.log_sigma = nn.Linear(8, 2)
        self.decoder = nn.Sequential(nn.Linear(2, FEATURES), nn.Unflatten(1, SHAPE))

    def noise(self, mu: torch.Tensor) -> torch.Tensor:
        return torch.randn_like(mu)

    def bottleneck(self, mu: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
        return mu + torch.exp(log_sigma) * self.noise(mu)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden = self.encoder(x)
        mu, log_sigma = self.mu(hidden), self.log_sigma(hidden)
        return self.decoder(self.bottleneck(mu, log_sigma)), mu, log_sigma


class WithBatchNorm(AutoEncoder):
    def __init__(self, track_running_stats: bool = True) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(FEATURES, 8),
                                     nn.BatchNorm1d(8, track_running_stats=track_running_stats))


class Classifier(nn.Module):
    """Ends in a softmax over classes: its outputs sum to 1 per sample."""

    def __init__(self, softmax_dim: int = 1) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(FEATURES, 5))
        self.softmax_dim = softmax_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(x), dim=self.softmax_dim)


class SequenceModel(nn.Module):
    """(B, C, L) -> (B, C, L) through a seq-first layer; ``bug`` uses reshape as a transpose."""

    def __init__(self, bug: bool = False) -> None:
        super().__init__()
        self.mix = nn.Linear(3, 3)
        self.bug = bug

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, length = x.shape
        seq_first = x.reshape(length, batch, channels) if self.bug else x.permute(2, 0, 1)
        return self.mix(seq_first).permute(1, 2, 0)


# -- one bug each ----------------------------------------------------------------
class HardWiredBatch(AutoEncoder):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder[2](self.encoder[1](x.view(4, FEATURES))))


class Squeezes(AutoEncoder):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).squeeze()


class RandnWithoutDevice(VAE):
    def noise(self, mu: torch.Tensor) -> torch.Tensor:
        return torch.randn(mu.shape)


class SamplesInTrainingOnly(RandnWithoutDevice):
    """Like most VAEs: eval mode returns mu, so the bug hides there."""

    def bottleneck(self, mu: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
        return super().bottleneck(mu, log_sigma) if self.training else mu


class ReturnsAConstantMadeOnTheCPU(AutoEncoder):
    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        return super().forward(x), torch.zeros(1)  # no device=: stays on the CPU


class UnregisteredTensor(AutoEncoder):
    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.ones(FEATURES)  # not a buffer: does not move with the model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x * self.scale.view(SHAPE))


class PlainListOfLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = [nn.Flatten(), nn.Linear(FEATURES, FEATURES)]  # not an nn.ModuleList
        self.out = nn.Unflatten(1, SHAPE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.out(x)


_LIBRARY = torch.library.Library("dltestkit_tests", "DEF")
_LIBRARY.define("double(Tensor x) -> Tensor")
_LIBRARY.impl("double", lambda x: x * 2, "CPU")


class NoMetaKernel(AutoEncoder):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.dltestkit_tests.double(super().forward(x))


class CentresOverBatch(AutoEncoder):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out - out.mean(dim=0, keepdim=True)


class DeadLayer(AutoEncoder):
    def __init__(self) -> None:
        super().__init__()
        self.refine = nn.Linear(FEATURES, FEATURES)  # defined, never used


class DetachedEncoder(AutoEncoder):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x).detach())


class LogOfNegative(AutoEncoder):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(super().forward(x))


class SqrtAtZero(AutoEncoder):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out + torch.sqrt(out * 0)  # finite output, NaN gradient


def model_case(model_type: Any, inputs: Any = None, **attributes: Any) -> type:
    def set_up(self: Any) -> None:
        self.model = model_type()
        self.inputs = torch.randn(4, *SHAPE) if inputs is None else inputs
        for name, value in attributes.items():
            setattr(self, name, value)

    return make_case(ModelTests, set_up)


CHECKS = ["test_all_parameters_updated", "test_batch_independence", "test_device_moving",
          "test_device_moving_on_gpu", "test_finite_outputs_and_gradients", "test_output_shape"]


class CorrectModels(CheckTestCase):
    def test_every_check_passes(self) -> None:
        cases = {
            "autoencoder": model_case(AutoEncoder),
            "vae": model_case(VAE),
            "batchnorm": model_case(WithBatchNorm),
            "softmax classifier": model_case(Classifier, expected_output_shape=(4, 5)),
            "sequence": model_case(SequenceModel, inputs=torch.randn(4, 3, 5)),
        }
        for label, case in cases.items():
            for name in CHECKS:
                with self.subTest(label, check=name):
                    self.assertPasses(case, name)

    def test_the_checks_contribute_six_tests(self) -> None:
        self.assertEqual(unittest.TestLoader().getTestCaseNames(model_case(AutoEncoder)), CHECKS)

    def test_checks_leave_the_model_and_its_modes_as_they_were(self) -> None:
        model = WithBatchNorm()
        model.encoder.train(False)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        modes = [m.training for m in model.modules()]

        def set_up(self: Any) -> None:
            self.model, self.inputs = model, torch.randn(4, *SHAPE)

        case = make_case(ModelTests, set_up)
        for name in CHECKS:
            self.assertPasses(case, name)
        self.assertEqual([m.training for m in model.modules()], modes)
        for key, value in model.state_dict().items():
            self.assertTrue(torch.equal(value, state[key]), key)


class OutputShape(CheckTestCase):
    def test_a_model_hard_wired_to_batch_four_fails(self) -> None:
        self.assertFailsWith(model_case(HardWiredBatch), "test_output_shape",
                             "at batch size 1 the model raises RuntimeError: shape '[4, 16]'",
                             "hard-coded batch size")

    def test_a_squeeze_that_drops_the_batch_dimension_fails(self) -> None:
        self.assertFailsWith(model_case(Squeezes), "test_output_shape",
                             "at batch size 1 the output has shape (4, 4), expected (1, 1, 4, 4)")

    def test_a_wrong_expected_shape_fails(self) -> None:
        case = model_case(AutoEncoder, expected_output_shape=(4, 16))
        self.assertFailsWith(case, "test_output_shape", "at batch size 4 the output has shape "
                             "(4, 1, 4, 4), expected (4, 16)")


class DeviceMoving(CheckTestCase):
    def test_bugs_that_break_on_a_gpu_are_caught_without_one(self) -> None:
        for model_type in (RandnWithoutDevice, UnregisteredTensor, PlainListOfLayers):
            with self.subTest(model_type.__name__):
                self.assertFailsWith(model_case(model_type), "test_device_moving",
                                     "does not move to another device as a whole",
                                     "Tensor on device cpu is not on the expected device meta",
                                     "register_buffer", "nn.ModuleList")

    def test_a_device_bug_in_the_training_path_only_is_caught(self) -> None:
        self.assertFailsWith(model_case(SamplesInTrainingOnly), "test_device_moving",
                             "its forward in training mode combines a tensor left on the CPU")

    def test_an_output_left_on_the_cpu_fails_naming_it(self) -> None:
        self.assertFailsWith(model_case(ReturnsAConstantMadeOnTheCPU), "test_device_moving",
                             "after .to('meta') the model returns output[1] (on cpu) in eval mode",
                             "no tensor made without device=")

    def test_without_a_gpu_the_gpu_check_skips_with_the_reason(self) -> None:
        with mock.patch("dltestkit.model.accelerators", return_value=[]):
            self.assertSkipsWith(model_case(AutoEncoder), "test_device_moving_on_gpu",
                                 "no CUDA or MPS device")

    def test_an_operator_without_meta_support_skips_with_the_reason(self) -> None:
        self.assertSkipsWith(model_case(NoMetaKernel), "test_device_moving",
                             "meta device cannot run", "dltestkit_tests::double")

    def test_with_an_accelerator_outputs_are_compared_after_moving_there_and_back(self) -> None:
        # Stand in "cpu" for a GPU so that this part runs on CPU-only machines too.
        with mock.patch("dltestkit.model.accelerators", return_value=["cpu"]):
            for model_type in (AutoEncoder, VAE):
                with self.subTest(model_type.__name__):
                    self.assertPasses(model_case(model_type), "test_device_moving_on_gpu")

    def test_with_an_accelerator_outputs_that_differ_on_the_device_fail(self) -> None:
        class ChangesWhenMoved(AutoEncoder):
            moved = False

            def _apply(self, fn: Any, recurse: bool = True) -> Any:  # what .to() calls
                self.moved = True
                return super()._apply(fn, recurse)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return super().forward(x) + float(self.moved)

        with mock.patch("dltestkit.model.accelerators", return_value=["cpu"]):
            self.assertFailsWith(model_case(ChangesWhenMoved), "test_device_moving_on_gpu",
                                 "the model on cpu gives other outputs than on the CPU",
                                 "Mismatched elements")


class BatchIndependence(CheckTestCase):
    def test_batch_mixing_bugs_fail(self) -> None:
        cases = {
            "reshape used as transpose": model_case(lambda: SequenceModel(bug=True),
                                                    inputs=torch.randn(4, 3, 5)),
            "softmax over dim 0": model_case(lambda: Classifier(softmax_dim=0),
                                             expected_output_shape=(4, 5)),
            "centring over the batch": model_case(CentresOverBatch),
            "BatchNorm without running stats": model_case(
                lambda: WithBatchNorm(track_running_stats=False)),
        }
        for label, case in cases.items():
            with self.subTest(label):
                self.assertFailsWith(case, "test_batch_independence",
                                     "gets a gradient from the outputs of the other samples",
                                     "mixes samples")

    def test_every_sample_is_masked_not_only_the_first(self) -> None:
        class MixesLastTwo(AutoEncoder):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                out = super().forward(x)
                return torch.cat([out[:2], out[2:].mean(dim=0, keepdim=True).expand(2, *SHAPE)])

        self.assertFailsWith(model_case(MixesLastTwo), "test_batch_independence",
                             "sample 2's input")

    def test_integer_inputs_skip(self) -> None:
        case = model_case(lambda: nn.Embedding(10, 3), inputs=torch.arange(4),
                          expected_output_shape=(4, 3))
        self.assertSkipsWith(case, "test_batch_independence", "no floating-point tensor")


class ParametersUpdated(CheckTestCase):
    def test_a_dead_layer_fails_naming_its_parameters(self) -> None:
        text = self.assertFailsWith(model_case(DeadLayer), "test_all_parameters_updated",
                                    "2 of 6 trainable parameters would not be trained",
                                    "refine.weight: no gradient", "refine.bias: no gradient")
        self.assertNotIn("encoder", text)

    def test_a_detach_that_cuts_off_the_encoder_fails(self) -> None:
        self.assertFailsWith(model_case(DetachedEncoder), "test_all_parameters_updated",
                             "encoder.1.weight: no gradient", "encoder.1.bias")

    def test_allowed_unchanged_parameters_are_not_reported(self) -> None:
        case = model_case(DeadLayer, allowed_unchanged_parameters=["refine.*"])
        self.assertPasses(case, "test_all_parameters_updated")

    def test_frozen_parameters_are_not_required_to_change(self) -> None:
        def frozen() -> nn.Module:
            model = AutoEncoder()
            model.encoder.requires_grad_(False)
            return model

        self.assertPasses(model_case(frozen), "test_all_parameters_updated")


class Finite(CheckTestCase):
    def test_nan_in_part_of_the_output_fails(self) -> None:
        self.assertFailsWith(model_case(LogOfNegative), "test_finite_outputs_and_gradients",
                             "outputs contain NaN or Inf: output (")

    def test_nan_only_in_gradients_fails_naming_parameters(self) -> None:
        self.assertFailsWith(model_case(SqrtAtZero), "test_finite_outputs_and_gradients",
                             "the gradients of", "decoder.0.weight", "contain NaN or Inf")

    def test_nan_gradients_also_fail_the_parameter_check(self) -> None:
        self.assertFailsWith(model_case(SqrtAtZero), "test_all_parameters_updated",
                             "gradient contains NaN or Inf")


if __name__ == "__main__":
    unittest.main()
