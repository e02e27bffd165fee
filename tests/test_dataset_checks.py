"""DatasetTests passes on correct datasets and fails, with its message, on broken ones:
one realistic bug per failure branch of every check, and the skips that point to the
check that failed."""

from __future__ import annotations

import functools
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import unittest
from typing import Any, List

import numpy as np
import torch
from checkrunner import CheckTestCase, make_case, run_check
from torch.utils.data import DataLoader, Dataset, get_worker_info

from dltestkit import DatasetTests
from dltestkit.core.options import UNSET

SHAPE = (1, 6, 6)
CHECKS = (
    "test_augmentation",
    "test_data_loading",
    "test_labels",
    "test_sample_shape",
    "test_split_overlap",
    "test_value_range",
)


class Images(Dataset):
    """``size`` fixed images in [-1, 1] (both bounds reached), labelled ``index % 10``;
    ``augment`` adds random noise to each load. ``seed`` makes other images (another split)."""

    def __init__(
        self,
        augment: bool = False,
        size: int = 40,
        low: float = -1.0,
        high: float = 1.0,
        seed: int = 123,
    ) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.images = low + (high - low) * torch.rand(size, *SHAPE, generator=generator)
        if size:
            self.images[0].view(-1)[:2] = torch.tensor([low, high])
        self.augment = augment

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Any:
        image = self.images[index]
        if self.augment:
            image = (image + 0.05 * torch.randn_like(image)).clamp(-1, 1)
        return image, index % 10


# -- broken datasets, one realistic bug each ---------------------------------------------
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
        super().__init__(seed=5)
        self.transform = lambda image: image  # a lambda defined in __init__


class WorkerDependent(Images):
    """Scales its images in worker processes only (code that reads get_worker_info)."""

    def __getitem__(self, index: int) -> Any:
        image, label = super().__getitem__(index)
        return (image * 0.5 if get_worker_info() is not None else image), label


class BareTensors(Images):
    def __getitem__(self, index: int) -> Any:
        return super().__getitem__(index)[0]


class EmptyTensors(Images):
    def __getitem__(self, index: int) -> Any:
        return torch.zeros(0), index % 10


class TooLong(Images):
    """__len__ counts 40 samples, the data has 23."""

    def __init__(self) -> None:
        super().__init__(size=23, seed=5)

    def __len__(self) -> int:
        return 40


class FailsInWorkers(Images):
    """A file opened lazily that cannot be read from a worker process."""

    def __getitem__(self, index: int) -> Any:
        if get_worker_info() is not None and index == 20:
            raise OSError("[Errno 9] Bad file descriptor")
        return super().__getitem__(index)


class Truncated(Images):
    """One sample that cannot be read in any process."""

    def __getitem__(self, index: int) -> Any:
        if index == 20:
            raise OSError("image 20: truncated file")
        return super().__getitem__(index)


class FailsInWorkersAt0(Images):
    def __getitem__(self, index: int) -> Any:
        if get_worker_info() is not None and index == 0:
            raise OSError("[Errno 9] Bad file descriptor")
        return super().__getitem__(index)


class OpenedInWorkers(Images):
    """Reads a file that only a worker_init_fn opens: fails in the main process."""

    def __getitem__(self, index: int) -> Any:
        if get_worker_info() is None:
            raise AttributeError("'OpenedInWorkers' object has no attribute 'file'")
        return super().__getitem__(index)


class Empty(Images):
    def __init__(self) -> None:
        super().__init__(size=0)


class PILImages(Images):
    """torchvision-style dataset without a ToTensor transform."""

    def __getitem__(self, index: int) -> Any:
        from PIL import Image

        image, label = super().__getitem__(index)
        return Image.fromarray(((image[0] + 1) * 127.5).to(torch.uint8).numpy()), label


class MissingReturn(Images):
    def __getitem__(self, index: int) -> Any:
        super().__getitem__(index)  # forgot the return


class DictImages(Images):
    def __getitem__(self, index: int) -> Any:
        image, label = super().__getitem__(index)
        return {"image": image, "label": label}


class NestedImages(Images):
    """Multimodal samples: {"inputs": {"image": tensor, "meta": tensor}, "label": int}."""

    def __getitem__(self, index: int) -> Any:
        image, label = super().__getitem__(index)
        meta = torch.tensor([float(index)])
        return {"inputs": {"image": image, "meta": meta}, "label": label}


class LabelFirst(Images):
    def __getitem__(self, index: int) -> Any:
        image, label = super().__getitem__(index)
        return label, image


class SomeWithoutImage(DictImages):
    def __getitem__(self, index: int) -> Any:
        sample = super().__getitem__(index)
        return {"label": sample["label"]} if index == 33 else sample


class ShortGetitems(Images):
    """A batched __getitems__ that drops the last sample of each batch."""

    def __getitems__(self, indices: List[int]) -> List[Any]:
        return [self[index] for index in indices[:-1]]


class BrokenGetitems(Images):
    """A batched __getitems__ that indexes a Python list with a list of indices."""

    def __getitems__(self, indices: List[int]) -> List[Any]:
        labels = [index % 10 for index in range(len(self))]
        return list(zip(self.images[indices], labels[indices]))


class BlocksInWorkers(Images):
    """A worker waits forever (for a lock or a connection it inherited in a broken state)."""

    def __getitem__(self, index: int) -> Any:
        if get_worker_info() is not None and index == 20:
            threading.Event().wait()
        return super().__getitem__(index)


class NoneLabel(Images):
    def __getitem__(self, index: int) -> Any:
        image, label = super().__getitem__(index)
        return image, (None if index == 30 else label)


class LabelsFromOne(Images):
    def __getitem__(self, index: int) -> Any:
        image, label = super().__getitem__(index)
        return image, label + 1


