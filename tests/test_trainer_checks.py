"""TrainerTests passes on correct trainers and fails, with its message, on broken ones.

Two correct trainers: a tiny VAE (for the KL, logging and overfit checks) and a small
classifier with BatchNorm and dropout that passes every check; each broken trainer below
subclasses one of them and has one bug.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import re
import tempfile
import time
import unittest
import warnings
from typing import Any, Dict, List, Tuple

import numpy as np
import torch
from checkrunner import (
    NO_GPU,
    PUT_DOWN_TO_THE_BATCH,
    CheckTestCase,
    example_project_module,
    make_case,
    run_check,
    with_class_attributes,
)
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from dltestkit import TrainerTests
from dltestkit.trainers.vae import kl_reference

TAGS = ["train/recon_loss", "train/kl_div_loss", "train/loss", "test/loss"]
CHECKS = [
    "test_compiled_training",
    "test_eval_leaves_model_unchanged",
    "test_frozen_parameters",
    "test_gradient_accumulation",
    "test_initial_loss",
    "test_kl_divergence",
    "test_logging",
    "test_mixed_precision",
    "test_no_retained_graphs",
    "test_overfit_one_batch",
    "test_reference_losses",
    "test_reproducible",
    "test_resume",
]
#: The checks of the training stack, which skip naming the keyword argument of make_trainer
#: they need when it does not take it (tests/test_training_stack.py runs them)
STACK = {
    "test_compiled_training": "compile_backend",
    "test_gradient_accumulation": "accumulation_steps",
    "test_mixed_precision": "grad_scale",
}


class RecordingWriter:
    """Stands in for a SummaryWriter."""

    def __init__(self) -> None:
        self.closed = False

    def add_scalar(self, tag: str, scalar_value: float, global_step: int = 0) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def kl_divergence(log_sigma: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    return (0.5 * (torch.exp(2 * log_sigma) + mu**2 - 1) - log_sigma).sum(dim=1)


def kl_mu_logvar(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """The pytorch/examples VAE's KL term (the total over the batch)."""
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())


