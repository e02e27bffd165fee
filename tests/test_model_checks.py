"""ModelTests passes on correct models and fails, with its message, on broken ones."""

from __future__ import annotations

import unittest
import warnings
from typing import Any, Callable, Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from checkrunner import (
    NO_GPU,
    NO_RUNNING_STATISTICS,
    CheckTestCase,
    make_case,
    run_check,
    with_class_attributes,
)
from torch import nn
from torch.utils.checkpoint import checkpoint

from dltestkit import ModelTests
from dltestkit.core.contract import checks_of

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
        self.encoder = nn.Sequential(
            nn.Flatten(),
            nn.Linear(FEATURES, 8),
            nn.BatchNorm1d(8, track_running_stats=track_running_stats),
        )


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


class TokenModel(nn.Module):
    """Token ids (and a mask) in, a dict out, like a transformers model: ``hidden`` per token
    and a ``pooled`` vector from a layer used only for it."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Embedding(20, 6)
        self.positions = nn.Embedding(16, 6)
        self.mix = nn.Linear(6, 6)
        self.pool = nn.Linear(6, 3)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        return self.tokens(ids) + self.positions(positions)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: Any = None
    ) -> Dict[str, torch.Tensor]:
        hidden = torch.tanh(self.mix(self.embed(input_ids)))
        if attention_mask is not None and not bool(attention_mask.all()):  # data-dependent
            hidden = hidden * attention_mask.unsqueeze(-1)
        return {"hidden": hidden, "pooled": self.pool(hidden.mean(dim=1))}


class PackedTagger(nn.Module):
    """The standard way to run an RNN over padding: lengths on the CPU, packed, unpacked."""

    def __init__(self, rnn: str = "lstm") -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 6)
        layers = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}
        self.rnn = layers[rnn](6, 6, batch_first=True, bidirectional=True)
        self.head = nn.Linear(12, 3)

    enforce_sorted = False

    def initial_state(self, ids: torch.Tensor) -> Any:
        return None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        lengths = attention_mask.sum(1).cpu()  # pack_padded_sequence wants them on the CPU
        packed = nn.utils.rnn.pack_padded_sequence(
            self.embed(input_ids), lengths, batch_first=True, enforce_sorted=self.enforce_sorted
        )
        out, _ = self.rnn(packed, self.initial_state(input_ids))
        out, _ = nn.utils.rnn.pad_packed_sequence(
            out, batch_first=True, total_length=input_ids.shape[1]
        )
        return self.head(out)


class CTCModel(nn.Module):
    """Computes its CTC loss in forward, with the targets and lengths on the CPU (cuDNN)."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(5, 8, batch_first=True)
        self.out = nn.Linear(8, 6)

    def forward(
        self, features: torch.Tensor, targets: torch.Tensor, lengths: torch.Tensor
    ) -> Dict[str, torch.Tensor]:
        log_probs = self.out(self.rnn(features)[0]).log_softmax(-1)
        loss = F.ctc_loss(
            log_probs.transpose(0, 1),
            targets.cpu(),
            lengths.cpu(),
            torch.full((targets.shape[0],), targets.shape[1], dtype=torch.long),
        )
        return {"log_probs": log_probs, "loss": loss}


def ctc_inputs() -> Tuple[torch.Tensor, ...]:
    return torch.randn(4, 12, 5), torch.randint(1, 6, (4, 3)), torch.tensor([12, 10, 12, 9])


def tokens(batch: int = 4, length: int = 5) -> Dict[str, torch.Tensor]:
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, -2:] = 0
    return {"input_ids": torch.randint(0, 20, (batch, length)), "attention_mask": mask}


