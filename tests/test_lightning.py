"""TrainerTests on a real PyTorch Lightning LightningModule and Trainer, through the adapter
the library ships (dltestkit.integrations.lightning), as docs/howto-lightning.md shows it."""

from __future__ import annotations

import contextlib
import inspect
import math
import shutil
import tempfile
import unittest
from pathlib import Path
from typing import Any

import torch
from checkrunner import NO_GPU, PUT_DOWN_TO_THE_BATCH, CheckTestCase, make_case, run_check
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from dltestkit import TrainerTests

try:
    import pytorch_lightning as pl

    from dltestkit.integrations.lightning import LightningAdapter
except ImportError:  # the dev extra installs it
    raise unittest.SkipTest(
        "pytorch-lightning is not installed (pip install -e '.[dev]')"
    ) from None

HOWTO = Path(__file__).resolve().parent.parent / "docs" / "howto-lightning.md"
_DATA = torch.Generator().manual_seed(0)
DATA = TensorDataset(torch.randn(8, 8, generator=_DATA), torch.arange(8) % 4)


# -- the LightningModule, as docs/howto-lightning.md shows it ---------------------------
class Classifier(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 4)
        )

    def loss(self, batch):
        inputs, targets = batch
        return F.cross_entropy(self.net(inputs), targets)

    def training_step(self, batch, batch_index):
        loss = self.loss(batch)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_index):
        self.log("val/loss", self.loss(batch))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.05)


class WithoutRandomState(LightningAdapter):
    def callbacks(self):
        return []  # Lightning's checkpoints alone


def lightning_case(
    adapter: Any = None, module: Any = Classifier, batch_size: int = 4, **attributes: Any
) -> type:
    def make_trainer(self: Any, accumulation_steps: int = 1, precision: str = "32") -> Any:
        """Batches of batch_size (as accumulation_steps micro-batches), in float32 or
        bfloat16."""
        generator = torch.Generator().manual_seed(int(torch.randint(2**62, ()).item()))
        return (adapter or LightningAdapter)(
            module(),
            DataLoader(
                DATA,
                batch_size=batch_size // accumulation_steps,
                shuffle=True,
                generator=generator,
            ),
            DataLoader(DATA, batch_size=8),
            log_dir=self.make_temp_dir(),
            accumulate_grad_batches=accumulation_steps,
            precision="bf16-mixed" if precision == "bf16" else "32-true",
        )

    def set_up(self: Any) -> None:
        self.trainer = self.make_trainer()
        self.expected_scalars = ["train/loss"]
        self.expected_initial_loss = math.log(4)
        self.overfit_epochs = 40
        self.overfit_max_loss = 0.5
        for name, value in attributes.items():
            setattr(self, name, value)

    return make_case(TrainerTests, set_up, make_trainer=make_trainer)


#: What the adapter's make_trainer above does not take, which the checks that need it name.
NOT_TAKEN = "make_trainer does not take the keyword argument"


