"""DatasetTests on the targets of segmentation and detection: label maps (Pascal VOC-like
masks with 255 borders) and torchvision's detection samples (per-box labels in a target dict,
some images without boxes), made in memory and transformed with torchvision's v2 transforms.
The correct datasets pass every check on several seeds; broken ones fail test_labels with
their message; what cannot be told from the data is a skipped part naming the option."""

from __future__ import annotations

import unittest
from typing import Any, Dict, List, Optional, Tuple

import torch
from checkrunner import CheckTestCase, make_case, run_check
from test_dataset_checks import CHECKS
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from dltestkit import DatasetTests

SIDE = 16
SHAPE = (3, SIDE, SIDE)
CLASSES = 4  # the background 0 and three object classes
SEEDS = (0, 1, 2)


def augmentation() -> v2.Transform:
    """A training augmentation that moves masks and boxes with the image."""
    return v2.Compose([v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()])


def _rectangles(generator: torch.Generator, count: int) -> List[Tuple[int, int, int, int]]:
    """``count`` rectangles (y0, x0, y1, x1) at least 2 pixels from the image's edges."""
    found = []
    for _ in range(count):
        y0, x0 = torch.randint(2, SIDE - 7, (2,), generator=generator).tolist()
        h, w = torch.randint(3, 6, (2,), generator=generator).tolist()
        found.append((y0, x0, y0 + h, x0 + w))
    return found


# -- semantic segmentation ---------------------------------------------------------------
class VOCLike(Dataset):
    """Pascal VOC-like segmentation samples (image (3, 16, 16) in [0, 1], mask (16, 16)
    int64): background 0, one or two objects of classes 1..3, each outlined by a 1-pixel
    border of 255 (VOC's "void", which the loss ignores). ``transform`` is applied to the
    image and the mask together; another ``seed`` gives other images (another split)."""

    def __init__(self, size: int = 100, seed: int = 0, transform: Any = None) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.rand(size, *SHAPE, generator=generator)
        self.masks = torch.zeros(size, SIDE, SIDE, dtype=torch.int64)
        for index in range(size):
            for number, (y0, x0, y1, x1) in enumerate(_rectangles(generator, 1 + index % 2)):
                self.masks[index, y0 - 1 : y1 + 1, x0 - 1 : x1 + 1] = 255
                self.masks[index, y0:y1, x0:x1] = 1 + (index + number) % (CLASSES - 1)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Any:
        image, mask = tv_tensors.Image(self.images[index]), tv_tensors.Mask(self.masks[index])
        if self.transform is not None:
            image, mask = self.transform(image, mask)
        return image, mask


class MasksFromOne(VOCLike):
    """The class numbers shifted by one (background 1, objects 2..4): 4 = num_classes."""

    def __getitem__(self, index: int) -> Any:
        image, mask = super().__getitem__(index)
        return image, torch.where(mask == 255, mask, mask + 1)


class FloatMasks(VOCLike):
    """Masks read as float images (a ToTensor on the mask file)."""

    def __getitem__(self, index: int) -> Any:
        image, mask = super().__getitem__(index)
        return image, mask.float()


class MinusOneBorders(VOCLike):
    """Borders marked -1 instead of 255."""

    def __getitem__(self, index: int) -> Any:
        image, mask = super().__getitem__(index)
        return image, torch.where(mask == 255, -1, mask)


class WithoutClass3(VOCLike):
    """A label mapping that merged class 3 into class 2."""

    def __getitem__(self, index: int) -> Any:
        image, mask = super().__getitem__(index)
        return image, torch.where(mask == 3, 2, mask)


class RepeatedImage(VOCLike):
    """Image 0 again at index 20, with the mask of image 21: a file list out of order."""

    def __getitem__(self, index: int) -> Any:
        image, _ = super().__getitem__(0 if index == 20 else index)
        _, mask = super().__getitem__(21 if index == 20 else index)
        return image, mask


def segmentation_case(train: Dataset, val: Dataset, **attributes: Any) -> type:
    """The setUp of docs/datasets.md for segmentation, on these splits."""

    def set_up(self: Any) -> None:
        self.splits = {"train": train, "val": val, "test": VOCLike(size=40, seed=2)}

    options: Dict[str, Any] = {
        "sample_shape": SHAPE,
        "value_range": (0.0, 1.0),
        "augmented_splits": {"train"},
        "num_classes": CLASSES,
        "ignore_index": 255,
        "batch_size": 16,
        **attributes,
    }
    return make_case(DatasetTests, set_up, **options)


