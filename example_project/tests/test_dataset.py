from __future__ import annotations

import unittest

from dataset import MyMNIST

from dltestkit import DatasetTests

from .mnist_data import mnist_root


class TestMyMNIST(DatasetTests, unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.data = MyMNIST(mnist_root())  # read once: the checks share one scan of the splits

    def setUp(self):
        self.splits = {"train": self.data.train_data, "test": self.data.test_data}
        self.sample_shape = (1, 32, 32)
        self.value_range = (-1.0, 1.0)
        self.augmented_splits = {"train"}
        self.num_classes = 10  # labels 0..9, every digit in each split
