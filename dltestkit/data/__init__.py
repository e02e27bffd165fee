"""The data wing: ``DatasetTests``, a composition of one feature mixin per check, each in its
module with the options only it reads.

- ``shape.py``: test_sample_shape
- ``values.py``: test_value_range
- ``augmentation.py``: test_augmentation
- ``loading.py``: test_data_loading
- ``overlap.py``: test_split_overlap
- ``labels.py``: test_labels

``contract.py`` holds the options every dataset check reads. The one pass over each split
they share: ``split.py`` (a split's state, cached), ``inspect.py`` (what the DataLoader workers
do), ``scan.py`` (their reports merged), ``samples.py`` and ``targets.py`` (a sample's input
and target), ``main_process.py`` and ``pickling.py`` (loads in the main process, from a copy).
"""

from __future__ import annotations

from typing import ClassVar

from .augmentation import Augmentation
from .labels import Labels
from .loading import DataLoading
from .overlap import SplitOverlap
from .shape import SampleShape
from .values import ValueRange

__all__ = ["DatasetTests"]


class DatasetTests(SampleShape, ValueRange, Augmentation, DataLoading, SplitOverlap, Labels):
    """Checks for the splits of a dataset: map-style datasets and streams (IterableDataset).

    Each sample is loaded at most twice across all checks: one pass with worker
    processes, in which the workers inspect every sample they load (shape, value range,
    hash, target), serves every check, and a few probe samples are loaded once more in
    the main process. The results are kept per test class and split until the class's
    tests are done, so setUp must build the same data for every test.
    """

    _suite: ClassVar[str] = "DatasetTests"