class Checkpointed(WithBatchNorm):
    """Reentrant gradient checkpointing (``use_reentrant=True``, the default of transformers'
    gradient_checkpointing_enable), in eval mode too, around BatchNorm and the decoder."""

    def checkpoint(self, function: Any, value: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():  # torch.no_grad(): nothing to save memory for
            return function(value)  # type: ignore[no-any-return]
        return checkpoint(function, value, use_reentrant=True)  # type: ignore[no-any-return]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder[1](self.encoder[0](x))
        return self.checkpoint(lambda h: self.decoder(self.encoder[2](h)), hidden)


# -- one bug each ----------------------------------------------------------------
class CheckpointsItsInput(AutoEncoder):
    """Reentrant checkpointing straight from the input, which needs no gradient in training:
    the layers inside get none."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(super().forward, x, use_reentrant=True)


class CentresInACheckpoint(Checkpointed):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder[1](self.encoder[0](x))
        return self.checkpoint(lambda h: self.decoder(h - h.mean(0)), hidden)


class SqrtAtZeroInACheckpoint(Checkpointed):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return self.checkpoint(lambda o: o + torch.sqrt(o * 0), out)


class HardWiredBatch(AutoEncoder):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder[2](self.encoder[1](x.view(4, FEATURES))))


class Squeezes(Classifier):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).squeeze()  # meant for size-1 dimensions; drops the batch


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


class PositionIdsOnTheCPU(TokenModel):
    """The classic: position ids made without device=; meta accepts them, a GPU does not."""

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.tokens(ids) + self.positions(torch.arange(ids.shape[1]))


class PositionsWhereTheWeightsAre(TokenModel):
    """Position ids made where the weights are, or with device=None while they are on meta
    (as transformers' LongT5 makes its relative positions): on the CPU on meta only."""

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        weight = self.positions.weight
        device = weight.device if weight.device.type != "meta" else None
        return self.tokens(ids) + self.positions(torch.arange(ids.shape[1], device=device))


class PositionsWhereTheWeightsAreThenNoise(PositionsWhereTheWeightsAre):
    """The same, and noise made without device= after it: a device bug."""

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        embedded = super().embed(ids)
        return embedded + torch.randn(embedded.shape)


class NumpyInForward(AutoEncoder):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = float(x.abs().max().detach().numpy())  # fails for a tensor on a GPU
        return super().forward(x / scale)


class DeviceDependentPath(AutoEncoder):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float() where the CPU run reads the data, .item() where the meta run does (of what
        # the weights give: the meta run needs the CPU run's)
        y = super().forward(x)
        scale = float(y.abs().max()) if y.device.type == "cpu" else y.abs().max().item()
        return y / scale


_LIBRARY = torch.library.Library("dltestkit_tests", "DEF")
_LIBRARY.define("double(Tensor x) -> Tensor")
_LIBRARY.impl("double", lambda x: x * 2, "CPU")
_LIBRARY.define("count_positive(Tensor x) -> int")
_LIBRARY.impl("count_positive", lambda x: int((x > 0).sum()), "CPU")
_LIBRARY.define("no_float64(Tensor x) -> Tensor")


def _no_float64(x: torch.Tensor) -> torch.Tensor:
    """A kernel that, like torch._grouped_mm on the CPU, takes no float64 tensors."""
    if x.dtype == torch.float64:
        raise RuntimeError(f"Expected x to be Float32 or BFloat16, got {x.dtype}")
    return x * 2


_LIBRARY.impl("no_float64", _no_float64, "CPU")


def passes_through(backward: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """An autograd function whose forward returns (a copy of) its input and whose backward
    hands ``backward(grad)`` back: a hook into every backward pass through it."""

    class PassesThrough(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
            return x.clone()

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
            return backward(grad)

    return PassesThrough


class NoMetaKernel(AutoEncoder):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.dltestkit_tests.double(super().forward(x))


class CentresOverBatch(AutoEncoder):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out - out.mean(dim=0, keepdim=True)


class TokensMixedOverBatch(TokenModel):
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        embedded = super().embed(ids)
        return embedded - embedded.mean(dim=0)  # statistics over the batch


class IgnoresItsInput(AutoEncoder):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(torch.zeros_like(x)))


class DeadLayer(AutoEncoder):
    def __init__(self) -> None:
        super().__init__()
        self.refine = nn.Linear(FEATURES, FEATURES)  # defined, never used


class DetachedEncoder(AutoEncoder):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x).detach())


class ZeroGate(AutoEncoder):
    """ReZero-style: a residual branch behind a gate that starts at exactly zero."""

    def __init__(self, trainable_gate: bool = True) -> None:
        super().__init__()
        self.branch = nn.Linear(8, 8)
        self.gate = nn.Parameter(torch.zeros(1), requires_grad=trainable_gate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(x)
        return self.decoder(hidden + self.gate * self.branch(hidden))


class NoRegisterTokens(AutoEncoder):
    """Register tokens (DINOv2, DINOv3) joined to the sequence, none of them in this
    configuration: a parameter of no element."""

    def __init__(self, registers: int = 0) -> None:
        super().__init__()
        self.register_tokens = nn.Parameter(torch.zeros(1, registers, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(x).unsqueeze(1)
        tokens = torch.cat([self.register_tokens.expand(len(x), -1, -1), hidden], 1)
        return self.decoder(tokens.mean(1))


class UnreadRegisterTokens(NoRegisterTokens):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class DoubleZeroGate(ZeroGate):
    """Two zero gates in a row: each blocks the other's gradient, so neither ever trains."""

    def __init__(self) -> None:
        super().__init__()
        self.second_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(x)
        return self.decoder(hidden + self.gate * self.second_gate * self.branch(hidden))


class PatchAttention(nn.Module):
    """Self-attention over the patches of an image: over a single position for an image no
    larger than one patch (softmax over one element: no gradient reaches query and key)."""

    def __init__(self, patch: int = 4) -> None:
        super().__init__()
        self.patch = patch
        self.embed = nn.Conv2d(3, 8, patch, stride=patch)
        self.query, self.key, self.value = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)  # (batch, positions, 8)
        scores = self.query(tokens) @ self.key(tokens).transpose(1, 2) / 8**0.5
        return (scores.softmax(dim=-1) @ self.value(tokens)).mean(1)


class AttentionBesideAFrozenGate(nn.Module):
    """Attention over a single position, and beside it a branch gated off by a frozen zero."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = PatchAttention()
        self.branch = nn.Linear(8, 8)
        self.gate = nn.Parameter(torch.zeros(1), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.attention(x)
        return hidden + self.gate * self.branch(hidden)


class PoolingMixer(nn.Module):
    """PoolFormer's token mixer, a pooling minus its input, after a stem that shrinks the
    image 4 times: on an image of 4 x 4, a pooling over a single position, which cancels, so
    the mixer's norm and scale get exactly zero gradients; on a larger image they train."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 4, stride=4)
        self.norm = nn.GroupNorm(1, 8)
        self.pool = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
        self.scale = nn.Parameter(torch.full((8, 1, 1), 0.1))
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.norm(x)
        x = x + self.scale * (self.pool(y) - y)
        return self.head(torch.tanh(x).mean((2, 3)))


def small_images() -> torch.Tensor:
    return torch.randn(4, 3, 4, 4)  # one patch of 4 x 4


class StateResetInPlace(AutoEncoder):
    """At evaluation, keeps a state it resets in place after use (as transformers' RWKV
    updates its state cache): no gradient can be taken through the eval-mode pass."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if self.training:
            return out * out
        state = out.clone()
        result = state * state
        state.zero_()  # needed by the backward pass of the product
        return result


class _TrainingOnlyBackward(torch.autograd.Function):
    """The identity, whose backward pass refuses to run for a module in eval mode (as the
    reversible layers of transformers' Reformer assert)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, training: bool) -> torch.Tensor:
        ctx.training = training
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[torch.Tensor, None]:
        assert ctx.training, "make sure to use model.train() to train this model"
        return grad, None


class BackwardInTrainingOnly(AutoEncoder):
    """A model whose backward pass runs in training mode only: no gradient can be taken
    through its eval-mode pass, by design."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _TrainingOnlyBackward.apply(super().forward(x), self.training)


def _mixes_samples(base: type) -> type:
    """``base`` with its outputs centred over the batch: statistics over the samples."""

    class MixesSamples(base):  # type: ignore[valid-type,misc]
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = super().forward(x)
            return out - out.mean(0, keepdim=True)

    return MixesSamples


class OverwritesAWeight(AutoEncoder):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.decoder[0].bias.fill_(0.5)
        return super().forward(x)


class LogOfNegative(AutoEncoder):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(super().forward(x))


class SqrtAtZero(AutoEncoder):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out + torch.sqrt(out * 0)  # finite output, NaN gradient


class DropoutAlwaysOn(AutoEncoder):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(super().forward(x), p=0.5)  # training= left at its default, True


class CountsCalls(AutoEncoder):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros(()), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return super().forward(x) + self.calls


class StatisticInAPlainAttribute(AutoEncoder):
    def __init__(self) -> None:
        super().__init__()
        self.mean = torch.randn(SHAPE)  # fitted statistics, but not in the state dict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x - self.mean)


class ScaleNotPersistent(AutoEncoder):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.rand(()) + 0.5, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.scale


class NoiseOfFixedDtype(AutoEncoder):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out + 0.01 * torch.randn(out.shape)  # float32 whatever the model's dtype


class CastsToFloat(AutoEncoder):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x).float())


class ConstantOfFixedDtype(AutoEncoder):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("offset", torch.zeros(FEATURES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = torch.ones(FEATURES, 8, dtype=torch.float32)  # fixed dtype: fails in linear
        return self.decoder(F.linear(x.flatten(1) + self.offset, weights.T))


class TwoTowers(nn.Module):
    """A contrastive model as CLIP: normalised image and text embeddings, and the similarity
    of every image with every text of the batch (a design, not a mix-up)."""

    def __init__(self, centred: bool = False) -> None:
        super().__init__()
        self.image = nn.Sequential(nn.Flatten(), nn.Linear(FEATURES, 8))
        self.text = nn.Linear(5, 8)
        self.centred = centred  # the bug: image embeddings centred over the batch

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> Dict[str, torch.Tensor]:
        image_embeds = F.normalize(self.image(image), dim=-1)
        if self.centred:
            image_embeds = image_embeds - image_embeds.mean(0)
        text_embeds = F.normalize(self.text(text), dim=-1)
        logits = image_embeds @ text_embeds.T
        return {
            "logits_per_image": logits,
            "logits_per_text": logits.T,
            "image_embeds": image_embeds,
            "text_embeds": text_embeds,
        }


def two_towers_inputs() -> Tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return torch.randn(4, *SHAPE, generator=generator), torch.randn(4, 5, generator=generator)


def model_case(model_type: Any, inputs: Any = None, **attributes: Any) -> type:
    def set_up(self: Any) -> None:
        self.model = model_type()
        self.inputs = torch.randn(4, *SHAPE) if inputs is None else inputs()
        for name, value in attributes.items():
            setattr(self, name, value)

    return make_case(ModelTests, set_up)


def token_case(model_type: Any, **attributes: Any) -> type:
    return model_case(model_type, inputs=tokens, **attributes)


CHECKS = sorted(
    [
        "test_all_inputs_used",
        "test_all_parameters_updated",
        "test_batch_independence",
        "test_device_moving",
        "test_device_moving_on_gpu",
        "test_dtype_moving",
        "test_eval_deterministic",
        "test_finite_outputs_and_gradients",
        "test_inputs_unchanged",
        "test_output_shape",
        "test_reference_model",
        "test_reference_outputs",
        "test_running_statistics",
        "test_state_dict_round_trip",
        "test_train_matches_eval",
    ]
)


class CorrectModels(CheckTestCase):
    def test_every_check_passes(self) -> None:
        cases = {
            "autoencoder": model_case(AutoEncoder, make_model=AutoEncoder),
            "batchnorm": model_case(WithBatchNorm, make_model=WithBatchNorm),
            "softmax classifier": model_case(
                Classifier, expected_output_shape=(4, 5), make_model=Classifier
            ),
            "sequence": model_case(
                SequenceModel, inputs=lambda: torch.randn(4, 3, 5), make_model=SequenceModel
            ),
            "token ids in a dict, dict out": token_case(
                TokenModel, expected_output_shape=(4, 5, 6), make_model=TokenModel
            ),
            "reentrant gradient checkpointing": model_case(Checkpointed, make_model=Checkpointed),
            "positional tuple": model_case(
                lambda: nn.Bilinear(2, 3, 5),
                inputs=lambda: (torch.randn(4, 2), torch.randn(4, 3)),
                expected_output_shape=(4, 5),
                make_model=lambda: nn.Bilinear(2, 3, 5),
            ),
        }
        for label, case in cases.items():
            # test_running_statistics has nothing to check but on the BatchNorm models
            allowed = [NO_GPU] + ([] if "batchnorm" in label else [NO_RUNNING_STATISTICS])
            if "checkpointing" in label:
                allowed = [NO_GPU]
            for name in CHECKS:
                with self.subTest(label, check=name):
                    self.assertPasses(case, name, allowed_skips=allowed)

    def test_a_model_random_in_eval_mode_passes_the_other_checks(self) -> None:
        case = model_case(VAE)
        for name in CHECKS:
            if name in ("test_eval_deterministic", "test_state_dict_round_trip"):
                continue
            with self.subTest(check=name):
                self.assertPasses(case, name, allowed_skips=[NO_GPU, NO_RUNNING_STATISTICS])

    def test_the_checks_contribute_thirteen_tests(self) -> None:
        case = model_case(AutoEncoder)
        self.assertEqual(unittest.TestLoader().getTestCaseNames(case), CHECKS)
        self.assertEqual(sorted(checks_of(case)), CHECKS)

    def test_checks_leave_the_model_its_modes_and_its_inputs_as_they_were(self) -> None:
        model = WithBatchNorm()
        model.encoder.train(False)
        inputs = torch.randn(4, *SHAPE)
        saved_inputs = inputs.clone()
        state = {k: v.clone() for k, v in model.state_dict().items()}
        modes = [m.training for m in model.modules()]

        def set_up(self: Any) -> None:
            self.model, self.inputs = model, inputs
            self.make_model = WithBatchNorm

        case = make_case(ModelTests, set_up)
        for name in CHECKS:
            self.assertPasses(case, name)
        self.assertEqual([m.training for m in model.modules()], modes)
        for key, value in model.state_dict().items():
            self.assertTrue(torch.equal(value, state[key]), key)
        self.assertTrue(all(p.grad is None for p in model.parameters()))
        self.assertTrue(torch.equal(inputs, saved_inputs))
        self.assertEqual(torch.get_default_dtype(), torch.float32)


class Inputs(CheckTestCase):
    def test_a_dict_is_passed_as_keyword_arguments(self) -> None:
        seen = []

        class Keywords(TokenModel):
            def forward(self, *, input_ids: torch.Tensor, attention_mask: Any = None) -> Any:
                seen.append(
                    sorted(
                        k
                        for k, v in (("input_ids", input_ids), ("attention_mask", attention_mask))
                        if v is not None
                    )
                )
                return super().forward(input_ids, attention_mask)

        self.assertPasses(
            token_case(Keywords, expected_output_shape=(4, 5, 6)), "test_output_shape"
        )
        self.assertEqual(seen[0], ["attention_mask", "input_ids"])

    def test_inputs_without_a_batch_dimension_must_be_declared(self) -> None:
        def inputs() -> Any:
            return {"src": torch.randn(4, 6, 8), "src_mask": torch.zeros(6, 6)}

        layer = lambda: nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)  # noqa: E731
        self.assertErrorsWith(
            model_case(layer, inputs=inputs),
            "test_output_shape",
            "ContractError",
            "whose first dimensions differ",
            "self.inputs['src_mask'] (6, 6)",
            "list the ones that are the same for every sample (a (seq, seq) mask) in "
            "self.unbatched_inputs. Inputs packed across the samples",
            "test the model through a wrapper that takes them batch first",
        )
        self.assertPasses(
            model_case(layer, inputs=inputs, unbatched_inputs=["src_mask"]),
            "test_batch_independence",
        )

    def test_unknown_unbatched_inputs_are_refused(self) -> None:
        self.assertErrorsWith(
            token_case(TokenModel, unbatched_inputs=["mask"]),
            "test_output_shape",
            "self.unbatched_inputs set in Case.setUp "
            "names ['mask'], which self.inputs does not have",
        )

    def test_inputs_without_any_batched_tensor_are_refused(self) -> None:
        self.assertErrorsWith(
            model_case(AutoEncoder, inputs=lambda: {"x": 3}),
            "test_output_shape",
            "holds no tensor with a batch dimension",
        )

    def test_an_expected_shape_not_starting_with_the_batch_size_is_a_contract_error(self) -> None:
        self.assertErrorsWith(
            model_case(AutoEncoder, expected_output_shape=(16,)),
            "test_batch_independence",
            "ContractError",
            "does not start with the batch size of self.inputs (4)",
        )

    def test_a_model_that_cannot_be_copied_is_told_why_the_checks_copy_it(self) -> None:
        class HoldsAGenerator(AutoEncoder):
            def __init__(self) -> None:
                super().__init__()
                self.stream = (i for i in range(3))

        self.assertErrorsWith(
            model_case(HoldsAGenerator),
            "test_all_parameters_updated",
            "self.model cannot be deep-copied",
            "work on a copy",
        )


class OutputShape(CheckTestCase):
    def test_a_similarity_matrix_follows_the_batch_in_both_dimensions_by_design(self) -> None:
        outcome = run_check(
            model_case(TwoTowers, inputs=two_towers_inputs, expected_output_shape=(4, 4)),
            "test_output_shape",
        )
        self.assertEqual((outcome.failures, outcome.errors), ([], []))
        self.assertEqual(len(outcome.skips), 1)  # batch size 1, as a subtest
        self.assertIn(
            "the checked output, of shape (4, 4), compares pairs of samples: at batch size 1 "
            "it has shape (1, 1), its dimension 1 following the batch size as the first does",
            outcome.skips[0],
        )
        self.assertIn("list this one in self.cross_sample_outputs", outcome.skips[0])

    def test_a_dimension_that_follows_the_batch_without_being_it_still_fails(self) -> None:
        class WithABiasColumn(TwoTowers):
            def forward(self, image: torch.Tensor, text: torch.Tensor) -> Dict[str, torch.Tensor]:  # type: ignore[override]
                out = super().forward(image, text)
                logits = out["logits_per_image"]
                return {"logits": torch.cat([logits, logits[:, :1]], dim=1), **out}

        self.assertFailsWith(
            model_case(WithABiasColumn, inputs=two_towers_inputs, expected_output_shape=(4, 5)),
            "test_output_shape",
            "at batch size 1 the output has shape (1, 2), expected (1, 5)",
        )

    def test_a_model_hard_wired_to_batch_four_fails_at_batch_size_one(self) -> None:
        text = self.assertFailsWith(
            model_case(HardWiredBatch),
            "test_output_shape",
            "at batch size 1 the model raises RuntimeError: shape '[4, 16]'",
            "hard-coded batch size",
        )
        self.assertNotIn("batch size 4 the", text)

    def test_a_squeeze_that_drops_the_batch_dimension_fails(self) -> None:
        self.assertFailsWith(
            model_case(Squeezes, expected_output_shape=(4, 5)),
            "test_output_shape",
            "at batch size 1 the output has shape (5,), expected (1, 5)",
        )

    def test_without_a_declared_shape_a_classifier_is_no_failure_its_batch_size_still_checked(
        self,
    ) -> None:
        # the inputs' shape is what an autoencoder returns, not a classifier: not a bug
        outcome = run_check(model_case(Classifier), "test_output_shape")
        self.assertEqual((outcome.failures, outcome.errors), ([], []))
        self.assertEqual(len(outcome.skips), 1)
        for fragment in (
            "self.expected_output_shape is not set, and the output has shape (4, 5) for "
            "self.inputs, not the inputs' shape (4, 1, 4, 4)",
            "Set self.expected_output_shape to the shape the model must return",
            "the other batch size was checked against the output's own shape",
        ):
            self.assertIn(fragment, outcome.skips[0])
        # ... and a squeeze that drops the batch dimension at batch size 1 still fails
        self.assertFailsWith(
            model_case(Squeezes),
            "test_output_shape",
            "at batch size 1 the output has shape (5,), expected (1, 5)",
        )
        self.assertPasses(model_case(Classifier, expected_output_shape=(4, 5)), "test_output_shape")

    def test_without_a_declared_shape_an_output_that_is_not_batch_first_skips(self) -> None:
        class ReturnsTheMean(Classifier):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return super().forward(x).mean(0)

        self.assertSkipsWith(
            model_case(ReturnsTheMean),
            "test_output_shape",
            "self.expected_output_shape is not set, and the output has shape (5,)",
            "the output's first dimension is not the batch size (4), so no other batch size "
            "was checked either",
        )

    def test_a_wrong_expected_shape_fails_once_without_the_batch_size_hint(self) -> None:
        case = model_case(AutoEncoder, expected_output_shape=(4, 16))
        text = self.assertFailsWith(
            case,
            "test_output_shape",
            "the output has shape "
            "(4, 1, 4, 4) for self.inputs (batch size 4), expected "
            "(4, 16). Fix the model or self.expected_output_shape.",
        )
        self.assertNotIn("hard-coded", text)
        self.assertEqual(len(run_check(case, "test_output_shape").failures), 1)

    def test_a_model_failing_on_the_inputs_themselves_is_one_error_saying_how_it_was_called(
        self,
    ) -> None:
        class WantsKeywords(TokenModel):
            def forward(
                self,
                input_ids: torch.Tensor,
                token_type_ids: torch.Tensor,  # type: ignore[override]
                attention_mask: Any = None,
            ) -> Any:
                return super().forward(input_ids + token_type_ids, attention_mask)

        case = model_case(
            WantsKeywords,
            # every id of the vocabulary of 20, shifted by the token type 1: id 20 is out of range
            inputs=lambda: (torch.arange(20).view(4, 5), torch.ones(4, 5, dtype=torch.long)),
            expected_output_shape=(4, 5, 6),
        )
        outcome = run_check(case, "test_output_shape")
        self.assertEqual((len(outcome.errors), outcome.failures), (1, []))
        self.assertIn("called as model(*inputs), positional arguments", outcome.errors[0])
        self.assertIn("use a dict for keyword arguments", outcome.errors[0])
        self.assertNotIn("hard-coded", outcome.errors[0])

    def test_every_check_on_a_model_that_raises_says_how_it_was_called(self) -> None:
        class RaisesOnItsInputs(AutoEncoder):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                raise ValueError("the size of tensor a (4) must match the size of tensor b (8)")

        # (the checks that call the model their own way too: through the probes of the
        # inputs, or watching them for changes)
        for name in (
            "test_all_inputs_used",
            "test_batch_independence",
            "test_inputs_unchanged",
            "test_output_shape",
        ):
            with self.subTest(name):
                outcome = run_check(model_case(RaisesOnItsInputs), name)
                self.assertEqual(len(outcome.errors), 1, outcome.failures)
                self.assertIn("ValueError: the size of tensor a (4)", outcome.errors[0])
                self.assertIn("[dltestkit] raised by the model in ", outcome.errors[0])
                self.assertIn("called as model(inputs)", outcome.errors[0])

    def test_a_dict_output_without_output_key_names_what_was_checked(self) -> None:
        case = token_case(TokenModel, expected_output_shape=(4, 3))
        self.assertFailsWith(
            case,
            "test_output_shape",
            "expected (4, 3)",
            "The checked output is the first element of the dict",
            "output['pooled'] (4, 3)",
            "set self.output_key",
        )
        self.assertPasses(
            token_case(TokenModel, expected_output_shape=(4, 3), output_key="pooled"),
            "test_output_shape",
        )

    def test_an_output_key_that_selects_nothing_is_a_contract_error(self) -> None:
        self.assertErrorsWith(
            token_case(TokenModel, output_key="logits", expected_output_shape=(4, 3)),
            "test_output_shape",
            "ContractError",
            "has no element 'logits' (chosen by self.output_key); it has ['hidden', 'pooled']",
        )

    def test_tuple_or_dict_inputs_without_an_expected_shape_skip(self) -> None:
        self.assertSkipsWith(
            token_case(TokenModel),
            "test_output_shape",
            "self.inputs is a dict; set self.expected_output_shape",
        )


class DeviceMoving(CheckTestCase):
    def test_bugs_that_break_on_a_gpu_are_caught_without_one(self) -> None:
        for model_type in (RandnWithoutDevice, UnregisteredTensor, PlainListOfLayers):
            with self.subTest(model_type.__name__):
                self.assertFailsWith(
                    model_case(model_type),
                    "test_device_moving",
                    "does not move to another device as a whole",
                    "combines a CPU tensor",
                    "register_buffer",
                    "nn.ModuleList",
                )

    def test_the_message_names_the_operation_the_module_and_the_line(self) -> None:
        self.assertFailsWith(
            model_case(UnregisteredTensor),
            "test_device_moving",
            "Tensor.mul combines a CPU tensor of shape (1, 4, 4) "
            "(torch.float32) with tensors on the model's device, in "
            "UnregisteredTensor, at test_model_checks.py:",
            "in forward",
        )

    def test_position_ids_on_the_cpu_are_caught_although_meta_accepts_them(self) -> None:
        self.assertFailsWith(
            token_case(PositionIdsOnTheCPU),
            "test_device_moving",
            "F.embedding combines a CPU tensor of shape (5,) (torch.int64)",
            "made by torch.arange without device= in PositionIdsOnTheCPU, at test_model_checks.py:",
            "in positions (Embedding)",
            "in embed",
        )

    def test_a_device_chosen_as_none_on_meta_skips_naming_it(self) -> None:
        # device=None passed explicitly: the model's own choice, which a GPU does not see
        self.assertSkipsWith(
            token_case(PositionsWhereTheWeightsAre),
            "test_device_moving",
            "in eval and training mode, F.embedding combines a CPU tensor of shape (5,) "
            "(torch.int64) with tensors on the model's device, made by torch.arange given "
            "device=None in PositionsWhereTheWeightsAre, at test_model_checks.py:",
            "a device the model chose (device=None passed explicitly",
            "the rest of the forward pass moved as a whole",
        )

    def test_a_device_bug_after_a_device_chosen_as_none_fails(self) -> None:
        self.assertFailsWith(
            token_case(PositionsWhereTheWeightsAreThenNoise),
            "test_device_moving",
            "Tensor.add combines a CPU tensor of shape (4, 5, 6) (torch.float32) with tensors "
            "on the model's device, made by torch.randn without device=",
        )

    def test_packed_sequences_keep_their_lengths_on_the_cpu_as_they_must(self) -> None:
        for rnn in ("lstm", "gru", "rnn"):
            with self.subTest(rnn):
                self.assertPasses(
                    token_case(lambda rnn=rnn: PackedTagger(rnn)), "test_device_moving"
                )

    def test_a_packed_rnn_started_from_a_state_made_on_the_cpu_fails(self) -> None:
        class InitialStateOnTheCPU(PackedTagger):
            enforce_sorted = True  # no reordering: the state goes straight to torch.gru

            def initial_state(self, ids: torch.Tensor) -> Any:
                return torch.zeros(2, ids.shape[0], 6)  # no device=

        def sorted_tokens() -> Dict[str, torch.Tensor]:
            batch = tokens()
            return {key: value.flip(0) for key, value in batch.items()}  # longest first

        self.assertFailsWith(
            model_case(lambda: InitialStateOnTheCPU("gru"), inputs=sorted_tokens),
            "test_device_moving",
            "torch.gru combines a CPU tensor of shape (2, 4, 6) (torch.float32) with tensors "
            "on the model's device, made by torch.zeros without device= in "
            "InitialStateOnTheCPU, at test_model_checks.py:",
            "in initial_state, in rnn (GRU)",
        )

    def test_an_unused_empty_argument_of_multi_head_attention_passes(self) -> None:
        # transformers' WavLM hands F.multi_head_attention_forward torch.empty([0]) as the
        # in_proj_weight it ignores when given separate projections; it runs on GPUs
        class SeparateProjections(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
                self.out = nn.Linear(8, 8)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                seq_first = x.transpose(0, 1)
                output, _ = F.multi_head_attention_forward(
                    seq_first, seq_first, seq_first, 8, 2,
                    torch.empty([0]),  # no device=: unused
                    torch.cat((self.q.bias, self.k.bias, self.v.bias)),
                    None, None, False, 0.0, self.out.weight, self.out.bias,
                    training=self.training, need_weights=False,
                    use_separate_proj_weight=True,
                    q_proj_weight=self.q.weight,
                    k_proj_weight=self.k.weight,
                    v_proj_weight=self.v.weight,
                )  # fmt: skip
                return output.transpose(0, 1)

        def inputs() -> torch.Tensor:
            return torch.randn(4, 5, 8)

        self.assertPasses(
            model_case(SeparateProjections, inputs=inputs), "test_device_moving", allowed_skips=()
        )

    def test_an_empty_tensor_made_on_the_cpu_and_combined_fails(self) -> None:
        class EmptyAccumulator(AutoEncoder):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                out = super().forward(x)
                gathered = torch.cat([torch.empty(0), out.flatten()])  # no device=
                return gathered.view_as(out)

        self.assertFailsWith(
            model_case(EmptyAccumulator),
            "test_device_moving",
            "torch.cat combines a CPU tensor of shape (0,) (torch.float32) with tensors on the "
            "model's device",
        )

    def test_ctc_loss_with_its_targets_and_lengths_on_the_cpu_passes(self) -> None:
        # cuDNN's CTC wants them there; the lengths made without device= are fine too
        self.assertPasses(model_case(CTCModel, inputs=ctc_inputs), "test_device_moving")

    def test_a_transformer_encoder_asking_whether_its_mask_is_left_aligned_is_checked(
        self,
    ) -> None:
        # enable_nested_tensor=True (the default) reads the mask's values in eval mode
        def encoder() -> nn.Module:
            layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
            return nn.TransformerEncoder(layer, 1)

        def inputs() -> Dict[str, torch.Tensor]:
            return {
                "src": torch.randn(4, 5, 8),
                "src_key_padding_mask": tokens()["attention_mask"] == 0,
            }

        self.assertPasses(
            model_case(encoder, inputs=inputs), "test_device_moving", allowed_skips=()
        )

    def test_data_dependent_forward_passes_are_checked_by_replaying_the_cpu_run(self) -> None:
        # TokenModel branches on attention_mask.all(), which the meta device cannot evaluate
        self.assertPasses(token_case(TokenModel), "test_device_moving")

    def test_a_device_bug_in_the_training_path_only_is_caught(self) -> None:
        self.assertFailsWith(
            model_case(SamplesInTrainingOnly),
            "test_device_moving",
            "in training mode, Tensor.mul combines a CPU tensor",
            "in bottleneck",
        )

    def test_an_output_left_on_the_cpu_fails_naming_it(self) -> None:
        self.assertFailsWith(
            model_case(ReturnsAConstantMadeOnTheCPU),
            "test_device_moving",
            "after .to('meta') the model returns output[1] (on cpu) in eval mode",
            "no tensor made without device=",
        )

    def test_mixing_hidden_from_the_operation_watch_is_still_caught_by_meta(self) -> None:
        class HidesItsOperations(UnregisteredTensor):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                with torch._C.DisableTorchFunction():  # no TorchFunctionMode sees this
                    return super().forward(x)

        self.assertFailsWith(
            model_case(HidesItsOperations),
            "test_device_moving",
            "combines a tensor left on the CPU (Tensor on device cpu is not on "
            "the expected device meta",
        )

    def test_a_model_that_raises_is_an_error_saying_how_it_was_called(self) -> None:
        class Raises(AutoEncoder):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                raise KeyError("no such layer")

        self.assertErrorsWith(
            model_case(Raises),
            "test_device_moving",
            "KeyError: 'no such layer'",
            "[dltestkit] raised by the model in eval mode, called as model(inputs)",
        )

    def test_numpy_arrays_of_a_device_tensor_fail(self) -> None:
        class AsArray(AutoEncoder):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                scale = float(np.asarray(x.abs().max().detach()))  # fails for a GPU tensor
                return super().forward(x / scale)

        self.assertFailsWith(
            model_case(AsArray),
            "test_device_moving",
            "np.asarray(tensor) is called on a tensor on the model's device",
        )

    def test_numpy_on_a_device_tensor_fails(self) -> None:
        self.assertFailsWith(
            model_case(NumpyInForward),
            "test_device_moving",
            "Tensor.numpy() is called on a tensor on the model's device",
            "use .cpu().numpy()",
        )

    def test_a_forward_pass_that_depends_on_the_device_skips_saying_why(self) -> None:
        self.assertSkipsWith(
            model_case(DeviceDependentPath),
            "test_device_moving",
            "takes another path on the meta device than on the CPU",
        )

    def test_an_operator_without_a_meta_kernel_is_stood_in_for_by_the_cpu_run(self) -> None:
        # as torch._grouped_mm in transformers' MoE layers, whose meta kernel refuses float32
        self.assertPasses(model_case(NoMetaKernel), "test_device_moving", allowed_skips=())

    def test_device_bugs_after_an_operator_without_a_meta_kernel_are_still_caught(self) -> None:
        class NoMetaKernelThenNoiseOnTheCPU(NoMetaKernel):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                out = super().forward(x)
                return out + torch.randn(out.shape)

        self.assertFailsWith(
            model_case(NoMetaKernelThenNoiseOnTheCPU),
            "test_device_moving",
            "after .to('meta'), in eval mode, Tensor.add combines a CPU tensor",
        )

    def test_an_operator_that_cannot_be_stood_in_for_skips_naming_it(self) -> None:
        class CountsOnMeta(AutoEncoder):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                out = super().forward(x)
                return out * torch.ops.dltestkit_tests.count_positive(x)  # an int, no tensor

        self.assertSkipsWith(
            model_case(CountsOnMeta),
            "test_device_moving",
            "in eval and training mode, the model uses an operation the meta device cannot "
            "run, torch.ops.dltestkit_tests.count_positive in CountsOnMeta, at "
            "test_model_checks.py:",
            "dltestkit_tests::count_positive",
        )

    def test_a_mode_that_cannot_run_on_meta_does_not_hide_the_other(self) -> None:
        class CountsInEval(AutoEncoder):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                out = super().forward(x)
                if self.training:
                    return out
                return out * torch.ops.dltestkit_tests.count_positive(x)

        class AndNoiseOnTheCPUInTraining(CountsInEval):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                out = super().forward(x)
                return out + torch.randn(out.shape) if self.training else out

        outcome = run_check(model_case(CountsInEval), "test_device_moving")
        self.assertEqual((outcome.failures, outcome.errors), ([], []))
        self.assertEqual(len(outcome.skips), 1)  # the eval mode only, as a subtest
        self.assertIn(
            "in eval mode, the model uses an operation the meta device cannot run", outcome.skips[0]
        )
        self.assertIn("(the other mode was checked)", outcome.skips[0])
        self.assertFailsWith(
            model_case(AndNoiseOnTheCPUInTraining),
            "test_device_moving",
            "after .to('meta'), in training mode, Tensor.add combines a CPU tensor",
        )

    def test_without_a_gpu_the_gpu_check_skips_with_the_reason(self) -> None:
        self.assertSkipsWith(
            model_case(AutoEncoder, accelerators=[]),
            "test_device_moving_on_gpu",
            "no CUDA, MPS or other accelerator",
        )

    def test_with_an_accelerator_outputs_are_compared_after_moving_there_and_back(self) -> None:
        # "cpu" stands in for a GPU so that this part runs on CPU-only machines too.
        # WithBatchNorm: its training-mode pass updates the running statistics, which must
        # not count as a change from moving back
        for model_type in (AutoEncoder, VAE, WithBatchNorm):
            with self.subTest(model_type.__name__):
                self.assertPasses(
                    model_case(model_type, accelerators=["cpu"]), "test_device_moving_on_gpu"
                )

    def test_with_an_accelerator_outputs_that_are_no_tensors_are_not_compared(self) -> None:
        class Cache:  # like transformers' DynamicCache: tensors inside an object
            def __init__(self, keys: torch.Tensor) -> None:
                self.keys = keys

        class ReturnsACache(AutoEncoder):
            def forward(self, x: torch.Tensor) -> Dict[str, Any]:  # type: ignore[override]
                return {"logits": super().forward(x), "cache": Cache(x * 2)}

        self.assertPasses(
            model_case(ReturnsACache, accelerators=["cpu"]), "test_device_moving_on_gpu"
        )

    def test_with_an_accelerator_outputs_that_differ_on_the_device_fail(self) -> None:
        class ChangesWhenMoved(AutoEncoder):
            moved = False

            def _apply(self, fn: Any, recurse: bool = True) -> Any:  # what .to() calls
                self.moved = True
                return super()._apply(fn, recurse)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return super().forward(x) + float(self.moved)

        self.assertFailsWith(
            model_case(ChangesWhenMoved, accelerators=["cpu"]),
            "test_device_moving_on_gpu",
            "the model on cpu gives other outputs than on the CPU (output):",
            "Mismatched elements",
        )

    def test_with_an_accelerator_the_output_that_differs_is_named(self) -> None:
        class ChangesItsSecondOutputWhenMoved(AutoEncoder):
            moved = False

            def _apply(self, fn: Any, recurse: bool = True) -> Any:
                self.moved = True
                return super()._apply(fn, recurse)

            def forward(self, x: torch.Tensor) -> Dict[str, Any]:  # type: ignore[override]
                out = super().forward(x)
                return {"out": out, "stats": [out.mean(), out.std() + float(self.moved)]}

        self.assertFailsWith(
            model_case(ChangesItsSecondOutputWhenMoved, accelerators=["cpu"]),
            "test_device_moving_on_gpu",
            "the model on cpu gives other outputs than on the CPU (output['stats'][1]):",
        )

    def test_with_an_accelerator_outputs_that_change_after_moving_back_fail(self) -> None:
        class ChangesWhenMovedBack(AutoEncoder):
            moves = 0

            def _apply(self, fn: Any, recurse: bool = True) -> Any:
                self.moves += 1
                return super()._apply(fn, recurse)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return super().forward(x) + float(self.moves >= 2)

        self.assertFailsWith(
            model_case(ChangesWhenMovedBack, accelerators=["cpu"]),
            "test_device_moving_on_gpu",
            "the model moved to cpu and back gives other outputs than before (output):",
        )


class BatchIndependence(CheckTestCase):
    def assertJudgedByValues(self, model_type: type, *refused: str) -> None:
        """The dependence checks pass on ``model_type``, whose eval-mode pass cannot be
        differentiated, comparing values, and say why in a skipped part (``refused``)."""
        for name, how in (
            ("test_batch_independence", "the samples were compared by values only"),
            ("test_all_inputs_used", "each input was judged as a whole, by values"),
        ):
            with self.subTest(name):
                self.assertSkipsWith(model_case(model_type), name, *refused, how)
                self.assertPasses(
                    model_case(model_type),
                    name,
                    allowed_skips=("no gradient can be taken through",),
                )
        self.assertFailsWith(
            model_case(_mixes_samples(model_type)),
            "test_batch_independence",
            "sample 0's output changes with the other samples of the batch",
        )

    def test_an_eval_pass_without_gradients_is_judged_by_values(self) -> None:
        self.assertJudgedByValues(
            StateResetInPlace,
            "no gradient can be taken through the model's eval-mode forward pass, "
            "which changes in place a tensor its backward pass needs",
            "modified by an inplace operation",
        )

    def test_a_backward_pass_that_refuses_eval_mode_is_judged_by_values(self) -> None:
        self.assertJudgedByValues(
            BackwardInTrainingOnly,
            "no gradient can be taken through the model's eval-mode forward pass: "
            "the model's own backward code raises AssertionError: make sure to use "
            "model.train() to train this model, at test_model_checks.py:",
            "in backward: `assert ctx.training",
        )

        class IgnoresItsInput(BackwardInTrainingOnly):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return super().forward(torch.zeros_like(x))

        self.assertFailsWith(
            model_case(IgnoresItsInput), "test_all_inputs_used", "self.inputs is not read"
        )

    def test_an_error_of_torch_alone_in_the_eval_mode_backward_pass_is_not_explained_away(
        self,
    ) -> None:
        class WrongGradientShape(torch.autograd.Function):
            @staticmethod
            def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
                return x.clone()

            @staticmethod
            def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
                return grad[:1]  # torch's engine refuses the shape, after this returns

        class BadBackward(AutoEncoder):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return WrongGradientShape.apply(super().forward(x))

        outcome = run_check(model_case(BadBackward), "test_batch_independence")
        self.assertEqual(outcome.skips, [])
        self.assertTrue(outcome.errors or outcome.failures)
        self.assertIn("invalid gradient", "\n".join(outcome.errors + outcome.failures))

    def test_batch_mixing_bugs_fail(self) -> None:
        cases = {
            "reshape used as transpose": model_case(
                lambda: SequenceModel(bug=True), inputs=lambda: torch.randn(4, 3, 5)
            ),
            "softmax over dim 0": model_case(
                lambda: Classifier(softmax_dim=0), expected_output_shape=(4, 5)
            ),
            "centring over the batch": model_case(CentresOverBatch),
            "BatchNorm without running stats": model_case(
                lambda: WithBatchNorm(track_running_stats=False)
            ),
        }
        for label, case in cases.items():
            with self.subTest(label):
                self.assertFailsWith(
                    case,
                    "test_batch_independence",
                    "gets a gradient from the outputs of the other samples",
                    "mixes samples",
                )

    def test_every_sample_is_masked_not_only_the_first(self) -> None:
        class MixesLastTwo(AutoEncoder):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                out = super().forward(x)
                return torch.cat([out[:2], out[2:].mean(dim=0, keepdim=True).expand(2, *SHAPE)])

        self.assertFailsWith(
            model_case(MixesLastTwo),
            "test_batch_independence",
            "sample 2's self.inputs gets a gradient",
        )

    def test_token_inputs_are_checked_through_their_embeddings(self) -> None:
        self.assertPasses(token_case(TokenModel), "test_batch_independence")
        self.assertFailsWith(
            token_case(TokensMixedOverBatch),
            "test_batch_independence",
            "sample 0's self.inputs['input_ids'] (through its embedding) gets "
            "a gradient from the outputs of the other samples",
        )

    def test_an_output_that_ignores_the_input_fails(self) -> None:
        self.assertFailsWith(
            model_case(IgnoresItsInput),
            "test_batch_independence",
            "the checked output does not depend on self.inputs at all",
            "every sample gets the same output although the samples differ",
            "torch.zeros_like(x)",
        )

    def test_the_same_output_for_every_sample_without_any_probe_skips(self) -> None:
        """Without a gradient, a zero-initialised output layer cannot be told from an output
        that ignores its inputs."""

        class ClampsItsTokens(TokenModel):
            def __init__(self, zero_head: bool = False) -> None:
                super().__init__()
                if zero_head:
                    nn.init.zeros_(self.mix.weight)

            def forward(self, input_ids: torch.Tensor, attention_mask: Any = None) -> Any:
                return super().forward(input_ids.clamp(0, 19), attention_mask)

        self.assertPasses(token_case(ClampsItsTokens), "test_batch_independence")
        self.assertSkipsWith(
            model_case(
                lambda: ClampsItsTokens(zero_head=True), inputs=lambda: tokens()["input_ids"]
            ),
            "test_batch_independence",
            "every sample gets exactly the same checked output in eval mode",
            "no input can be differentiated",
            "(clamped, shifted, offset)",
        )

    def test_a_zero_initialised_output_layer_is_no_false_alarm(self) -> None:
        def zero_head() -> nn.Module:  # as torchvision's VisionTransformer initialises its head
            model = AutoEncoder()
            nn.init.zeros_(model.decoder[0].weight)
            return model

        self.assertPasses(model_case(zero_head), "test_batch_independence")

    def test_a_checked_output_without_the_batch_dimension_fails(self) -> None:
        class ReturnsLossFirst(AutoEncoder):
            def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
                out = super().forward(x)
                return out.square().mean(), out

        self.assertFailsWith(
            model_case(ReturnsLossFirst),
            "test_batch_independence",
            "the checked output has shape (), whose first dimension is not the batch size 4",
            "set self.output_key",
        )

    def test_integer_inputs_that_reach_no_embedding_are_compared_by_value(self) -> None:
        class OneHot(nn.Module):
            def __init__(self, mixes: bool = False) -> None:
                super().__init__()
                self.linear = nn.Linear(10, 3)
                self.mixes = mixes

            def forward(self, labels: torch.Tensor) -> torch.Tensor:
                out = self.linear(F.one_hot(labels, 10).float())
                return out.softmax(dim=0) if self.mixes else out

        def case(mixes: bool) -> type:
            return model_case(
                lambda: OneHot(mixes), inputs=lambda: torch.arange(4), expected_output_shape=(4, 3)
            )

        self.assertPasses(case(mixes=False), "test_batch_independence")
        self.assertFailsWith(
            case(mixes=True),
            "test_batch_independence",
            "sample 0's output changes with the other samples of the batch: for a batch of "
            "4 copies of sample 0 it differs from the output for self.inputs by up to",
            "softmax/normalisation over dim 0",
            "(Only outputs were compared: no input can be differentiated: self.inputs has "
            "no floating-point tensor, and its integer tensors (self.inputs) reach no embedding",
        )

    def test_batch_statistics_computed_without_gradient_fail(self) -> None:
        class CentresDetached(AutoEncoder):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return super().forward(x - x.mean(0).detach())

        class StandardisesUnderNoGrad(AutoEncoder):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                hidden = self.encoder(x)
                with torch.no_grad():
                    mean, std = hidden.mean(0), hidden.std(0)
                return self.decoder((hidden - mean) / (std + 1e-5))

        class HandWrittenBatchNorm(AutoEncoder):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                hidden = self.encoder(x)
                return self.decoder(hidden - hidden.data.mean(0))

        class BatchNormUnderNoGrad(WithBatchNorm):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                hidden = self.encoder[1](self.encoder[0](x))
                with torch.no_grad():
                    normalised = self.encoder[2](hidden)
                return self.decoder(hidden + normalised)

        cases = {
            "x - x.mean(0).detach()": model_case(CentresDetached),
            "statistics under torch.no_grad()": model_case(StandardisesUnderNoGrad),
            "statistics of .data": model_case(HandWrittenBatchNorm),
            "BatchNorm without running stats under torch.no_grad()": model_case(
                lambda: BatchNormUnderNoGrad(track_running_stats=False)
            ),
        }
        for label, case in cases.items():
            with self.subTest(label):
                self.assertFailsWith(
                    case,
                    "test_batch_independence",
                    "sample 0's output changes with the other samples of the batch",
                    "although no gradient flows between the samples",
                    "statistics over the batch taken under torch.no_grad(), with .detach() or "
                    "on .data",
                    "Greatest absolute difference",
                )
        self.assertPasses(model_case(lambda: BatchNormUnderNoGrad()), "test_batch_independence")

    def test_a_backward_pass_that_is_not_linear_is_no_false_alarm(self) -> None:
        """Gradients clipped inside backward (not linear in the gradient handed to it): the
        screen of two backward passes sees a difference, and the exact comparison of every
        sample's gradients passes the model; the same clipping with samples mixed fails."""

        ClipsGradients = passes_through(lambda grad: grad.clamp(-1e-3, 1e-3))

        class Clipped(AutoEncoder):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return super().forward(ClipsGradients.apply(x))

        class ClippedAndMixed(AutoEncoder):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return super().forward(ClipsGradients.apply(x).roll(1, 0))

        self.assertPasses(model_case(Clipped), "test_batch_independence")
        self.assertFailsWith(
            model_case(ClippedAndMixed),
            "test_batch_independence",
            "gets a gradient from the outputs of the other samples of the batch",
        )

    def test_values_leaked_into_one_sample_or_through_a_maximum_one_sample_holds_fail(
        self,
    ) -> None:
        """Once the gradients show no mixing, the values are compared for copies of samples 0
        and 1, whose other positions screen the other samples: a leak into the last sample
        only is found (the copies of sample 0 do not repeat its output at position 3, and
        copies of sample 3 show the leak), and a division by the batch's largest value,
        which copies of sample 0 leave unchanged when sample 0 holds it, by the copies of
        sample 1."""

        class LeaksIntoTheLast(AutoEncoder):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                out = super().forward(x)
                return torch.cat([out[:-1], out[-1:] + out[:1].detach()])

        class DividesByTheBatchMaximum(AutoEncoder):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return super().forward(x / x.abs().max().detach())

        def largest_in_sample_0() -> torch.Tensor:
            x = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(0))
            x[0, 0, 0, 0] = 10.0
            return x

        self.assertFailsWith(
            model_case(LeaksIntoTheLast),
            "test_batch_independence",
            "sample 3's output changes with the other samples of the batch: for a batch of 4 "
            "copies of sample 3 it differs from the output for self.inputs",
            "although no gradient flows between the samples",
        )
        self.assertFailsWith(
            model_case(DividesByTheBatchMaximum, inputs=largest_in_sample_0),
            "test_batch_independence",
            "sample 1's output changes with the other samples of the batch: for a batch of 4 "
            "copies of sample 1 it differs from the output for self.inputs",
            "although no gradient flows between the samples",
        )
        self.assertPasses(
            model_case(AutoEncoder, inputs=largest_in_sample_0), "test_batch_independence"
        )

    def test_every_output_whose_first_dimension_is_the_batch_is_compared(self) -> None:
        class LeaksIntoASecondOutput(AutoEncoder):
            def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
                hidden = self.encoder(x)
                return self.decoder(hidden), hidden - hidden.mean(0).detach()

        self.assertFailsWith(
            model_case(LeaksIntoASecondOutput),
            "test_batch_independence",
            "sample 0's output[1] changes with the other samples of the batch",
            "statistics over the batch (also when computed under torch.no_grad()",
        )

    def test_outputs_whose_first_dimension_is_not_the_batch_are_not_compared(self) -> None:
        """nn.GRU's final state is (layers, batch, features): with 4 layers and 4 samples its
        first dimension has the batch size, but its rows are layers."""
        case = model_case(
            lambda: nn.GRU(3, 5, num_layers=4, batch_first=True),
            inputs=lambda: torch.randn(4, 6, 3),
            expected_output_shape=(4, 6, 5),
        )
        self.assertPasses(case, "test_batch_independence")

    def test_outputs_padded_to_the_longest_sample_of_the_batch_are_no_false_alarm(self) -> None:
        class PackedGRU(nn.Module):
            """Returns (batch, longest length in the batch, features), as pad_packed_sequence."""

            def __init__(self) -> None:
                super().__init__()
                self.gru = nn.GRU(3, 5, batch_first=True)

            def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
                packed = nn.utils.rnn.pack_padded_sequence(
                    x, lengths, batch_first=True, enforce_sorted=False
                )
                out, _ = nn.utils.rnn.pad_packed_sequence(self.gru(packed)[0], batch_first=True)
                return out

        case = model_case(
            PackedGRU, inputs=lambda: (torch.randn(4, 6, 3), torch.tensor([6, 2, 4, 3]))
        )
        self.assertPasses(case, "test_batch_independence")

    def test_outputs_computed_from_a_frozen_part_under_no_grad_are_compared_by_value(
        self,
    ) -> None:
        class FrozenEncoder(AutoEncoder):
            def __init__(self, centred: bool = False) -> None:
                super().__init__()
                self.centred = centred

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                with torch.no_grad():  # a frozen feature extractor (linear probing)
                    hidden = self.encoder(x)
                    if self.centred:
                        hidden = hidden - hidden.mean(0)
                return self.decoder(hidden)

        self.assertPasses(model_case(FrozenEncoder), "test_batch_independence")
        self.assertFailsWith(
            model_case(lambda: FrozenEncoder(centred=True)),
            "test_batch_independence",
            "sample 0's output changes with the other samples of the batch",
            "(Only outputs were compared: the checked output is not computed from the "
            "inputs in the autograd graph.)",
        )

    def test_a_similarity_matrix_is_a_design_that_skips_naming_the_options(self) -> None:
        self.assertSkipsWith(
            model_case(TwoTowers, inputs=two_towers_inputs),
            "test_batch_independence",
            "the checked output, of shape (4, 4), compares pairs of samples: its element "
            "(i, j) depends on samples i and j only, as a similarity matrix does",
            "List it in self.cross_sample_outputs, or set self.output_key",
        )

    def test_cross_sample_outputs_are_left_out_and_the_next_output_is_checked(self) -> None:
        listed = {"cross_sample_outputs": ["logits_per_image", "logits_per_text"]}
        self.assertPasses(
            model_case(TwoTowers, inputs=two_towers_inputs, **listed), "test_batch_independence"
        )
        self.assertFailsWith(  # image_embeds, the first output not listed, is compared
            model_case(lambda: TwoTowers(centred=True), inputs=two_towers_inputs, **listed),
            "test_batch_independence",
            "sample 0's self.inputs[0] gets a gradient from the outputs of the other samples",
        )

    def test_with_output_key_only_that_output_is_compared(self) -> None:
        self.assertPasses(
            model_case(TwoTowers, inputs=two_towers_inputs, output_key="text_embeds"),
            "test_batch_independence",
        )
        self.assertFailsWith(
            model_case(
                lambda: TwoTowers(centred=True),
                inputs=two_towers_inputs,
                output_key="image_embeds",
            ),
            "test_batch_independence",
            "gets a gradient from the outputs of the other samples",
        )

    def test_a_square_output_that_mixes_a_third_sample_still_fails(self) -> None:
        class ComparesWithTheBatchMean(TwoTowers):
            def forward(self, image: torch.Tensor, text: torch.Tensor) -> Dict[str, torch.Tensor]:  # type: ignore[override]
                out = super().forward(image, text)
                image_embeds = out["image_embeds"]
                return {
                    "logits": (image_embeds - image_embeds.mean(0)) @ out["text_embeds"].T,
                    **out,
                }

        self.assertFailsWith(
            model_case(ComparesWithTheBatchMean, inputs=two_towers_inputs),
            "test_batch_independence",
            "gets a gradient from the outputs of the other samples",
        )

    def test_a_model_whose_state_changes_between_calls_skips_the_value_comparison(
        self,
    ) -> None:
        self.assertSkipsWith(
            model_case(CountsCalls),
            "test_batch_independence",
            "state that changes between calls; see test_eval_deterministic",
            "(the gradient comparison passed)",
        )

    def test_one_sample_is_a_contract_error(self) -> None:
        self.assertErrorsWith(
            model_case(AutoEncoder, inputs=lambda: torch.randn(1, *SHAPE)),
            "test_batch_independence",
            "ContractError",
            "holds 1 sample",
            "needs at least 2",
        )


class SparseTokens(TokenModel):
    """Sparse token embeddings (nn.Embedding(sparse=True)): their gradients are sparse."""

    def __init__(self, unused: bool = False) -> None:
        super().__init__()
        self.tokens = nn.Embedding(20, 6, sparse=True)
        self.extra = nn.Embedding(20, 6, sparse=True)
        self.unused = unused

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        extra = self.extra(ids)
        return super().embed(ids) + (extra.detach() if self.unused else extra)


class ParametersUpdated(CheckTestCase):
    def test_sparse_gradients_are_checked(self) -> None:
        for name in ("test_all_parameters_updated", "test_finite_outputs_and_gradients"):
            with self.subTest(check=name):
                self.assertPasses(token_case(SparseTokens), name)
        self.assertFailsWith(
            token_case(lambda: SparseTokens(unused=True)),
            "test_all_parameters_updated",
            "1 of 7 trainable parameters would not be trained",
            "extra.weight: no gradient",
        )

    def test_a_dead_layer_fails_naming_its_parameters(self) -> None:
        text = self.assertFailsWith(
            model_case(DeadLayer),
            "test_all_parameters_updated",
            "2 of 6 trainable parameters would not be trained",
            "refine.weight: no gradient in 3 step(s): dead",
            "refine.bias: no gradient",
        )
        self.assertNotIn("encoder", text)

    def test_a_detach_that_cuts_off_the_encoder_fails(self) -> None:
        self.assertFailsWith(
            model_case(DetachedEncoder),
            "test_all_parameters_updated",
            "encoder.1.weight: no gradient",
            "encoder.1.bias",
        )

    def test_a_zero_initialised_gate_is_no_false_alarm(self) -> None:
        self.assertPasses(model_case(ZeroGate), "test_all_parameters_updated")

    def test_a_parameter_of_no_element_is_no_false_alarm(self) -> None:
        self.assertPasses(model_case(NoRegisterTokens), "test_all_parameters_updated")
        self.assertFailsWith(  # two register tokens, never read: dead
            model_case(lambda: UnreadRegisterTokens(registers=2)),
            "test_all_parameters_updated",
            "1 of 5 trainable parameters would not be trained",
            "register_tokens: no gradient in 3 step(s): dead",
        )

    def test_a_gate_that_stays_zero_is_reported_as_gated_not_dead(self) -> None:
        text = self.assertFailsWith(
            model_case(lambda: ZeroGate(trainable_gate=False)),
            "test_all_parameters_updated",
            "branch.weight: gradient exactly zero in each of 3 steps: "
            "gated off by something that stays zero",
        )
        self.assertNotIn("dead", text.split("\n")[2])
        self.assertFailsWith(
            model_case(DoubleZeroGate),
            "test_all_parameters_updated",
            "gate: gradient exactly zero",
            "second_gate: gradient exactly zero",
        )

    def test_zero_gradients_of_attention_over_a_single_position_skip_naming_it(self) -> None:
        # timm's LeViT and transformers' MobileViT on small images: their last stage attends
        # over one position, so query, key and attention biases get no gradient at that size
        self.assertPasses(
            model_case(PatchAttention, inputs=small_images),
            "test_all_parameters_updated",
            allowed_skips=("exactly zero gradients at the size of self.inputs",),
        )
        self.assertSkipsWith(
            model_case(PatchAttention, inputs=small_images),
            "test_all_parameters_updated",
            "exactly zero gradients at the size of self.inputs, in every step, of 4 parameters "
            "of modules that make a call whose input gets none at that size: Tensor.softmax at "
            "test_model_checks.py:",
            "(a softmax over a dimension of size 1 (dim=-1) is constant), in PatchAttention, "
            "for query.weight, query.bias, key.weight, key.bias.",
            "check them with inputs large enough",
        )
        self.assertPasses(  # on an image of four patches, they train
            model_case(PatchAttention, inputs=lambda: torch.randn(4, 3, 8, 8)),
            "test_all_parameters_updated",
            allowed_skips=(),
        )

    def test_zero_gradients_that_images_twice_as_large_do_not_have_skip_naming_both_sizes(
        self,
    ) -> None:
        # timm's PoolFormer on 32 x 32 images: its last stage pools over one position
        self.assertSkipsWith(
            model_case(PoolingMixer, inputs=small_images),
            "test_all_parameters_updated",
            "exactly zero gradients at the size of self.inputs (images of 4 x 4), in every "
            "step, of 3 parameters (scale, norm.weight, norm.bias), which get gradients on "
            "images twice as large (8 x 8)",
            "check them with inputs large enough for every stage of the model",
        )
        self.assertPasses(
            model_case(PoolingMixer, inputs=small_images),
            "test_all_parameters_updated",
            allowed_skips=("exactly zero gradients at the size of self.inputs",),
        )

        class FrozenGateAfterPooling(PoolingMixer):  # a gate that stays zero at any size
            def __init__(self) -> None:
                super().__init__()
                self.scale.requires_grad_(False).zero_()

        self.assertFailsWith(
            model_case(FrozenGateAfterPooling, inputs=lambda: torch.randn(4, 3, 8, 8)),
            "test_all_parameters_updated",
            "norm.weight: gradient exactly zero in each of 3 steps",
        )

        class MadeForOneSize(PoolingMixer):  # raises on the larger images: the failure stands
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return super().forward(x.view(4, 3, 4, 4))

        self.assertFailsWith(
            model_case(MadeForOneSize, inputs=small_images),
            "test_all_parameters_updated",
            "norm.weight: gradient exactly zero in each of 3 steps",
        )

    def test_a_frozen_gate_beside_a_degenerate_attention_still_fails(self) -> None:
        text = self.assertFailsWith(
            model_case(AttentionBesideAFrozenGate, inputs=small_images),
            "test_all_parameters_updated",
            "2 of 10 trainable parameters would not be trained",
            "branch.weight: gradient exactly zero in each of 3 steps",
        )
        self.assertNotIn("attention.query.weight:", text)

    def test_a_weight_that_forward_overwrites_fails(self) -> None:
        self.assertFailsWith(
            model_case(OverwritesAWeight),
            "test_all_parameters_updated",
            "decoder.0.bias: the optimisation step is undone by the next forward pass",
        )

    def test_every_floating_point_output_counts_without_a_loss_fn(self) -> None:
        self.assertPasses(token_case(TokenModel), "test_all_parameters_updated")
        self.assertPasses(model_case(VAE), "test_all_parameters_updated")

    def test_a_loss_fn_that_ignores_a_branch_reports_it(self) -> None:
        case = token_case(TokenModel, loss_fn=lambda out: out["hidden"].square().sum())
        self.assertFailsWith(case, "test_all_parameters_updated", "pool.weight: no gradient")

    def test_allowed_unchanged_parameters_are_not_reported(self) -> None:
        case = model_case(DeadLayer, allowed_unchanged_parameters=["refine.*"])
        self.assertPasses(case, "test_all_parameters_updated")

    def test_frozen_parameters_are_not_required_to_change(self) -> None:
        def frozen() -> nn.Module:
            model = AutoEncoder()
            model.encoder.requires_grad_(False)
            return model

        self.assertPasses(model_case(frozen), "test_all_parameters_updated")

    def test_a_model_without_trainable_parameters_fails_once_clearly(self) -> None:
        def frozen() -> nn.Module:
            return AutoEncoder().requires_grad_(False)

        self.assertFailsWith(
            model_case(frozen),
            "test_all_parameters_updated",
            "the model has no trainable parameter",
        )
        self.assertPasses(model_case(frozen), "test_finite_outputs_and_gradients")
        self.assertFailsWith(
            model_case(lambda: LogOfNegative().requires_grad_(False)),
            "test_finite_outputs_and_gradients",
            "outputs contain NaN",
        )

    def test_an_output_without_floating_point_tensors_needs_a_loss_fn(self) -> None:
        class ArgMax(AutoEncoder):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return super().forward(x).flatten(1).argmax(dim=1)

        self.assertErrorsWith(
            model_case(ArgMax),
            "test_all_parameters_updated",
            "ContractError",
            "no floating-point tensor",
            "set self.loss_fn",
        )


class MaskedLogits(AutoEncoder):
    """Logits over 16 actions, the last ``masked`` of them (of the first ``samples`` samples)
    set to -inf by the model's code (invalid actions, padded classes: a softmax or a sigmoid
    makes them exactly 0); ``log_of_zero``: and a log of 0 added to the rest."""

    def __init__(self, masked: int = 4, samples: int = 4, log_of_zero: bool = False) -> None:
        super().__init__()
        self.masked, self.samples, self.log_of_zero = masked, samples, log_of_zero

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(x).flatten(1)
        invalid = torch.zeros_like(logits, dtype=torch.bool)
        invalid[: self.samples, logits.shape[1] - self.masked :] = True
        if self.log_of_zero:
            logits = logits + torch.log(torch.relu(logits) * 0)
        return logits.masked_fill(invalid, float("-inf"))


def _first_action(logits: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long))


class Finite(CheckTestCase):
    def test_nan_in_part_of_the_output_fails(self) -> None:
        self.assertFailsWith(
            model_case(LogOfNegative),
            "test_finite_outputs_and_gradients",
            "outputs contain NaN or Inf: output (",
            "The first operation that made them from finite values: torch.log in "
            "LogOfNegative, at test_model_checks.py:",
        )

    def test_infinities_the_model_places_itself_pass(self) -> None:
        # masked logits: -inf placed with masked_fill, the gradients finite
        self.assertPasses(
            model_case(MaskedLogits, loss_fn=_first_action), "test_finite_outputs_and_gradients"
        )

    def test_infinities_made_beside_placed_ones_fail_naming_the_operation(self) -> None:
        self.assertFailsWith(
            model_case(lambda: MaskedLogits(log_of_zero=True), loss_fn=_first_action),
            "test_finite_outputs_and_gradients",
            "outputs contain NaN or Inf",
            "The first operation that made them from finite values: torch.log in "
            "MaskedLogits, at test_model_checks.py:",
            "(Inf)",
        )

    def test_a_softmax_over_a_row_masked_everywhere_fails(self) -> None:
        class Probabilities(MaskedLogits):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return torch.softmax(super().forward(x), dim=1)

        self.assertPasses(
            model_case(Probabilities, loss_fn=lambda p: p[:, 0].mean()),
            "test_finite_outputs_and_gradients",
        )
        self.assertFailsWith(
            model_case(lambda: Probabilities(masked=16, samples=1), loss_fn=lambda p: p.sum()),
            "test_finite_outputs_and_gradients",
            "outputs contain NaN or Inf: output (16 of 64 values)",
            "The first operation that made them from finite values: torch.softmax in "
            "Probabilities, at test_model_checks.py:",
            "(NaN)",
        )

    def test_nan_only_in_gradients_fails_naming_parameters(self) -> None:
        self.assertFailsWith(
            model_case(SqrtAtZero),
            "test_finite_outputs_and_gradients",
            "the gradients of",
            "decoder.0.weight",
            "contain NaN or Inf",
        )

    def test_nan_gradients_also_fail_the_parameter_check(self) -> None:
        self.assertFailsWith(
            model_case(SqrtAtZero), "test_all_parameters_updated", "gradient contains NaN or Inf"
        )


class GradientCheckpointing(CheckTestCase):
    """Reentrant checkpointing refuses torch.autograd.grad: the checks back-propagate with
    backward() instead, in the mode of the forward pass."""

    def test_the_gradients_come_through_reentrant_checkpoints(self) -> None:
        for name in (
            "test_all_parameters_updated",
            "test_finite_outputs_and_gradients",
            "test_batch_independence",
        ):
            with self.subTest(name):
                self.assertPasses(model_case(Checkpointed), name)

    def test_a_checkpoint_whose_input_needs_no_gradient_fails_naming_the_layers(self) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "None of the inputs have requires_grad")
            text = self.assertFailsWith(
                model_case(CheckpointsItsInput),
                "test_all_parameters_updated",
                "4 of 4 trainable parameters would not be trained",
                "encoder.1.weight: no gradient in 3 step(s)",
                "or in a reentrant checkpoint whose input needs no gradient",
            )
        self.assertIn("decoder.0.bias", text)

    def test_batch_mixing_inside_a_checkpoint_in_eval_mode_fails(self) -> None:
        self.assertFailsWith(
            model_case(CentresInACheckpoint),
            "test_batch_independence",
            "sample 0's self.inputs gets a gradient from the outputs of the other samples",
        )

    def test_nan_gradients_inside_a_checkpoint_fail(self) -> None:
        self.assertFailsWith(
            model_case(SqrtAtZeroInACheckpoint),
            "test_finite_outputs_and_gradients",
            "the gradients of",
            "decoder.0.weight",
            "contain NaN or Inf",
        )

    def test_the_eval_backward_pass_leaves_the_model_as_it_was(self) -> None:
        """In eval mode, as the probes were made (BatchNorm in training mode would mix the
        samples and update its statistics), and no gradient is left on the parameters."""
        model = Checkpointed().train()
        for parameter in model.parameters():
            parameter.grad = torch.ones_like(parameter)
        saved = {name: p.grad for name, p in model.named_parameters()}
        state = {k: v.clone() for k, v in model.state_dict().items()}

        def set_up(self: Any) -> None:
            self.model, self.inputs = model, torch.randn(4, *SHAPE)

        self.assertPasses(make_case(ModelTests, set_up), "test_batch_independence")
        self.assertTrue(model.training)
        for name, parameter in model.named_parameters():
            self.assertIs(parameter.grad, saved[name])
            self.assertTrue(torch.equal(parameter.grad, torch.ones_like(parameter)), name)
        for key, value in model.state_dict().items():
            self.assertTrue(torch.equal(value, state[key]), key)


class EvalDeterministic(CheckTestCase):
    def test_dropout_that_ignores_eval_mode_fails(self) -> None:
        self.assertFailsWith(
            model_case(DropoutAlwaysOn),
            "test_eval_deterministic",
            "output changes with the random seed in eval mode",
            "F.dropout(x, p) without training=self.training",
        )

    def test_sampling_in_eval_mode_is_a_design_skipped_naming_the_operation(self) -> None:
        self.assertSkipsWith(
            model_case(VAE),
            "test_eval_deterministic",
            "output[0] changes with the random seed in eval mode",
            "the model samples at evaluation: torch.randn_like in VAE, at "
            "test_model_checks.py:53 in noise",
            "set deterministic_eval = True to make this a failure",
        )

    def test_sampling_in_eval_mode_fails_when_the_model_must_be_deterministic(self) -> None:
        self.assertFailsWith(
            model_case(VAE, deterministic_eval=True),
            "test_eval_deterministic",
            "output[0] changes with the random seed in eval mode",
            "the model samples at evaluation (torch.randn_like in VAE, at "
            "test_model_checks.py:53 in noise), and self.deterministic_eval is True",
        )

    def test_a_drop_path_that_ignores_eval_mode_fails(self) -> None:
        class DropPathAlwaysOn(AutoEncoder):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                keep = x.new_empty(x.shape[0], 1, 1, 1).bernoulli_(0.8)  # ignores self.training
                return super().forward(x * keep / 0.8)

        self.assertFailsWith(
            model_case(DropPathAlwaysOn),
            "test_eval_deterministic",
            "the model draws a dropout mask at evaluation: Tensor.bernoulli_ in "
            "DropPathAlwaysOn, at test_model_checks.py:",
        )

    def test_a_drop_path_drawn_alike_under_the_first_two_seeds_still_fails(self) -> None:
        class DropPathAlwaysOn(AutoEncoder):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                keep = x.new_empty(x.shape[0], 1, 1, 1).bernoulli_(0.8)  # ignores self.training
                return super().forward(x * keep / 0.8)

        # under seeds 14 and 15, the four samples draw the same mask
        seeded = with_class_attributes(model_case(DropPathAlwaysOn), seed=14)
        self.assertFailsWith(
            seeded,
            "test_eval_deterministic",
            "the model draws a dropout mask at evaluation: Tensor.bernoulli_ in "
            "DropPathAlwaysOn, at test_model_checks.py:",
        )

    def test_a_model_that_draws_without_using_the_draws_passes(self) -> None:
        class DrawsAndIgnores(AutoEncoder):
            passes = 0

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                DrawsAndIgnores.passes += 1
                torch.rand(3)  # drawn, never used
                return super().forward(x)

        self.assertPasses(model_case(DrawsAndIgnores), "test_eval_deterministic")
        self.assertEqual(DrawsAndIgnores.passes, 8)  # the shared eval pass and 7 seeds more

        class Counts(AutoEncoder):
            passes = 0

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                Counts.passes += 1
                return super().forward(x)

        self.assertPasses(model_case(Counts), "test_eval_deterministic")
        self.assertEqual(Counts.passes, 2)  # drawing nothing: one pass besides the shared one

    def test_a_hand_made_mask_that_ignores_eval_mode_fails(self) -> None:
        class MaskAlwaysOn(AutoEncoder):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return super().forward(x * (torch.rand_like(x) > 0.1))

        self.assertFailsWith(
            model_case(MaskAlwaysOn),
            "test_eval_deterministic",
            "torch.rand_like compared with a threshold (a mask) in MaskAlwaysOn",
        )

    def test_attention_dropout_in_eval_mode_fails(self) -> None:
        class AttentionDropoutAlwaysOn(AutoEncoder):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                tokens = x.flatten(2)
                mixed = F.scaled_dot_product_attention(tokens, tokens, tokens, dropout_p=0.5)
                return super().forward(mixed.view_as(x))

        self.assertFailsWith(
            model_case(AttentionDropoutAlwaysOn),
            "test_eval_deterministic",
            "the model draws a dropout mask at evaluation: torch.scaled_dot_product_attention",
        )

    def test_a_sampling_model_with_dropout_on_at_evaluation_fails(self) -> None:
        class SamplesAndDrops(VAE):
            def forward(self, x: torch.Tensor) -> Any:  # type: ignore[override]
                recon, mu, log_sigma = super().forward(x)
                return F.dropout(recon, 0.1), mu, log_sigma

        self.assertFailsWith(
            model_case(SamplesAndDrops),
            "test_eval_deterministic",
            "the model draws a dropout mask at evaluation: F.dropout in SamplesAndDrops",
        )

    def test_dropout_switched_off_in_eval_mode_passes(self) -> None:
        class Correct(AutoEncoder):
            def __init__(self) -> None:
                super().__init__()
                self.drop = nn.Dropout(0.5)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                hidden = F.dropout(x, 0.2, training=self.training)
                mixed = F.scaled_dot_product_attention(
                    hidden.flatten(2),
                    hidden.flatten(2),
                    hidden.flatten(2),
                    dropout_p=0.5 if self.training else 0.0,
                )
                return self.drop(super().forward(mixed.view_as(x)))

        self.assertPasses(model_case(Correct), "test_eval_deterministic")

    def test_state_that_changes_between_calls_fails_as_not_deterministic(self) -> None:
        self.assertFailsWith(
            model_case(CountsCalls),
            "test_eval_deterministic",
            "even under the same seed: the model is not deterministic",
        )

    def test_nan_outputs_in_the_same_places_are_deterministic(self) -> None:
        self.assertPasses(model_case(LogOfNegative), "test_eval_deterministic")


class StateDictRoundTrip(CheckTestCase):
    def test_without_make_model_it_skips_naming_it(self) -> None:
        self.assertSkipsWith(
            model_case(AutoEncoder), "test_state_dict_round_trip", "self.make_model is not set"
        )

    def test_a_plain_tensor_attribute_fails_naming_it(self) -> None:
        self.assertFailsWith(
            model_case(StatisticInAPlainAttribute, make_model=StatisticInAPlainAttribute),
            "test_state_dict_round_trip",
            "gives other eval outputs (output)",
            "Tensors outside the state dict that differ: mean (plain attribute)",
            "register_buffer",
        )

    def test_a_non_persistent_buffer_that_matters_fails_naming_it(self) -> None:
        self.assertFailsWith(
            model_case(ScaleNotPersistent, make_model=ScaleNotPersistent),
            "test_state_dict_round_trip",
            "scale (buffer with persistent=False)",
        )

    def test_make_model_of_another_architecture_fails(self) -> None:
        self.assertFailsWith(
            model_case(AutoEncoder, make_model=DeadLayer),
            "test_state_dict_round_trip",
            "does not load self.model's state dict",
            "refine.weight",
            "make_model must build the same architecture",
        )

    def test_make_model_returning_something_else_is_a_contract_error(self) -> None:
        self.assertErrorsWith(
            model_case(AutoEncoder, make_model=lambda: "model"),
            "test_state_dict_round_trip",
            "ContractError",
            "self.make_model set in Case.setUp returned a str",
        )

    def test_state_that_weights_only_loading_refuses_fails(self) -> None:
        class ExtraState(AutoEncoder):
            def get_extra_state(self) -> Any:
                return {"fitted": object()}

            def set_extra_state(self, state: Any) -> None:
                pass

        self.assertFailsWith(
            model_case(ExtraState, make_model=ExtraState),
            "test_state_dict_round_trip",
            "torch.load(..., weights_only=True) cannot read the saved state_dict",
            "get_extra_state",
        )


class CachedBias(AutoEncoder):
    """Caches its bias per device in a dict at evaluation, as transformers' LeViT caches its
    attention biases: a model evaluated once and then moved to bfloat16 uses the stale
    float32 cache, which .to() does not convert."""

    def __init__(self) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(SHAPE))
        self.cache: Dict[str, torch.Tensor] = {}

    def bias(self, device: torch.device) -> torch.Tensor:
        if self.training:
            return self.shift * 2
        if str(device) not in self.cache:
            self.cache[str(device)] = self.shift * 2
        return self.cache[str(device)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x + self.bias(x.device))


def evaluated_once() -> nn.Module:
    model = CachedBias()
    with torch.no_grad():
        model.eval()(torch.randn(2, *SHAPE))
    return model.train()


class DtypeMoving(CheckTestCase):
    def test_a_stale_cache_of_the_model_is_named(self) -> None:
        self.assertFailsWith(
            model_case(evaluated_once, moved_dtypes=[torch.bfloat16]),
            "test_dtype_moving",
            "combines a torch.bfloat16 tensor with a torch.float32 tensor of shape (1, 4, 4)",
            "That tensor was not made by the forward pass: the model keeps it in "
            "cache['cpu'] of CachedBias, which is no parameter or buffer, so "
            ".to(torch.bfloat16) did not convert it",
        )

    def test_a_tensor_made_in_float32_fails_naming_where(self) -> None:
        self.assertFailsWith(
            model_case(NoiseOfFixedDtype),
            "test_dtype_moving",
            "a copy moved with .to(torch.bfloat16) returns output (torch.float32, made by "
            "torch.randn without dtype= in NoiseOfFixedDtype, at test_model_checks.py:",
            "in forward) in eval mode",
            "combines a torch.bfloat16 tensor with a torch.float32 tensor of "
            "shape (4, 1, 4, 4), made by torch.randn without dtype= in "
            "NoiseOfFixedDtype, at test_model_checks.py:",
            "torch.randn_like(x)",
        )

    def test_a_cast_to_float_fails_naming_it(self) -> None:
        self.assertFailsWith(
            model_case(CastsToFloat), "test_dtype_moving", "made by Tensor.float with a fixed dtype"
        )

    def test_an_output_made_in_float32_is_named_with_where_it_was_made(self) -> None:
        class ReturnsAFloat32Mask(AutoEncoder):
            def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
                return super().forward(x), torch.ones(x.shape[0])  # no dtype=, mixed with nothing

        self.assertFailsWith(
            model_case(ReturnsAFloat32Mask, strict_output_dtypes=True),
            "test_dtype_moving",
            "returns output[1] (torch.float32, made by torch.ones without dtype= in "
            "ReturnsAFloat32Mask, at test_model_checks.py:",
        )

    def test_an_output_made_beside_the_computation_is_reported_not_failed(self) -> None:
        # transformers' ViTMAE returns a float32 mask of 0s and 1s made by torch.ones
        class ReturnsAFloat32Mask(AutoEncoder):
            def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
                mask = torch.ones(x.shape[0])  # no dtype=, mixed with nothing
                mask[::2] = 0
                return super().forward(x), mask.gather(0, torch.arange(x.shape[0]))

        outcome = run_check(model_case(ReturnsAFloat32Mask), "test_dtype_moving")
        self.assertEqual((outcome.failures, outcome.errors), ([], []))
        self.assertEqual(len(outcome.skips), 2)  # bfloat16 and float64, as subtests
        self.assertIn(
            "a copy moved with .to(torch.bfloat16) returns output[1] (torch.float32, made by "
            "torch.ones without dtype= in ReturnsAFloat32Mask, at test_model_checks.py:",
            outcome.skips[0],
        )
        self.assertIn(
            "Set strict_output_dtypes = True to make such an output a failure", outcome.skips[0]
        )

    def test_a_loss_computed_in_float32_passes(self) -> None:
        # what transformers' causal LMs do with labels: logits.float(), for float64 too
        class WithLoss(AutoEncoder):
            def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:  # type: ignore[override]
                out = super().forward(x)
                return {"out": out, "loss": F.mse_loss(out.float(), x.float())}

        self.assertPasses(model_case(WithLoss), "test_dtype_moving")

    def test_a_loss_in_float32_must_be_finite(self) -> None:
        class OverflowingLoss(AutoEncoder):
            def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:  # type: ignore[override]
                out = super().forward(x)
                return {"out": out, "loss": (out * 1e38).square().float().sum()}  # inf in bf16

        self.assertFailsWith(
            model_case(OverflowingLoss, moved_dtypes=[torch.bfloat16]),
            "test_dtype_moving",
            "returns output['loss'] = inf in eval mode: a scalar (a loss) may be computed "
            "in float32, but it must be finite",
        )

    def test_an_explicit_cast_of_an_output_is_deliberate(self) -> None:
        # transformers' Mamba returns logits.float(); a per-sample loss computed in float32
        class PerSampleLossInFloat32(AutoEncoder):
            def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:  # type: ignore[override]
                out = super().forward(x)
                return {
                    "logits": out.float(),
                    "loss": (out.float() - x.float()).square().flatten(1).mean(1),
                }

        self.assertPasses(model_case(PerSampleLossInFloat32), "test_dtype_moving")

    def test_an_upcast_inside_the_model_is_deliberate(self) -> None:
        # as a state-space model computes its scan in float32 (A = -exp(A_log.float()))
        class ScanInFloat32(AutoEncoder):
            def __init__(self) -> None:
                super().__init__()
                self.log_decay = nn.Parameter(torch.zeros(FEATURES))

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                decay = -torch.exp(self.log_decay.float())
                scanned = x.flatten(1) * decay  # promoted to float32 on purpose
                return super().forward(scanned.to(x.dtype).view_as(x))

        self.assertPasses(model_case(ScanInFloat32), "test_dtype_moving")

    def test_a_mask_cast_with_a_fixed_dtype_that_promotes_the_output_fails(self) -> None:
        class MaskInFloat32(AutoEncoder):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return super().forward(x) * (x > 0).float()  # not .to(x.dtype)

        self.assertFailsWith(
            model_case(MaskInFloat32, moved_dtypes=[torch.bfloat16]),
            "test_dtype_moving",
            "returns output (torch.float32, made by Tensor.float of a torch.bool tensor, with "
            "a fixed dtype in MaskInFloat32, at test_model_checks.py:",
        )

    def test_an_operation_without_a_kernel_for_the_dtype_skips_naming_it(self) -> None:
        batches: List[Tuple[torch.dtype, int]] = []  # (dtype, batch size) of every pass

        class Float64Unsupported(AutoEncoder):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                batches.append((x.dtype, len(x)))
                return torch.ops.dltestkit_tests.no_float64(super().forward(x))

        outcome = run_check(model_case(Float64Unsupported), "test_dtype_moving")
        self.assertEqual((outcome.failures, outcome.errors), ([], []))
        self.assertEqual(len(outcome.skips), 1)  # float64 only; bfloat16 was checked
        # the float64 pass that raised, in eval mode on one sample of the four; no batch has
        # the kernel, so it is not tried again on all four (the float32 pass tells the
        # model's own error)
        self.assertEqual([b for b in batches if b[0] == torch.float64], [(torch.float64, 1)])
        self.assertIn(
            "torch.ops.dltestkit_tests.no_float64 in Float64Unsupported, at test_model_checks.py:",
            outcome.skips[0],
        )
        self.assertIn(
            "cannot run in torch.float64 on this platform although every floating-point tensor "
            "it was given is torch.float64 (RuntimeError: Expected x to be Float32 or "
            "BFloat16, got torch.float64)",
            outcome.skips[0],
        )

    def test_when_no_dtype_could_be_checked_the_check_skips(self) -> None:
        class Float64Unsupported(AutoEncoder):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return torch.ops.dltestkit_tests.no_float64(super().forward(x))

        outcome = run_check(
            model_case(Float64Unsupported, moved_dtypes=[torch.float64]), "test_dtype_moving"
        )
        self.assertEqual((outcome.failures, outcome.errors), ([], []))
        self.assertEqual(len(outcome.skips), 2)  # the part, and the check as a whole
        self.assertTrue(outcome.skips[1].startswith("no dtype could be checked. torch.float64: "))

    def test_an_error_of_the_model_itself_is_not_blamed_on_dtypes(self) -> None:
        class RefusesOtherDtypes(AutoEncoder):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                if x.dtype != torch.float32:
                    raise ValueError("this model runs in float32 only")
                return super().forward(x)

        text = self.assertFailsWith(
            model_case(RefusesOtherDtypes, moved_dtypes=[torch.bfloat16]),
            "test_dtype_moving",
            "a copy moved with .to(torch.bfloat16) raises in eval mode: ValueError: this model "
            "runs in float32 only, raised by the model's own code, not by a torch operation",
            "set self.moved_dtypes to those",
        )
        self.assertNotIn("promotes the rest", text)

    def test_a_model_that_raises_unmoved_too_is_reported_as_its_error(self) -> None:
        class AlwaysRaises(AutoEncoder):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                raise KeyError("a wrong call")

        self.assertErrorsWith(model_case(AlwaysRaises), "test_dtype_moving", "KeyError")

    def test_a_device_move_of_a_float32_constant_keeps_where_it_was_made(self) -> None:
        class MovesAConstant(AutoEncoder):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                offset = torch.tensor([0.5, -0.5, 0.5, -0.5])  # float32: no dtype=
                return super().forward(x - offset.to(x.device))  # a device move, no cast

        text = self.assertFailsWith(
            model_case(MovesAConstant, moved_dtypes=[torch.bfloat16]),
            "test_dtype_moving",
            "Tensor.sub in MovesAConstant",
            "combines a torch.bfloat16 tensor with a torch.float32 tensor of shape (4,), "
            "made by torch.tensor without dtype= in MovesAConstant, at test_model_checks.py:",
        )
        self.assertNotIn("made by Tensor.to", text)

    def test_a_fixed_dtype_that_makes_forward_raise_fails_naming_the_mix(self) -> None:
        self.assertFailsWith(
            model_case(ConstantOfFixedDtype),
            "test_dtype_moving",
            "a copy moved with .to(torch.bfloat16) raises in eval mode",
            "made by torch.ones with a fixed dtype",
        )

    def test_scores_copied_into_a_tensor_of_a_fixed_dtype_fail(self) -> None:
        # Grounding DINO pads its logits: torch.full(..., -inf) without dtype=, then
        # new_output[..., :n] = output, which rounds a float64 model's scores to float32
        class PaddedScores(AutoEncoder):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                scores = super().forward(x).flatten(1)
                padded = torch.full((x.shape[0], 20), float("-inf"))
                padded[:, :16] = scores
                return padded

        self.assertFailsWith(
            model_case(PaddedScores, moved_dtypes=[torch.float64]),
            "test_dtype_moving",
            "a copy moved with .to(torch.float64) returns output (torch.float32, made by "
            "torch.full without dtype= in PaddedScores, at test_model_checks.py:",
            "Tensor.__setitem__ in PaddedScores, at test_model_checks.py:",
        )

    def test_a_state_kept_in_a_dtype_chosen_for_it_is_no_failure(self) -> None:
        # RWKV keeps its recurrent state in torch.zeros(..., dtype=torch.float32) by choice
        class StateInFloat32(AutoEncoder):
            def forward(self, x: torch.Tensor) -> Any:
                hidden = self.encoder(x)
                state = torch.zeros(x.shape[0], 8, dtype=torch.float32)
                state[:] = hidden
                return self.decoder(hidden), state

        self.assertSkipsWith(
            model_case(StateInFloat32, moved_dtypes=[torch.float64]),
            "test_dtype_moving",
            "returns output[1] (torch.float32, made by torch.zeros with a fixed dtype in "
            "StateInFloat32",
        )

    def test_a_fill_value_of_the_moved_dtype_in_a_float32_factory_fails(self) -> None:
        # Kosmos-2's causal mask: torch.full(..., torch.finfo(dtype).min) without dtype=
        class MaskFilledWithTheDtypesMinimum(AutoEncoder):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                mask = torch.full((4, 4), torch.finfo(x.dtype).min)
                return super().forward(x) + mask.mean() * 0

        self.assertFailsWith(
            model_case(MaskFilledWithTheDtypesMinimum, moved_dtypes=[torch.float64]),
            "test_dtype_moving",
            "a copy moved with .to(torch.float64) raises in eval mode: RuntimeError: value "
            "cannot be converted to type float without overflow, in torch.full in "
            "MaskFilledWithTheDtypesMinimum, at test_model_checks.py:",
            ", given no floating-point tensor.",
        )

    def test_float64_is_checked_too(self) -> None:
        outcome = run_check(
            model_case(NoiseOfFixedDtype, moved_dtypes=[torch.float64]), "test_dtype_moving"
        )
        self.assertEqual(outcome.failures, [])  # float32 noise promotes to float64: harmless

    def test_an_operation_without_a_kernel_for_the_dtype_skips(self) -> None:
        class HalfUnsupported(AutoEncoder):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                if x.dtype == torch.bfloat16:
                    raise NotImplementedError("\"addmm\" not implemented for 'BFloat16'")
                return super().forward(x)

        self.assertSkipsWith(
            model_case(HalfUnsupported),
            "test_dtype_moving",
            "has no torch.bfloat16 kernel on the CPU",
        )


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 5),
    )


