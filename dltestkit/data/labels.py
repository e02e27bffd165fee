"""test_labels: every target is made of class indices in range, every class occurs,
equal inputs have equal targets."""

from __future__ import annotations

from typing import Any, Collection, Dict, FrozenSet, Optional, Sequence, Tuple

from ..core.contract import check
from ..core.options import UNSET, option
from ..core.validators import is_fraction, is_positive_int, is_shape, optional
from .callables import describe_callable
from .contract import LOADING, DatasetContract, round_up
from .positions import SHOWN, Position, listed, where
from .samples import as_key, path_text
from .scan import Registered, Scan
from .statistics import Tally
from .targets import Target

__all__ = ["Labels"]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_ignore_index(value: Any) -> Optional[str]:
    if _is_int(value):
        return None
    if isinstance(value, (list, tuple, set, frozenset)) and all(_is_int(v) for v in value):
        return None
    return f"is {value!r}, not an int or a collection of ints (e.g. 255 or (-100, 255))"


def _is_classes(value: Any) -> Optional[str]:
    if isinstance(value, (list, tuple, set, frozenset, range)) and all(
        _is_int(v) and v >= 0 for v in value
    ):
        return None
    return f"is {value!r}, not a collection of class indices (e.g. {{0}} or ())"


class Labels(DatasetContract):
    """Class targets in range, every class present, no conflicting labels."""

    ignore_index: Any = option(-100, _is_ignore_index, example="255")
    """The target values that mean no class, ignored by the loss.

    An int or a collection of ints, as the `ignore_index` of `F.cross_entropy` (whose default is
    -100): `255` for Pascal VOC masks, whose object borders are 255; `(-100, 255)`. These values are
    neither out of range nor counted as a class."""
    target_shape: Sequence[int] = option(
        UNSET, is_shape, example="()", default_text="unset: any shape"
    )
    """The shape of one sample's target.

    `()`: one class index per sample, so that a one-element target (`torch.tensor([label])`) fails
    even when the batches do not show its shape; `(512, 512)`: label maps of that size. Leave it
    unset for targets of varying shape (per-object labels)."""
    unused_classes: Optional[Collection[int]] = option(None, optional(_is_classes), example="{0}")
    """The classes that may occur in no sample of a split.

    `None`: a class that no sample of a large enough split holds fails for per-sample labels, and is
    reported in a skipped part for label maps and per-object labels, whose numbering may leave ids
    unused by design (the background class 0 of torchvision's detection models, COCO's unused
    category ids). A collection (`{0}`, `()`) makes that strict: every other class must occur."""
    class_presence: Optional[int] = option(20, optional(is_positive_int), example="50")
    """The samples per class, on average, from which a split must hold every class.

    A split of fewer scanned samples than `class_presence * num_classes` may lack a class; `None`
    never requires every class."""
    max_label_conflicts: float = option(0.0, is_fraction, example="0.2")
    """The fraction of a split's labelled samples that may have the input of an earlier sample but
    another target.

    For data in which equal inputs legitimately carry different labels (tabular data with few
    distinct feature values, label noise). Inputs whose values are all equal are never compared."""

    @check(
        reads=(
            *LOADING,
            "num_classes",
            "ignore_index",
            "target_shape",
            "unused_classes",
            "class_presence",
            "max_label_conflicts",
        )
    )
    def test_labels(self) -> None:
        """Check that every target is made of class indices in [0, ``num_classes``) (or
        ``ignore_index``), every class occurs in every large enough split, and equal inputs
        have equal targets.

        Catches labels numbered from 1, a wrong num_classes, label-map values that are no
        class (255 borders without ignore_index), a class lost by filtering, float or
        one-element targets the loss rejects, inputs and targets paired wrongly so that the
        same input has different labels. Multi-label targets, vectors of 0s and 1s with one
        value per class, are checked as the classes they mark.
        """
        classes = self._get_or_skip("num_classes")
        for name in self.splits:
            probe = self._first_probe(name)
            if probe is not None and probe.target_missing:
                fix = probe.target_key_hint
                raise self._key_error(
                    name,
                    "target_key",
                    f"has no element {self.target_key!r} ({probe.structure})",
                    "the index or key of the class label"
                    + (
                        ""
                        if fix is not None
                        else ", or leave self.num_classes unset "
                        "(test_labels needs samples that hold a target)"
                    ),
                    fix,
                )
            if probe is not None and probe.labels_inside is not None:
                raise self._key_error(
                    name,
                    "target_key",
                    f"holds a container as element {self.target_key!r}, with the class labels "
                    f"at {path_text(probe.labels_inside)}",
                    "the index, key or path of the class labels",
                    as_key(probe.labels_inside),
                )
        for name in self.splits:
            with self.subTest(split=name):
                scan = self._loaded(name).scan
                self._check_target_types(name, scan, classes)
                self._check_target_shapes(name, scan)
                self._check_label_range(name, scan, classes)
                self._check_class_presence(name, scan, classes)
                self._check_label_conflicts(name, scan)

    def _ignored(self) -> FrozenSet[int]:
        value = self.ignore_index
        return frozenset([value] if isinstance(value, int) else value)

    def _check_target_types(self, name: str, scan: Scan, classes: int) -> None:
        # vectors of 0s and 1s of another length than num_classes are no multi-hot labels
        wrong = {shape: seen for shape, seen in scan.multi_hot.items() if shape != (classes,)}
        if scan.target_problems:
            position, what = scan.target_problems.first[0]
            count = scan.target_problems.count + sum(seen.count for seen in wrong.values())
            self.fail(
                f"split {name!r}: {count} targets are not integer "
                f"class indices; the target of {where(position)} is {what}. Classification "
                "losses need integer class indices (an int, or an integer tensor: one index "
                "per sample, per pixel or per object), or, for multi-label targets, vectors "
                "of 0s and 1s, one per class; convert the labels in the dataset, or leave "
                "self.num_classes unset if the targets are not class labels."
            )
        if wrong:
            self._multi_hot_of_another_length(name, classes, wrong)
        if scan.unlabelled:
            self.fail(
                f"split {name!r}: {scan.unlabelled.count} samples have no element "
                f"{self.target_key!r} (self.target_key), unlike the first samples: "
                f"{listed(scan.unlabelled)}."
            )

    def _multi_hot_of_another_length(
        self, name: str, classes: int, wrong: Dict[Tuple[int, ...], Tally[Position]]
    ) -> None:
        """Vectors of 0s and 1s are multi-hot labels only with one value per class."""
        count = sum(seen.count for seen in wrong.values())
        shapes = "; ".join(f"{shape} at {listed(seen)}" for shape, seen in list(wrong.items())[:3])
        self.fail(
            f"split {name!r}: {count} targets are floating-point or bool vectors of 0s and 1s "
            f"whose length is not num_classes={classes} ({shapes}): neither multi-hot labels "
            "(one value per class, for BCEWithLogitsLoss) nor integer class indices, which "
            "classification losses and torchvision's detection models need. Convert class "
            "indices stored as floats to integers (torch.int64) in the dataset, or set "
            "self.num_classes to the vectors' length if they are multi-hot labels."
        )

    def _check_target_shapes(self, name: str, scan: Scan) -> None:
        """target_shape when set; else one-element targets, judged from the batches."""
        if self._is_set("target_shape"):
            expected = tuple(self.target_shape)
            wrong = {shape: seen for shape, seen in scan.target_shapes.items() if shape != expected}
            if wrong:
                count = sum(seen.count for seen in wrong.values())
                shapes = "; ".join(
                    f"{shape} at {listed(seen)}" for shape, seen in sorted(wrong.items())[:SHOWN]
                )
                hint = (
                    " (batches of one-element targets have shape (batch, 1), which "
                    "cross-entropy rejects: give the label as int(label))"
                    if not expected and (1,) in wrong
                    else ""
                )
                self.fail(
                    f"split {name!r}: {count} of {scan.labelled} targets do not have "
                    f"target_shape {expected}: {shapes}{hint}. Fix the targets in the dataset, "
                    "or self.target_shape."
                )
            return
        if scan.one_element is None or set(scan.target_shapes) != {(1,)}:
            return
        # Every target is a one-element tensor: a class label stored as
        # torch.tensor([label]) (a bug once batched to (batch, 1)), or the labels of
        # samples that each hold one object. The batches collate_fn makes tell them apart.
        position, target = scan.one_element
        seen = f"the target of {where(position)} is {target.described()}"
        collate = describe_callable(self._collate_fn())
        batch = scan.target_batch
        if batch is not None and batch[1] == (batch[0], 1):
            self.fail(
                f"split {name!r}: every target is a one-element tensor ({seen}), which "
                f"collate_fn ({collate}) batches to shape {batch[1]}: batches of it have "
                "shape (batch, 1), which cross-entropy rejects with (batch, classes) "
                "logits. Give the label as int(label) (or label.squeeze(0)). If each target "
                "holds the labels of a sample's objects (a detection dataset whose samples "
                "each hold one object), set self.collate_fn to the collate function your "
                "DataLoader uses (one that keeps the targets in a list)."
            )
        if batch is None:
            self._skip_part(
                "one-element targets",
                f"one-element targets not judged: every target of split {name!r} is a "
                f"one-element tensor ({seen}), and the batches of collate_fn ({collate}) hold "
                "no tensor of them at self.target_key, so the shape the loss receives is not "
                "seen. A class label stored as torch.tensor([label]) (a bug once stacked to "
                "(batch, 1), which cross-entropy rejects) and the labels of samples that each "
                "hold one object (a detection dataset) look alike here. Set "
                "self.target_shape = () if each target is one class label (this part then "
                "fails), or self.target_shape = (1,) if one-element targets are the design.",
            )

    def _check_label_range(self, name: str, scan: Scan, classes: int) -> None:
        ignored = self._ignored()
        values = [value for value in scan.labels if value not in ignored]
        outside = sorted(value for value in values if not 0 <= value < classes)
        if not outside:
            return
        per_sample = set(scan.target_shapes) == {()}
        shown = ", ".join(
            (
                f"{value} ({scan.labels[value]} samples, "
                if per_sample
                else f"{value} ({scan.elements[value]} values in {scan.labels[value]} samples, "
            )
            + f"first at {where(scan.first_with_label[value])})"
            for value in outside[:10]
        )
        hint = ""
        if min(values) == 1 and max(values) == classes:
            hint = " Labels numbered from 1 instead of 0?"
            if all(len(shape) == 1 for shape in scan.target_shapes):
                hint += (
                    " (torchvision's detection models number the object classes from 1, 0 "
                    "being the background: their num_classes counts the background too.)"
                )
        markers = [value for value in outside if value == 255 or value < 0]
        if markers:
            kept = {value for value in scan.labels if value in ignored}
            suggested = sorted(kept | set(markers))
            setting = suggested[0] if len(suggested) == 1 else tuple(suggested)
            hint += (
                f" If {' and '.join(map(str, markers))} mark{'s' if len(markers) == 1 else ''} "
                "values the loss ignores (the 255 borders of Pascal VOC masks, -100 padding), "
                f"set self.ignore_index = {setting!r} (now {self.ignore_index!r}) and give the "
                "loss that ignore_index."
            )
        self.fail(
            f"split {name!r} has targets outside [0, num_classes={classes}): {shown}. "
            f"{self._counts_name(scan).capitalize()}: {self._class_counts(scan, classes)}."
            f"{hint} Fix the labels, or self.num_classes if it is wrong."
        )

    def _check_class_presence(self, name: str, scan: Scan, classes: int) -> None:
        if self.class_presence is None:
            return
        needed = self.class_presence * classes
        may_lack = set(self.unused_classes or ()) | self._ignored()
        missing = [c for c in range(classes) if not scan.labels[c] and c not in may_lack]
        if not missing or scan.labelled < needed:
            return
        per_sample = set(scan.target_shapes) == {()}
        plural = "es" if len(missing) > 1 else ""
        found = (
            f"no sample {'of' if per_sample else 'holding'} class{plural} "
            f"{', '.join(map(str, missing[:20]))} among its {scan.labelled} scanned samples "
            f"({self._counts_name(scan)}: {self._class_counts(scan, classes)})"
        )
        if not per_sample and self.unused_classes is None:
            self._skip_part(
                "class presence",
                f"class presence not judged: split {name!r} has {found}; its targets are "
                f"{_target_kinds(scan)}, whose numbering may leave a class unused by design "
                "(the background class 0 of torchvision's detection models, COCO's unused "
                "category ids) as well as lose one by a filter. To require every class, set "
                "self.unused_classes to the classes that may be absent (e.g. {0}, or () for "
                "none): this part then fails.",
            )
            return
        example = "{" + ", ".join(map(str, missing[:3])) + "}"
        self.fail(
            f"split {name!r} has {found}. A class lost by a filter, or a split made by label? "
            f"A split of at least class_presence={self.class_presence} samples per class "
            f"({needed} here) must hold every class; if the class is legitimately rare, raise "
            "self.class_presence or set it to None; if it is never used, list it in "
            f"self.unused_classes (e.g. self.unused_classes = {example})."
        )

    def _check_label_conflicts(self, name: str, scan: Scan) -> None:
        conflicts = scan.conflicts.count / scan.labelled if scan.labelled else 0.0
        if not scan.conflicts or conflicts <= self.max_label_conflicts:
            return
        shown = ", ".join(
            _conflict(first, position, target) for first, position, target in scan.conflicts
        )
        self.fail(
            f"split {name!r}: {scan.conflicts.count} samples have the same input as "
            f"an earlier sample but another target, e.g. {shown}. Inputs and "
            "targets are paired wrongly (a label list in another order than the "
            "files), or the same input is labelled twice; fix the pairing, or "
            "remove the contradicting duplicates. If equal inputs legitimately "
            "carry different labels (tabular data with few distinct feature "
            "values, label noise), set self.max_label_conflicts = "
            f"{round_up(conflicts)} (the fraction of the {scan.labelled} labelled "
            f"samples; now {self.max_label_conflicts:g}). (Inputs whose values are "
            "all equal, like silence or a blank image, are not compared.)"
        )

    @staticmethod
    def _counts_name(scan: Scan) -> str:
        """What the class counts count: samples (a class counts once per sample)."""
        if set(scan.target_shapes) <= {()}:
            return "class counts"
        return "samples holding each class"

    def _class_counts(self, scan: Scan, classes: int) -> str:
        ignored = self._ignored()
        shown = sorted((set(range(classes)) | set(scan.labels)) - (ignored - set(range(classes))))
        if len(shown) <= 20:
            return ", ".join(f"{c}: {scan.labels[c]}" for c in shown)
        counts = [scan.labels[c] for c in range(classes)]
        return (
            f"{sum(1 for n in counts if n)} of {classes} classes present, "
            f"{min(counts)} to {max(counts)} samples per class"
        )


