"""Where the example tests get MNIST from (a helper, not a test module).

``mnist_root()`` returns a folder that holds ``MNIST/raw/``:

1. ``$DLTESTKIT_MNIST_ROOT`` when set (it must contain MNIST/raw);
2. else the ``data`` folder beside run.py when it has MNIST/raw (real MNIST
   if you downloaded it there with ``run.py --download``);
3. else a small generated MNIST-format set (``mnist_files.write_mnist``),
   512 train / 256 test images by default or ``$DLTESTKIT_MNIST_SIZES``
   (e.g. "512,256"), written once per process into a temporary folder that
   is removed when the interpreter exits.

The first call prints one line to stderr saying which data is used.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional, Tuple

from mnist_files import has_mnist, write_mnist

ROOT_VARIABLE = "DLTESTKIT_MNIST_ROOT"
SIZES_VARIABLE = "DLTESTKIT_MNIST_SIZES"
DEFAULT_SIZES = (512, 256)
PROJECT_DATA = Path(__file__).resolve().parent.parent / "data"

_root: Optional[str] = None


def mnist_root() -> str:
    """A folder containing ``MNIST/raw/``; the same one for the whole process."""
    global _root
    if _root is None:
        _root, description = _find_or_generate()
        print(f"example tests: {description}", file=sys.stderr)
    return _root


def _find_or_generate() -> Tuple[str, str]:
    configured = os.environ.get(ROOT_VARIABLE)
    if configured:
        if not has_mnist(configured):
            raise FileNotFoundError(
                f"{ROOT_VARIABLE}={configured} but {Path(configured) / 'MNIST' / 'raw'} "
                "does not hold the four uncompressed MNIST files"
            )
        return configured, f"MNIST from {ROOT_VARIABLE}, in {configured}"
    if has_mnist(PROJECT_DATA):
        return str(PROJECT_DATA), f"MNIST from the project's data folder, in {PROJECT_DATA}"
    n_train, n_test = _sizes()
    folder = tempfile.mkdtemp(prefix="dltestkit-mnist-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    write_mnist(folder, n_train=n_train, n_test=n_test)
    return folder, f"generated MNIST-format data, {n_train} train / {n_test} test, in {folder}"


def _sizes() -> Tuple[int, int]:
    text = os.environ.get(SIZES_VARIABLE)
    if not text:
        return DEFAULT_SIZES
    try:
        n_train, n_test = (int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f'{SIZES_VARIABLE} must look like "512,256", got {text!r}') from None
    return n_train, n_test
