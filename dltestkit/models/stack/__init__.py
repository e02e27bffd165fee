"""The training stack of today, as opt-in mixins: ``TrainingStackTests`` (torch.compile,
memory layouts, autocast, activation checkpointing) and ``ExportTests`` (torch.export).

- ``contract.py``: what they share (the tolerance, a seeded pass, comparing two runs)
- ``compiling.py``: test_compile
"""

from __future__ import annotations

from typing import ClassVar

from .autocasting import Autocast
from .checkpointing import ActivationCheckpointing
from .compiling import Compile
from .exporting import Export
from .layouts import MemoryLayouts

__all__ = ["ExportTests", "TrainingStackTests"]


class TrainingStackTests(Compile, MemoryLayouts, Autocast, ActivationCheckpointing):
    """Checks that a model works with the training stack of today: torch.compile, memory
    layouts, mixed precision and activation checkpointing.

    An add-on: it reads the ``ModelTests`` contract (``model``, ``inputs``, ...) and combines
    with ``ModelTests`` or ``SequenceModelTests``: ``class TestX(TrainingStackTests,
    ModelTests, unittest.TestCase)``. Used alone, it runs its own checks only.
    """

    _suite: ClassVar[str] = "TrainingStackTests"


class ExportTests(Export):
    """Checks that a model can be exported with torch.export for any batch size.

    Opt-in, as data-dependent control flow is a legitimate design that torch.export cannot
    trace: combine it with the test class of a model meant to be exported, as an add-on that
    reads the ``ModelTests`` contract: ``class TestX(ExportTests, ModelTests,
    unittest.TestCase)``.
    """

    _suite: ClassVar[str] = "ExportTests"