class FloatLabels(Images):
    def __getitem__(self, index: int) -> Any:
        image, label = super().__getitem__(index)
        return image, float(label)


class OneElementLabels(Images):
    def __getitem__(self, index: int) -> Any:
        image, label = super().__getitem__(index)
        return image, torch.tensor([label])


class UnlabelledAsMinus100(Images):
    """Samples 7 and 17 unlabelled, marked -100 (cross_entropy's default ignore_index)."""

    def __getitem__(self, index: int) -> Any:
        image, label = super().__getitem__(index)
        return image, (-100 if index in (7, 17) else label)


class LabelPairs(Images):
    """Multi-label samples: a numpy array of two class indices."""

    def __getitem__(self, index: int) -> Any:
        image, label = super().__getitem__(index)
        return image, np.array([label, (label + 3) % 10])


def keep_targets_apart(samples: List[Any]) -> Any:
    images, labels = zip(*samples)
    return torch.stack(images), list(labels)


def concatenate_targets(samples: List[Any]) -> Any:
    images, labels = zip(*samples)
    return torch.stack(images), torch.cat(labels)


class WithoutClass3(Images):
    """A filter that lost class 3 (400 samples, 10 classes)."""

    def __init__(self) -> None:
        super().__init__(size=400, seed=9)

    def __getitem__(self, index: int) -> Any:
        image, label = super().__getitem__(index)
        return image, (4 if label == 3 else label)


class SwappedDuplicates(Images):
    """The same image twice, with two different labels (5 such pairs)."""

    def __getitem__(self, index: int) -> Any:
        image, label = super().__getitem__(index - 20 if 20 <= index < 25 else index)
        return image, (label + 1) % 10 if 20 <= index < 25 else label


class SomeUnlabelled(Images):
    def __getitem__(self, index: int) -> Any:
        image, label = super().__getitem__(index)
        return (image,) if index == 17 else (image, label)


class SharesWithTrain(Images):
    """A test split of 40 images, 2 of them (5%) copies of training images."""

    def __init__(self, train: Images) -> None:
        super().__init__(seed=7)
        self.images[[5, 30]] = train.images[[11, 3]]


class Normalised(Images):
    """ToTensor + Normalize with ImageNet's statistics: images in [0, 1] mapped, in float32,
    to [(0 - mean) / std, (1 - mean) / std] per channel (three channels)."""

    MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

    def __init__(self, seed: int = 123, overshoot: float = 0.0) -> None:
        generator = torch.Generator().manual_seed(seed)
        pixels = torch.rand(40, 3, 4, 4, generator=generator)
        pixels[0, :, 0, 0], pixels[0, :, 0, 1] = 0.0, 1.0  # both bounds in every channel
        mean = torch.tensor(self.MEAN).view(3, 1, 1)
        std = torch.tensor(self.STD).view(3, 1, 1)
        self.images = (pixels - mean) / std
        if overshoot:  # index 1 a little above the maximum of channel 2
            self.images[1, 2, 0, 0] = self.images[0, 2, 0, 1] + overshoot
        self.augment = False

    @classmethod
    def bounds(cls) -> tuple:
        """The bounds as a user computes them, in float64."""
        return (
            min((0 - m) / s for m, s in zip(cls.MEAN, cls.STD)),
            max((1 - m) / s for m, s in zip(cls.MEAN, cls.STD)),
        )


class RequiresGradFeatures(Images):
    """Features computed by an encoder outside torch.no_grad(): tensors that remember their
    graph, which workers started with spawn refuse to receive."""

    def __init__(self) -> None:
        super().__init__(seed=5)
        # A learned gain, still at its initial 1: the values (and the bounds they reach) are
        # those of the images, but every image is now the output of an operation with a graph.
        gain = torch.nn.Parameter(torch.ones(()))
        self.images = self.images * gain


class LosesItsRootWhenPickled(Images):
    """__getstate__ leaves out what __setstate__ needs."""

    def __init__(self) -> None:
        super().__init__(seed=5)
        self.root = "/data/images"

    def __getstate__(self) -> Any:
        state = dict(self.__dict__)
        del state["root"]
        return state

    def __setstate__(self, state: Any) -> None:
        self.__dict__.update(state)
        self.index_file = self.root + "/index.txt"


class BlocksEverywhere(Images):
    """Index 0 waits forever, in every process (for a file that is never written)."""

    def __getitem__(self, index: int) -> Any:
        if index == 0:
            threading.Event().wait()
        return super().__getitem__(index)


class DiesInWorkers(Images):
    """A worker process exits (a crash in native code) while loading index 150."""

    def __init__(self) -> None:
        super().__init__(size=300, seed=5)

    def __getitem__(self, index: int) -> Any:
        if index == 150 and get_worker_info() is not None:
            os._exit(3)
        return super().__getitem__(index)


class KilledInWorkers(DiesInWorkers):
    """A worker process is killed (by the out-of-memory killer, say) while loading index 150."""

    def __getitem__(self, index: int) -> Any:
        if index == 150 and get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().__getitem__(index)


class Silence(Images):
    """Clips in [-1, 1] of which every fifth is all zeros (silence cut from the recordings),
    in every split, each labelled with its recording's class."""

    def __init__(self, seed: int, size: int = 100) -> None:
        super().__init__(size=size, seed=seed)
        self.images[5::5] = 0.0

    def __getitem__(self, index: int) -> Any:
        image, _ = super().__getitem__(index)
        return image, index % 4


def splits_case(train: Dataset, test: Dataset, **attributes: Any) -> type:
    """A DatasetTests case with a (normally augmented) "train" and a "test" split."""

    def set_up(self: Any) -> None:
        self.splits = {"train": train, "test": test}

    # class attributes, so that a test can change one: `case.num_classes = 5`
    options = {
        "sample_shape": SHAPE,
        "value_range": (-1.0, 1.0),
        "augmented_splits": {"train"},
        "batch_size": 16,
        **attributes,
    }
    return make_case(DatasetTests, set_up, **options)


