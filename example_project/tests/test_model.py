from __future__ import annotations

import unittest

import torch
from model import CNNVAE, MLPVAE

from dltestkit import DistributedModelTests, ModelTests


def mlp_vae() -> MLPVAE:
    return MLPVAE(input_shape=(1, 32, 32), bottleneck_dim=16)


def cnn_vae() -> CNNVAE:
    return CNNVAE(input_shape=(1, 32, 32), bottleneck_dim=16)


class TestMLPVAE(DistributedModelTests, ModelTests, unittest.TestCase):
    def setUp(self):
        self.model = mlp_vae()
        self.inputs = torch.randn(4, 1, 32, 32)
        self.make_model = mlp_vae  # a fresh model of the same architecture
        # inputs and outputs stored beside this file (python -m dltestkit write-references);
        # the weights drawn from each parameter's mean and std, which keeps the file small
        self.reference_file = "references/mlp_vae.safetensors"
        self.reference_weights = "drawn"


class TestCNNVAE(DistributedModelTests, ModelTests, unittest.TestCase):
    def setUp(self):
        self.model = cnn_vae()
        self.inputs = torch.randn(4, 1, 32, 32)
        self.make_model = cnn_vae
        self.reference_file = "references/cnn_vae.safetensors"
        self.reference_weights = "drawn"
