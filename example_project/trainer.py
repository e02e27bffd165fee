"""Training loop for the VAE, logging to TensorBoard.

    trainer = Trainer(model, data.train_data, data.test_data, optimizer,
                      batch_size=128, device="cpu", log_dir="runs/mnist")
    with trainer:
        trainer.train(epochs=10)
        trainer.save_checkpoint("runs/mnist/checkpoint")  # a folder

Resuming is exact: ``load_checkpoint`` restores the weights, the optimizer state
(Adam's moments), the epoch and step counters, the seed that shuffles the training
data (with the epoch), and torch's global random state that the VAE's sampling draws
from. A trainer built the same way that loads the checkpoint and trains on gives the
weights and the logs of an uninterrupted run, with DataLoader workers too (augmentation in
the workers aside: their random streams are in no checkpoint). Checkpoints are written with
``torch.distributed.checkpoint`` (DCP, a folder): each rank writes its own shards, and
any number of processes can load them, so a run saved on two processes resumes on one.

Distributed training: built in a process that joined a ``torch.distributed`` process
group (``torchrun``, see run.py), the trainer gives each rank its shard of the training
data with ``DistributedSampler`` (reshuffled every epoch), and only rank 0 logs. The
model trains with ``DistributedDataParallel`` (each rank holds all the weights), or
fully sharded (FSDP2: each rank holds a shard of the weights and of the optimizer
state) when it was sharded with ``shard_vae`` before its optimizer was built::

    shard_vae(model)                                       # before the optimizer
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

``batch_size`` is per process.

Loss per batch: ``recon_loss + kl_weight * kl_div_loss``, where
``recon_loss`` is the squared error summed over pixels and averaged over the
batch, and ``kl_div_loss`` is KL(N(mu, sigma^2) || N(0, 1)) summed over the
latent dimension and averaged over the batch.

Gradient accumulation: with ``accumulation_steps=k`` an optimizer step takes k
batches of the loader (a window; the last one of an epoch may be shorter). Each
batch's losses are summed over its samples and divided by the samples of the
whole window, so that the step is the step on one batch of all of them.

Mixed precision: ``precision="bf16"`` (or ``"fp16"``) runs the model's forward
passes under ``torch.autocast``; the losses are computed in float32 and the
parameters and the optimizer stay in float32. ``"fp16"`` scales the loss with a
``GradScaler`` (one can be passed in as ``grad_scaler``, also for the other
precisions); it is unscaled before the step and saved in the checkpoints.
``compile_backend`` trains the model through ``torch.compile``.

TensorBoard logs (``self.summary``):

- ``train/recon_loss``, ``train/kl_div_loss``, ``train/loss`` at every
  optimisation step (global step 0, 1, ... across ``train()`` calls);
- ``test/loss`` (``eval()``) after each epoch, with the epoch (0, 1, ...) as step;
- ``test/reconstructions`` (top row inputs, bottom row reconstructions) every
  ``image_every`` epochs, never when ``image_every`` is 0.
"""

from __future__ import annotations

import contextlib
import io
import itertools
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import make_grid

__all__ = ["Trainer", "shard_vae"]

PathLike = Union[str, Path]
PRECISIONS = {"32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def shard_vae(model: nn.Module) -> nn.Module:
    """Shard ``model`` (a VAE) over the processes of the torch.distributed group with
    ``fully_shard`` (FSDP2): the encoder and the decoder each a unit, the heads with the
    model itself; ``forward_with_latent``, which training calls, gathers the weights as
    ``forward`` does. Call it before building the optimizer (it replaces the parameters).
    Outside torch.distributed, or in a group of one process, the model stays as it is."""
    rank, world_size = process_group()
    if world_size == 1:
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (world_size,))
    for part in (model.encoder, model.decoder):
        fully_shard(part, mesh=mesh)
    fully_shard(model, mesh=mesh)
    register_fsdp_forward_method(model, "forward_with_latent")
    return model


