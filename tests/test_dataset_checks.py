"""DatasetTests passes on correct datasets and fails, with its message, on broken ones."""
from __future__ import annotations

import unittest
from typing import Any, Dict

import torch
from torch.utils.data import Dataset, get_worker_info

from checkrunner import CheckTestCase, make_case
from dltestkit import DatasetTests

SHAPE = (1, 6, 6)


class Images(Dataset):
    """40 fixed images in [-1, 1] (both bounds reached); optional random noise augmentation."""

    def __init__(self, augment: bool = False, size: int = 40, low: float = -1.0,
                 high: float = 1.0) -> None:
        generator = torch.Generator().manual_seed(123)
        self.images = low + (high - low) * torch.rand(size, *SHAPE, generator=generator)
        self.images[0].view(-1)[:2] = torch.tensor([low, high])
        self.augment = augment

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Any:
        image = self.images[index]
        if self.augment:
            image = (image + 0.05 * torch.randn_like(image)).clamp(-1, 1)
        return image, index % 10


class LastImageCropped(Images):
    def __getitem__(self, index: int) -> Any:
        image, label = super().__getitem__(index)
        return (image[:, :, :-1] if index == len(self) - 1 else image), label


class OneImageNaN(Images):
    def __getitem__(self, index: int) -> Any:
        image, label = super().__getitem__(index)
        return (image * float("nan") if index == 7 else image), label


class Unpicklable(Images):
    def __init__(self) -> None:
        super().__init__()
        self.transform = lambda image: image  # a lambda defined in __init__


class WorkerDependent(Images):
    def __getitem__(self, index: int) -> Any:
        image, label = super().__getitem__(index)
        return (image * 0.5 if get_worker_info() is not None else image), label


class BareTensors(Images):
    def __getitem__(self, index: int) -> Any:
        return super().__getitem__(index)[0]


def splits_case(train: Dataset, test: Dataset, **attributes: Any) -> type:
    def set_up(self: Any) -> None:
        self.splits = {"train": train, "test": test}
        self.sample_shape = SHAPE
        self.value_range = (-1.0, 1.0)
        self.augmented_splits = {"train"}
        for name, value in attributes.items():
            setattr(self, name, value)

    return make_case(DatasetTests, set_up, batch_size=16)


GOOD = splits_case(Images(augment=True), Images())


class CorrectDatasets(CheckTestCase):
    def test_every_check_passes(self) -> None:
        for name in ("test_sample_shape", "test_value_range", "test_augmentation",
                     "test_data_loading"):
            with self.subTest(name):
                self.assertPasses(GOOD, name)

    def test_bare_tensor_samples_and_a_capped_scan_pass(self) -> None:
        case = splits_case(BareTensors(augment=True), BareTensors(), max_samples=17)
        for name in ("test_sample_shape", "test_value_range", "test_augmentation",
                     "test_data_loading"):
            with self.subTest(name):
                self.assertPasses(case, name)

    def test_the_checks_contribute_four_tests(self) -> None:
        names = unittest.TestLoader().getTestCaseNames(GOOD)
        self.assertEqual(names, ["test_augmentation", "test_data_loading", "test_sample_shape",
                                 "test_value_range"])


class SampleShape(CheckTestCase):
    def test_a_wrong_shape_at_the_last_index_fails_naming_it(self) -> None:
        case = splits_case(Images(augment=True), LastImageCropped())
        self.assertFailsWith(case, "test_sample_shape", "split 'test'", "index 39: (1, 6, 5)",
                             "sample_shape (1, 6, 6)")

    def test_unset_sample_shape_skips_naming_the_attribute(self) -> None:
        case = make_case(DatasetTests, lambda self: setattr(self, "splits", {"a": Images()}))
        self.assertSkipsWith(case, "test_sample_shape", "self.sample_shape is not set")


class ValueRange(CheckTestCase):
    def test_data_in_zero_one_declared_minus_one_one_fails(self) -> None:
        case = splits_case(Images(augment=True), Images(low=0.0))
        self.assertFailsWith(case, "test_value_range", "split 'test' does not use value_range",
                             "min 0", "range_coverage")

    def test_values_above_the_range_fail_with_min_and_max(self) -> None:
        case = splits_case(Images(high=1.5), Images(), augmented_splits=set())
        self.assertFailsWith(case, "test_value_range", "split 'train' leaves value_range",
                             "max 1.5")

    def test_a_single_nan_sample_fails_naming_it(self) -> None:
        case = splits_case(Images(augment=True), OneImageNaN())
        self.assertFailsWith(case, "test_value_range", "1 samples contain NaN or Inf",
                             "index 7")


class Augmentation(CheckTestCase):
    def test_an_unaugmented_training_split_fails(self) -> None:
        case = splits_case(Images(), Images())
        self.assertFailsWith(case, "test_augmentation", "split 'train' is in augmented_splits",
                             "identical")

    def test_an_augmented_test_split_fails(self) -> None:
        case = splits_case(Images(augment=True), Images(augment=True))
        self.assertFailsWith(case, "test_augmentation", "split 'test' is not in augmented_splits",
                             "max difference")

    def test_an_unknown_split_name_fails(self) -> None:
        case = splits_case(Images(augment=True), Images(), augmented_splits={"training"})
        self.assertFailsWith(case, "test_augmentation", "['training']", "not in self.splits")


class DataLoading(CheckTestCase):
    def test_a_lambda_in_init_fails_even_with_fork(self) -> None:
        case = splits_case(Images(augment=True), Unpicklable())
        self.assertFailsWith(case, "test_data_loading", "split 'test' cannot be pickled",
                             "spawn", "module-level")

    def test_worker_processes_giving_other_data_fail(self) -> None:
        case = splits_case(Images(augment=True), WorkerDependent())
        self.assertFailsWith(case, "test_data_loading", "loaded by worker processes differ")

    def test_samples_of_different_shapes_fail(self) -> None:
        case = splits_case(Images(augment=True), LastImageCropped())
        self.assertFailsWith(case, "test_data_loading", "cannot be batched")


class CountingImages(Images):
    """Counts loads per index in shared memory, so loads in worker processes count too."""

    def __init__(self) -> None:
        super().__init__()
        self.loads = torch.zeros(len(self), dtype=torch.int64).share_memory_()

    def __getitem__(self, index: int) -> Any:
        self.loads[index] += 1
        return super().__getitem__(index)


class LoadCount(CheckTestCase):
    def test_each_sample_is_loaded_at_most_twice_across_all_checks(self) -> None:
        train, test = CountingImages(), CountingImages()
        train.augment = True
        case = splits_case(train, test)
        for name in unittest.TestLoader().getTestCaseNames(case):
            self.assertPasses(case, name)
        for split in (train, test):
            self.assertEqual(int(split.loads.min()), 1)  # every sample scanned
            self.assertEqual(int(split.loads.max()), 2)  # probes once more, nothing more


if __name__ == "__main__":
    unittest.main()