def voc_case(**attributes: Any) -> type:
    return segmentation_case(
        VOCLike(transform=augmentation()), VOCLike(size=40, seed=1), **attributes
    )


# -- detection ------------------------------------------------------------------------------
class COCOLike(Dataset):
    """torchvision's detection samples: (image (3, 16, 16) in [0, 1], {"boxes": float32
    (n, 4), "labels": int64 (n,)}), n = index % 4 (every fourth image holds no object),
    classes 1..3 (0 is the background of torchvision's detection models). ``boxes`` as
    tv_tensors.BoundingBoxes, so that ``transform`` moves them with the image;
    ``objects`` fixes n."""

    def __init__(
        self, size: int = 100, seed: int = 0, transform: Any = None, objects: int = -1
    ) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.rand(size, *SHAPE, generator=generator)
        self.boxes, self.labels = [], []
        for index in range(size):
            count = index % 4 if objects < 0 else objects
            rectangles = _rectangles(generator, count)
            self.boxes.append(
                torch.tensor([[x0, y0, x1, y1] for y0, x0, y1, x1 in rectangles]).float()
            )
            self.labels.append(
                torch.tensor([1 + (index + k) % (CLASSES - 1) for k in range(count)]).long()
            )
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Any:
        image = tv_tensors.Image(self.images[index])
        target = {
            "boxes": tv_tensors.BoundingBoxes(
                self.boxes[index].reshape(-1, 4), format="XYXY", canvas_size=(SIDE, SIDE)
            ),
            "labels": self.labels[index],
        }
        if self.transform is not None:
            image, target = self.transform(image, target)
        return image, target


class ClassIds(COCOLike):
    """The labels under another key than torchvision's."""

    def __getitem__(self, index: int) -> Any:
        image, target = super().__getitem__(index)
        return image, {"boxes": target["boxes"], "class_ids": target["labels"]}


class FloatBoxLabels(COCOLike):
    def __getitem__(self, index: int) -> Any:
        image, target = super().__getitem__(index)
        return image, {**target, "labels": target["labels"].float()}


class RepeatedDetection(COCOLike):
    """Image 2 again at index 6, with the boxes and labels of image 6."""

    def __getitem__(self, index: int) -> Any:
        image, _ = super().__getitem__(2 if index == 6 else index)
        _, target = super().__getitem__(index)
        return image, target


class SingleClassFloatLabels(COCOLike):
    """Every object of class 1, its label a float: vectors of 1.0, one per object."""

    def __getitem__(self, index: int) -> Any:
        image, target = super().__getitem__(index)
        return image, {**target, "labels": torch.ones(len(target["labels"]))}


def detection_collate(batch: List[Any]) -> Tuple[Any, ...]:
    """torchvision's detection references' collate: a tuple of images, a tuple of targets."""
    return tuple(zip(*batch))


def detection_case(
    train: Dataset, val: Dataset, test: Optional[Dataset] = None, **attributes: Any
) -> type:
    """The setUp of docs/datasets.md for detection, on these splits."""
    test = COCOLike(size=40, seed=2) if test is None else test

    def set_up(self: Any) -> None:
        self.splits = {"train": train, "val": val, "test": test}

    options: Dict[str, Any] = {
        "sample_shape": SHAPE,
        "value_range": (0.0, 1.0),
        "augmented_splits": {"train"},
        "num_classes": CLASSES,
        "target_key": (1, "labels"),
        "unused_classes": {0},
        "collate_fn": detection_collate,
        "batch_size": 16,
        **attributes,
    }
    return make_case(DatasetTests, set_up, **options)


def coco_case(**attributes: Any) -> type:
    return detection_case(
        COCOLike(transform=augmentation()), COCOLike(size=40, seed=1), **attributes
    )


# -- multi-label classification ------------------------------------------------------------
LABELS = 5


class MultiLabel(Dataset):
    """Images with several of 5 attributes each, as a multi-hot float32 vector (what
    BCEWithLogitsLoss takes), ``dtype`` torch.bool or another floating-point type for
    other datasets; ``labels`` (the vectors' length) for a broken one."""

    def __init__(
        self, size: int = 100, seed: int = 0, dtype: Any = torch.float32, labels: int = LABELS
    ) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.rand(size, *SHAPE, generator=generator)
        self.targets = (torch.rand(size, labels, generator=generator) < 0.4).to(dtype)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Any:
        return self.images[index], self.targets[index]