@functools.lru_cache(maxsize=None)
def good_case() -> type:
    """A correct dataset (one case for several tests, so that its splits are scanned once;
    not at module level, where the test runners would collect it)."""
    return splits_case(Images(augment=True), Images(seed=5), num_classes=10)


@functools.lru_cache(maxsize=None)
def failing_case() -> type:
    """Loading fails in the workers at index 20: every check but test_data_loading skips."""
    return splits_case(Images(seed=1), FailsInWorkers(), num_classes=10, augmented_splits=set())


class CorrectDatasets(CheckTestCase):
    def test_every_check_passes(self) -> None:
        for name in CHECKS:
            with self.subTest(name):
                if name == "test_split_overlap":  # one deterministic split: nothing to compare
                    self.assertSkipsWith(
                        good_case(), name, "fewer than two (['test'])", "un-augmented view"
                    )
                else:
                    self.assertPasses(good_case(), name)

    def test_bare_tensor_samples_and_a_capped_scan_pass(self) -> None:
        case = splits_case(BareTensors(augment=True), BareTensors(seed=5), max_samples=17)
        for name in CHECKS:
            with self.subTest(name):
                if name in ("test_labels", "test_split_overlap"):
                    self.assertTrue(run_check(case, name).skips)
                else:
                    self.assertPasses(case, name)

    def test_the_checks_contribute_six_tests(self) -> None:
        self.assertEqual(unittest.TestLoader().getTestCaseNames(good_case()), list(CHECKS))


class Contract(CheckTestCase):
    def test_an_unknown_augmented_split_is_a_contract_error(self) -> None:
        case = splits_case(Images(augment=True), Images(), augmented_splits={"training"})
        self.assertErrorsWith(
            case,
            "test_augmentation",
            "ContractError",
            "self.augmented_splits set in the class body of Case names ['training'], "
            "which are not in self.splits (['test', 'train'])",
        )

    def test_a_generator_is_no_split(self) -> None:
        case = make_case(
            DatasetTests,
            lambda self: setattr(self, "splits", {"train": (image for image in Images().images)}),
        )
        self.assertErrorsWith(
            case,
            "test_data_loading",
            "ContractError",
            "has split 'train' of "
            "type generator, which is neither a sized Dataset (with __len__ "
            "and __getitem__) nor an IterableDataset",
        )

    def test_an_input_key_the_samples_lack_is_a_contract_error(self) -> None:
        case = splits_case(DictImages(augment=True), DictImages(seed=5), input_key="img")
        self.assertErrorsWith(
            case,
            "test_value_range",
            "ContractError",
            "self.input_key = 'img' does not fit the samples of split "
            "'train': the first sample has no element 'img' (it has "
            "['image', 'label'])",
        )

    def test_a_label_first_sample_asks_for_input_key(self) -> None:
        case = splits_case(LabelFirst(augment=True), LabelFirst(seed=5))
        self.assertErrorsWith(
            case,
            "test_sample_shape",
            "ContractError",
            "self.input_key (default None) does not fit",
            "has an int as element 0, not a tensor (its tensors: sample[1])",
        )

    def test_a_target_key_the_samples_lack_is_a_contract_error_of_test_labels(self) -> None:
        case = splits_case(
            DictImages(augment=True), DictImages(seed=5), input_key="image", num_classes=10
        )
        self.assertErrorsWith(
            case,
            "test_labels",
            "ContractError",
            "self.target_key (default 1) does not fit the samples of split "
            "'train': the first sample has no element 1",
            "its elements: ['image', 'label']",
        )
        case.target_key = "label"
        self.assertPasses(case, "test_labels")

    def test_an_input_key_that_is_no_key_nor_path_is_a_contract_error(self) -> None:
        case = splits_case(DictImages(augment=True), DictImages(seed=5), input_key=["image"])
        self.assertErrorsWith(
            case,
            "test_value_range",
            "ContractError",
            "self.input_key set in the class body of Case is ['image'], not an int index, a str "
            "key or a tuple of them (a path into nested samples",
        )

    def test_a_path_the_samples_lack_names_the_part_that_exists(self) -> None:
        case = splits_case(
            NestedImages(augment=True), NestedImages(seed=5), input_key=("inputs", "img")
        )
        self.assertErrorsWith(
            case,
            "test_value_range",
            "ContractError",
            "self.input_key = ('inputs', 'img') does not fit the samples of split 'train': the "
            "first sample has no element ('inputs', 'img') (sample['inputs'] has ['image', "
            "'meta'])",
        )

    def test_a_range_coverage_outside_zero_one_is_a_contract_error(self) -> None:
        for coverage in (-0.1, 2.0):
            with self.subTest(coverage):
                case = splits_case(Images(augment=True), Images(seed=5), range_coverage=coverage)
                self.assertErrorsWith(
                    case,
                    "test_value_range",
                    f"self.range_coverage set in the class body of Case is {coverage}, not a "
                    "number in [0, 1]",
                )

    def test_an_unknown_start_method_is_a_contract_error(self) -> None:
        case = splits_case(Images(augment=True), Images(seed=5), multiprocessing_context="thread")
        self.assertErrorsWith(
            case,
            "test_data_loading",
            "self.multiprocessing_context set in the class body of Case is 'thread', not None or "
            "one of the start methods",
        )

    def test_num_classes_without_targets_is_a_contract_error(self) -> None:
        case = splits_case(BareTensors(augment=True), BareTensors(seed=5), num_classes=10)
        self.assertErrorsWith(
            case, "test_labels", "it is a bare tensor", "leave self.num_classes unset"
        )

    def test_the_options_of_test_labels_are_validated(self) -> None:
        for name, value, problem in (
            ("ignore_index", "255", "is '255', not an int or a collection of ints"),
            ("ignore_index", (255, 1.5), "is (255, 1.5), not an int or a collection of ints"),
            ("unused_classes", 0, "is 0, not a collection of class indices"),
            ("unused_classes", {-1}, "is {-1}, not a collection of class indices"),
            ("target_shape", 1, "is 1, not a shape"),
        ):
            with self.subTest(name=name, value=value):
                case = splits_case(
                    Images(augment=True), Images(seed=5), num_classes=10, **{name: value}
                )
                self.assertErrorsWith(
                    case,
                    "test_labels",
                    "ContractError",
                    f"self.{name} set in the class body of Case {problem}",
                )


