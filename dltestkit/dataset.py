"""DatasetTests: checks for torch Datasets."""
from __future__ import annotations

import pickle
import weakref
from dataclasses import dataclass, field
from typing import Any, ClassVar, Collection, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data._utils.collate import default_collate

from ._base import (
    REQUIRED,
    Attribute,
    CheckMixin,
    check,
    is_key,
    is_names,
    is_number,
    is_positive_int,
    is_shape,
    optional,
)
from ._tensors import select_tensor

__all__ = ["DatasetTests"]


def _is_splits(value: Any) -> Optional[str]:
    if not isinstance(value, Mapping) or not value:
        return f"is a {type(value).__name__}, not a non-empty dict"
    for name, split in value.items():
        if not hasattr(split, "__getitem__") or not hasattr(split, "__len__"):
            return f"has split {name!r} of type {type(split).__name__}, which is not a sized Dataset"
    return None


def _is_range(value: Any) -> Optional[str]:
    if (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        and value[0] < value[1]
    ):
        return None
    return f"is {value!r}, not a (low, high) pair with low < high"


@dataclass
class _Scan:
    """What one pass over a split with worker processes saw."""

    count: int = 0
    minimum: float = float("inf")
    maximum: float = float("-inf")
    argmin: int = -1
    argmax: int = -1
    nonfinite: int = 0
    first_nonfinite: int = -1
    kept: Dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class _SplitData:
    """What the checks of one test class know of one split; filled lazily, loaded once."""

    indices: Sequence[int]
    probes: List[int]
    scan: Optional[_Scan] = None
    probe_samples: Optional[Dict[int, Any]] = None


_CACHE: "weakref.WeakKeyDictionary[type, Dict[Tuple[Any, ...], _SplitData]]" = (
    weakref.WeakKeyDictionary()
)