def small_mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(FEATURES, 8), nn.Tanh(), nn.Linear(8, 3))


#: The training-mode checks on TorchScript, whose operations no watch sees: no running
#: statistics to check, dropout and BatchNorm that cannot be switched off in training.
TORCHSCRIPT_SKIPS = (NO_RUNNING_STATISTICS, "output differs between training and eval mode (")


def scripted(build: Any) -> Any:
    def make() -> nn.Module:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated
            return torch.jit.script(build())  # type: ignore[no-any-return]

    return make


def traced(build: Any) -> Any:
    def make() -> nn.Module:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.trace(build().eval(), torch.randn(2, *SHAPE))  # type: ignore[no-any-return]

    return make


class NoiseMadeOnTheCPU(AutoEncoder):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.decoder(self.encoder(x))
        return out + torch.randn(out.shape)  # no device=, no dtype=


class WrapsAScriptedModel(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * self.scale


class TorchScript(CheckTestCase):
    """Modules made by torch.jit.script and torch.jit.trace, on their own and inside others."""

    def test_every_check_passes_on_scripted_and_traced_models(self) -> None:
        for convert in (scripted, traced):
            for build, shape in ((small_cnn, (4, 5)), (small_mlp, (4, 3))):
                make = convert(build)
                for accelerators in ([], ["cpu"]):  # "cpu" stands in for a GPU
                    case = model_case(
                        make,
                        make_model=make,
                        expected_output_shape=shape,
                        accelerators=accelerators,
                    )
                    for name in checks_of(case):
                        label = f"{convert.__name__} {build.__name__}, {accelerators}"
                        with self.subTest(label, check=name):
                            # BatchNorm and dropout inside TorchScript cannot be watched
                            self.assertPasses(case, name, [NO_GPU, *TORCHSCRIPT_SKIPS])

    def test_a_scripted_submodule_trains_and_moves_in_a_copy(self) -> None:
        case = model_case(lambda: WrapsAScriptedModel(scripted(AutoEncoder)()))
        for name in ("test_all_parameters_updated", "test_device_moving", "test_dtype_moving"):
            with self.subTest(name):
                self.assertPasses(case, name)

    def test_a_device_bug_in_scripted_code_fails_naming_the_line(self) -> None:
        for make in (
            scripted(NoiseMadeOnTheCPU),
            lambda: WrapsAScriptedModel(scripted(NoiseMadeOnTheCPU)()),
        ):
            with self.subTest(make):
                self.assertFailsWith(
                    model_case(make),
                    "test_device_moving",
                    "in eval mode, its forward combines a tensor left on the CPU (Tensor on "
                    "device cpu is not on the expected device meta! (in TorchScript code, at "
                    "test_model_checks.py:",
                    "in forward: return out + torch.randn(out.shape)",
                )

    def test_a_dead_layer_of_a_scripted_model_fails_naming_it(self) -> None:
        self.assertFailsWith(
            model_case(scripted(DeadLayer)),
            "test_all_parameters_updated",
            "refine.weight: no gradient in 3 step(s)",
        )

    def test_a_fixed_dtype_in_scripted_code_fails(self) -> None:
        self.assertFailsWith(
            model_case(scripted(NoiseMadeOnTheCPU), moved_dtypes=[torch.bfloat16]),
            "test_dtype_moving",
            "a copy moved with .to(torch.bfloat16) returns output (torch.float32) in eval mode",
        )


class Speed(unittest.TestCase):
    def test_the_parameter_check_trains_more_than_one_step_only_when_needed(self) -> None:
        calls = []

        def counting(base: type) -> type:
            class Counting(base):  # type: ignore[valid-type,misc]
                def forward(self, x: torch.Tensor) -> torch.Tensor:
                    calls.append(1)
                    return super().forward(x)

            return Counting

        for base, steps in ((AutoEncoder, 1), (ZeroGate, 2), (DeadLayer, 3)):
            with self.subTest(base.__name__):
                calls.clear()
                run_check(model_case(counting(base)), "test_all_parameters_updated")
                self.assertEqual(len(calls), steps)  # (writing no parameter: nothing to undo)

    def test_batch_independence_takes_two_backward_passes_and_two_batches_of_copies(
        self,
    ) -> None:
        """For a model that does not mix its samples, whatever the batch size: two backward
        passes (the screen, not one per sample) and two batches of copies (of samples 0 and
        1, not one per sample); a model that mixes them still fails (BatchIndependence)."""
        counts = {"forward": 0, "backward": 0}

        def counted(grad: torch.Tensor) -> torch.Tensor:
            counts["backward"] += 1
            return grad

        Counted = passes_through(counted)

        class CountsItsPasses(AutoEncoder):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                counts["forward"] += 1
                return super().forward(Counted.apply(x))

        for batch in (4, 8):
            with self.subTest(batch=batch):
                counts.update(forward=0, backward=0)
                case = model_case(
                    CountsItsPasses, inputs=lambda batch=batch: torch.randn(batch, *SHAPE)
                )
                self.assertEqual(run_check(case, "test_batch_independence").failures, [])
                # the probed pass, the shared eval pass, two batches of copies
                self.assertEqual(counts, {"forward": 4, "backward": 2})


if __name__ == "__main__":
    unittest.main()