class SampleShape(CheckTestCase):
    def test_a_wrong_shape_at_the_last_index_fails_naming_it(self) -> None:
        case = splits_case(Images(augment=True), LastImageCropped(seed=5))
        self.assertFailsWith(
            case,
            "test_sample_shape",
            "split 'test': 1 of 40 samples do not "
            "have sample_shape (1, 6, 6): (1, 6, 5) at index 39",
        )

    def test_unset_sample_shape_skips_naming_the_attribute(self) -> None:
        case = make_case(DatasetTests, lambda self: setattr(self, "splits", {"a": Images()}))
        self.assertSkipsWith(case, "test_sample_shape", "self.sample_shape is not set")


class ValueRange(CheckTestCase):
    def test_data_in_zero_one_declared_minus_one_one_fails_naming_range_coverage(self) -> None:
        case = splits_case(Images(augment=True), Images(low=0.0, seed=5))
        self.assertFailsWith(
            case,
            "test_value_range",
            "split 'test' does not use value_range",
            "min 0 (index 0)",
            "range_coverage=0.1",
            "set self.range_coverage = 0.5",
        )

    def test_quiet_audio_passes_with_the_range_coverage_the_message_names(self) -> None:
        quiet = Images(low=-0.7, high=0.7, seed=5)
        case = splits_case(Images(augment=True), quiet)
        # 0.16, not 0.15: -0.7 in float32 lies a little above -0.7
        self.assertFailsWith(case, "test_value_range", "set self.range_coverage = 0.16")
        case.range_coverage = 0.16
        self.assertPasses(case, "test_value_range")

    def test_values_above_the_range_fail_with_min_and_max(self) -> None:
        case = splits_case(Images(high=1.5), Images(seed=5), augmented_splits=set())
        self.assertFailsWith(
            case,
            "test_value_range",
            "split 'train' leaves value_range",
            "max 1.5 (index 0)",
            "widen self.value_range",
        )

    def test_normalised_images_pass_with_the_bounds_computed_in_float64(self) -> None:
        # float32 rounding puts the maximum a little above (1 - 0.406) / 0.225 = 2.64
        self.assertGreater(float(Normalised().images.max()), Normalised.bounds()[1])
        for bounds in (Normalised.bounds(), (-2.1179039301310043, 2.64)):
            with self.subTest(bounds):
                case = splits_case(
                    Normalised(seed=1),
                    Normalised(seed=2),
                    value_range=bounds,
                    sample_shape=(3, 4, 4),
                )
                self.assertPasses(case, "test_value_range")

    def test_an_overshoot_beyond_rounding_fails_showing_its_digits(self) -> None:
        case = splits_case(
            Normalised(seed=1),
            Normalised(seed=2, overshoot=3e-6),
            value_range=Normalised.bounds(),
            sample_shape=(3, 4, 4),
        )
        self.assertFailsWith(
            case,
            "test_value_range",
            "split 'test' leaves value_range [-2.1179039301310043, 2.6399999999999997]",
            "max 2.6400032 (index 1)",
        )

    def test_a_single_nan_sample_fails_once_naming_it(self) -> None:
        case = splits_case(Images(augment=True), OneImageNaN(seed=5))
        self.assertFailsWith(
            case, "test_value_range", "split 'test': 1 of 40 samples contain NaN or Inf: index 7"
        )
        # one rule, one home: not reported as randomness or as a worker mismatch
        for name in ("test_augmentation", "test_data_loading"):
            self.assertPasses(case, name)

    def test_inputs_without_values_skip(self) -> None:
        case = splits_case(EmptyTensors(), EmptyTensors(seed=5), augmented_splits=set())
        self.assertSkipsWith(case, "test_value_range", "split 'train' has no input values")


class Augmentation(CheckTestCase):
    def test_an_unaugmented_training_split_fails(self) -> None:
        case = splits_case(Images(), Images(seed=5))
        self.assertFailsWith(
            case, "test_augmentation", "split 'train' is in augmented_splits", "identical"
        )

    def test_an_augmented_test_split_fails(self) -> None:
        case = splits_case(Images(augment=True), Images(augment=True, seed=5))
        self.assertFailsWith(
            case,
            "test_augmentation",
            "split 'test' is not in augmented_splits",
            "index 0 (max difference",
            "Remove the random transform",
        )
        # test_data_loading cannot compare random data: it skips, pointing here
        self.assertSkipsWith(
            case,
            "test_data_loading",
            "split 'test' gives different inputs on every load",
            "see test_augmentation",
        )

    def test_worker_dependent_data_is_not_blamed_on_augmentation(self) -> None:
        case = splits_case(Images(augment=True), WorkerDependent(seed=5))
        self.assertPasses(case, "test_augmentation")
        self.assertFailsWith(
            case,
            "test_data_loading",
            "loaded by DataLoader worker processes differ",
            "while two loads in the main process agree",
        )


