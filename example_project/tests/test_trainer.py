from __future__ import annotations

import unittest

import torch
from dataset import MyMNIST
from model import MLPVAE
from torch.utils.data import Subset
from trainer import Trainer, shard_vae

from dltestkit import DistributedTrainerTests, TrainerTests

from .mnist_data import mnist_root


class TestVAETrainer(DistributedTrainerTests, TrainerTests, unittest.TestCase):
    compile_with = "eager"  # dynamo only: counts the recompiles in a fraction of a second

    @classmethod
    def setUpClass(cls):
        # Four fixed, un-augmented training images, used for training and testing (read once).
        cls.data = Subset(MyMNIST(mnist_root(), augment=False).train_data, range(4))

    def setUp(self):
        data = self.data

        def make_trainer(
            rank=0,
            world_size=1,
            accumulation_steps=1,
            precision="32",
            grad_scale=None,
            compile_backend=None,
        ):
            """A new trainer, built as self.trainer is. The checks that resume or repeat
            training call make_trainer(); the distributed check calls it in each of its
            processes with rank and world_size, where the Trainer trains with
            DistributedDataParallel on its shard of the four images. The checks of the
            training stack ask for gradient accumulation (the four images as
            accumulation_steps batches per step), bfloat16 autocast, a GradScaler starting
            at grad_scale, and the model compiled with compile_backend."""
            model = MLPVAE(input_shape=(1, 32, 32), bottleneck_dim=16)
            return Trainer(
                model,
                train_data=data,
                test_data=data,
                optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
                batch_size=4 // world_size // accumulation_steps,
                device="cpu",
                log_dir=self.make_temp_dir(),
                num_workers=0,
                accumulation_steps=accumulation_steps,
                precision=precision,
                grad_scaler=None
                if grad_scale is None
                else torch.amp.GradScaler("cpu", init_scale=grad_scale),
                compile_backend=compile_backend,
            )

        self.make_trainer = make_trainer
        self.trainer = self.make_trainer()
        self.expected_scalars = ["train/recon_loss", "train/kl_div_loss", "train/loss", "test/loss"]
        self.kl_divergence = self.trainer.kl_divergence
        self.overfit_epochs = 100
        self.overfit_max_loss = 30.0
        self.reference_file = "references/vae_trainer.safetensors"  # the first epoch's losses
        self.reference_weights = "drawn"
        # An untrained decoder outputs about 0, so the first loss (squared error summed over
        # the pixels) is about the images' mean squared norm.
        images = torch.stack([image for image, _ in data])
        self.expected_initial_loss = images.pow(2).sum(dim=(1, 2, 3)).mean().item()


class TestVAETrainerFSDP(DistributedTrainerTests, unittest.TestCase):
    """The same trainer with its VAE sharded over the processes with fully_shard (FSDP2):
    test_fsdp_training and test_resume_across_world_sizes (test_ddp_training skips)."""

    @classmethod
    def setUpClass(cls):
        cls.data = Subset(MyMNIST(mnist_root(), augment=False).train_data, range(4))

    def setUp(self):
        data = self.data

        def make_trainer(rank=0, world_size=1):
            model = MLPVAE(input_shape=(1, 32, 32), bottleneck_dim=16)
            shard_vae(model)  # before the optimizer, which must hold the sharded parameters
            return Trainer(
                model,
                train_data=data,
                test_data=data,
                optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
                batch_size=4 // world_size,
                device="cpu",
                log_dir=self.make_temp_dir(),
                num_workers=0,
            )

        self.make_trainer = make_trainer
