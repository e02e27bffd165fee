from __future__ import annotations

import unittest

import torch
from dltestkit import ModelTests

from model import CNNVAE, MLPVAE


class TestMLPVAE(ModelTests, unittest.TestCase):
    def setUp(self):
        self.model = MLPVAE(input_shape=(1, 32, 32), bottleneck_dim=16)
        self.inputs = torch.randn(4, 1, 32, 32)


class TestCNNVAE(ModelTests, unittest.TestCase):
    def setUp(self):
        self.model = CNNVAE(input_shape=(1, 32, 32), bottleneck_dim=16)
        self.inputs = torch.randn(4, 1, 32, 32)