class DataLoading(CheckTestCase):
    def test_a_lambda_in_init_fails_even_with_fork(self) -> None:
        case = splits_case(Images(augment=True), Unpicklable())
        self.assertFailsWith(
            case, "test_data_loading", "split 'test' cannot be pickled", "spawn", "module-level"
        )

    def test_tensors_that_remember_their_graph_fail_to_pickle(self) -> None:
        case = splits_case(Images(augment=True), RequiresGradFeatures())
        self.assertFailsWith(
            case,
            "test_data_loading",
            "split 'test' cannot be pickled (PicklingError: Cowardly refusing to serialize "
            "non-leaf tensor which requires_grad",
            "spawn",
        )
        self.assertPasses(case, "test_value_range")  # loaded itself, after the scan

    def test_a_split_that_cannot_be_unpickled_fails(self) -> None:
        case = splits_case(Images(augment=True), LosesItsRootWhenPickled())
        self.assertFailsWith(
            case,
            "test_data_loading",
            "split 'test' can be pickled but not unpickled (AttributeError: "
            "'LosesItsRootWhenPickled' object has no attribute 'root')",
            "__setstate__",
        )
        for name in ("test_value_range", "test_augmentation", "test_sample_shape"):
            self.assertPasses(case, name)

    def test_a_load_that_blocks_in_the_main_process_fails_naming_the_index(self) -> None:
        case = splits_case(Images(augment=True), BlocksEverywhere(seed=5), loader_timeout=1)
        started = time.monotonic()
        self.assertFailsWith(
            case,
            "test_data_loading",
            "split 'test': loading index 0 in the main process did not finish within "
            "loader_timeout=1 s",
            "raise self.loader_timeout",
            "daemon thread",
        )
        self.assertSkipsWith(
            case, "test_value_range", "split 'test' cannot be loaded (loading index 0 timed out)"
        )
        self.assertLess(time.monotonic() - started, 60)

    def test_a_worker_that_exits_is_reported_with_the_batches_it_was_loading(self) -> None:
        case = splits_case(Images(augment=True), DiesInWorkers())
        self.assertFailsWith(
            case,
            "test_data_loading",
            "split 'test': the DataLoader (batch_size=16, num_workers=2) failed while loading "
            "one of the batches",
            "indices 144 to 159",  # among those named (which vary: the pipe may break first)
            "exited unexpectedly with exit code 3 (a worker process exited: a crash in native code",
        )

    def test_a_worker_that_is_killed_is_reported_with_the_signal(self) -> None:
        case = splits_case(Images(augment=True), KilledInWorkers())
        self.assertFailsWith(
            case,
            "test_data_loading",
            "indices 144 to 159",
            "exited unexpectedly, killed by SIGKILL (a worker process exited: ",
            "the out-of-memory killer",
        )

    def test_a_worker_that_exits_is_found_by_the_scan_not_raised_into_it(self) -> None:
        # torch's SIGCHLD handler raises a worker's death into whatever the main process runs
        # when the signal arrives: dltestkit's own code (an error instead of the check's
        # failure), a temporary file half made (left behind), or a finaliser, where Python
        # drops the error and the scan then waited out loader_timeout (300 s) for a batch
        # that never came (a hang seen in CI). The scan takes its workers out of that watch
        # and finds a death itself, between its waits for a batch.
        list(DataLoader(range(2), num_workers=1))  # torch's handler, set once per process
        torchs = signal.getsignal(signal.SIGCHLD)
        assert callable(torchs), torchs
        raised: List[str] = []

        def spy(signum: int, frame: Any) -> None:
            try:
                torchs(signum, frame)
            except RuntimeError as exc:
                raised.append(str(exc))
                raise

        signal.signal(signal.SIGCHLD, spy)
        self.addCleanup(signal.signal, signal.SIGCHLD, torchs)
        case = splits_case(Images(augment=True), DiesInWorkers())
        self.assertFailsWith(
            case, "test_data_loading", "DataLoader worker (pid(s) ", "exited unexpectedly with"
        )
        self.assertEqual(raised, [])

    def test_workers_that_die_or_are_killed_leave_no_folder(self) -> None:
        # a fresh interpreter, its temporary files in a folder of ours: multiprocessing's
        # folder of each forked worker (pymp-*) stays where the worker dies or is killed,
        # unless the workers share their parent's, which the parent removes at its end
        script = textwrap.dedent("""
            from checkrunner import run_check
            from test_dataset_checks import BlocksInWorkers, DiesInWorkers, Images, splits_case

            for case in (
                splits_case(Images(augment=True), DiesInWorkers()),
                splits_case(Images(augment=True), BlocksInWorkers(seed=5), loader_timeout=0.5),
            ):
                assert run_check(case, "test_data_loading").failures
        """)
        with tempfile.TemporaryDirectory() as temp:
            completed = subprocess.run(
                [sys.executable, "-c", script],
                capture_output=True,
                text=True,
                timeout=120,
                cwd=os.path.dirname(__file__),
                env={**os.environ, "TMPDIR": temp, "PYTHONPATH": os.pathsep.join(sys.path)},
            )
            self.assertEqual(completed.returncode, 0, completed.stderr)
            self.assertEqual(os.listdir(temp), [])

    def test_a_sample_that_fails_only_in_workers_says_it_loads_in_the_main_process(self) -> None:
        case = splits_case(Images(augment=True), FailsInWorkersAt0(seed=5))
        self.assertFailsWith(
            case,
            "test_data_loading",
            "split 'test': loading index 0 in a DataLoader worker raised OSError: [Errno 9] Bad "
            "file descriptor, though it loads in the main process. The worker processes are "
            f"started with {multiprocessing.get_start_method()}: ",
        )

    def test_worker_processes_giving_other_data_fail(self) -> None:
        case = splits_case(Images(augment=True), WorkerDependent(seed=5))
        self.assertFailsWith(
            case,
            "test_data_loading",
            "split 'test': inputs loaded by "
            "DataLoader worker processes differ from those loaded in the main "
            "process: index 0 (max difference 0.5)",
            "get_worker_info()",
        )

    def test_an_empty_split_fails_and_the_other_checks_skip(self) -> None:
        case = splits_case(Images(augment=True), Empty(), num_classes=10)
        self.assertFailsWith(case, "test_data_loading", "split 'test' is empty: len() is 0")
        for name in ("test_sample_shape", "test_value_range", "test_labels"):
            self.assertSkipsWith(
                case, name, "split 'test' cannot be loaded (it is empty); see test_data_loading"
            )

    def test_loading_that_fails_in_workers_names_the_index(self) -> None:
        # index 20 is loaded in the main process to tell, whether or not it was a probe
        self.assertFailsWith(
            failing_case(),
            "test_data_loading",
            "split 'test': loading index "
            "20 in a DataLoader worker raised OSError: [Errno 9] Bad file "
            "descriptor, though it loads in the main process.",
        )

    def test_a_sample_that_fails_everywhere_is_to_be_fixed_in_getitem(self) -> None:
        case = splits_case(Images(augment=True), Truncated(seed=5))
        text = self.assertFailsWith(
            case,
            "test_data_loading",
            "split 'test': loading index 20 in ",  # a worker, or the main process (a probe)
            "raised OSError: image 20: truncated file. Fix the split's __getitem__ or its "
            "transforms.",
        )
        self.assertNotIn("though it loads in the main process", text)

    def test_loading_that_fails_in_the_main_process_says_so(self) -> None:
        case = splits_case(Images(augment=True), OpenedInWorkers(seed=5))
        self.assertFailsWith(
            case,
            "test_data_loading",
            "split 'test': loading index 0 in the "
            "main process raised AttributeError: 'OpenedInWorkers' object has "
            "no attribute 'file'",
        )

    def test_the_other_checks_skip_pointing_to_test_data_loading(self) -> None:
        for name in CHECKS:
            if name != "test_data_loading":
                with self.subTest(name):
                    self.assertSkipsWith(
                        failing_case(),
                        name,
                        "split 'test' cannot be loaded "
                        "(index 20 raised OSError); see test_data_loading",
                    )

    def test_a_len_larger_than_the_data_says_so(self) -> None:
        case = splits_case(Images(augment=True), TooLong())
        text = self.assertFailsWith(
            case,
            "test_data_loading",
            "(9 samples failed in the batches the workers "
            "read: index 23, index 24, index 25, index 26, index 27 and 4 more)",
            "len() says the split has 40 samples: is __len__ larger than the data",
        )
        # the first index that fails, where it was loaded first: in the main process when the
        # samples it probes (drawn under the seed) hold it (under seed 25), else in a worker
        self.assertRegex(
            text, r"loading index 23 in (the main process|a DataLoader worker) raised IndexError"
        )

    def test_pil_images_are_told_to_add_a_to_tensor_transform(self) -> None:
        case = splits_case(Images(augment=True), PILImages(seed=5))
        self.assertFailsWith(
            case,
            "test_data_loading",
            "split 'test': the sample at index 0 has "
            "a PIL Image as element 0 (the input), not a torch.Tensor: the "
            "split has no ToTensor-like transform",
            "ToTensor()",
        )
        self.assertSkipsWith(
            case, "test_value_range", "split 'test' cannot be loaded (its inputs are not tensors)"
        )

    def test_none_samples_are_told_what_returns_none(self) -> None:
        case = splits_case(Images(augment=True), MissingReturn(seed=5))
        self.assertFailsWith(
            case,
            "test_data_loading",
            "the sample at index 0 is None, not a tensor",
            "a missing return statement",
        )

    def test_a_sample_that_lacks_the_input_key_fails_naming_it(self) -> None:
        case = splits_case(DictImages(augment=True), SomeWithoutImage(seed=5), input_key="image")
        self.assertFailsWith(
            case,
            "test_data_loading",
            "the sample at index 33 has no element 'image' (it has ['label'])",
            "same structure",
        )

    def test_a_getitems_that_drops_samples_fails(self) -> None:
        case = splits_case(Images(augment=True), ShortGetitems(seed=5))
        self.assertFailsWith(
            case,
            "test_data_loading",
            "split 'test': the dataset's "
            "__getitems__ returned 15 samples for the 16 indices 0 to 15; it "
            "must return one sample per index.",
        )
        self.assertSkipsWith(
            case, "test_value_range", "(its __getitems__ fails); see test_data_loading"
        )

    def test_a_getitems_that_raises_fails_even_if_each_index_loads(self) -> None:
        case = splits_case(Images(augment=True), BrokenGetitems(seed=5))
        self.assertFailsWith(
            case,
            "test_data_loading",
            "split 'test': the dataset's "
            "__getitems__ raised TypeError: list indices must be integers or "
            "slices, not list for the indices 0 to 15, though __getitem__ "
            "loads each of them.",
        )

    def test_a_worker_init_fn_that_raises_fails_naming_the_batch(self) -> None:
        case = splits_case(Images(augment=True), Images(seed=5), worker_init_fn=broken_init)
        self.assertFailsWith(
            case,
            "test_data_loading",
            "split 'train': the DataLoader "
            "(batch_size=16, num_workers=2) failed while loading indices 0 to "
            "15 (batch 1 of 3)",
            "ValueError: no shard for this worker",
        )

    def test_samples_of_different_shapes_fail_once_in_test_sample_shape(self) -> None:
        case = splits_case(Images(augment=True), LastImageCropped(seed=5))
        self.assertSkipsWith(
            case, "test_data_loading", "samples of different shapes", "see test_sample_shape"
        )
        for name in ("test_value_range", "test_augmentation"):
            self.assertPasses(case, name)

    def test_samples_that_cannot_be_batched_fail_without_sample_shape(self) -> None:
        case = splits_case(Images(augment=True), LastImageCropped(seed=5))
        case.sample_shape = UNSET
        text = self.assertFailsWith(
            case,
            "test_data_loading",
            "split 'test': samples cannot be batched by collate_fn "
            "(torch.utils.data.default_collate): RuntimeError",
            "the batch of indices 32 to 39 holds inputs of 2 shapes: (1, 6, 6), (1, 6, 5)",
            "Set self.collate_fn",
        )
        self.assertNotIn("loading it with a DataLoader", text)

    def test_a_none_label_is_reported_by_test_labels_only(self) -> None:
        case = splits_case(Images(augment=True), NoneLabel(seed=5), num_classes=10)
        self.assertFailsWith(case, "test_labels", "the target of index 30 is None. ")
        self.assertSkipsWith(case, "test_data_loading", "see test_labels")
        case.num_classes = UNSET  # without test_labels, test_data_loading reports it
        self.assertFailsWith(case, "test_data_loading", "cannot be batched", "NoneType")

    def test_a_worker_that_blocks_fails_naming_the_indices_in_flight(self) -> None:
        case = splits_case(Images(augment=True), BlocksInWorkers(seed=5), loader_timeout=1)
        self.assertFailsWith(
            case,
            "test_data_loading",
            "split 'test': no batch arrived within "
            "loader_timeout=1 s; a DataLoader worker blocked while loading "
            "indices 16 to 31 (batch 2 of 3)",
            "raise self.loader_timeout",
        )
        self.assertSkipsWith(
            case, "test_value_range", "(a worker timed out); see test_data_loading"
        )

    def test_a_blocked_worker_is_killed_at_once_not_waited_for(self) -> None:
        # the DataLoader's own shutdown waits 5 s for a worker before it terminates it; the
        # scan kills the blocked one when the timeout has shown it blocked (torch told first,
        # so that its death raises nothing later)
        case = splits_case(Images(augment=True), BlocksInWorkers(seed=5), loader_timeout=0.5)
        started = time.monotonic()
        self.assertFailsWith(case, "test_data_loading", "no batch arrived within")
        self.assertLess(time.monotonic() - started, 4.5)
        time.sleep(0.2)  # the killed worker's SIGCHLD is handled now, raising nothing