class Lightning(CheckTestCase):
    def test_every_check_passes_but_the_kl_and_compile_checks_which_skip(self) -> None:
        for name in unittest.TestLoader().getTestCaseNames(lightning_case()):
            with self.subTest(name):
                if name == "test_kl_divergence":
                    self.assertSkipsWith(lightning_case(), name, "applies to VAEs only")
                elif name == "test_compiled_training":
                    # the adapter fits a new pl.Trainer in every train(): a compiled step
                    # would recompile for each
                    self.assertSkipsWith(lightning_case(), name, f"{NOT_TAKEN} compile_backend")
                elif name == "test_mixed_precision":
                    # Lightning's GradScaler comes with float16 autocast ("16-mixed")
                    self.assertPasses(
                        lightning_case(), name, allowed_skips=[f"{NOT_TAKEN} grad_scale"]
                    )
                else:
                    # (under some seeds the first batch's loss is put down to the batch)
                    allowed = (NO_GPU, PUT_DOWN_TO_THE_BATCH)
                    self.assertPasses(lightning_case(), name, allowed)

    def test_a_bias_that_batch_normalisation_cancels_is_no_failure_under_sgd(self) -> None:
        # training_step calls self.net, not the module itself, and Lightning clears the
        # gradients after each step: the Linear bias before BatchNorm1d, which SGD at a small
        # learning rate leaves unchanged, is judged on the Sequential that holds it
        class SGDClassifier(Classifier):
            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.001, momentum=0.9)

        outcome = run_check(lightning_case(module=SGDClassifier), "test_frozen_parameters")
        self.assertEqual((outcome.failures, outcome.errors), ([], []))
        self.assertEqual(len(outcome.skips), 1, outcome.skips)
        self.assertIn(
            "net.0.bias did not change in 3 epochs of training, and the training-mode output of "
            "the module that holds it does not depend on it (its eval-mode output does)",
            outcome.skips[0],
        )

    def test_lightning_checkpoints_alone_lose_the_data_order_and_random_state(self) -> None:
        self.assertFailsWith(
            lightning_case(WithoutRandomState),
            "test_resume",
            "a resumed run differs from an uninterrupted one",
            "data order: the random generator "
            "trainer.train_loader.generator is not in the saved state",
            "random state: training draws from torch's global RNG",
        )

    def test_eval_leaves_model_unchanged_passes_on_several_seeds(self) -> None:
        class FrozenStatistics(Classifier):
            """Trains with the BatchNorm statistics frozen, as fine-tuning often does."""

            def on_train_epoch_start(self):
                self.net[1].eval()

        for module in (Classifier, FrozenStatistics):
            for seed in (0, 1, 2):
                for strict in (False, True):
                    with self.subTest(module.__name__, seed=seed, eval_restores_mode=strict):
                        case = lightning_case(module=module, eval_restores_mode=strict)
                        self.assertPasses(
                            type("Case", (case,), {"seed": seed}),
                            "test_eval_leaves_model_unchanged",
                        )

    def test_the_documented_training_step_outputs_skip_a_part_unless_strict(self) -> None:
        class KeepsTheEpochsLosses(Classifier):
            """Lightning's documented way to an epoch's mean loss (four steps an epoch)."""

            def __init__(self):
                super().__init__()
                self.training_step_outputs = []

            def training_step(self, batch, batch_index):
                loss = super().training_step(batch, batch_index)
                self.training_step_outputs.append(loss)
                return loss

            def on_train_epoch_end(self):
                self.log("train/epoch_loss", torch.stack(self.training_step_outputs).mean())
                self.training_step_outputs.clear()

        holds = "trainer.model.training_step_outputs[...]"
        self.assertSkipsWith(
            lightning_case(module=KeepsTheEpochsLosses, batch_size=2),
            "test_no_retained_graphs",
            "grows within epoch 2, from step to step:",
            f"({holds} holds it)",
            "set strict_graphs = True to make this a failure",
        )
        self.assertFailsWith(
            lightning_case(module=KeepsTheEpochsLosses, batch_size=2, strict_graphs=True),
            "test_no_retained_graphs",
            "within epoch 2, from step to step:",
            f"{holds}: 4 tensors with grad_fn",
        )

    def test_with_the_runs_length_one_epoch_at_a_time_trains_as_one_fit(self) -> None:
        from pytorch_lightning.callbacks import StochasticWeightAveraging

        class Averaging(LightningAdapter):  # SWA starts and ends from max_epochs
            def callbacks(self) -> list:
                averaging = StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=2)
                return [*super().callbacks(), averaging]

        def weights(epochs: list, **options: Any) -> torch.Tensor:
            folder = tempfile.mkdtemp(prefix="dltestkit-lightning-")
            self.addCleanup(shutil.rmtree, folder, ignore_errors=True)
            torch.manual_seed(0)
            order = torch.Generator().manual_seed(1)
            adapter = Averaging(
                Classifier(),
                DataLoader(DATA, batch_size=4, shuffle=True, generator=order),
                DataLoader(DATA, batch_size=8),
                log_dir=folder,
                **options,
            )
            for count in epochs:
                adapter.train(count)
            return torch.cat([p.detach().flatten() for p in adapter.model.parameters()])

        start = weights([])
        whole = weights([3])
        self.assertFalse(torch.equal(whole, start))
        self.assertTrue(torch.equal(weights([1, 1, 1], max_epochs=3), whole))
        # without it, fits of 1 and 2 epochs end before SWA starts, and SWA hands the model
        # its average, never updated: the weights it started with
        self.assertTrue(torch.equal(weights([1, 1, 1]), start))
        case = lightning_case(lambda *a, **k: Averaging(*a, max_epochs=3, **k))
        for name in ("test_frozen_parameters", "test_resume"):
            with self.subTest(name):
                self.assertPasses(case, name)

    def test_an_adapter_without_a_model_attribute_is_told_so(self) -> None:
        class KeepsItAsModule(LightningAdapter):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                self.module = self.__dict__.pop("model")

        self.assertErrorsWith(
            lightning_case(KeepsItAsModule),
            "test_eval_leaves_model_unchanged",
            "ContractError: the trainer (KeepsItAsModule) has no attribute 'model' "
            "(model_attribute); TrainerTests reads the trained model there. Set "
            "self.model_attribute to the name of the attribute that holds it (the trainer's "
            "nn.Module attribute: module (Classifier)).",
        )

    def test_nothing_is_printed_or_written_to_the_working_directory(self) -> None:
        import io
        import os
        import tempfile

        previous = os.getcwd()
        with (
            tempfile.TemporaryDirectory() as folder,
            contextlib.redirect_stderr(io.StringIO()) as errors,
            contextlib.redirect_stdout(io.StringIO()) as output,
        ):
            os.chdir(folder)
            try:
                outcome = run_check(lightning_case(), "test_resume")
                self.assertEqual(os.listdir(folder), [])
            finally:
                os.chdir(previous)
        self.assertEqual((outcome.failures, outcome.errors), ([], []))
        self.assertEqual((output.getvalue(), errors.getvalue()), ("", ""))

    def test_the_how_to_shows_this_module_and_the_adapter_of_the_library(self) -> None:
        page = HOWTO.read_text(encoding="utf-8")
        self.assertIn("from dltestkit.integrations.lightning import LightningAdapter", page)
        for code in (Classifier, WithoutRandomState):
            with self.subTest(code.__name__):
                self.assertIn(inspect.getsource(code), page)


if __name__ == "__main__":
    unittest.main()