def _conflict(first: Registered, position: Position, target: Target) -> str:
    """Two samples with equal inputs and different targets: "index 0 (target 0) and index
    20 (target 1)", "index 2 and index 6 (targets of shape (2,) that differ)"."""
    if not isinstance(first.label, tuple) and not target.shape:
        return (
            f"{where(first.position)} (target {first.label}) and {where(position)} ({target.text})"
        )
    shape = first.label[1] if isinstance(first.label, tuple) else ()
    shapes = f"shape {shape}" if shape == target.shape else f"shapes {shape} and {target.shape}"
    return f"{where(first.position)} and {where(position)} (targets of {shapes} that differ)"


def _target_kinds(scan: Scan) -> str:
    """What the targets of a split are, for messages: "label maps of shape (8, 8)"."""
    shapes = list(scan.target_shapes)
    if scan.multi_hot and list(scan.multi_hot) == shapes == [shapes[0]]:
        return f"multi-hot vectors of {shapes[0][0]} classes"
    if all(len(shape) == 1 for shape in shapes):
        lengths = sorted(shape[0] for shape in shapes)
        size = (
            f"{lengths[0]} elements"
            if len(lengths) == 1
            else f"{lengths[0]} to {lengths[-1]} elements"
        )
        return f"label vectors of {size} (per-object labels, multi-label index lists)"
    if all(len(shape) >= 2 for shape in shapes):
        if len(shapes) == 1:
            return f"label maps of shape {shapes[0]}"
        return f"label maps of {len(shapes)} shapes"
    return f"targets of {len(shapes)} shapes"
