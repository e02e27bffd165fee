"""A PyTorch Lightning ``LightningModule`` and its data loaders as ``TrainerTests`` sees a
trainer: ``train(epochs)``, ``eval()``, ``save_checkpoint(path)``, ``load_checkpoint(path)``, the
module as ``.model``, the optimizer and the ``SummaryWriter`` Lightning logs to::

    from dltestkit.integrations.lightning import LightningAdapter

    class TestClassifierTraining(TrainerTests, unittest.TestCase):
        def setUp(self):
            self.make_trainer = lambda: LightningAdapter(
                Classifier(), train_loader(), val_loader(), log_dir=self.make_temp_dir()
            )
            self.trainer = self.make_trainer()

Every check then runs on the real Lightning loop. It needs ``pytorch-lightning`` (or
``lightning``) installed; the rest of dltestkit does not.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Union

import torch

try:
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import TensorBoardLogger
except ImportError:  # the package's newer name
    import lightning.pytorch as pl  # type: ignore[no-redef, import-not-found, unused-ignore]
    from lightning.pytorch.loggers import TensorBoardLogger  # type: ignore[no-redef, import-not-found, unused-ignore]

__all__ = ["LightningAdapter", "RandomState", "quiet"]


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Lightning's info messages and warnings off (the logging level is restored)."""
    logger = logging.getLogger("pytorch_lightning")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module="pytorch_lightning|lightning_fabric|lightning")
            yield
    finally:
        logger.setLevel(level)


class RandomState(pl.Callback):
    """Puts the state of the generator that shuffles the training data and torch's global
    random state (which dropout draws from) into Lightning's checkpoints, which leave them
    out: without it a resumed run sees another data order and other dropout masks. A loader
    without a generator of its own (one whose sampler orders the data by its seed and epoch,
    as DistributedSampler does) has only torch's random state saved."""

    def __init__(self, generator: Optional[torch.Generator]) -> None:
        self.generator = generator

    def state_dict(self) -> Dict[str, Any]:
        order = None if self.generator is None else self.generator.get_state()
        return {"data_order": order, "torch": torch.get_rng_state()}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        if self.generator is not None and state_dict["data_order"] is not None:
            self.generator.set_state(state_dict["data_order"])
        torch.set_rng_state(state_dict["torch"])


class _StopAfter(pl.Callback):
    """Ends the fit after the epoch that brings it to ``epochs`` epochs in all."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


class LightningAdapter:
    """A LightningModule and its data loaders as TrainerTests sees a trainer. On the CPU,
    without progress bar or model summary; the logs and checkpoints go to ``log_dir`` only.

    Args:
        module: the LightningModule, kept as ``.model`` (where the checks read the model).
        train_loader: its training DataLoader; a ``generator`` of its own (the data order) is
            saved in the checkpoints.
        val_loader: the DataLoader ``eval()`` validates on.
        log_dir: the folder of the TensorBoard logs and the checkpoints (a test gives it
            ``self.make_temp_dir()``).
        val_metric: the metric ``validation_step`` logs as the evaluation loss.
        max_epochs: the length of the run your ``pl.Trainer(max_epochs=...)`` is set up for,
            which every fit is given (each stops after the epochs ``train`` asks for), so that
            callbacks and schedulers that read it see your run's: ``StochasticWeightAveraging``
            (which starts and ends its average from it), a scheduler sized by
            ``trainer.estimated_stepping_batches``. None: each fit's ``max_epochs`` is the
            number of epochs trained so far.
        trainer_options: more arguments of every ``pl.Trainer`` it builds, for fitting and
            validating: ``accumulate_grad_batches=k``, ``precision="bf16-mixed"``, ...
    """

    def __init__(
        self,
        module: pl.LightningModule,
        train_loader: Any,
        val_loader: Any,
        log_dir: Union[str, Path],
        val_metric: str = "val/loss",
        max_epochs: Optional[int] = None,
        **trainer_options: Any,
    ) -> None:
        self.model = module
        self.trainer_options = trainer_options
        self.train_loader, self.val_loader = train_loader, val_loader
        self.log_dir = str(log_dir)
        self.val_metric = val_metric
        self.max_epochs = max_epochs
        self.logger = TensorBoardLogger(self.log_dir, name="", version="", default_hp_metric=False)
        self.summary = self.logger.experiment  # the SummaryWriter Lightning logs to
        self.optimizer: Optional[Any] = None  # fit() builds it
        self.epochs = 0
        self.last_checkpoint: Optional[str] = None  # the next fit() resumes from it
        self._checkpoints: Optional[str] = None  # the folder of last_checkpoint

    def lightning_trainer(self, **options: Any) -> pl.Trainer:
        defaults: Dict[str, Any] = {
            "accelerator": "cpu",
            "devices": 1,
            "default_root_dir": self.log_dir,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            "log_every_n_steps": 1,
        }
        return pl.Trainer(**{**defaults, **self.trainer_options, **options})

    def train(self, epochs: int) -> None:
        """Train ``epochs`` more epochs: a new ``fit`` that resumes from the checkpoint the
        previous one left, as a resumed run would (Lightning builds a new optimizer in every
        ``fit``), and that ends after them (given ``max_epochs``: a fit of the whole run,
        stopped)."""
        self.epochs += epochs
        with quiet():
            trainer = self.lightning_trainer(
                max_epochs=max(self.max_epochs or 0, self.epochs),
                logger=self.logger,
                callbacks=[*self.callbacks(), _StopAfter(self.epochs)],
            )
            trainer.fit(
                self.model,
                self.train_loader,
                self.val_loader,
                ckpt_path=self.last_checkpoint,
                weights_only=True,
            )
            self.optimizer = trainer.optimizers[0]
            self.last_checkpoint = f"{self._checkpoint_folder()}/last.ckpt"
            trainer.save_checkpoint(self.last_checkpoint)  # by rank 0; then all wait for it

    def _checkpoint_folder(self) -> str:
        """Where the fits leave their checkpoints: ``log_dir``, or, on several ranks joined in
        a process group (distributed training), rank 0's, where Lightning writes them and
        every rank resumes from (each rank may have been given a folder of its own)."""
        if self._checkpoints is None:
            folder = [self.log_dir]
            distributed = torch.distributed
            if distributed.is_available() and distributed.is_initialized():
                distributed.broadcast_object_list(folder, src=0)
            self._checkpoints = folder[0]
        return self._checkpoints

    def callbacks(self) -> List[pl.Callback]:
        return [RandomState(self.train_loader.generator)]

    def eval(self) -> float:
        """The validation loss, from ``Trainer.validate`` (which logs nothing here, and puts
        every submodule back in the mode it found it in)."""
        with quiet():
            trainer = self.lightning_trainer(logger=False)
            metrics = trainer.validate(self.model, self.val_loader, verbose=False)
        return float(metrics[0][self.val_metric])

    def save_checkpoint(self, path: Union[str, Path]) -> None:
        if self.last_checkpoint is None:
            raise RuntimeError("save_checkpoint before any training: there is no checkpoint")
        shutil.copyfile(self.last_checkpoint, path)

    def load_checkpoint(self, path: Union[str, Path]) -> None:
        """Load the weights now; the next ``fit`` restores the optimizer, the counters and
        the callbacks' state from the same checkpoint."""
        checkpoint = torch.load(path, weights_only=True)
        self.model.load_state_dict(checkpoint["state_dict"])
        self.epochs = checkpoint["epoch"]
        self.last_checkpoint = str(path)