def multi_label_case(seed: int = 0, **attributes: Any) -> type:
    def set_up(self: Any) -> None:
        self.splits = {
            "train": MultiLabel(seed=seed),
            "val": MultiLabel(size=40, seed=seed + 10, dtype=torch.bool),
            "test": MultiLabel(size=40, seed=seed + 20, dtype=torch.float16),
        }

    options: Dict[str, Any] = {
        "sample_shape": SHAPE,
        "value_range": (0.0, 1.0),
        "num_classes": LABELS,
        "batch_size": 16,
        **attributes,
    }
    return make_case(DatasetTests, set_up, **options)


# -- the tests ---------------------------------------------------------------------------
class PassEveryCheck(CheckTestCase):
    def assertEveryCheckPasses(self, make: Any) -> None:
        for seed in SEEDS:
            case = make(seed=seed)
            for name in CHECKS:
                with self.subTest(seed=seed, check=name):
                    self.assertPasses(case, name)

    def test_segmentation_masks_with_255_borders(self) -> None:
        self.assertEveryCheckPasses(voc_case)

    def test_torchvision_detection_samples_with_images_without_boxes(self) -> None:
        self.assertEveryCheckPasses(coco_case)

    def test_multi_label_targets_of_0s_and_1s(self) -> None:
        # float32, bool and float16 vectors, one value per class (BCEWithLogitsLoss's)
        self.assertEveryCheckPasses(multi_label_case)

    def test_detection_samples_collated_by_a_lambda(self) -> None:
        case = coco_case(collate_fn=lambda batch: tuple(zip(*batch)))
        for name in ("test_data_loading", "test_labels"):
            with self.subTest(name):
                self.assertPasses(case, name)


class SegmentationMasks(CheckTestCase):
    def test_255_borders_without_ignore_index_fail_suggesting_it(self) -> None:
        case = voc_case(ignore_index=-100)
        text = self.assertFailsWith(
            case,
            "test_labels",
            "split 'train' has targets outside [0, num_classes=4): 255 (",
            " values in 100 samples, first at index 0)",
            "Samples holding each class: 0: 100, 1: ",
            "set self.ignore_index = 255 (now -100) and give the loss that ignore_index",
        )
        self.assertNotIn("numbered from 1", text)

    def test_other_markers_are_suggested_with_the_ignored_values_in_use(self) -> None:
        case = segmentation_case(MinusOneBorders(transform=augmentation()), VOCLike(seed=1))
        self.assertFailsWith(
            case,
            "test_labels",
            "split 'train' has targets outside [0, num_classes=4): -1 (",
            "set self.ignore_index = -1 (now 255)",
        )
        case.ignore_index = (-1, 255)
        self.assertPasses(case, "test_labels")

    def test_masks_numbered_from_one_fail(self) -> None:
        case = segmentation_case(MasksFromOne(), VOCLike(size=40, seed=1), augmented_splits=set())
        self.assertFailsWith(
            case,
            "test_labels",
            "split 'train' has targets outside [0, num_classes=4): 4 (",
            "Samples holding each class: 0: 0, 1: 100,",
            "Labels numbered from 1 instead of 0?",
        )

    def test_a_wrong_num_classes_fails(self) -> None:
        case = voc_case(num_classes=3)
        self.assertFailsWith(
            case,
            "test_labels",
            "split 'train' has targets outside [0, num_classes=3): 3 (",
            "Fix the labels, or self.num_classes if it is wrong.",
        )

    def test_float_masks_fail(self) -> None:
        case = segmentation_case(FloatMasks(), VOCLike(size=40, seed=1), augmented_splits=set())
        self.assertFailsWith(
            case,
            "test_labels",
            "split 'train': 100 targets are not integer class indices; the target of index 0 "
            "is a float32 tensor of shape (16, 16).",
            "Classification losses need integer class indices",
        )

    def test_a_class_in_no_mask_is_a_skipped_part_unless_unused_classes_is_set(self) -> None:
        case = segmentation_case(WithoutClass3(), VOCLike(size=40, seed=1), augmented_splits=set())
        self.assertSkipsWith(
            case,
            "test_labels",
            "class presence not judged: split 'train' has no sample holding class 3 among its "
            "100 scanned samples (samples holding each class: 0: 100, 1: ",
            "label maps of shape (16, 16)",
            "set self.unused_classes to the classes that may be absent",
        )
        case.unused_classes = ()
        self.assertFailsWith(
            case,
            "test_labels",
            "split 'train' has no sample holding class 3 among its 100 scanned samples",
            "A class lost by a filter",
            "self.unused_classes = {3}",
        )
        case.unused_classes = {3}
        self.assertPasses(case, "test_labels")

    def test_the_same_image_with_another_mask_fails(self) -> None:
        case = segmentation_case(VOCLike(transform=augmentation()), RepeatedImage(size=40, seed=1))
        self.assertFailsWith(
            case,
            "test_labels",
            "split 'val': 1 samples have the same input as an earlier sample but another "
            "target, e.g. index 0 and index 20 (targets of shape (16, 16) that differ)",
        )

    def test_target_shape_checks_the_masks_shape(self) -> None:
        case = voc_case(target_shape=(SIDE, SIDE))
        self.assertPasses(case, "test_labels")
        case.target_shape = (8, 8)
        self.assertFailsWith(
            case,
            "test_labels",
            "split 'train': 100 of 100 targets do not have target_shape (8, 8): (16, 16) at "
            "index 0, index 1, index 2, index 3, index 4 and 95 more.",
        )