def broken_init(worker_id: int) -> None:
    raise ValueError("no shard for this worker")


class SplitOverlap(CheckTestCase):
    def test_a_test_split_sharing_five_percent_with_train_fails(self) -> None:
        train = Images(size=100, seed=1)
        case = splits_case(train, SharesWithTrain(train), augmented_splits=set())
        self.assertFailsWith(
            case,
            "test_split_overlap",
            "splits 'train' and 'test' share inputs: "
            "2 of the 40 scanned samples of 'test' (5.0%) also occur in "
            "'train', e.g. train index 11 = test index 5, train index 3 = "
            "test index 30",
            "remove the duplicates",
        )

    def test_an_augmented_split_is_compared_through_a_plain_view(self) -> None:
        train = Images(size=100, seed=1)

        def set_up(self: Any) -> None:
            self.splits = {
                "train": Images(augment=True, size=100, seed=1),
                "train (plain)": train,
                "test": SharesWithTrain(train),
            }
            self.augmented_splits = {"train"}

        case = make_case(DatasetTests, set_up, batch_size=16)
        self.assertFailsWith(
            case,
            "test_split_overlap",
            "splits 'train (plain)' and 'test' share inputs: 2 of the 40",
        )

    def test_max_shared_fraction_accepts_an_overlap_up_to_it(self) -> None:
        train = Images(size=100, seed=1)
        case = splits_case(train, SharesWithTrain(train), augmented_splits=set())
        self.assertFailsWith(
            case,
            "test_split_overlap",
            "set self.max_shared_fraction = 0.05 (now 0)",
            "are not compared",
        )
        case.max_shared_fraction = 0.05  # 2 of 40: accepted
        self.assertPasses(case, "test_split_overlap")
        case.max_shared_fraction = 0.04
        self.assertFailsWith(case, "test_split_overlap", "2 of the 40 scanned samples")

    def test_constant_inputs_in_every_split_are_not_compared(self) -> None:
        case = splits_case(Silence(seed=1), Silence(seed=2), augmented_splits=set())
        self.assertPasses(case, "test_split_overlap")

    def test_distinct_splits_pass(self) -> None:
        case = splits_case(Images(size=100, seed=1), Images(seed=2), augmented_splits=set())
        self.assertPasses(case, "test_split_overlap")

    def test_a_hash_match_is_confirmed_by_comparing_the_inputs(self) -> None:
        from unittest import mock

        from dltestkit.data import samples

        case = splits_case(Images(size=100, seed=1), Images(seed=2), augmented_splits=set())
        with mock.patch.object(samples, "_hash", lambda header, data: b"every input collides"):
            self.assertPasses(case, "test_split_overlap")