class DatasetTests(CheckMixin):
    """Checks for the splits of a dataset.

    Each sample is loaded at most twice across all checks: one pass with worker
    processes serves the value-range, augmentation and data-loading checks, and the
    probe indices are loaded once more in the main process. The results are kept per
    test class and split name, so setUp must build the same data for every test.
    """

    _mixin_name: ClassVar[str] = "DatasetTests"
    _contract: ClassVar[Tuple[Attribute, ...]] = (
        Attribute("splits", "a dict mapping split name to a torch Dataset",
                  '{"train": train_data, "test": test_data}', default=REQUIRED,
                  validate=_is_splits,
                  details="Each dataset has `__len__` and `__getitem__`."),
        Attribute("sample_shape", "the shape of one sample's input tensor", "(1, 32, 32)",
                  validate=is_shape, read_by=("test_sample_shape",),
                  details="Without the batch dimension."),
        Attribute("value_range", "the inclusive (low, high) bounds of the input values",
                  "(-1.0, 1.0)", validate=_is_range, read_by=("test_value_range",)),
        Attribute("augmented_splits", "the names of the splits that are randomly augmented",
                  '{"train"}', default=frozenset(), validate=is_names,
                  read_by=("test_augmentation", "test_data_loading"),
                  details="Every other split must give the same sample each time."),
        Attribute("input_key", "the index or key of the input tensor in a sample", "0",
                  default=None, validate=is_key,
                  details="`None`: a tensor sample itself, else the first element of a tuple "
                          "or dict sample."),
        Attribute("num_workers", "the worker processes of the DataLoader that scans each split",
                  "2", default=2, validate=is_positive_int,
                  read_by=("test_value_range", "test_augmentation", "test_data_loading"),
                  details="At least 1: loading in workers is part of what is checked."),
        Attribute("batch_size", "the batch size of the scan of each split", "256",
                  default=256, validate=is_positive_int,
                  read_by=("test_value_range", "test_augmentation", "test_data_loading")),
        Attribute("max_samples", "a cap on the samples scanned per split (None: all)",
                  "10_000", default=None, validate=optional(is_positive_int),
                  details="A seeded random subset of that size is scanned. See "
                          "[large datasets](large-datasets.md)."),
        Attribute("probe_count", "how many indices are compared sample by sample", "8",
                  default=8, validate=is_positive_int,
                  read_by=("test_sample_shape", "test_augmentation", "test_data_loading"),
                  details="The first, the last and random ones."),
        Attribute("range_coverage",
                  "how close, as a fraction of high - low, the data must come to each bound",
                  "0.1", default=0.1, validate=is_number, read_by=("test_value_range",)),
    )

    splits: Mapping[str, Any]
    sample_shape: Sequence[int]
    value_range: Tuple[float, float]
    augmented_splits: Collection[str]
    input_key: Optional[Any]
    num_workers: int
    batch_size: int
    max_samples: Optional[int]
    probe_count: int
    range_coverage: float

    # -- loading, shared by the checks -------------------------------------------
    def _input(self, sample: Any, split: str) -> torch.Tensor:
        return select_tensor(sample, self.input_key, f"a sample of split {split!r}", "input_key")

    def _split_data(self, name: str) -> _SplitData:
        dataset = self.splits[name]
        key = (name, len(dataset), type(dataset).__qualname__, self.max_samples,
               self.probe_count, self.seed)
        per_class = _CACHE.setdefault(type(self), {})
        if key not in per_class:
            size = len(dataset)
            generator = torch.Generator().manual_seed(self.seed)
            if self.max_samples is not None and self.max_samples < size:
                indices: Sequence[int] = sorted(
                    torch.randperm(size, generator=generator)[: self.max_samples].tolist())
            else:
                indices = range(size)
            probes = [indices[0], indices[-1]] if len(indices) else []
            extra = torch.randperm(len(indices), generator=generator).tolist()
            probes += [indices[i] for i in extra if indices[i] not in probes]
            per_class[key] = _SplitData(indices, sorted(set(probes[: self.probe_count])))
        return per_class[key]

    def _probe_samples(self, name: str) -> Dict[int, Any]:
        """Load the probe indices one by one in the main process (num_workers=0)."""
        data = self._split_data(name)
        if data.probe_samples is None:
            loader = DataLoader(self.splits[name], batch_size=None, sampler=data.probes,
                                num_workers=0)
            data.probe_samples = dict(zip(data.probes, loader))
        return data.probe_samples

    def _scan(self, name: str) -> _Scan:
        """One pass over the (capped) split with worker processes, in batches."""
        data = self._split_data(name)
        if data.scan is not None:
            return data.scan
        dataset = self.splits[name]
        sampler = None if isinstance(data.indices, range) else data.indices
        loader = DataLoader(dataset, batch_size=self.batch_size, sampler=sampler,
                            num_workers=self.num_workers,
                            generator=torch.Generator().manual_seed(self.seed))
        scan = _Scan()
        wanted = set(data.probes)
        try:
            for batch in loader:
                inputs = self._input(batch, name)
                positions = list(data.indices[scan.count: scan.count + len(inputs)])
                for offset, index in enumerate(positions):
                    if index in wanted:
                        scan.kept[index] = inputs[offset].clone()
                values = inputs.detach().reshape(len(inputs), -1).double()
                finite = torch.isfinite(values).all(dim=1)
                if not finite.all():
                    if scan.nonfinite == 0:
                        scan.first_nonfinite = positions[int((~finite).nonzero()[0])]
                    scan.nonfinite += int((~finite).sum())
                    values = values[finite]
                    positions = [p for p, ok in zip(positions, finite.tolist()) if ok]
                if len(values):
                    low, high = values.min(dim=1).values, values.max(dim=1).values
                    if float(low.min()) < scan.minimum:
                        scan.minimum = float(low.min())
                        scan.argmin = positions[int(low.argmin())]
                    if float(high.max()) > scan.maximum:
                        scan.maximum = float(high.max())
                        scan.argmax = positions[int(high.argmax())]
                scan.count += len(inputs)
        except Exception as exc:
            self.fail(
                f"split {name!r}: loading it with a DataLoader (batch_size={self.batch_size}, "
                f"num_workers={self.num_workers}) failed with {type(exc).__name__}: {exc}"
            )
        data.scan = scan
        return scan

    def _splits_to_check(self) -> List[str]:
        unknown = set(self.augmented_splits) - set(self.splits)
        if unknown:
            self.fail(
                f"self.augmented_splits names {sorted(unknown)}, which are not in self.splits "
                f"({sorted(self.splits)}); fix {self._where()}"
            )
        return list(self.splits)

    # -- the checks --------------------------------------------------------------
    @check
    def test_sample_shape(self) -> None:
        """Check that the first, the last and random samples of every split have ``sample_shape``.

        Catches samples of the wrong shape: a missing channel dimension, a resize or pad
        that is not applied to every sample.
        """
        expected = tuple(self._get_or_skip("sample_shape"))
        for name in self._splits_to_check():
            with self.subTest(split=name):
                wrong = {
                    index: tuple(self._input(sample, name).shape)
                    for index, sample in self._probe_samples(name).items()
                    if tuple(self._input(sample, name).shape) != expected
                }
                if wrong:
                    listed = ", ".join(f"index {i}: {s}" for i, s in sorted(wrong.items()))
                    self.fail(
                        f"split {name!r}: samples do not have sample_shape {expected}: {listed}. "
                        "Fix the split's transforms (resize, pad, channel dimension) or "
                        "self.sample_shape."
                    )

    @check
    def test_value_range(self) -> None:
        """Check that every sample of every split lies in ``value_range`` and the split uses that range.

        Catches wrong scaling (0-255, data in [0, 1] declared as [-1, 1]), values out of
        range, NaN or Inf.
        """
        low, high = self._get_or_skip("value_range")
        slack = self.range_coverage * (high - low)
        for name in self._splits_to_check():
            with self.subTest(split=name):
                scan = self._scan(name)
                seen = (f"values seen over {scan.count} samples: min {scan.minimum:.6g} "
                        f"(index {scan.argmin}), max {scan.maximum:.6g} (index {scan.argmax})")
                if scan.nonfinite:
                    self.fail(f"split {name!r}: {scan.nonfinite} samples contain NaN or Inf, "
                              f"the first at index {scan.first_nonfinite}.")
                if scan.minimum < low or scan.maximum > high:
                    self.fail(
                        f"split {name!r} leaves value_range [{low}, {high}]: {seen}. Fix the "
                        "normalisation (or value_range, if the data is right)."
                    )
                if scan.minimum > low + slack or scan.maximum < high - slack:
                    self.fail(
                        f"split {name!r} does not use value_range [{low}, {high}]: {seen}; each "
                        f"bound must be reached within range_coverage={self.range_coverage} of "
                        "the range. The scaling is probably wrong (e.g. data in [0, 1] declared "
                        "as [-1, 1]); fix the normalisation or value_range."
                    )

    def _differences(self, name: str) -> Dict[int, float]:
        """Probe indices whose worker-loaded and main-process-loaded inputs differ."""
        scan = self._scan(name)
        different = {}
        for index, sample in self._probe_samples(name).items():
            first, second = scan.kept[index], self._input(sample, name)
            if first.shape != second.shape or first.dtype != second.dtype:
                different[index] = float("nan")
            elif not torch.equal(first, second):
                different[index] = float((first.double() - second.double()).abs().max())
        return different

    @check
    def test_augmentation(self) -> None:
        """Check that samples of ``augmented_splits`` change between loads and the others are identical.

        Catches random augmentation leaking into evaluation data, or missing from the
        training data.
        """
        for name in self._splits_to_check():
            with self.subTest(split=name):
                different = self._differences(name)
                probes = self._split_data(name).probes
                if name in self.augmented_splits and not different:
                    self.fail(
                        f"split {name!r} is in augmented_splits, but loading indices {probes} "
                        "twice gave identical inputs each time: no random augmentation is "
                        "applied. Add it to the split's transforms, or remove the split from "
                        "self.augmented_splits."
                    )
                if name not in self.augmented_splits and different:
                    listed = ", ".join(f"index {i} (max difference {d:.3g})"
                                       for i, d in sorted(different.items()))
                    self.fail(
                        f"split {name!r} is not in augmented_splits, but loading the same index "
                        f"twice gave different inputs: {listed}. Remove the random transform "
                        "from this split (evaluation data must be deterministic), or add the "
                        "split to self.augmented_splits."
                    )

    @check
    def test_data_loading(self) -> None:
        """Check that every split pickles and loads with and without worker processes, with equal results.

        Catches datasets that cannot be pickled (so fail with spawned workers), samples that
        cannot be batched, a wrong len(), workers that load other data than the main
        process.
        """
        for name in self._splits_to_check():
            with self.subTest(split=name):
                try:
                    pickle.dumps(self.splits[name])
                except Exception as exc:
                    self.fail(
                        f"split {name!r} cannot be pickled ({type(exc).__name__}: {exc}), so "
                        "DataLoader workers started with spawn or forkserver (the default on "
                        "macOS, Windows and, from Python 3.14, Linux) fail. Replace lambdas and "
                        "functions defined inside functions with module-level functions or "
                        "classes."
                    )
                probes = self._probe_samples(name)
                try:
                    default_collate(list(probes.values()))
                except Exception as exc:
                    self.fail(f"split {name!r}: samples cannot be batched by the default "
                              f"collate function: {type(exc).__name__}: {exc}")
                scan = self._scan(name)
                expected = len(self._split_data(name).indices)
                if scan.count != expected:
                    self.fail(f"split {name!r}: the DataLoader yielded {scan.count} samples, "
                              f"but the split has {expected}; check __len__ and __getitem__.")
                different = self._differences(name)
                if name not in self.augmented_splits and different:
                    self.fail(
                        f"split {name!r}: inputs loaded by worker processes differ from those "
                        f"loaded in the main process at indices {sorted(different)}. Worker "
                        "processes must give the same data: look for state that is changed "
                        "while loading, or randomness in a split not in augmented_splits."
                    )