def _is_sharded(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # PyTorch before 2.6
        return False
    return isinstance(model, FSDPModule)


def process_group() -> Tuple[int, int]:
    """(rank, world_size) of this process: (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _WithLatent(nn.Module):
    """The VAE with ``forward_with_latent`` as its forward: DistributedDataParallel
    synchronises the gradients of what its own forward computed, so the whole training
    step has to go through it."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.vae.forward_with_latent(x)


class Trainer:
    """Trains a ``model.VAE`` (anything with ``forward_with_latent(x) ->
    (recon, mu, log_sigma)``).

    Args:
        model: the VAE; moved to ``device`` here, once.
        train_data, test_data: datasets of ``(image, label)`` pairs (or of images).
        optimizer: an optimizer over ``model``'s parameters.
        batch_size: batch size of both data loaders (per process).
        device: where the model and the batches live ("cpu", "cuda", ...).
        log_dir: TensorBoard log folder for ``self.summary`` (rank 0 only; None elsewhere).
        num_workers: DataLoader worker processes; 0 loads in this process.
        image_every: log reconstructions every this many epochs; 0: never.
        kl_weight: weight of the KL term in the loss.
        num_images: how many test images the reconstruction grid shows.
        shuffle: shuffle the training data each epoch.
        accumulation_steps: batches whose gradients are accumulated for each optimizer step.
        precision: "32", or "bf16" / "fp16" for autocast forward passes.
        grad_scaler: the GradScaler that scales the loss; by default one for "fp16" only.
        compile_backend: when given, the model trains as ``torch.compile(..., backend=...)``.
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
        accumulation_steps: int = 1,
        precision: str = "32",
        grad_scaler: Optional[torch.amp.GradScaler] = None,
        compile_backend: Optional[Union[str, Callable[..., Any]]] = None,
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision is {precision!r}, not one of {sorted(PRECISIONS)}")
        if accumulation_steps < 1:
            raise ValueError(f"accumulation_steps is {accumulation_steps}, not a positive int")
        self.device = torch.device(device)
        self.rank, self.world_size = process_group()
        self.model = model.to(self.device)
        self.sharded = _is_sharded(self.model)  # by shard_vae: FSDP; otherwise DDP
        step: Callable[[torch.Tensor], Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
        step = _WithLatent(self.model)
        if self.sharded:  # forward_with_latent gathers the shards, backward reduce-scatters
            step = self.model.forward_with_latent  # type: ignore[assignment]
        elif self.world_size > 1:  # broadcasts rank 0's weights, then averages the gradients
            step = DistributedDataParallel(
                step, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        if compile_backend is not None:
            step = torch.compile(step, backend=compile_backend)
        self._step_model = step
        self.optimizer = optimizer
        self.accumulation_steps = accumulation_steps
        self.precision = precision
        if grad_scaler is None and precision == "fp16":
            grad_scaler = torch.amp.GradScaler(self.device.type)
        self.scaler = grad_scaler
        self.kl_weight = kl_weight
        self.image_every = image_every
        self.num_images = num_images
        self.log_dir = Path(log_dir)
        self.summary = SummaryWriter(str(self.log_dir)) if self.rank == 0 else None
        # The data order is decided by a seed and the epoch: DistributedSampler shuffles
        # with both (and shards the data when there are several processes). The seed comes
        # from torch's global RNG, so torch.manual_seed makes the whole run reproducible; it
        # must be the same on every rank, and it is checkpointed.
        self.data_seed = _from_rank_zero(int(torch.randint(2**62, ()).item()))
        loader_options: Dict[str, Any] = dict(
            batch_size=batch_size,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
            pin_memory=self.device.type == "cuda",
            # The loaders draw their workers' seed from a generator of their own, not from
            # torch's global one, which the VAE samples from: a resumed run makes its
            # loaders anew, where an uninterrupted one made them once (persistent workers),
            # and a draw from the global generator would shift every sample after it.
            generator=torch.Generator().manual_seed(self.data_seed),
        )
        self.sampler = DistributedSampler(
            train_data,
            num_replicas=self.world_size,
            rank=self.rank,
            shuffle=shuffle,
            seed=self.data_seed,
        )
        self.train_loader = DataLoader(train_data, sampler=self.sampler, **loader_options)
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
    def train(
        self, epochs: int, callback: Optional[Callable[[Dict[str, float]], None]] = None
    ) -> Optional[float]:
        """Train for ``epochs`` epochs; return the last ``test/loss`` (None if epochs is 0).

        ``callback``, if given, is called after every step with that step's
        losses ``{"recon_loss": ..., "kl_div_loss": ..., "loss": ...}``
        (e.g. to update a progress bar).
        """
        test_loss = None
        for _ in range(epochs):
            self.model.train()
            self.sampler.set_epoch(self.epoch)  # a new order every epoch
            for window in self._windows():
                losses = self._train_step(window)
                for name, value in losses.items():
                    self._log(f"train/{name}", value, self.global_step)
                self.global_step += 1
                if callback is not None:
                    callback(losses)
            test_loss = self.eval()
            self._log("test/loss", test_loss, self.epoch)
            if self.image_every and (self.epoch + 1) % self.image_every == 0:
                self.log_reconstructions()  # every rank: a sharded forward is a collective
            self.epoch += 1
        return test_loss

    def _log(self, tag: str, value: float, step: int) -> None:
        """Log a scalar (on rank 0 only: every rank would write it again)."""
        if self.summary is not None:
            self.summary.add_scalar(tag, value, step)

    def _windows(self) -> Iterator[List[torch.Tensor]]:
        """The epoch's batches, ``accumulation_steps`` at a time (the last window may hold
        fewer)."""
        batches = iter(self.train_loader)
        while True:
            window = [self._inputs(b) for b in itertools.islice(batches, self.accumulation_steps)]
            if not window:
                return
            yield window

    def _autocast(self) -> Any:
        dtype = PRECISIONS[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def _train_step(self, window: List[torch.Tensor]) -> Dict[str, float]:
        """One optimizer step on a window of batches, accumulating their gradients: each
        batch's losses summed over its samples and divided by the samples of the window."""
        self.optimizer.zero_grad(set_to_none=True)
        count = sum(x.shape[0] for x in window)
        losses = {"recon_loss": 0.0, "kl_div_loss": 0.0, "loss": 0.0}
        for x in window:
            with self._autocast():
                recon, mu, log_sigma = self._step_model(x)
            recon_loss = self.recon_loss(recon.float(), x).sum() / count
            kl_div_loss = self.kl_divergence(log_sigma.float(), mu.float()).sum() / count
            loss = recon_loss + self.kl_weight * kl_div_loss
            (loss if self.scaler is None else self.scaler.scale(loss)).backward()
            losses["recon_loss"] += recon_loss.item()
            losses["kl_div_loss"] += kl_div_loss.item()
            losses["loss"] += loss.item()
        if self.scaler is None:
            self.optimizer.step()
        else:
            self.scaler.step(self.optimizer)  # unscales first; skips a step that overflowed
            self.scaler.update()
        return losses

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
                    with self._autocast():
                        recon = self.model(x)
                    total += self.recon_loss(recon.float(), x).sum().item()
                    count += x.shape[0]
        finally:
            self.model.train(was_training)
        if count == 0:
            raise ValueError("the test dataset is empty")
        return total / count

    def log_reconstructions(self) -> None:
        """Log a grid of test images (top row) and their reconstructions (bottom row).
        Called on every rank (the forward pass of a sharded model gathers its weights from
        all of them); rank 0 writes the image."""
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
        if self.summary is None:  # only rank 0 logs
            return
        self.summary.add_image(
            "test/reconstructions", make_grid(images, nrow=x.shape[0]), self.epoch
        )

    # ------------------------------------------------------------- checkpoints
    def save_checkpoint(self, path: PathLike) -> None:
        """Write everything training depends on to the folder ``path``, with
        torch.distributed.checkpoint: model and optimizer state (each rank its shards when the
        model is sharded), epoch and step, the data-order seed and every rank's global random
        states (CPU, and the GPU's when training on one). Called on every rank; any number of
        processes can load it."""
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        every_rank = io.BytesIO()
        torch.save(_gather(rng), every_rank)
        every_rank.seek(0)
        state = {**self._state(), "rng": every_rank}
        dcp.save(state, checkpoint_id=str(path), no_dist=self.world_size == 1)

    def load_checkpoint(self, path: PathLike) -> None:
        """Restore what ``save_checkpoint`` wrote, on any number of processes (this changes
        torch's global random state, as resuming must). Called on every rank."""
        state = {**self._state(), "rng": io.BytesIO()}
        dcp.load(state, checkpoint_id=str(path), no_dist=self.world_size == 1)
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
        )
        self.epoch = int(state["trainer"]["epoch"])
        self.global_step = int(state["trainer"]["step"])
        self.data_seed = self.sampler.seed = int(state["trainer"]["data_seed"])
        if self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
        state["rng"].seek(0)
        states = torch.load(state["rng"], weights_only=True)
        rng = states[self.rank] if self.rank < len(states) else states[0]
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)

    def _state(self) -> Dict[str, Any]:
        """The state save_checkpoint writes and load_checkpoint fills in (but the random
        states): the model's and the optimizer's state dicts (sharded when the model is),
        the trainer's counters and the GradScaler's state (its scale), if it has one."""
        model, optimizer = get_state_dict(self.model, self.optimizer)
        counters = {"epoch": self.epoch, "step": self.global_step, "data_seed": self.data_seed}
        state = {"model": model, "optimizer": optimizer, "trainer": counters}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    # ----------------------------------------------------------------- cleanup
    def close(self) -> None:
        """Flush and close the TensorBoard writer."""
        if self.summary is not None:
            self.summary.close()

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _from_rank_zero(value: int) -> int:
    """Rank 0's value on every rank (the value itself outside torch.distributed)."""
    if process_group()[1] == 1:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return int(holder[0])


def _gather(value: Dict[str, torch.Tensor]) -> List[Dict[str, torch.Tensor]]:
    """Every rank's ``value``, in rank order (a list of one outside torch.distributed)."""
    rank, world_size = process_group()
    if world_size == 1:
        return [value]
    gathered: List[Any] = [None] * world_size
    dist.all_gather_object(gathered, value)
    return gathered
