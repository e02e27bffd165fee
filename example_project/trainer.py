"""Training loop for the VAE, logging to TensorBoard.

    trainer = Trainer(model, data.train_data, data.test_data, optimizer,
                      batch_size=128, device="cpu", log_dir="runs/mnist")
    with trainer:
        trainer.train(epochs=10)
        trainer.save_checkpoint("runs/mnist/checkpoint.pt")

Resuming is exact: ``load_checkpoint`` restores the weights, the optimizer state
(Adam's moments), the epoch and step counters, the state of the generator that
shuffles the training data, and torch's global random state that the VAE's
sampling draws from. A trainer built the same way that loads the checkpoint
and trains on gives the weights and the logs of an uninterrupted run.

Loss per batch: ``recon_loss + kl_weight * kl_div_loss``, where
``recon_loss`` is the squared error summed over pixels and averaged over the
batch, and ``kl_div_loss`` is KL(N(mu, sigma^2) || N(0, 1)) summed over the
latent dimension and averaged over the batch.

TensorBoard logs (``self.summary``):

- ``train/recon_loss``, ``train/kl_div_loss``, ``train/loss`` at every
  optimisation step (global step 0, 1, ... across ``train()`` calls);
- ``test/loss`` (``eval()``) after each epoch, with the epoch (0, 1, ...) as step;
- ``test/reconstructions`` (top row inputs, bottom row reconstructions) every
  ``image_every`` epochs, never when ``image_every`` is 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import make_grid

__all__ = ["Trainer"]

PathLike = Union[str, Path]


class Trainer:
    """Trains a ``model.VAE`` (anything with ``forward_with_latent(x) ->
    (recon, mu, log_sigma)``).

    Args:
        model: the VAE; moved to ``device`` here, once.
        train_data, test_data: datasets of ``(image, label)`` pairs (or of images).
        optimizer: an optimizer over ``model``'s parameters.
        batch_size: batch size of both data loaders.
        device: where the model and the batches live ("cpu", "cuda", ...).
        log_dir: TensorBoard log folder for ``self.summary``.
        num_workers: DataLoader worker processes; 0 loads in this process.
        image_every: log reconstructions every this many epochs; 0: never.
        kl_weight: weight of the KL term in the loss.
        num_images: how many test images the reconstruction grid shows.
        shuffle: shuffle the training data each epoch.
    """

    def __init__(
        self,
        model: nn.Module,
        train_data: Dataset,
        test_data: Dataset,
        optimizer: torch.optim.Optimizer,
        batch_size: int,
        device: Union[str, torch.device],
        log_dir: PathLike,
        num_workers: int = 0,
        image_every: int = 10,
        kl_weight: float = 1.0,
        num_images: int = 8,
        shuffle: bool = True,
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.optimizer = optimizer
        self.kl_weight = kl_weight
        self.image_every = image_every
        self.num_images = num_images
        self.log_dir = Path(log_dir)
        self.summary = SummaryWriter(str(self.log_dir))
        loader_options: Dict[str, Any] = dict(
            batch_size=batch_size,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
            pin_memory=self.device.type == "cuda",
        )
        # The trainer's own generator decides the data order (and the DataLoader workers'
        # seeds); its state is checkpointed. Its seed comes from torch's global RNG, so
        # torch.manual_seed makes the whole run reproducible.
        self.generator = torch.Generator().manual_seed(int(torch.randint(2**62, ()).item()))
        self.train_loader = DataLoader(
            train_data, shuffle=shuffle, generator=self.generator, **loader_options
        )
        self.test_loader = DataLoader(test_data, shuffle=False, **loader_options)
        self.epoch = 0  # epochs trained so far
        self.global_step = 0  # optimisation steps so far
        self._image_batch: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ losses
    @staticmethod
    def kl_divergence(log_sigma: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
        """KL(N(mu, sigma^2) || N(0, 1)) summed over the last dimension.

        Closed form per latent dimension:
        ``0.5 * (sigma^2 + mu^2 - 1) - log_sigma``. Returns one value per
        sample: shape ``mu.shape[:-1]``, i.e. (batch,).
        """
        return (0.5 * (torch.exp(2.0 * log_sigma) + mu**2 - 1.0) - log_sigma).sum(dim=-1)

    @staticmethod
    def recon_loss(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Squared error summed over all but the batch dimension; shape (batch,)."""
        return (recon - x).pow(2).flatten(1).sum(dim=1)

    # ---------------------------------------------------------------- training
    def train(self, epochs: int, callback: Optional[Callable[[Dict[str, float]], None]] = None) -> Optional[float]:
        """Train for ``epochs`` epochs; return the last ``test/loss`` (None if epochs is 0).

        ``callback``, if given, is called after every step with that step's
        losses ``{"recon_loss": ..., "kl_div_loss": ..., "loss": ...}``
        (e.g. to update a progress bar).
        """
        test_loss = None
        for _ in range(epochs):
            self.model.train()
            for batch in self.train_loader:
                losses = self._train_step(self._inputs(batch))
                for name, value in losses.items():
                    self.summary.add_scalar(f"train/{name}", value, self.global_step)
                self.global_step += 1
                if callback is not None:
                    callback(losses)
            test_loss = self.eval()
            self.summary.add_scalar("test/loss", test_loss, self.epoch)
            if self.image_every and (self.epoch + 1) % self.image_every == 0:
                self.log_reconstructions()
            self.epoch += 1
        return test_loss

    def _train_step(self, x: torch.Tensor) -> Dict[str, float]:
        self.optimizer.zero_grad(set_to_none=True)
        recon, mu, log_sigma = self.model.forward_with_latent(x)
        recon_loss = self.recon_loss(recon, x).mean()
        kl_div_loss = self.kl_divergence(log_sigma, mu).mean()
        loss = recon_loss + self.kl_weight * kl_div_loss
        loss.backward()
        self.optimizer.step()
        return {"recon_loss": recon_loss.item(), "kl_div_loss": kl_div_loss.item(), "loss": loss.item()}

    def _inputs(self, batch: Any) -> torch.Tensor:
        """The images of a batch, on the trainer's device."""
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return x.to(self.device, non_blocking=True)

    # -------------------------------------------------------------- evaluation
    def eval(self) -> float:
        """Mean reconstruction loss (squared error summed over pixels) per test
        sample, with the model in eval mode (deterministic: the latent is mu).
        The model's previous train/eval mode is restored."""
        was_training = self.model.training
        self.model.eval()
        total = 0.0
        count = 0
        try:
            with torch.no_grad():
                for batch in self.test_loader:
                    x = self._inputs(batch)
                    total += self.recon_loss(self.model(x), x).sum().item()
                    count += x.shape[0]
        finally:
            self.model.train(was_training)
        if count == 0:
            raise ValueError("the test dataset is empty")
        return total / count

    def log_reconstructions(self) -> None:
        """Log a grid of test images (top row) and their reconstructions (bottom row)."""
        if self._image_batch is None:
            self._image_batch = self._inputs(next(iter(self.test_loader)))[: self.num_images]
        x = self._image_batch
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                recon = self.model(x)
        finally:
            self.model.train(was_training)
        images = torch.cat([x, recon]).float().add(1.0).div(2.0).clamp(0.0, 1.0).cpu()
        self.summary.add_image("test/reconstructions", make_grid(images, nrow=x.shape[0]), self.epoch)

    # ------------------------------------------------------------- checkpoints
    def save_checkpoint(self, path: PathLike) -> None:
        """Write everything training depends on, loadable with ``weights_only=True``:
        model and optimizer state, epoch and step, the state of the data-order generator
        and the global random states (CPU, and the GPU's when training on one)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        checkpoint = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch,
            "step": self.global_step,
            "data_order": self.generator.get_state(),
            "rng": torch.get_rng_state(),
        }
        if self.device.type == "cuda":
            checkpoint["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        torch.save(checkpoint, path)

    def load_checkpoint(self, path: PathLike) -> None:
        """Restore what ``save_checkpoint`` wrote (this changes torch's global random state,
        as resuming must)."""
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.epoch = int(checkpoint["epoch"])
        self.global_step = int(checkpoint["step"])
        self.generator.set_state(checkpoint["data_order"])
        torch.set_rng_state(checkpoint["rng"])
        if "cuda_rng" in checkpoint and self.device.type == "cuda":
            torch.cuda.set_rng_state(checkpoint["cuda_rng"], self.device)

    # ----------------------------------------------------------------- cleanup
    def close(self) -> None:
        """Flush and close the TensorBoard writer."""
        self.summary.close()

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
