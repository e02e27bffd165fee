"""TrainerTests passes on a correct trainer and fails, with its message, on broken ones."""
from __future__ import annotations

import math
import unittest
from typing import Any, List, Tuple

import numpy as np
import torch
from torch import nn

from checkrunner import CheckTestCase, make_case
from dltestkit import TrainerTests
from dltestkit.trainer import kl_reference

TAGS = ["train/recon_loss", "train/kl_div_loss", "train/loss", "test/loss"]


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


class TinyVAETrainer:
    """Trains a tiny VAE on (and evaluates it on) one fixed batch of 4 samples."""

    step_offset = 0

    def __init__(self) -> None:
        self.data = torch.rand(4, 8) * 2 - 1
        self.encoder = nn.Linear(8, 8)
        self.decoder = nn.Linear(4, 8)
        self.optimizer = torch.optim.Adam(
            [*self.encoder.parameters(), *self.decoder.parameters()], lr=0.05)
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


CHECKS = ["test_kl_divergence", "test_logging", "test_overfit_one_batch"]


class CorrectTrainer(CheckTestCase):
    def test_every_check_passes(self) -> None:
        for name in CHECKS:
            with self.subTest(name):
                self.assertPasses(trainer_case(TinyVAETrainer), name)

    def test_a_scalar_total_kl_is_accepted(self) -> None:
        case = trainer_case(TinyVAETrainer, kl_divergence=lambda s, m: kl_divergence(s, m).sum())
        self.assertPasses(case, "test_kl_divergence")

    def test_the_checks_contribute_three_tests(self) -> None:
        names = unittest.TestLoader().getTestCaseNames(trainer_case(TinyVAETrainer))
        self.assertEqual(names, CHECKS)

    def test_the_writer_is_closed_after_every_check(self) -> None:
        trainers: List[TinyVAETrainer] = []

        class Recorded(TinyVAETrainer):
            def __init__(self) -> None:
                super().__init__()
                trainers.append(self)

        for name in CHECKS:
            self.assertPasses(trainer_case(Recorded), name)
        self.assertEqual([trainer.summary.closed for trainer in trainers], [True] * 3)


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
        }
        for trainer_type, diagnosis in mistakes.items():
            with self.subTest(trainer_type.__name__):
                self.assertFailsWith(trainer_case(trainer_type), "test_kl_divergence",
                                     "does not match the numerical reference", diagnosis,
                                     "random draw")

    def test_a_wrong_output_shape_fails(self) -> None:
        case = trainer_case(TinyVAETrainer, kl_divergence=lambda s, m: s + m)
        self.assertFailsWith(case, "test_kl_divergence", "returned shape (3, 5)")

    def test_unset_kl_divergence_skips_naming_it(self) -> None:
        def set_up(self: Any) -> None:
            self.trainer = TinyVAETrainer()

        self.assertSkipsWith(make_case(TrainerTests, set_up), "test_kl_divergence",
                             "self.kl_divergence is not set")


class Logging(CheckTestCase):
    def test_a_missing_tag_fails_listing_the_logged_ones(self) -> None:
        case = trainer_case(MisspelledTag, expected_scalars=TAGS + ["train/kl_los"])
        self.assertFailsWith(case, "test_logging", "'train/kl_los' was not logged",
                             "did you mean 'train/kl_loss'", "Tags logged: ['test/loss'")

    def test_steps_counted_from_one_fail(self) -> None:
        self.assertFailsWith(trainer_case(StepsFromOne), "test_logging",
                             "'train/loss' was logged at steps [1], never at global step 0")

    def test_a_nan_value_fails(self) -> None:
        self.assertFailsWith(trainer_case(LogsNaN), "test_logging",
                             "'train/kl_div_loss' was logged at step 0 with nan")


class Overfit(CheckTestCase):
    def test_a_trainer_that_never_steps_fails_showing_losses(self) -> None:
        text = self.assertFailsWith(trainer_case(ZeroesGradientsBeforeStepping),
                                    "test_overfit_one_batch", "did not overfit one batch",
                                    "after 150 epochs, required <= 0.1")
        before, after = (float(v) for v in
                         text.split("eval() loss ")[1].split(" after")[0].split(" before and "))
        self.assertTrue(math.isclose(before, after))


if __name__ == "__main__":
    unittest.main()