class TinyVAETrainer:
    """Trains a tiny VAE on (and evaluates it on) one fixed batch of 4 samples."""

    step_offset = 0

    def __init__(self) -> None:
        self.data = torch.rand(4, 8) * 2 - 1
        self.encoder = nn.Linear(8, 8)
        self.decoder = nn.Linear(4, 8)
        self.model = nn.ModuleDict({"encoder": self.encoder, "decoder": self.decoder})
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=0.05)
        self.summary = RecordingWriter()
        self.global_step = 0
        self.epoch = 0

    def kl_divergence(self, log_sigma: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
        return kl_divergence(log_sigma, mu)

    def losses(self, sample: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        mu, log_sigma = self.encoder(self.data).chunk(2, dim=1)
        z = mu + torch.exp(log_sigma) * torch.randn_like(mu) if sample else mu
        recon = ((self.decoder(z) - self.data) ** 2).sum(dim=1).mean()
        return recon, 0.01 * self.kl_divergence(log_sigma, mu).mean()

    def step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()

    def train(self, epochs: int) -> None:
        for _ in range(epochs):
            recon, kl = self.losses(sample=True)
            loss = recon + kl
            self.step(loss)
            for tag, value in zip(TAGS, (recon, kl, loss)):
                self.summary.add_scalar(tag, value.item(), self.global_step + self.step_offset)
            self.global_step += 1
            self.summary.add_scalar("test/loss", self.eval(), self.epoch + self.step_offset)
            self.epoch += 1

    def eval(self) -> float:
        with torch.no_grad():
            return float(self.losses(sample=False)[0])


# -- one bug each ----------------------------------------------------------------
class MissingHalf(TinyVAETrainer):
    def kl_divergence(self, log_sigma: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
        return (torch.exp(2 * log_sigma) + mu**2 - 1 - 2 * log_sigma).sum(dim=1)


class MeanNotSum(TinyVAETrainer):
    def kl_divergence(self, log_sigma: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
        return (0.5 * (torch.exp(2 * log_sigma) + mu**2 - 1) - log_sigma).mean(dim=1)


class LogSigmaAsLogVariance(TinyVAETrainer):
    def kl_divergence(self, log_sigma: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
        return (0.5 * (torch.exp(log_sigma) + mu**2 - 1 - log_sigma)).sum(dim=1)


class SigmaForVariance(TinyVAETrainer):
    def kl_divergence(self, log_sigma: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
        return (0.5 * (torch.exp(log_sigma) + mu**2 - 1) - log_sigma).sum(dim=1)


class SwappedArguments(TinyVAETrainer):
    def kl_divergence(self, mu: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
        return kl_divergence(log_sigma, mu)  # written for (mu, log_sigma), called the other way


class FlippedSign(TinyVAETrainer):
    def kl_divergence(self, log_sigma: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
        return -kl_divergence(log_sigma, mu)


class MisspelledTag(TinyVAETrainer):
    def train(self, epochs: int) -> None:
        super().train(epochs)
        self.summary.add_scalar("train/kl_loss", 0.0, 0)


class StepsFromOne(TinyVAETrainer):
    step_offset = 1


class LogsNaN(TinyVAETrainer):
    def losses(self, sample: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        recon, kl = super().losses(sample)
        return recon, kl * float("nan") if sample else kl


class LogsWithKeywords(TinyVAETrainer):
    def train(self, epochs: int) -> None:
        for _ in range(epochs):
            recon, kl = self.losses(sample=True)
            self.step(recon + kl)
            for tag, value in zip(TAGS, (recon, kl, recon + kl)):
                self.summary.add_scalar(
                    tag=tag, scalar_value=value.item(), global_step=self.global_step
                )
            self.summary.add_scalar("test/loss", global_step=self.epoch, scalar_value=self.eval())
            self.global_step += 1
            self.epoch += 1


class ZeroesGradientsBeforeStepping(TinyVAETrainer):
    def step(self, loss: torch.Tensor) -> None:
        loss.backward()
        self.optimizer.zero_grad()
        self.optimizer.step()


def trainer_case(trainer_type: Any, **attributes: Any) -> type:
    def set_up(self: Any) -> None:
        self.trainer = trainer_type()
        self.expected_scalars = TAGS
        self.kl_divergence = self.trainer.kl_divergence
        self.overfit_epochs = 150
        self.overfit_max_loss = 0.1
        for name, value in attributes.items():
            setattr(self, name, value)

    return make_case(TrainerTests, set_up)


# -- a correct classifier trainer, and one bug each ----------------------------------------
_DATA = torch.Generator().manual_seed(0)
INPUTS = torch.randn(16, 8, generator=_DATA)  # 16 fixed samples of 4 classes
TARGETS = torch.arange(16) % 4


class Net(nn.Module):
    """features (Linear, BatchNorm) -> ReLU -> dropout -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32))
        self.dropout = nn.Dropout(0.1)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(F.relu(self.features(x))))


class ClassifierTrainer:
    """Trains Net on the 16 samples in shuffled batches of 4 and evaluates it on them. Exactly
    resumable: the checkpoint holds the weights, the optimizer state, the counters, the state
    of the generator that shuffles and torch's global RNG state (which dropout draws from)."""

    batch_size = 4

    def __init__(self) -> None:
        self.model = self.make_model()
        self.optimizer = self.make_optimizer()
        self.summary = RecordingWriter()
        self.generator = torch.Generator().manual_seed(int(torch.randint(2**62, ()).item()))
        self.epoch = 0
        self.global_step = 0

    def make_model(self) -> nn.Module:
        return Net()

    def make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.model.parameters(), lr=0.05)

    def loss(self, indices: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.model(INPUTS[indices]), TARGETS[indices])

    def order(self) -> torch.Tensor:
        return torch.randperm(len(INPUTS), generator=self.generator)

    def step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()

    def start_of_epoch(self) -> None:
        self.model.train()

    def end_of_epoch(self) -> None:
        pass

    def train(self, epochs: int) -> None:
        for _ in range(epochs):
            self.start_of_epoch()
            for batch in self.order().split(self.batch_size):
                loss = self.loss(batch)
                self.step(loss)
                self.summary.add_scalar("train/loss", loss.item(), self.global_step)
                self.global_step += 1
            self.summary.add_scalar("test/loss", self.eval(), self.epoch)
            self.end_of_epoch()
            self.epoch += 1

    def eval(self) -> float:
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                return self.loss(torch.arange(len(INPUTS))).item()
        finally:
            self.model.train(was_training)

    def checkpoint(self) -> Dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch,
            "step": self.global_step,
            "generator": self.generator.get_state(),
            "rng": torch.get_rng_state(),
        }

    def restore(self, checkpoint: Dict[str, Any]) -> None:
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.epoch, self.global_step = checkpoint["epoch"], checkpoint["step"]
        self.generator.set_state(checkpoint["generator"])
        torch.set_rng_state(checkpoint["rng"])

    def save_checkpoint(self, path: str) -> None:
        torch.save(self.checkpoint(), path)

    def load_checkpoint(self, path: str) -> None:
        self.restore(torch.load(path, weights_only=True))


def classifier_case(trainer_type: Any, **attributes: Any) -> type:
    def set_up(self: Any) -> None:
        self.make_trainer = trainer_type
        self.trainer = self.make_trainer()
        self.expected_scalars = ["train/loss", "test/loss"]
        self.expected_initial_loss = math.log(4)
        self.overfit_epochs = 40
        self.overfit_max_loss = 0.5  # from log(4) = 1.39; about 0.25 after 40 epochs
        for name, value in attributes.items():
            setattr(self, name, value)

    return make_case(TrainerTests, set_up)


class OptimizerNotSaved(ClassifierTrainer):
    def checkpoint(self) -> Dict[str, Any]:
        checkpoint = super().checkpoint()
        del checkpoint["optimizer"]
        return checkpoint

    def restore(self, checkpoint: Dict[str, Any]) -> None:
        checkpoint["optimizer"] = self.optimizer.state_dict()  # the fresh optimizer's
        super().restore(checkpoint)


class CountersNotRestored(ClassifierTrainer):
    def restore(self, checkpoint: Dict[str, Any]) -> None:
        epoch, step = self.epoch, self.global_step
        super().restore(checkpoint)
        self.epoch, self.global_step = epoch, step


class WeightsNotRestored(ClassifierTrainer):
    def restore(self, checkpoint: Dict[str, Any]) -> None:
        state = checkpoint.pop("model")
        checkpoint["model"] = self.model.state_dict()
        super().restore(checkpoint)
        self.model.state_dict().update(state)  # updates a new dict, not the model


class GeneratorNotSaved(ClassifierTrainer):
    """The shuffling generator restarts from its seed: the resumed epoch replays epoch 1's
    order."""

    def __init__(self) -> None:
        super().__init__()
        self.generator.manual_seed(0)

    def restore(self, checkpoint: Dict[str, Any]) -> None:
        checkpoint["generator"] = self.generator.get_state()
        super().restore(checkpoint)


class RandomStateNotSaved(ClassifierTrainer):
    def restore(self, checkpoint: Dict[str, Any]) -> None:
        checkpoint["rng"] = torch.get_rng_state()  # dropout's draws are not the same
        super().restore(checkpoint)


def halving(epoch: int) -> float:
    return 0.5**epoch


class SchedulerNotSaved(ClassifierTrainer):
    def __init__(self) -> None:
        super().__init__()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, halving)

    def end_of_epoch(self) -> None:
        self.scheduler.step()


class ScheduleInAnIterator(ClassifierTrainer):
    """The learning rate of each epoch comes from an iterator, which no checkpoint holds."""

    def __init__(self) -> None:
        super().__init__()
        self.rates = iter([0.05, 0.02, 0.01, 0.005, 0.002])

    def train(self, epochs: int) -> None:
        for _ in range(epochs):
            for group in self.optimizer.param_groups:
                group["lr"] = next(self.rates)
            super().train(1)


class PersistentWorkers(ClassifierTrainer):
    """Shuffles with a DataLoader whose two workers persist across epochs, the sampler
    drawing from the trainer's generator (DataLoader(shuffle=True, generator=...)), whose
    state the checkpoint holds. Not exactly resumable: the persistent iterator drew its
    workers' seed from that generator once, a fresh loader draws it again."""

    def __init__(self) -> None:
        super().__init__()
        self.loader = DataLoader(
            TensorDataset(torch.arange(len(INPUTS))),
            batch_size=self.batch_size,
            shuffle=True,
            generator=self.generator,
            num_workers=2,
            persistent_workers=True,
        )

    def train(self, epochs: int) -> None:
        batches = iter([batch for (batch,) in self.loader] for _ in range(epochs))
        self.order = lambda: torch.cat(next(batches))  # type: ignore[method-assign]
        super().train(epochs)


class PersistentWorkersOwnSamplerGenerator(PersistentWorkers):
    """As the failure on PersistentWorkers advises: the sampler draws from the trainer's
    generator, the DataLoader's workers' seed from one of its own."""

    def __init__(self) -> None:
        super().__init__()
        indices = TensorDataset(torch.arange(len(INPUTS)))
        self.loader = DataLoader(
            indices,
            batch_size=self.batch_size,
            sampler=RandomSampler(indices, generator=self.generator),
            generator=torch.Generator(),
            num_workers=2,
            persistent_workers=True,
        )


class ConfiguredRateOnLoad(ClassifierTrainer):
    """Decays the learning rate in the optimizer, but load_checkpoint sets the configured
    rate again."""

    def end_of_epoch(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] *= 0.5

    def restore(self, checkpoint: Dict[str, Any]) -> None:
        super().restore(checkpoint)
        for group in self.optimizer.param_groups:
            group["lr"] = 0.05


class UnseededShuffling(ClassifierTrainer):
    def __init__(self) -> None:
        super().__init__()
        self.rng = np.random.default_rng()  # no seed: another order in every run

    def order(self) -> torch.Tensor:
        return torch.from_numpy(self.rng.permutation(len(INPUTS)))


class SeedsFromTheSystem(ClassifierTrainer):
    def make_model(self) -> nn.Module:
        torch.seed()  # "a different run every time"
        return super().make_model()


class EvalWithoutModelEval(ClassifierTrainer):
    def eval(self) -> float:
        with torch.no_grad():
            return self.loss(torch.arange(len(INPUTS))).item()


class EvalRecalibratesBatchNorm(ClassifierTrainer):
    """Re-estimates the BatchNorm statistics on the evaluation data before evaluating."""

    def eval(self) -> float:
        batches = [(INPUTS[index],) for index in torch.arange(len(INPUTS)).split(4)]
        torch.optim.swa_utils.update_bn(batches, self.model)
        return super().eval()


class EvalLeavesEvalMode(ClassifierTrainer):
    """Correct: eval() leaves the model in eval mode, and training starts every epoch with
    model.train()."""

    def eval(self) -> float:
        self.model.eval()
        with torch.no_grad():
            return self.loss(torch.arange(len(INPUTS))).item()


class EvalModeNeverUndone(EvalLeavesEvalMode):
    """eval() leaves the model in eval mode and training never calls model.train()."""

    def start_of_epoch(self) -> None:
        pass


class EvalBeforeTrainingLeavesEvalMode(EvalLeavesEvalMode):
    """Evaluates at the start of every epoch, after model.train(): trains in eval mode."""

    def start_of_epoch(self) -> None:
        self.model.train()
        self.summary.add_scalar("val/loss", self.eval(), self.epoch)


class EvalDisablesGradients(ClassifierTrainer):
    def eval(self) -> float:
        torch.set_grad_enabled(False)
        return super().eval()


class EvalReturnsMetrics(ClassifierTrainer):
    def eval(self) -> Any:
        return {"loss": super().eval(), "accuracy": 0.25}


class SummedLoss(ClassifierTrainer):
    def loss(self, indices: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.model(INPUTS[indices]), TARGETS[indices], reduction="sum")


class TrainingLossSummed(ClassifierTrainer):
    """Sums the training loss over the batch (a step 4 times too large); eval() averages."""

    tag = "train/loss"
    reduction = "sum"

    def train(self, epochs: int) -> None:
        for _ in range(epochs):
            self.model.train()
            for batch in self.order().split(self.batch_size):
                output = self.model(INPUTS[batch])
                loss = F.cross_entropy(output, TARGETS[batch], reduction=self.reduction)
                self.step(loss)
                self.summary.add_scalar(self.tag, loss.item(), self.global_step)
                self.global_step += 1
            self.epoch += 1


class SumsUnderItsOwnTag(TrainingLossSummed):
    tag = "loss/train"


class LogsTheLossAs(SumsUnderItsOwnTag):
    """Logs its (correct) training loss under another tag than train/loss."""

    reduction = "mean"


class EvalEndsInTrainingMode(ClassifierTrainer):
    """eval() ends with model.train(), whatever the mode was."""

    def eval(self) -> float:
        self.model.eval()
        with torch.no_grad():
            loss = self.loss(torch.arange(len(INPUTS))).item()
        self.model.train()
        return loss


class KeepsBatchNormFrozen(EvalEndsInTrainingMode):
    """Correct: trains with the BatchNorm statistics frozen (its layer in eval mode), put
    back at the start of every epoch; eval() ends with model.train()."""

    def start_of_epoch(self) -> None:
        self.model.train()
        self.model.features[1].eval()


class KeepsBatchNormFrozenEvalLeavesEvalMode(EvalLeavesEvalMode):
    """Correct: the frozen BatchNorm of KeepsBatchNormFrozen, with an eval() that leaves the
    model in eval mode."""

    def start_of_epoch(self) -> None:
        self.model.train()
        self.model.features[1].eval()


class EvalStepsTheOptimizer(ClassifierTrainer):
    """Evaluates with gradients and steps the optimizer on the evaluation loss."""

    def eval(self) -> float:
        self.model.eval()
        loss = self.loss(torch.arange(len(INPUTS)))
        self.step(loss)
        self.model.train()
        return loss.item()


class FrozenBatchNormUnfrozenByEval(ClassifierTrainer):
    """Freezes the BatchNorm statistics once; eval()'s model.train(was_training) unfreezes
    them and training never freezes them again."""

    def __init__(self) -> None:
        super().__init__()
        self.model.features[1].eval()

    def start_of_epoch(self) -> None:
        pass


class FrozenFeatures(ClassifierTrainer):
    """Fine-tunes the head only: features frozen before the optimizer is built."""

    def make_model(self) -> nn.Module:
        model = Net()
        model.features.requires_grad_(False)
        return model

    def make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([p for p in self.model.parameters() if p.requires_grad], lr=0.05)


class FrozenByZeroedGradients(ClassifierTrainer):
    """'Freezes' the features by zeroing their gradients; AdamW's weight decay still moves
    them."""

    def make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.model.parameters(), lr=0.05, weight_decay=0.01)

    def step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad()
        loss.backward()
        for parameter in self.model.features.parameters():
            parameter.grad.zero_()
        self.optimizer.step()


class FrozenAfterBackward(ClassifierTrainer):
    def step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad()
        loss.backward()
        self.model.features.requires_grad_(False)  # too late: the gradients are there
        self.optimizer.step()


class FrozenByAccident(ClassifierTrainer):
    def make_model(self) -> nn.Module:
        model = Net()
        model.features[1].requires_grad_(False)  # meant to freeze the BatchNorm statistics
        return model


class OptimizerBuiltBeforeUnfreezing(FrozenFeatures):
    def __init__(self) -> None:
        super().__init__()
        self.model.features[1].requires_grad_(True)  # fine-tune the BatchNorm too


class UnusedLayer(ClassifierTrainer):
    def make_model(self) -> nn.Module:
        model = Net()
        model.auxiliary = nn.Linear(32, 4)  # its loss was removed
        return model


class WithBranch(Net):
    """Net with an auxiliary branch, which ``combine`` adds to its output."""

    def __init__(self) -> None:
        super().__init__()
        self.branch = nn.Linear(8, 4)

    def combine(self, out: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.combine(super().forward(x), self.branch(x))


class SwitchedOffBranch(ClassifierTrainer):
    """An auxiliary branch whose weight in the output is 0."""

    def make_model(self) -> nn.Module:
        class Switched(WithBranch):
            def combine(self, out: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
                return out + 0.0 * branch

        return Switched()


class ConvBiasBeforeBatchNorm(ClassifierTrainer):
    """Correct: a beginner's CNN, nn.Conv2d with its default bias right before BatchNorm2d,
    trained with SGD at a small learning rate. BatchNorm subtracts the batch mean, so in training
    mode the conv bias has a gradient of rounding size, too small to change it."""

    def make_model(self) -> nn.Module:
        class CNN(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.body = nn.Sequential(
                    nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1)
                )
                self.head = nn.Linear(8, 4)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.head(self.body(x.view(-1, 1, 2, 4).repeat(1, 1, 2, 1)).flatten(1))

        return CNN()

    def make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.model.parameters(), lr=0.001, momentum=0.9)


class EvalOnlyBranch(ClassifierTrainer):
    """A branch added in eval mode only: it never trains, but changes what eval() measures."""

    def make_model(self) -> nn.Module:
        class EvalOnly(WithBranch):
            def combine(self, out: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
                return out if self.training else out + branch

        return EvalOnly()


class LoRAHead(ClassifierTrainer):
    """One step per epoch; the head is B @ A with B zero-initialised, so A gets its first
    gradient in the second step."""

    batch_size = 16

    def make_model(self) -> nn.Module:
        class Low(Net):
            def __init__(self) -> None:
                super().__init__()
                self.a = nn.Parameter(torch.randn(2, 32) * 0.1)
                self.b = nn.Parameter(torch.zeros(4, 2))

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                features = self.dropout(F.relu(self.features(x)))
                return self.head(features) + features @ (self.b @ self.a).T

        return Low()


class NoRegisterTokens(ClassifierTrainer):
    """Register tokens joined to the features, none of them in this configuration (DINOv3's
    default): a parameter of no element, which training cannot change."""

    def make_model(self) -> nn.Module:
        class WithRegisters(Net):
            def __init__(self) -> None:
                super().__init__()
                self.register_tokens = nn.Parameter(torch.zeros(0, 32))

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                features = self.dropout(F.relu(self.features(x)))
                return self.head(features + self.register_tokens.sum(0))

        return WithRegisters()


# -- the tests ------------------------------------------------------------------------------
class CorrectTrainers(CheckTestCase):
    def test_every_check_passes_on_the_classifier_but_the_kl_check_which_skips(self) -> None:
        for name in CHECKS:
            with self.subTest(name):
                if name == "test_kl_divergence":
                    self.assertSkipsWith(
                        classifier_case(ClassifierTrainer), name, "applies to VAEs only"
                    )
                elif name in STACK:
                    self.assertSkipsWith(
                        classifier_case(ClassifierTrainer),
                        name,
                        f"make_trainer does not take the keyword argument {STACK[name]}",
                    )
                else:
                    # (under some seeds the first batch's loss is put down to the batch)
                    allowed = (NO_GPU, PUT_DOWN_TO_THE_BATCH)
                    self.assertPasses(classifier_case(ClassifierTrainer), name, allowed)

    def test_the_vae_passes_its_checks(self) -> None:
        for name in [
            "test_kl_divergence",
            "test_logging",
            "test_overfit_one_batch",
            "test_eval_leaves_model_unchanged",
            "test_frozen_parameters",
        ]:
            with self.subTest(name):
                self.assertPasses(trainer_case(TinyVAETrainer), name)

    def test_a_scalar_total_kl_is_accepted(self) -> None:
        case = trainer_case(TinyVAETrainer, kl_divergence=lambda s, m: kl_divergence(s, m).sum())
        self.assertPasses(case, "test_kl_divergence")

    def test_the_mu_logvar_convention_of_pytorch_examples_is_accepted(self) -> None:
        case = trainer_case(
            TinyVAETrainer, kl_divergence=kl_mu_logvar, kl_arguments=("mu", "logvar")
        )
        self.assertPasses(case, "test_kl_divergence")

    def test_add_scalar_called_with_keywords_is_understood(self) -> None:
        self.assertPasses(trainer_case(LogsWithKeywords), "test_logging")

    def test_frozen_layers_listed_in_frozen_parameters_pass(self) -> None:
        for pattern in (["features.*"], ["features.0.weight", "features.0.bias", "features.1.*"]):
            with self.subTest(pattern=pattern):
                self.assertPasses(
                    classifier_case(FrozenFeatures, frozen_parameters=pattern),
                    "test_frozen_parameters",
                )

    def test_a_parameter_behind_a_zero_initialised_gate_is_no_false_alarm(self) -> None:
        self.assertPasses(classifier_case(LoRAHead), "test_frozen_parameters")

    def test_a_parameter_of_no_element_is_no_false_alarm(self) -> None:
        self.assertPasses(classifier_case(NoRegisterTokens), "test_frozen_parameters")

    def test_a_trainer_without_writer_passes_resume_and_reproducibility(self) -> None:
        class Silent(ClassifierTrainer):
            def __init__(self) -> None:
                super().__init__()
                del self.summary
                self.model.register_forward_hook(lambda *_: None)  # no logging

            def train(self, epochs: int) -> None:
                self.summary = RecordingWriter()  # stands in for logging to elsewhere
                super().train(epochs)
                del self.summary

        for name in ("test_resume", "test_reproducible"):
            with self.subTest(name):
                self.assertPasses(
                    classifier_case(
                        Silent,
                        writer_attribute=None,
                        expected_scalars=TrainerTests.expected_scalars,
                    ),
                    name,
                )

    def test_other_attribute_and_method_names_are_configurable(self) -> None:
        class Renamed:
            def __init__(self) -> None:
                self.inner = ClassifierTrainer()
                self.net, self.opt, self.writer = (
                    self.inner.model,
                    self.inner.optimizer,
                    self.inner.summary,
                )

            def train(self, epochs: int) -> None:
                self.inner.train(epochs)

            def eval(self) -> float:
                return self.inner.eval()

            def save(self, path: str) -> None:
                self.inner.save_checkpoint(path)

            def load(self, path: str) -> None:
                self.inner.load_checkpoint(path)

        case = classifier_case(
            Renamed,
            model_attribute="net",
            optimizer_attribute="opt",
            writer_attribute="writer",
            save_checkpoint_method="save",
            load_checkpoint_method="load",
        )
        for name in (
            "test_resume",
            "test_reproducible",
            "test_eval_leaves_model_unchanged",
            "test_frozen_parameters",
            "test_logging",
        ):
            with self.subTest(name):
                self.assertPasses(case, name)

    def test_the_checks_contribute_twelve_tests(self) -> None:
        names = unittest.TestLoader().getTestCaseNames(trainer_case(TinyVAETrainer))
        self.assertEqual(names, CHECKS)

    def test_the_writer_of_every_trainer_is_closed_after_every_check(self) -> None:
        writers: List[RecordingWriter] = []

        class Recorded(ClassifierTrainer):
            def __init__(self) -> None:
                super().__init__()
                writers.append(self.summary)

        for name in CHECKS:
            run_check(classifier_case(Recorded), name)
        self.assertGreater(len(writers), len(CHECKS))  # setUp's, and make_trainer()'s
        self.assertEqual([writer.closed for writer in writers], [True] * len(writers))

    def test_the_checks_write_nothing_to_the_working_directory(self) -> None:
        previous = os.getcwd()
        with tempfile.TemporaryDirectory() as folder:
            os.chdir(folder)
            try:
                for name in CHECKS:
                    self.assertEqual(run_check(classifier_case(ClassifierTrainer), name).errors, [])
                self.assertEqual(os.listdir(folder), [])
            finally:
                os.chdir(previous)

    def test_the_global_random_state_and_grad_mode_are_restored(self) -> None:
        state = torch.get_rng_state()
        for trainer_type, name in (
            (ClassifierTrainer, "test_resume"),
            (EvalDisablesGradients, "test_eval_leaves_model_unchanged"),
            (EvalDisablesGradients, "test_overfit_one_batch"),
        ):
            with self.subTest(name):
                run_check(classifier_case(trainer_type), name)
                self.assertTrue(torch.is_grad_enabled())
                self.assertTrue(torch.equal(torch.get_rng_state(), state))


class ExampleTrainerWithWorkers(CheckTestCase):
    def test_the_example_trainer_resumes_exactly_with_persistent_loader_workers(self) -> None:
        # its loaders draw their workers' seed from a generator of their own: from torch's
        # global one, which the VAE samples from, a resumed run failed test_resume
        trainer, model = example_project_module("trainer"), example_project_module("model")
        images = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(0))
        data = TensorDataset(images, torch.zeros(4, dtype=torch.int64))

        def set_up(self: Any) -> None:
            def make_trainer() -> Any:
                vae = model.MLPVAE(input_shape=(1, 32, 32), bottleneck_dim=16)
                return trainer.Trainer(
                    vae,
                    train_data=data,
                    test_data=data,
                    optimizer=torch.optim.Adam(vae.parameters(), lr=1e-3),
                    batch_size=2,
                    device="cpu",
                    log_dir=self.make_temp_dir(),
                    num_workers=2,
                )

            self.make_trainer = make_trainer
            self.trainer = make_trainer()
            self.addCleanup(self.trainer.close)

        self.assertPasses(make_case(TrainerTests, set_up), "test_resume")


class KLReference(unittest.TestCase):
    def test_the_reference_matches_the_closed_form_over_many_seeds(self) -> None:
        rng = np.random.default_rng(0)
        mu, log_sigma = 2 * rng.standard_normal(500), rng.uniform(-1.5, 1.5, 500)
        closed = 0.5 * (np.exp(2 * log_sigma) + mu**2 - 1) - log_sigma
        np.testing.assert_allclose(kl_reference(mu, log_sigma), closed, rtol=1e-8, atol=1e-10)


class KLDivergence(CheckTestCase):
    def test_common_mistakes_fail_and_are_named(self) -> None:
        mistakes = {
            MissingHalf: "the factor 0.5 is missing",
            MeanNotSum: "mean over the latent dimension instead of the sum",
            LogSigmaAsLogVariance: "log_sigma is treated as log-variance",
            SigmaForVariance: "it uses sigma (exp(log_sigma)) where sigma^2",
            SwappedArguments: "the arguments are swapped (it expects (log_sigma, mu))",
            FlippedSign: "the sign is flipped",
        }
        for trainer_type, diagnosis in mistakes.items():
            with self.subTest(trainer_type.__name__):
                self.assertFailsWith(
                    trainer_case(trainer_type),
                    "test_kl_divergence",
                    "kl_divergence(log_sigma, mu) does not match the numerical reference",
                    diagnosis,
                    "random draw",
                    "0.5 * (sigma^2 + mu^2 - 1) - log_sigma",
                )

    def test_common_mistakes_in_the_mu_logvar_convention_are_named(self) -> None:
        mistakes = {
            "the factor 0.5 is missing": lambda m, v: 2 * kl_mu_logvar(m, v),
            "the sign is flipped": lambda m, v: -kl_mu_logvar(m, v),
            "logvar is treated as log-sigma": lambda m, v: kl_divergence(v, m).sum(),
            "the arguments are swapped (it expects (mu, logvar))": lambda m, v: kl_mu_logvar(v, m),
        }
        for diagnosis, function in mistakes.items():
            with self.subTest(diagnosis):
                case = trainer_case(
                    TinyVAETrainer, kl_divergence=function, kl_arguments=("mu", "logvar")
                )
                self.assertFailsWith(
                    case,
                    "test_kl_divergence",
                    "kl_divergence(mu, logvar) does not match",
                    diagnosis,
                    "-0.5 * (1 + logvar - mu^2 - exp(logvar))",
                )

    def test_the_other_convention_than_kl_arguments_says_is_named(self) -> None:
        self.assertFailsWith(
            trainer_case(TinyVAETrainer, kl_divergence=kl_mu_logvar),  # kl_arguments forgotten
            "test_kl_divergence",
            "kl_divergence(log_sigma, mu) does not match",
            "It looks like it follows the (mu, logvar) convention of the pytorch/examples VAE "
            '(-0.5 * sum(1 + logvar - mu^2 - exp(logvar))): set kl_arguments = ("mu", "logvar")',
        )
        self.assertFailsWith(
            trainer_case(TinyVAETrainer, kl_arguments=("mu", "logvar")),  # kl(log_sigma, mu)
            "test_kl_divergence",
            "kl_divergence(mu, logvar) does not match",
            "It looks like it follows the (log_sigma, mu) convention (0.5 * (sigma^2 + mu^2 - "
            '1) - log_sigma): set kl_arguments = ("log_sigma", "mu")',
        )

    def test_a_total_averaged_over_the_batch_is_named(self) -> None:
        def batch_mean(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
            return (-0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1)).mean()

        def mean_of_all(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
            return -0.5 * torch.mean(1 + logvar - mu.pow(2) - logvar.exp())

        mistakes = {
            "It looks like it averages over the batch (the total divided by the batch size, "
            "3) instead of summing: return one value per sample, or their sum": batch_mean,
            "It looks like it takes the mean over the batch and the latent dimension "
            "(torch.mean) instead of the sum": mean_of_all,
        }
        for diagnosis, function in mistakes.items():
            with self.subTest(diagnosis):
                case = trainer_case(
                    TinyVAETrainer, kl_divergence=function, kl_arguments=("mu", "logvar")
                )
                self.assertFailsWith(case, "test_kl_divergence", diagnosis)

    def test_an_unknown_mistake_fails_without_a_diagnosis(self) -> None:
        case = trainer_case(TinyVAETrainer, kl_divergence=lambda s, m: kl_divergence(s, m) + 1)
        text = self.assertFailsWith(case, "test_kl_divergence", "does not match")
        self.assertNotIn("It looks like", text)

    def test_a_wrong_output_shape_fails(self) -> None:
        case = trainer_case(TinyVAETrainer, kl_divergence=lambda s, m: s + m)
        self.assertFailsWith(case, "test_kl_divergence", "returned shape (3, 5)")

    def test_a_result_that_is_no_number_is_a_contract_error_naming_it(self) -> None:
        for returned, shown in (
            (None, "returned None (a NoneType)"),
            ("0.5", "returned '0.5' (a str)"),
            (torch.zeros(3, dtype=torch.long), "shape (3,)"),
        ):
            with self.subTest(shown):
                case = trainer_case(TinyVAETrainer, kl_divergence=lambda s, m, r=returned: r)
                text = self.assertErrorsWith(
                    case,
                    "test_kl_divergence",
                    "ContractError",
                    "self.kl_divergence(log_sigma, mu) returned",
                    shown,
                    "not a floating-point tensor or number",
                )
                self.assertEqual(text.count("ContractError:"), 1)

    def test_an_unknown_argument_order_is_a_contract_error(self) -> None:
        case = trainer_case(TinyVAETrainer, kl_arguments=("mu", "log_sigma"))
        self.assertErrorsWith(
            case,
            "test_kl_divergence",
            "self.kl_arguments",
            "not one of ('log_sigma', 'mu'), ('mu', 'logvar')",
        )

    def test_unset_kl_divergence_skips_saying_it_is_for_vaes(self) -> None:
        def set_up(self: Any) -> None:
            self.trainer = TinyVAETrainer()

        self.assertSkipsWith(
            make_case(TrainerTests, set_up),
            "test_kl_divergence",
            "applies to VAEs only",
            "self.kl_divergence is not set",
        )


class Logging(CheckTestCase):
    def test_a_missing_tag_fails_listing_the_logged_ones(self) -> None:
        case = trainer_case(MisspelledTag, expected_scalars=TAGS + ["train/kl_los"])
        self.assertFailsWith(
            case,
            "test_logging",
            "'train/kl_los' was not logged",
            "did you mean 'train/kl_loss'",
            "Tags logged: ['test/loss'",
        )

    def test_steps_counted_from_one_fail(self) -> None:
        self.assertFailsWith(
            trainer_case(StepsFromOne),
            "test_logging",
            "'train/loss' was logged at steps [1], never at global step 0",
        )

    def test_a_nan_value_fails(self) -> None:
        self.assertFailsWith(
            trainer_case(LogsNaN),
            "test_logging",
            "'train/kl_div_loss' was logged at step 0 with nan",
        )

    def test_a_missing_writer_is_a_contract_error_naming_the_attribute(self) -> None:
        for writer, problem in (
            ("missing", "there is no such attribute"),
            (None, "it is None (a NoneType), which has no add_scalar"),
            (
                print,
                "it is <built-in function print> (a "
                "builtin_function_or_method), which has no add_scalar",
            ),
        ):
            with self.subTest(problem):

                def set_up(self: Any, writer: Any = writer) -> None:
                    self.trainer = TinyVAETrainer()
                    del self.trainer.summary
                    if writer != "missing":
                        self.trainer.summary = writer
                    self.expected_scalars = TAGS

                self.assertErrorsWith(
                    make_case(TrainerTests, set_up),
                    "test_logging",
                    "has no SummaryWriter at trainer.summary (writer_attribute)",
                    problem,
                    "set self.writer_attribute",
                )

    def test_expected_scalars_without_a_writer_is_a_contract_error(self) -> None:
        case = trainer_case(TinyVAETrainer, writer_attribute=None)
        self.assertErrorsWith(
            case, "test_logging", "self.expected_scalars", "self.writer_attribute is None"
        )


class Overfit(CheckTestCase):
    def test_a_trainer_that_never_steps_fails_showing_losses(self) -> None:
        text = self.assertFailsWith(
            trainer_case(ZeroesGradientsBeforeStepping),
            "test_overfit_one_batch",
            "did not overfit one batch",
            "after 150 epochs, required <= 0.1",
        )
        before, after = (
            float(v) for v in text.split("eval() loss ")[1].split(" after")[0].split(" before and ")
        )
        self.assertTrue(math.isclose(before, after))

    def test_eval_returning_no_number_is_a_contract_error_naming_what_it_returned(self) -> None:
        self.assertErrorsWith(
            classifier_case(EvalReturnsMetrics),
            "test_overfit_one_batch",
            "ContractError: trainer.eval() returned {'loss': ",
            "(a dict), not a number",
        )


class Resume(CheckTestCase):
    def assertResumeFails(self, trainer_type: Any, *fragments: str) -> str:
        return self.assertFailsWith(
            classifier_case(trainer_type),
            "test_resume",
            "a resumed run differs from an uninterrupted one",
            *fragments,
        )

    def test_optimizer_state_not_saved_fails_naming_it(self) -> None:
        self.assertResumeFails(
            OptimizerNotSaved,
            "optimizer state: the state of model.features.0.weight['step'] differs after the "
            "second epoch",
            "optimizer state: the fresh trainer's optimizer has no state, the saved one had "
            "exp_avg, exp_avg_sq, step for 6 parameters",
        )

    def test_counters_not_restored_fail_naming_them_and_the_step(self) -> None:
        text = self.assertResumeFails(
            CountersNotRestored,
            "logging: the resumed run logged 'train/loss' at step 0 where the uninterrupted run "
            "logged 'train/loss' at step 4",
            "counters: trainer.epoch is 0, was 1; trainer.global_step is 0, was 4",
        )
        self.assertNotIn("weights:", text)  # the training itself is the same

    def test_weights_not_restored_fail_naming_them(self) -> None:
        self.assertResumeFails(
            WeightsNotRestored,
            "weights: model.features.0.weight differs after the second epoch",
            "weights: model.features.0.weight, model.features.0.bias, model.features.1.weight and",
        )

    def test_a_shuffling_generator_not_saved_fails_naming_it(self) -> None:
        self.assertResumeFails(
            GeneratorNotSaved,
            "data order: the random generator trainer.generator is not in the saved state",
        )

    def test_the_global_random_state_not_saved_fails_naming_it(self) -> None:
        text = self.assertResumeFails(
            RandomStateNotSaved,
            "logged values: 'train/loss' at step 4 is ",
            "in the resumed run, ",
            "in the uninterrupted one",
            "random state: training draws from torch's global RNG (dropout,",
            "whose state is not restored",
        )
        self.assertNotIn("NumPy", text)  # training does not draw from it

    def test_optimizer_state_changed_after_loading_fails_naming_the_entry(self) -> None:
        self.assertResumeFails(
            ConfiguredRateOnLoad,
            "optimizer state: optimizer.state_dict()['param_groups'][0]['lr'] is 0.05, was 0.025",
        )

    def test_a_scheduler_not_saved_fails_naming_it(self) -> None:
        self.assertResumeFails(
            SchedulerNotSaved,
            "optimizer state: ['param_groups'][0]['lr'] differs",
            "other state: the state_dict() of trainer.scheduler",
        )

    def test_state_no_attribute_shows_fails_saying_so(self) -> None:
        self.assertResumeFails(
            ScheduleInAnIterator,
            "so the difference comes from state kept elsewhere: a schedule held in an iterator",
        )

    def test_a_loader_with_persistent_workers_is_named_as_the_likely_cause(self) -> None:
        self.assertResumeFails(
            PersistentWorkers,
            "so the difference comes from state kept elsewhere",
            " Likely here: trainer.loader is a DataLoader with persistent_workers=True.",
            "Give the sampler a generator of its own",
        )
        # the workers of the trainers the check made are stopped with it, not left to the
        # garbage collector (PersistentWorkers is in a reference cycle), which stops each
        # only after torch's 5 s timeout, in whichever test runs then
        self.assertEqual(multiprocessing.active_children(), [])
        self.assertPasses(
            classifier_case(PersistentWorkersOwnSamplerGenerator), "test_resume", (NO_GPU,)
        )

    def test_a_state_dict_that_raises_is_named_as_not_compared(self) -> None:
        class Tracker:
            """Has a state_dict() that needs an argument."""

            def state_dict(self, prefix: str) -> Dict[str, Any]:
                return {prefix: 0}

        def with_tracker(trainer_type: Any) -> Any:
            class WithTracker(trainer_type):  # type: ignore[valid-type, misc]
                def __init__(self) -> None:
                    super().__init__()
                    self.tracker = Tracker()

            return WithTracker

        self.assertResumeFails(
            with_tracker(ScheduleInAnIterator),
            "so the difference comes from state kept elsewhere",
            "\nNot compared: trainer.tracker.state_dict() raised TypeError: ",
            "missing 1 required positional argument: 'prefix'.\n",
        )
        self.assertPasses(classifier_case(with_tracker(ClassifierTrainer)), "test_resume")

    def test_a_trainer_that_is_not_reproducible_is_told_so(self) -> None:
        self.assertResumeFails(
            UnseededShuffling,
            "reproducibility: the first epoch already differs",
            "test_reproducible says why",
        )

    def test_a_tolerance_lets_small_differences_pass(self) -> None:
        class Perturbed(ClassifierTrainer):
            def make_optimizer(self) -> torch.optim.Optimizer:
                # Adam would blow the difference up in the bias before BatchNorm, whose
                # gradient is rounding noise
                return torch.optim.SGD(self.model.parameters(), lr=0.05)

            def restore(self, checkpoint: Dict[str, Any]) -> None:
                super().restore(checkpoint)
                with torch.no_grad():
                    self.model.head.bias.add_(1e-6)

        self.assertResumeFails(
            Perturbed,
            "weights: model.features.0.weight differs after the "
            "second epoch (Mismatched elements: ",
            "Greatest absolute difference",
            "not restore (the fresh trainer compared with the "
            "one that saved the checkpoint):\n  - weights: model.head.bias "
            "differs\n",
        )
        self.assertPasses(
            classifier_case(Perturbed, resume_atol=1e-4, resume_rtol=1e-4), "test_resume"
        )

    def test_without_make_trainer_the_checks_needing_trainers_skip_naming_it(self) -> None:
        def set_up(self: Any) -> None:
            self.trainer = ClassifierTrainer()

        for name in ("test_resume", "test_reproducible"):
            with self.subTest(name):
                self.assertSkipsWith(
                    make_case(TrainerTests, set_up), name, "self.make_trainer is not set"
                )

    def test_missing_parts_are_contract_errors_naming_the_option(self) -> None:
        cases = {
            "save_checkpoint_method": (
                {"save_checkpoint_method": "save"},
                "has no method save(path) (save_checkpoint_method)",
            ),
            "load_checkpoint_method": (
                {"load_checkpoint_method": "restore_from"},
                "has no method restore_from(path)",
            ),
            "model_attribute": (
                {"model_attribute": "net"},
                "has no attribute 'net' (model_attribute); TrainerTests reads the trained model "
                "there. Set self.model_attribute to the name of the attribute that holds it "
                "(the trainer's nn.Module attribute: model (Net))",
            ),
            "optimizer_attribute": (
                {"optimizer_attribute": "opt"},
                "has no attribute 'opt' (optimizer_attribute)",
            ),
        }
        for option, (attributes, fragment) in cases.items():
            with self.subTest(option):
                self.assertErrorsWith(
                    classifier_case(ClassifierTrainer, **attributes),
                    "test_resume",
                    "ContractError",
                    fragment,
                    f"Set self.{option} to the name",
                )

    def test_a_make_trainer_that_shares_the_trainer_or_model_is_a_contract_error(self) -> None:
        shared_model = Net()

        class SharesTheModel(ClassifierTrainer):
            def make_model(self) -> nn.Module:
                return shared_model

        for make_trainer, fragment in (
            (None, "returned the same trainer as before"),
            (SharesTheModel, "returned a trainer with the same model as before"),
        ):
            with self.subTest(fragment):

                def set_up(self: Any, make_trainer: Any = make_trainer) -> None:
                    self.trainer = ClassifierTrainer() if make_trainer else SharesTheModel()
                    self.make_trainer = make_trainer or (lambda: self.trainer)

                self.assertErrorsWith(
                    make_case(TrainerTests, set_up),
                    "test_reproducible",
                    "self.make_trainer",
                    fragment,
                )

    def test_a_make_trainer_returning_no_trainer_is_a_contract_error(self) -> None:
        case = classifier_case(ClassifierTrainer, make_trainer=object)
        self.assertErrorsWith(
            case,
            "test_resume",
            "self.make_trainer",
            "returned a object, which has no train(epochs) and eval()",
        )


class UnsetOrMisspelled(CheckTestCase):
    """An unset, misspelled or ill-fitting make_trainer or model attribute is a ContractError
    that names it, never a TypeError from deep inside."""

    def case(self, **body: Any) -> type:
        return type("TestMine", (TrainerTests, unittest.TestCase), {"seed": 0, **body})

    def test_a_setup_calling_an_unset_make_trainer_names_it_and_the_close_name(self) -> None:
        def setUp(self: Any) -> None:  # noqa: N802 (its name is in the message)
            self.trainer = self.make_trainer()

        def make_trainr(self: Any) -> Any:
            return ClassifierTrainer()

        for body, hint in (
            ({"make_trainr": make_trainr}, " Did you mean make_trainr? TestMine defines "),
            ({}, ""),
        ):
            with self.subTest(defines=sorted(body)):
                text = self.assertErrorsWith(
                    self.case(setUp=setUp, **body),
                    "test_logging",
                    "ContractError: TestMine.setUp (test_trainer_checks.py, line ",
                    ") calls self.make_trainer(), which is not set: TrainerTests needs a "
                    "callable that builds a fresh trainer, with the same data, hyperparameters "
                    "and model class every time, e.g. self.make_trainer = lambda rank=0, "
                    "world_size=1: Trainer(MyModel(), data), or a method `def "
                    f"make_trainer(self, rank=0, world_size=1):` of the test class.{hint}",
                )
                self.assertNotIn("_Marker", text)

    def test_a_misspelled_make_trainer_method_is_a_contract_error_naming_it(self) -> None:
        def set_up(self: Any) -> None:
            self.trainer = ClassifierTrainer()

        def make_trainr(self: Any) -> Any:
            return ClassifierTrainer()

        case = self.case(setUp=set_up, make_trainr=make_trainr)
        self.assertErrorsWith(
            case,
            "test_resume",
            "ContractError: self.make_trainer is not set, but TestMine defines 'make_trainr': "
            "did you mean self.make_trainer? TrainerTests needs a callable that builds a fresh "
            "trainer",
        )
        # the checks that do not need it run; this one would use it only if eval() switched
        # a mode, and trains the trainer of setUp twice otherwise
        for trainer in (ClassifierTrainer, EvalLeavesEvalMode):
            with self.subTest(trainer.__name__):

                def set_up_with(self: Any, trainer: Any = trainer) -> None:
                    self.trainer = trainer()

                self.assertPasses(
                    self.case(setUp=set_up_with, make_trainr=make_trainr),
                    "test_eval_leaves_model_unchanged",
                )

    def test_other_methods_leave_the_checks_that_need_make_trainer_skipping(self) -> None:
        def set_up(self: Any) -> None:
            self.trainer = self.build()

        def build(self: Any) -> Any:
            return ClassifierTrainer()

        case = self.case(setUp=set_up, build=build)
        self.assertSkipsWith(case, "test_resume", "self.make_trainer is not set")
        self.assertPasses(case, "test_eval_leaves_model_unchanged")

    def test_a_make_trainer_that_needs_arguments_is_a_contract_error(self) -> None:
        def set_up(self: Any) -> None:
            self.trainer = ClassifierTrainer()
            self.make_trainer = lambda data: ClassifierTrainer()

        self.assertErrorsWith(
            make_case(TrainerTests, set_up),
            "test_reproducible",
            "ContractError: self.make_trainer set in Case.setUp cannot be called as "
            "make_trainer() (missing a required argument: 'data'); the checks call it so",
        )

    def test_the_model_attribute_absent_or_not_a_module_is_told_as_it_is(self) -> None:
        class Holder:
            def __init__(self, net: Any) -> None:
                self.inner = ClassifierTrainer()
                self.net, self.backbone = net, nn.Linear(2, 2)

            def train(self, epochs: int) -> None:
                self.inner.train(epochs)

            def eval(self) -> float:
                return self.inner.eval()

        for net, fragment in (
            (None, "has no nn.Module at trainer.net (model_attribute), it has None (a NoneType)"),
            ("weights.pt", "has no nn.Module at trainer.net (model_attribute), it has "),
        ):
            with self.subTest(net=net):

                def set_up(self: Any, net: Any = net) -> None:
                    self.trainer = Holder(net)
                    self.model_attribute = "net"

                self.assertErrorsWith(
                    make_case(TrainerTests, set_up),
                    "test_eval_leaves_model_unchanged",
                    "ContractError: the trainer (Holder) " + fragment,
                    "Set self.model_attribute to the name of the attribute that holds it (the "
                    "trainer's nn.Module attribute: backbone (Linear)).",
                )

        def set_up(self: Any) -> None:
            self.trainer = Holder(None)
            self.model_attribute = "model"

        self.assertErrorsWith(
            make_case(TrainerTests, set_up),
            "test_frozen_parameters",
            "ContractError: the trainer (Holder) has no attribute 'model' (model_attribute); "
            "TrainerTests reads the trained model there.",
        )


class Reproducible(CheckTestCase):
    def test_unseeded_shuffling_fails_naming_the_first_difference(self) -> None:
        self.assertFailsWith(
            classifier_case(UnseededShuffling),
            "test_reproducible",
            "under the same seed and trained one epoch differ",
            "the first logged scalar that differs is 'train/loss' at step 0 (",
            "the first parameter or buffer that differs is model.",
            "np.random.default_rng() or random.Random() without a seed",
        )

    def test_weights_from_an_unseeded_source_fail_before_training(self) -> None:
        self.assertFailsWith(
            classifier_case(SeedsFromTheSystem),
            "test_reproducible",
            "start from different weights: model.features.0.weight differs before any training",
            "torch.seed()",
        )

    def test_a_timing_scalar_fails_unless_listed_as_nondeterministic(self) -> None:
        class LogsTheTime(ClassifierTrainer):
            def end_of_epoch(self) -> None:
                self.summary.add_scalar("time/clock", time.perf_counter(), self.epoch)

        for name in ("test_reproducible", "test_resume"):
            with self.subTest(name):
                self.assertFailsWith(
                    classifier_case(LogsTheTime),
                    name,
                    "'time/clock' at step",
                    "with equal weights: a timing? list it in nondeterministic_scalars",
                )
                self.assertPasses(
                    classifier_case(LogsTheTime, nondeterministic_scalars=["time/*"]), name
                )

    def test_a_different_number_of_logged_scalars_is_named(self) -> None:
        class LogsOnce(ClassifierTrainer):
            logged = False

            def train(self, epochs: int) -> None:
                super().train(epochs)
                if not LogsOnce.logged:
                    LogsOnce.logged = True  # state shared between trainers
                    self.summary.add_scalar("once", 0.0, 0)

        self.assertFailsWith(
            classifier_case(LogsOnce),
            "test_reproducible",
            "the first logged scalar that differs is 'once' at step 0 (the "
            "other run logged nothing)",
        )


def without_make_trainer(trainer_type: Any, **attributes: Any) -> type:
    """classifier_case's setUp without make_trainer."""

    def set_up(self: Any) -> None:
        self.trainer = trainer_type()
        for name, value in attributes.items():
            setattr(self, name, value)

    return make_case(TrainerTests, set_up)


def seeded(case: type, seed: int) -> type:
    return type("Case", (case,), {"seed": seed})


class Parts(unittest.TestResult):
    """A TestResult that also notes the checks that passed."""

    def __init__(self) -> None:
        super().__init__()
        self.passed: List[str] = []

    def addSuccess(self, test: Any) -> None:
        super().addSuccess(test)
        self.passed.append(test._testMethodName)


class EvalLeavesModelUnchanged(CheckTestCase):
    check = "test_eval_leaves_model_unchanged"

    def test_eval_without_model_eval_fails_naming_the_modules(self) -> None:
        self.assertFailsWith(
            classifier_case(EvalWithoutModelEval),
            self.check,
            "trainer.eval() does not leave the model as it found it",
            "it ran model.features.1 (BatchNorm1d), model.dropout (Dropout), "
            "model (Net) and 3 more in training mode, so its loss changes "
            "with the random seed",
            "Call model.eval() before evaluating",
        )

    def test_batchnorm_statistics_updated_by_eval_fail_naming_the_buffers(self) -> None:
        self.assertFailsWith(
            classifier_case(EvalRecalibratesBatchNorm),
            self.check,
            "it changed model.features.1.running_mean (buffer), "
            "model.features.1.running_var (buffer), "
            "model.features.1.num_batches_tracked (buffer)",
            "updates BatchNorm's running statistics with the evaluation data",
        )

    def test_an_optimizer_step_in_eval_fails_naming_the_parameters(self) -> None:
        self.assertFailsWith(
            classifier_case(EvalStepsTheOptimizer),
            self.check,
            "it changed model.features.0.weight (parameter), model.features.0.bias "
            "(parameter), model.features.1.weight (parameter) and 3 more",
            "an optimizer step or an in-place update in eval() changes the weights",
        )

    def test_the_two_common_idioms_pass_on_several_seeds(self) -> None:
        idioms = {
            "model.eval() ... model.train() in eval()": EvalEndsInTrainingMode,
            "eval mode left, model.train() at the start of every epoch": EvalLeavesEvalMode,
            "model.eval() ... model.train(was_training)": ClassifierTrainer,
            "a BatchNorm kept frozen in training, eval() ending in model.train()": (
                KeepsBatchNormFrozen
            ),
            "a BatchNorm kept frozen in training, eval mode left": (
                KeepsBatchNormFrozenEvalLeavesEvalMode
            ),
        }
        for label, trainer in idioms.items():
            for make in (classifier_case, without_make_trainer):
                for seed in (0, 1, 2):
                    with self.subTest(label, make_trainer=make is classifier_case, seed=seed):
                        self.assertPasses(seeded(make(trainer), seed), self.check)

    def test_the_training_that_follows_in_eval_mode_fails_naming_the_modules(self) -> None:
        for make, reference in (
            (classifier_case, "one epoch of a fresh trainer from make_trainer()"),
            (
                without_make_trainer,
                "another epoch of this trainer, its modes put back as eval() found them",
            ),
        ):
            with self.subTest(reference):
                self.assertFailsWith(
                    make(EvalModeNeverUndone),
                    self.check,
                    "the training that follows it runs in eval mode: trainer.train(1) right "
                    "after eval() ran model.features.1 (BatchNorm1d), model.dropout (Dropout), "
                    "model (Net) and 3 more in eval mode in its forward passes with gradients, "
                    f"where the same training without eval()'s change of mode ({reference}) "
                    "runs them in training mode",
                    "Call model.train() at the start of training (of every epoch), or restore "
                    "the mode at the end of eval()",
                )

    def test_an_eval_the_trainer_calls_before_training_is_seen_too(self) -> None:
        # The trainer's own eval() at the start of each epoch leaves it training in eval
        # mode, with or without the check's eval() before.
        self.assertFailsWith(
            classifier_case(EvalBeforeTrainingLeavesEvalMode),
            self.check,
            "the training that follows it runs in eval mode",
            "model.features.1 (BatchNorm1d), model.dropout (Dropout)",
        )

    def test_a_frozen_batchnorm_unfrozen_by_eval_fails_naming_it(self) -> None:
        self.assertFailsWith(
            classifier_case(FrozenBatchNormUnfrozenByEval),
            self.check,
            "the training that follows it runs in training mode where it should not: "
            "trainer.train(1) right after eval() ran model.features.1 (BatchNorm1d) in "
            "training mode in its forward passes with gradients, where the same training "
            "without eval()'s change of mode (one epoch of a fresh trainer from "
            "make_trainer()) keeps it in eval mode",
            "Restore each submodule's mode at the end of eval()",
        )

    def test_eval_restores_mode_makes_a_switched_mode_fail(self) -> None:
        self.assertFailsWith(
            classifier_case(EvalLeavesEvalMode, eval_restores_mode=True),
            self.check,
            "it left model, model.features, model.features.0 and 3 more in "
            "eval mode, which were in training mode before, although eval_restores_mode is "
            "True (eval() promises to leave the model in the mode it found it)",
            "model.train(was_training)",
        )

    def test_eval_that_ends_in_training_mode_fails_from_eval_mode_with_eval_restores_mode(
        self,
    ) -> None:
        self.assertFailsWith(
            classifier_case(EvalEndsInTrainingMode, eval_restores_mode=True),
            self.check,
            "called on the model in eval mode (model.eval() first, as an inference script "
            "does), it left model, model.features, model.features.0 and 3 more in training "
            "mode: an eval() that ends with model.train() undoes the caller's model.eval(), "
            "and eval_restores_mode is True",
            "model.train(was_training)",
        )
        self.assertPasses(classifier_case(ClassifierTrainer, eval_restores_mode=True), self.check)

    def test_the_check_trains_two_epochs_at_most(self) -> None:
        epochs: List[int] = []

        def counted(trainer_type: Any) -> Any:
            class Counted(trainer_type):  # type: ignore[valid-type, misc]
                def train(self, count: int) -> None:
                    epochs.append(count)
                    super().train(count)

            return Counted

        for trainer, expected in ((EvalEndsInTrainingMode, 0), (EvalLeavesEvalMode, 2)):
            for make in (classifier_case, without_make_trainer):
                with self.subTest(trainer.__name__, make_trainer=make is classifier_case):
                    epochs.clear()
                    self.assertPasses(make(counted(trainer)), self.check)
                    self.assertEqual(sum(epochs), expected)

    def test_the_modes_are_restored_after_the_check(self) -> None:
        trainers = []

        class Noted(ClassifierTrainer):
            def __init__(self) -> None:
                super().__init__()
                self.model.features[1].eval()  # as the trainer found it
                trainers.append(self)

            def eval(self) -> float:
                modes = {module: module.training for module in self.model.modules()}
                loss = super().eval()
                for module, training in modes.items():
                    module.training = training
                return loss

        self.assertPasses(classifier_case(Noted), self.check)
        modes = [module.training for module in trainers[0].model.modules()]
        self.assertEqual(modes, [True, True, True, False, True, True])

    def test_eval_that_leaves_gradients_disabled_fails(self) -> None:
        self.assertFailsWith(
            classifier_case(EvalDisablesGradients),
            self.check,
            "it left torch.is_grad_enabled() False, which was True before",
            "`with torch.no_grad():`",
        )

    def test_a_torchscript_model_is_checked_without_hooks(self) -> None:
        def scripted(trainer_type: Any) -> Any:
            class Scripted(trainer_type):  # type: ignore[valid-type, misc]
                def make_model(self) -> nn.Module:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated
                        return torch.jit.script(Net())

            return Scripted

        for trainer in (ClassifierTrainer, EvalLeavesEvalMode, EvalEndsInTrainingMode):
            with self.subTest(trainer.__name__):
                self.assertPasses(classifier_case(scripted(trainer)), self.check)
        # the forward pass of the scripted model as a whole is seen
        self.assertFailsWith(
            classifier_case(scripted(EvalModeNeverUndone)),
            self.check,
            "the training that follows it runs in eval mode: trainer.train(1) right after "
            "eval() ran model (RecursiveScriptModule) in eval mode",
        )

    def test_training_no_hook_sees_is_a_skipped_part_of_a_passing_check(self) -> None:
        class CallsForward(EvalModeNeverUndone):
            """Trains a scripted model through .forward(), which no forward hook sees."""

            def make_model(self) -> nn.Module:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)
                    return torch.jit.script(Net())

            def loss(self, indices: torch.Tensor) -> torch.Tensor:
                return F.cross_entropy(self.model.forward(INPUTS[indices]), TARGETS[indices])

        case = classifier_case(CallsForward)
        result = Parts()
        case(self.check).run(result)
        self.assertEqual((result.failures, result.errors), ([], []))
        self.assertEqual(result.passed, [self.check])
        [(part, reason)] = result.skipped
        self.assertIn("(part='training after eval()')", str(part))
        self.assertIn(
            "eval() switched the train/eval mode of model, model.features, model.features.0 "
            "and 3 more (it does not restore the mode it found); whether the training that "
            "follows runs in the wrong mode could not be seen: trainer.train(1) ran no "
            "forward pass with gradients enabled that a forward hook of the model saw. Set "
            "eval_restores_mode = True",
            reason,
        )
        self.assertFailsWith(
            classifier_case(CallsForward, eval_restores_mode=True),
            self.check,
            "which were in training mode before, although eval_restores_mode is True",
        )

    def test_a_submodule_kept_in_eval_mode_stays_so_with_eval_restores_mode(self) -> None:
        class FrozenStatistics(ClassifierTrainer):
            def __init__(self) -> None:
                super().__init__()
                self.model.features[1].eval()  # frozen BatchNorm statistics

        # training starts with model.train(), which unfreezes them anyway: no consequence
        self.assertPasses(classifier_case(FrozenStatistics), self.check)
        self.assertFailsWith(
            classifier_case(FrozenStatistics, eval_restores_mode=True),
            self.check,
            "it left model.features.1 in training mode, which was in eval mode before",
        )

        class RestoresEachModule(FrozenStatistics):
            def eval(self) -> float:
                modes = {module: module.training for module in self.model.modules()}
                loss = super().eval()
                for module, training in modes.items():
                    module.training = training
                return loss

        self.assertPasses(classifier_case(RestoresEachModule, eval_restores_mode=True), self.check)

    def test_eval_restores_mode_must_be_a_bool(self) -> None:
        self.assertErrorsWith(
            classifier_case(ClassifierTrainer, eval_restores_mode="yes"),
            self.check,
            "ContractError: self.eval_restores_mode set in Case.setUp is 'yes', not True or False",
        )


class InitialLoss(CheckTestCase):
    def test_a_loss_summed_over_the_batch_fails_with_the_ratio(self) -> None:
        self.assertFailsWith(
            classifier_case(SummedLoss),
            "test_initial_loss",
            "trainer.eval() before any training returned ",
            "expected about 1.38629 (expected_initial_loss, within rtol=0.25, atol=0.0) (1",
            "times the expected value)",
            "summed over the batch instead of averaged",
        )

    def test_a_training_loss_summed_over_the_batch_fails_although_eval_averages(self) -> None:
        text = self.assertFailsWith(
            classifier_case(TrainingLossSummed),
            "test_initial_loss",
            "The first training loss trainer.train(1) logged as 'train/loss' "
            "(initial_loss_tag) was ",
            "expected about 1.38629 (expected_initial_loss, within rtol=0.25, atol=0.0) (",
            "training computes another loss than evaluation (summed over the batch there, "
            "which multiplies the learning rate by the batch size",
            "set initial_loss_tag to the tag that logs it, or to None",
        )
        # Summed over batches of 4: 4 times the expected value, times what one batch's loss at
        # initialisation differs by from the mean (0.73 to 1.41 times over 300 seeds).
        ratio = re.search(r"\(([0-9.]+) times the expected value\)", text)
        assert ratio is not None, text
        self.assertTrue(2.9 < float(ratio.group(1)) < 5.7, text)
        # eval() averages: its loss is within the tolerance of log(4), whatever the seed.
        returned = re.search(r"although trainer\.eval\(\) returned ([0-9.]+):", text)
        assert returned is not None, text
        self.assertAlmostEqual(float(returned.group(1)), math.log(4), delta=0.25 * math.log(4))

    def test_a_first_batch_off_by_less_than_the_factor_is_put_down_to_the_batch(self) -> None:
        """Under seed 20, the correct classifier's first batch of 4 has a loss 1.32 times
        log(4), outside the 25 % tolerance, while eval() returns 1.41."""
        seeded = with_class_attributes(classifier_case(ClassifierTrainer), seed=20)
        self.assertSkipsWith(
            seeded,
            "test_initial_loss",
            "The first training loss trainer.train(1) logged as 'train/loss' was 1.83496, "
            "outside the tolerance of expected_initial_loss (1.38629, rtol=0.25, atol=0.0) "
            "(1.32 times the expected value), but within a factor of 2.0 "
            "(initial_batch_factor) of the 1.40749 that trainer.eval() returned",
            "Not judged; lower initial_batch_factor (1: strict) to judge it.",
        )
        strict = with_class_attributes(seeded, initial_batch_factor=1)
        self.assertFailsWith(
            strict,
            "test_initial_loss",
            "The first training loss trainer.train(1) logged as 'train/loss' (initial_loss_tag) "
            "was 1.83496, expected about 1.38629",
        )

    def test_the_training_loss_is_read_from_initial_loss_tag(self) -> None:
        self.assertFailsWith(
            classifier_case(SumsUnderItsOwnTag, initial_loss_tag="loss/train"),
            "test_initial_loss",
            "The first training loss trainer.train(1) logged as 'loss/train' (initial_loss_tag)",
        )
        self.assertPasses(
            classifier_case(LogsTheLossAs, initial_loss_tag="loss/train"),
            "test_initial_loss",
            (PUT_DOWN_TO_THE_BATCH,),
        )
        # The default tag, train/loss, is compared only when the trainer logs it.
        self.assertPasses(classifier_case(SumsUnderItsOwnTag), "test_initial_loss")
        self.assertPasses(
            classifier_case(TrainingLossSummed, initial_loss_tag=None), "test_initial_loss"
        )

    def test_an_initial_loss_tag_that_is_not_logged_is_a_contract_error(self) -> None:
        self.assertErrorsWith(
            classifier_case(ClassifierTrainer, initial_loss_tag="train/los"),
            "test_initial_loss",
            "ContractError",
            "self.initial_loss_tag set in Case.setUp is 'train/los', which one epoch of "
            "trainer.train(1) did not log (did you mean 'train/loss'?); it logged "
            "['test/loss', 'train/loss']",
        )

    def test_unset_expected_initial_loss_skips(self) -> None:
        def set_up(self: Any) -> None:
            self.trainer = ClassifierTrainer()

        self.assertSkipsWith(
            make_case(TrainerTests, set_up),
            "test_initial_loss",
            "self.expected_initial_loss is not set",
        )

    def test_eval_returning_no_number_is_a_contract_error(self) -> None:
        class ReturnsLosses(ClassifierTrainer):
            def eval(self) -> Any:
                return torch.zeros(16)

        self.assertErrorsWith(
            classifier_case(ReturnsLosses),
            "test_initial_loss",
            "trainer.eval() returned a tensor of shape (16,), not a number",
        )


class FrozenParameters(CheckTestCase):
    check = "test_frozen_parameters"

    def test_a_frozen_layer_moved_by_weight_decay_fails(self) -> None:
        self.assertFailsWith(
            classifier_case(FrozenByZeroedGradients, frozen_parameters=["features.*"]),
            self.check,
            "after 1 epoch of trainer.train(1), 3 of 6 parameters",
            "features.0.weight, features.0.bias, features.1.weight: listed in frozen_parameters "
            "but changed: requires_grad is True, so the optimizer updates it; the optimizer's "
            "param group has weight_decay=0.01, which moves a parameter even when its gradient "
            "is zeroed",
        )

    def test_a_layer_listed_as_frozen_but_trainable_fails(self) -> None:
        text = self.assertFailsWith(
            classifier_case(ClassifierTrainer, frozen_parameters=["head.*"]),
            self.check,
            "after 1 epoch of trainer.train(1), 2 of 6 parameters",
            "head.weight, head.bias: listed in frozen_parameters but changed: requires_grad is "
            "True, so the optimizer updates it\n",
        )
        self.assertNotIn("param group has", text)

    def test_a_layer_frozen_after_backward_fails(self) -> None:
        self.assertFailsWith(
            classifier_case(FrozenAfterBackward, frozen_parameters=["features.*"]),
            self.check,
            "features.0.weight, features.0.bias, features.1.weight, features.1.bias: "
            "frozen (requires_grad=False) but changed: by a gradient from before the freezing",
        )

    def test_a_layer_frozen_by_accident_fails(self) -> None:
        self.assertFailsWith(
            classifier_case(FrozenByAccident),
            self.check,
            "after 3 epochs of trainer.train(1), 2 of 6 parameters",
            "features.1.weight, features.1.bias: unchanged, with requires_grad=False: frozen by "
            "accident",
        )

    def test_a_layer_unfrozen_after_the_optimizer_was_built_fails(self) -> None:
        self.assertFailsWith(
            classifier_case(OptimizerBuiltBeforeUnfreezing, frozen_parameters=["features.0.*"]),
            self.check,
            "features.1.weight, features.1.bias: unchanged: not in "
            "trainer.optimizer's param groups",
            "the optimizer was built before the layer was unfrozen",
        )

    def test_a_branch_used_in_eval_mode_only_fails(self) -> None:
        # its training-mode output ignores it and its eval-mode output does not, as for a bias
        # that BatchNorm cancels; but no backward pass computes a gradient for it
        self.assertFailsWith(
            classifier_case(EvalOnlyBranch),
            self.check,
            "branch.weight, branch.bias: unchanged, without a gradient in training: not "
            "connected to the loss",
        )

    def test_an_unused_layer_fails(self) -> None:
        self.assertFailsWith(
            classifier_case(UnusedLayer),
            self.check,
            "auxiliary.weight, auxiliary.bias: unchanged, without a gradient in training",
        )

    def test_a_layer_with_zero_gradients_fails(self) -> None:
        self.assertFailsWith(
            classifier_case(SwitchedOffBranch),
            self.check,
            "branch.weight, branch.bias: unchanged although trainable and in "
            "the optimizer: a zero gradient",
        )

    def test_a_bias_that_batch_normalisation_cancels_is_no_failure(self) -> None:
        # issue 20's rule: the conv bias of the most common CNN cannot train (BatchNorm
        # cancels it), by design; SwitchedOffBranch, which neither mode uses, still fails
        outcome = run_check(classifier_case(ConvBiasBeforeBatchNorm), self.check)
        self.assertEqual((outcome.failures, outcome.errors), ([], []))
        self.assertEqual(len(outcome.skips), 1, outcome.skips)
        for fragment in (
            "body.0.bias did not change in 3 epochs of training, and the training-mode output "
            "of the module that holds it does not depend on it (its eval-mode output does)",
            "give that layer bias=False",
        ):
            self.assertIn(fragment, outcome.skips[0])

    def test_a_scripted_model_is_checked(self) -> None:
        # a ScriptModule takes no forward hooks: trained and judged all the same
        class Scripted(ClassifierTrainer):
            def make_model(self) -> nn.Module:
                return torch.jit.script(Net())

        self.assertPasses(classifier_case(Scripted), self.check)
        self.assertFailsWith(
            classifier_case(Scripted, frozen_parameters=["head.*"]),
            self.check,
            "head.weight, head.bias: listed in frozen_parameters but changed",
        )

    def test_a_pattern_matching_no_parameter_is_a_contract_error(self) -> None:
        case = classifier_case(FrozenFeatures, frozen_parameters=["backbone.*"])
        self.assertErrorsWith(
            case,
            self.check,
            "self.frozen_parameters",
            "has ['backbone.*'], which matches no parameter of trainer.model "
            "(its parameters: features.0.weight",
        )


if __name__ == "__main__":
    unittest.main()