class Labels(CheckTestCase):
    def test_unset_num_classes_skips(self) -> None:
        case = splits_case(Images(augment=True), Images(seed=5))
        self.assertSkipsWith(case, "test_labels", "self.num_classes is not set")

    def test_labels_numbered_from_one_fail(self) -> None:
        case = splits_case(Images(augment=True), LabelsFromOne(seed=5), num_classes=10)
        self.assertFailsWith(
            case,
            "test_labels",
            "split 'test' has targets outside [0, "
            "num_classes=10): 10 (4 samples, first at index 9)",
            "Class counts: 0: 0, 1: 4,",
            "Labels numbered from 1 instead of 0?",
        )

    def test_float_targets_fail(self) -> None:
        case = splits_case(Images(augment=True), FloatLabels(seed=5), num_classes=10)
        self.assertFailsWith(
            case,
            "test_labels",
            "split 'test': 40 targets are not integer class "
            "indices; the target of index 0 is a float (0.0)",
        )

    def test_one_element_targets_fail_with_the_batch_shape(self) -> None:
        case = splits_case(Images(augment=True), OneElementLabels(seed=5), num_classes=10)
        self.assertFailsWith(
            case,
            "test_labels",
            "is an int64 tensor of shape (1,) (0)",
            "batches of it have shape (batch, 1)",
        )

    def test_one_element_targets_kept_apart_by_collate_fn_are_a_skipped_part(self) -> None:
        case = splits_case(
            Images(augment=True),
            OneElementLabels(seed=5),
            num_classes=10,
            collate_fn=keep_targets_apart,
        )
        self.assertSkipsWith(
            case,
            "test_labels",
            "one-element targets not judged: every target of split 'test' is a one-element "
            "tensor (the target of index 0 is an int64 tensor of shape (1,) (0)), and the "
            "batches of collate_fn (test_dataset_checks.keep_targets_apart) hold no tensor",
            "Set self.target_shape = () if each target is one class label",
        )
        case.target_shape = ()
        self.assertFailsWith(
            case,
            "test_labels",
            "split 'test': 40 of 40 targets do not have target_shape (): (1,) at index 0, "
            "index 1, index 2, index 3, index 4 and 35 more (batches of one-element targets "
            "have shape (batch, 1), which cross-entropy rejects",
        )

    def test_one_element_targets_concatenated_by_collate_fn_pass(self) -> None:
        case = splits_case(
            Images(augment=True),
            OneElementLabels(seed=5),
            num_classes=10,
            collate_fn=concatenate_targets,
        )
        self.assertPasses(case, "test_labels")

    def test_labels_at_ignore_index_are_neither_out_of_range_nor_a_class(self) -> None:
        case = splits_case(Images(augment=True), UnlabelledAsMinus100(seed=5), num_classes=10)
        self.assertPasses(case, "test_labels")
        case.ignore_index = ()
        self.assertFailsWith(
            case,
            "test_labels",
            "split 'test' has targets outside [0, num_classes=10): -100 (2 samples, first at "
            "index 7). Class counts: -100: 2, 0: 4, 1: 4,",
            "set self.ignore_index = -100 (now ())",
        )
        case.ignore_index = 255
        self.assertFailsWith(case, "test_labels", "set self.ignore_index = -100 (now 255)")

    def test_an_ignored_class_may_be_absent(self) -> None:
        case = splits_case(Images(augment=True), WithoutClass3(), num_classes=10, ignore_index=3)
        self.assertPasses(case, "test_labels")

    def test_label_vectors_are_checked_element_by_element(self) -> None:
        case = splits_case(Images(augment=True), LabelPairs(seed=5), num_classes=10)
        self.assertPasses(case, "test_labels")
        case.num_classes = 9
        self.assertFailsWith(
            case,
            "test_labels",
            "split 'test' has targets outside [0, num_classes=9): 9 (8 values in 8 samples, "
            "first at index 6). Samples holding each class: 0: 8,",
        )

    def test_a_missing_class_fails_with_the_class_counts(self) -> None:
        case = splits_case(Images(augment=True), WithoutClass3(), num_classes=10)
        self.assertFailsWith(
            case,
            "test_labels",
            "split 'test' has no sample of class 3 among its "
            "400 scanned samples (class counts: 0: 40, 1: 40, 2: 40, 3: 0, 4: 80",
            "class_presence=20 samples per class (200 here)",
        )
        case.class_presence = 50  # 400 < 50 * 10: the split may lack a rare class
        self.assertPasses(case, "test_labels")
        case.class_presence = None
        self.assertPasses(case, "test_labels")
        case.class_presence = 20
        case.unused_classes = {3}
        self.assertPasses(case, "test_labels")

    def test_many_classes_are_counted_in_short(self) -> None:
        case = splits_case(Images(augment=True), Images(seed=5), num_classes=30, class_presence=1)
        self.assertFailsWith(
            case,
            "test_labels",
            "split 'train' has no sample of classes 10, 11, 12",
            "among its 40 scanned samples (class counts: 10 of 30 classes "
            "present, 0 to 4 samples per class)",
        )

    def test_a_small_split_may_lack_a_class(self) -> None:
        case = splits_case(Images(augment=True), Images(size=8, seed=5), num_classes=10)
        self.assertPasses(case, "test_labels")

    def test_the_same_input_with_two_labels_fails(self) -> None:
        case = splits_case(Images(augment=True), SwappedDuplicates(seed=5), num_classes=10)
        self.assertFailsWith(
            case,
            "test_labels",
            "split 'test': 5 samples have the same input as "
            "an earlier sample but another target, e.g. index 0 (target 0) and "
            "index 20 (target 1)",
            "paired wrongly",
        )

    def test_max_label_conflicts_accepts_conflicts_up_to_it(self) -> None:
        case = splits_case(Images(augment=True), SwappedDuplicates(seed=5), num_classes=10)
        self.assertFailsWith(
            case,
            "test_labels",
            "set self.max_label_conflicts = 0.13 (the fraction of the 40 labelled samples; now 0)",
        )
        case.max_label_conflicts = 0.13  # 5 of 40
        self.assertPasses(case, "test_labels")

    def test_constant_inputs_with_different_labels_are_not_compared(self) -> None:
        case = splits_case(Silence(seed=1), Silence(seed=2), augmented_splits=set(), num_classes=4)
        self.assertPasses(case, "test_labels")

    def test_samples_without_a_target_fail(self) -> None:
        case = splits_case(Images(augment=True), SomeUnlabelled(seed=5), num_classes=10)
        self.assertFailsWith(
            case,
            "test_labels",
            "split 'test': 1 samples have no element 1 "
            "(self.target_key), unlike the first samples: index 17",
        )


if __name__ == "__main__":
    unittest.main()
