"""Write MNIST-format files with generated, digit-like images.

The files are the real big-endian IDX files that ``torchvision.datasets.MNIST``
reads from ``<root>/MNIST/raw/``, so the real loading code runs unchanged on
them. Use them when the real MNIST cannot be downloaded (offline machines, CI):

    from mnist_files import write_mnist
    write_mnist("data", n_train=60000, n_test=10000)

Each image is the label's digit drawn as seven-segment strokes with a random
size, offset, slant, stroke width and intensity, and soft (slightly blurred)
edges. Every image has a background of 0 and some pixels at 255. Rendering is
vectorised with numpy: 70,000 images take a second or two.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Union

import numpy as np

__all__ = ["FILE_NAMES", "has_mnist", "raw_folder", "render_digits", "write_mnist"]

IMAGE_SIZE = 28
IMAGES_MAGIC = 2051  # IDX: unsigned byte, 3 dimensions
LABELS_MAGIC = 2049  # IDX: unsigned byte, 1 dimension

FILE_NAMES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

# Segments a..g of a seven-segment display: a top, b top right, c bottom
# right, d bottom, e bottom left, f top left, g middle.
_SEGMENTS = {
    0: "abcdef",
    1: "bc",
    2: "abdeg",
    3: "abcdg",
    4: "bcfg",
    5: "acdfg",
    6: "acdefg",
    7: "abc",
    8: "abcdefg",
    9: "abcdfg",
}
# _ON[label, k] is True when segment "abcdefg"[k] is lit for that digit.
_ON = np.array([[s in _SEGMENTS[d] for s in "abcdefg"] for d in range(10)])

PathLike = Union[str, Path]


def raw_folder(root: PathLike) -> Path:
    """The folder torchvision's ``MNIST(root)`` reads: ``<root>/MNIST/raw``."""
    return Path(root) / "MNIST" / "raw"


def has_mnist(root: PathLike) -> bool:
    """True when the four uncompressed MNIST files are in ``<root>/MNIST/raw``."""
    folder = raw_folder(root)
    return all((folder / name).is_file() for name in FILE_NAMES)


def render_digits(labels: np.ndarray, rng: np.random.Generator, chunk: int = 1024) -> np.ndarray:
    """Draw one 28x28 uint8 image of each label's digit; returns (n, 28, 28)."""
    labels = np.asarray(labels, dtype=np.int64)
    out = np.empty((len(labels), IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    for start in range(0, len(labels), chunk):
        out[start : start + chunk] = _render_chunk(labels[start : start + chunk], rng)
    return out


def _render_chunk(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    n = len(labels)
    f32 = np.float32

    def uniform(low: float, high: float) -> np.ndarray:
        return rng.uniform(low, high, size=(n, 1, 1)).astype(f32)

    half_w = uniform(3.0, 5.0)  # half the digit's width, pixels
    half_h = uniform(5.5, 8.0)  # half the digit's height, pixels
    slant = uniform(-0.35, 0.35)  # shear of x with y
    width = uniform(0.9, 2.0)  # half the stroke width, pixels
    gain = uniform(1.0, 1.8)  # ink intensity before clipping
    cx = 13.5 + uniform(-2.0, 2.0)
    cy = 13.5 + uniform(-2.0, 2.0)
    # A "1" lights only the right-hand segments: centre it.
    cx = cx + np.where(labels == 1, 1.0, 0.0).astype(f32)[:, None, None] * half_w

    grid = np.arange(IMAGE_SIZE, dtype=f32)
    v = grid[None, :, None] - cy  # (n, 28, 1): rows
    u = grid[None, None, :] - cx + slant * v  # (n, 28, 28): sheared columns

    # Squared distance from each pixel to the nearest lit segment, in sheared
    # pixel units. A segment's distance is a column term plus a row term; the
    # row terms have shape (n, 28, 1), so masking unlit segments (inf) is cheap.
    on = _ON[labels].T[:, :, None, None]  # (7, n, 1, 1), segments a..g
    inf = np.float32(np.inf)
    top = np.maximum(np.maximum(-half_h - v, v), 0.0) ** 2  # outside [-h, 0]
    bottom = np.maximum(np.maximum(-v, v - half_h), 0.0) ** 2  # outside [0, h]
    rows_h = np.minimum(  # horizontal segments a, d, g
        np.minimum(
            np.where(on[0], (v + half_h) ** 2, inf), np.where(on[3], (v - half_h) ** 2, inf)
        ),
        np.where(on[6], v**2, inf),
    )
    rows_l = np.minimum(np.where(on[5], top, inf), np.where(on[4], bottom, inf))  # f, e
    rows_r = np.minimum(np.where(on[1], top, inf), np.where(on[2], bottom, inf))  # b, c
    dist2 = np.maximum(np.abs(u) - half_w, 0.0) ** 2 + rows_h
    np.minimum(dist2, (u + half_w) ** 2 + rows_l, out=dist2)
    np.minimum(dist2, (u - half_w) ** 2 + rows_r, out=dist2)
    dist = np.sqrt(dist2)

    # Soft-edged strokes: 1 on the stroke's core, falling to 0 over ~1.5 px.
    ink = np.clip((width + 0.75 - dist) / 1.5, 0.0, 1.0)
    # A little blur: separable [1, 2, 1] / 4 filter.
    padded = np.pad(ink, ((0, 0), (1, 1), (0, 0)))
    ink = 0.25 * padded[:, :-2] + 0.5 * padded[:, 1:-1] + 0.25 * padded[:, 2:]
    padded = np.pad(ink, ((0, 0), (0, 0), (1, 1)))
    ink = 0.25 * padded[:, :, :-2] + 0.5 * padded[:, :, 1:-1] + 0.25 * padded[:, :, 2:]

    # Scale so that every image reaches 255; the background stays 0.
    peak = ink.max(axis=(1, 2), keepdims=True)
    ink = np.clip(ink * (gain / np.maximum(peak, 1e-6)), 0.0, 1.0)
    return np.rint(ink * 255.0).astype(np.uint8)


def _write_images(path: Path, images: np.ndarray) -> None:
    n, rows, cols = images.shape
    with open(path, "wb") as f:
        f.write(struct.pack(">IIII", IMAGES_MAGIC, n, rows, cols))
        f.write(np.ascontiguousarray(images, dtype=np.uint8).tobytes())


def _write_labels(path: Path, labels: np.ndarray) -> None:
    with open(path, "wb") as f:
        f.write(struct.pack(">II", LABELS_MAGIC, len(labels)))
        f.write(np.ascontiguousarray(labels, dtype=np.uint8).tobytes())


def write_mnist(root: PathLike, n_train: int = 60000, n_test: int = 10000, seed: int = 0) -> Path:
    """Write generated MNIST-format files into ``<root>/MNIST/raw/``.

    Writes the four uncompressed IDX files (``train-images-idx3-ubyte``,
    ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
    ``t10k-labels-idx1-ubyte``) that ``torchvision.datasets.MNIST(root)``
    loads. Existing files are overwritten. The output depends only on the
    arguments. Returns the folder written to.
    """
    if n_train < 1 or n_test < 1:
        raise ValueError(f"n_train and n_test must be positive, got {n_train} and {n_test}")
    folder = raw_folder(root)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        images = render_digits(labels, rng)
        _write_images(folder / f"{prefix}-images-idx3-ubyte", images)
        _write_labels(folder / f"{prefix}-labels-idx1-ubyte", labels)
    return folder
