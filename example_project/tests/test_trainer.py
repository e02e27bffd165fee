from __future__ import annotations

import unittest

import torch
from dltestkit import TrainerTests
from torch.utils.data import Subset

from dataset import MyMNIST
from model import MLPVAE
from trainer import Trainer

from .mnist_data import mnist_root


class TestVAETrainer(TrainerTests, unittest.TestCase):
    def setUp(self):
        # Four fixed, un-augmented training images, used for training and testing.
        data = Subset(MyMNIST(mnist_root(), augment=False).train_data, range(4))
        model = MLPVAE(input_shape=(1, 32, 32), bottleneck_dim=16)
        self.trainer = Trainer(
            model,
            train_data=data,
            test_data=data,
            optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
            batch_size=4,
            device="cpu",
            log_dir=self.make_temp_dir(),
            num_workers=0,
        )
        self.expected_scalars = ["train/recon_loss", "train/kl_div_loss", "train/loss", "test/loss"]
        self.kl_divergence = self.trainer.kl_divergence
        self.overfit_epochs = 100
        self.overfit_max_loss = 30.0