class DetectionTargets(CheckTestCase):
    def test_the_default_collate_cannot_batch_them(self) -> None:
        case = coco_case(collate_fn=None)
        self.assertFailsWith(
            case,
            "test_data_loading",
            "samples cannot be batched by collate_fn (torch.utils.data.default_collate)",
            "Set self.collate_fn to the collate function your DataLoader uses",
        )

    def test_a_target_key_at_the_target_dict_asks_for_the_labels_path(self) -> None:
        case = coco_case(target_key=1)
        self.assertErrorsWith(
            case,
            "test_labels",
            "ContractError: self.target_key = 1 does not fit the samples of split 'train': the "
            "first sample holds a container as element 1, with the class labels at "
            "sample[1]['labels']",
            "e.g. self.target_key = (1, 'labels')",
        )
        case.collate_fn = None  # the batch fails for the boxes: test_data_loading says so
        self.assertFailsWith(
            case,
            "test_data_loading",
            "samples cannot be batched by collate_fn (torch.utils.data.default_collate)",
        )

    def test_a_target_dict_without_a_label_key_fails_naming_a_path_into_it(self) -> None:
        case = detection_case(
            ClassIds(transform=augmentation()),
            ClassIds(size=40, seed=1),
            ClassIds(size=40, seed=2),
            target_key=1,
        )
        self.assertFailsWith(
            case,
            "test_labels",
            "split 'val': 40 targets are not integer class indices; the target of index 0 is "
            "a dict with elements ['boxes', 'class_ids'] (to check the class labels in it, "
            "set self.target_key = (1, 'class_ids'))",
        )

    def test_the_unused_background_class_is_a_skipped_part_unless_unused_classes_is_set(
        self,
    ) -> None:
        case = coco_case(unused_classes=None)
        self.assertSkipsWith(
            case,
            "test_labels",
            "class presence not judged: split 'train' has no sample holding class 0 among its "
            "100 scanned samples (samples holding each class: 0: 0, 1: ",
            "label vectors of 0 to 3 elements (per-object labels",
            "the background class 0 of torchvision's detection models",
        )
        outcome = run_check(case, "test_labels")
        self.assertEqual(len(outcome.skips), 1)  # train only; val and test are small
        case.unused_classes = ()
        self.assertFailsWith(
            case, "test_labels", "split 'train' has no sample holding class 0 among its 100"
        )

    def test_num_classes_without_the_background_fails_with_the_hint(self) -> None:
        case = coco_case(num_classes=CLASSES - 1, unused_classes=None)
        self.assertFailsWith(
            case,
            "test_labels",
            "split 'train' has targets outside [0, num_classes=3): 3 (",
            " values in ",
            "samples, first at index 2)",
            "Labels numbered from 1 instead of 0? (torchvision's detection models number the "
            "object classes from 1, 0 being the background: their num_classes counts the "
            "background too.)",
        )

    def test_float_labels_fail(self) -> None:
        case = detection_case(FloatBoxLabels(), COCOLike(size=40, seed=1), augmented_splits=set())
        self.assertFailsWith(
            case,
            "test_labels",
            "split 'train': 100 targets are not integer class indices; the target of index 0 "
            "is a float32 tensor of shape (0,).",
        )

    def test_float_labels_of_a_single_class_fail_though_they_are_0s_and_1s(self) -> None:
        # one object per image, its label 1.0: not num_classes values, so no multi-hot labels
        case = detection_case(
            SingleClassFloatLabels(objects=1),
            COCOLike(size=40, seed=1),
            augmented_splits=set(),
        )
        self.assertFailsWith(
            case,
            "test_labels",
            "split 'train': 100 targets are floating-point or bool vectors of 0s and 1s whose "
            "length is not num_classes=4 ((1,) at index 0",
            "Convert class indices stored as floats to integers (torch.int64)",
        )
        # with images without objects too: counted with the empty float targets
        case = detection_case(
            SingleClassFloatLabels(), COCOLike(size=40, seed=1), augmented_splits=set()
        )
        self.assertFailsWith(
            case,
            "test_labels",
            "split 'train': 100 targets are not integer class indices; the target of index 0 "
            "is a float32 tensor of shape (0,).",
        )

    def test_an_image_repeated_with_other_boxes_fails(self) -> None:
        case = detection_case(COCOLike(transform=augmentation()), RepeatedDetection(seed=1))
        self.assertFailsWith(
            case,
            "test_labels",
            "split 'val': 1 samples have the same input as an earlier sample but another "
            "target, e.g. index 2 and index 6 (targets of shape (2,) that differ)",
        )


