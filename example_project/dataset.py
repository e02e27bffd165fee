"""MNIST for the VAE: 32x32 images scaled to [-1, 1].

``MyMNIST(root)`` wraps the two splits of ``torchvision.datasets.MNIST``, read
from the raw IDX files in ``<root>/MNIST/raw/``:

- ``train_data``: padded to 32x32, randomly rotated by up to 5 degrees
  (only when ``augment=True``), scaled to [-1, 1];
- ``test_data``: padded to 32x32 and scaled to [-1, 1], deterministic.

Each sample is ``(image, label)`` with image a float tensor of shape
(1, 32, 32). All transforms are module-level objects, so the datasets pickle
and work in DataLoader worker processes under every start method.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

from torchvision import datasets, transforms

__all__ = ["MNISTNotFoundError", "MyMNIST", "eval_transform", "train_transform"]

MAX_ROTATION_DEGREES = 5.0


class MNISTNotFoundError(RuntimeError):
    """The MNIST files are not in ``<root>/MNIST/raw`` and were not downloaded."""


def train_transform(augment: bool = True) -> transforms.Compose:
    """PIL image -> (1, 32, 32) tensor in [-1, 1], with a small random rotation."""
    steps = [transforms.Pad(2)]
    if augment:
        steps.append(transforms.RandomRotation(MAX_ROTATION_DEGREES))
    steps += [transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))]
    return transforms.Compose(steps)


def eval_transform() -> transforms.Compose:
    """PIL image -> (1, 32, 32) tensor in [-1, 1], deterministic."""
    return train_transform(augment=False)


class MyMNIST:
    """The MNIST training and test splits, transformed for the VAE.

    Args:
        root: folder that holds ``MNIST/raw/`` (the uncompressed IDX files).
        download: let torchvision download MNIST into ``root`` if missing.
        augment: apply the random rotation to the training split. Pass False
            for a deterministic training split (e.g. to overfit a few images).

    Raises:
        MNISTNotFoundError: the files are missing and ``download`` is False
            (or the download failed).
    """

    def __init__(
        self, root: Union[str, Path], download: bool = False, augment: bool = True
    ) -> None:
        self.root = Path(root)
        self.augment = augment
        try:
            self.train_data = datasets.MNIST(
                str(self.root), train=True, transform=train_transform(augment), download=download
            )
            self.test_data = datasets.MNIST(str(self.root), train=False, transform=eval_transform())
        except RuntimeError as error:
            if isinstance(error, MNISTNotFoundError) or "not found" not in str(error).lower():
                raise
            raise MNISTNotFoundError(
                f"MNIST not found in {self.root / 'MNIST' / 'raw'}. Either put the files "
                "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and "
                "t10k-labels-idx1-ubyte there (or pass a root that has MNIST/raw), download them "
                "with download=True (run.py --download), or write generated MNIST-format files "
                "with run.py --generate-data (mnist_files.write_mnist)."
            ) from error

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, augment={self.augment})"
