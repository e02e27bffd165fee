"""Seeding and restoring the global random state."""

from __future__ import annotations

import contextlib
import random
from typing import Any, Iterator, List, Tuple

import numpy as np
import torch

__all__ = [
    "TORCH_GENERATOR",
    "all_generators_seeded",
    "derived_seed",
    "generator_states",
    "generators_drawn",
    "make_deterministic",
    "preserved_global_state",
    "seed_torch",
]

#: How generators_drawn names torch's CPU generator.
TORCH_GENERATOR = "torch's CPU generator"


def derived_seed(seed: int, offset: int) -> int:
    """Another seed made from ``seed``, the same for the same two numbers, always one that
    ``torch.manual_seed`` accepts: ``seed + offset`` wrapped into [0, 2**64), which is how
    torch reads a negative seed too (``seed = 2**64 - 1`` with offset 1 gives 0)."""
    return (seed + offset) % 2**64


def _accelerator_present() -> bool:
    """Whether an accelerator torch.manual_seed seeds could run here (CUDA, MPS, XPU, MTIA,
    a backend of a plug-in)."""
    mtia = getattr(torch, "mtia", None)
    return (
        torch.cuda.is_available()
        or _mps_available()
        or torch.xpu.is_available()
        or (mtia is not None and mtia.is_available())
        or torch._C._get_privateuse1_backend_name() != "privateuseone"
    )


def seed_torch(seed: int) -> None:
    """``torch.manual_seed(seed)``: torch's CPU generator, and every accelerator's where there
    is one. Without one, the CPU generator only: there, torch.manual_seed queues a seeding for
    each accelerator backend that could start later, formatting the call stack for each
    (0.15 ms a call, and the checks seed every pass)."""
    if _accelerator_present():
        torch.manual_seed(seed)
    else:
        torch.default_generator.manual_seed(seed)


def generator_states() -> Tuple[Any, Any, Any]:
    """The states of the global generators a pass can draw from: torch's CPU generator,
    NumPy's and Python's (``generators_drawn`` tells which moved since)."""
    return torch.get_rng_state(), np.random.get_state(), random.getstate()


def generators_drawn(before: Tuple[Any, Any, Any]) -> List[str]:
    """The global generators whose state moved since ``before`` (``generator_states()``)."""
    torch_state, numpy_state, python_state = before
    drawn = []
    if not torch.equal(torch.get_rng_state(), torch_state):
        drawn.append(TORCH_GENERATOR)
    numpy_now: Any = np.random.get_state()
    if numpy_now[2] != numpy_state[2] or not np.array_equal(numpy_now[1], numpy_state[1]):
        drawn.append("NumPy's global generator (np.random)")
    if random.getstate() != python_state:
        drawn.append("Python's global generator (random)")
    return drawn


def make_deterministic(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every GPU) and make cuDNN deterministic.

    This changes global state. The dltestkit checks call it before setUp and restore
    the previous random state after the check, so a user's other tests are unaffected.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    seed_torch(seed)  # every GPU's too
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


@contextlib.contextmanager
def preserved_global_state() -> Iterator[None]:
    """Restore the Python, NumPy and torch RNG states and the cuDNN flags on exit."""
    torch_state, numpy_state, python_state = generator_states()
    cuda_initialized = torch.cuda.is_initialized()  # type: ignore[no-untyped-call]
    cuda_states = torch.cuda.get_rng_state_all() if cuda_initialized else None
    mps_state = torch.mps.get_rng_state() if _mps_available() else None
    cudnn_flags = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        if mps_state is not None:
            torch.mps.set_rng_state(mps_state)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn_flags


@contextlib.contextmanager
def all_generators_seeded(seed: int) -> Iterator[None]:
    """Python's, NumPy's and torch's generators seeded with ``seed``, and restored after (a
    model may draw from any of them: transformers' wav2vec2 masks spans with NumPy)."""
    with preserved_global_state():
        random.seed(seed)
        np.random.seed(seed % 2**32)
        seed_torch(seed)
        yield