class MultiLabelTargets(CheckTestCase):
    def test_vectors_of_another_length_than_num_classes_fail(self) -> None:
        self.assertFailsWith(
            multi_label_case(num_classes=6),
            "test_labels",
            "split 'train': 100 targets are floating-point or bool vectors of 0s and 1s whose "
            "length is not num_classes=6 ((5,) at index 0",
            "or set self.num_classes to the vectors' length if they are multi-hot labels",
        )

    def test_a_class_never_marked_is_a_skipped_part_unless_unused_classes_is_set(self) -> None:
        class WithoutClass4(MultiLabel):
            def __getitem__(self, index: int) -> Any:
                image, target = super().__getitem__(index)
                return image, torch.cat([target[:4], torch.zeros(1)])

        def set_up(self: Any) -> None:
            self.splits = {"train": WithoutClass4()}

        options = {"num_classes": LABELS, "batch_size": 16}
        said = "its targets are multi-hot vectors of 5 classes"
        self.assertSkipsWith(make_case(DatasetTests, set_up, **options), "test_labels", said)
        strict = make_case(DatasetTests, set_up, **options, unused_classes=())
        self.assertFailsWith(strict, "test_labels", "no sample holding class 4 among its 100")

    def test_soft_labels_are_no_class_indices(self) -> None:
        class Smoothed(MultiLabel):
            def __getitem__(self, index: int) -> Any:
                image, target = super().__getitem__(index)
                return image, target * 0.9 + 0.02

        def set_up(self: Any) -> None:
            self.splits = {"train": Smoothed()}

        self.assertFailsWith(
            make_case(DatasetTests, set_up, num_classes=LABELS, batch_size=16),
            "test_labels",
            "targets are not integer class indices; the target of index 0 is a float32 tensor "
            "of shape (5,)",
            "or, for multi-label targets, vectors of 0s and 1s, one per class",
        )


class OneObjectPerImage(CheckTestCase):
    """Every target of shape (1,): the labels of one box per image, or a class label stored
    as a one-element tensor. Told apart by the batches of collate_fn."""

    @staticmethod
    def case(**attributes: Any) -> type:
        return detection_case(
            COCOLike(objects=1, transform=augmentation()),
            COCOLike(size=40, seed=1, objects=1),
            COCOLike(size=40, seed=2, objects=1),
            **attributes,
        )

    def test_kept_in_lists_by_collate_fn_is_a_skipped_part(self) -> None:
        case = self.case()
        self.assertSkipsWith(
            case,
            "test_labels",
            "one-element targets not judged: every target of split 'train' is a one-element "
            "tensor (the target of index 0 is an int64 tensor of shape (1,) (1)), and the "
            "batches of collate_fn (test_dataset_targets.detection_collate) hold no tensor "
            "of them at self.target_key",
            "Set self.target_shape = () if each target is one class label",
        )
        case.target_shape = (1,)
        self.assertPasses(case, "test_labels")
        case.target_shape = ()
        self.assertFailsWith(
            case,
            "test_labels",
            "split 'train': 100 of 100 targets do not have target_shape (): (1,) at index 0",
            "batches of one-element targets have shape (batch, 1)",
        )

    def test_stacked_by_the_default_collate_fails(self) -> None:
        case = self.case(collate_fn=None)
        self.assertFailsWith(
            case,
            "test_labels",
            "which collate_fn (torch.utils.data.default_collate) batches to shape (16, 1)",
            "set self.collate_fn to the collate function your DataLoader uses",
        )


if __name__ == "__main__":
    unittest.main()
