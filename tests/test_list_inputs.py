"""ModelTests on models that take a list of samples (torchvision's detection models).

An argument of ``self.inputs`` that is a list of tensors (images of different sizes) or of
dicts of tensors (target dicts) carries the batch as the list; a list the model returns for
it is one element per sample. A hand-made model shows that every check passes on a correct
one and fails on the bugs, with its message; torchvision's detection models, built offline
with random weights, must pass every check (or skip a part the platform cannot run).

Faster R-CNN on MobileNet runs in the quick suite; SSDlite and the detection models with a
ResNet-50 backbone take a minute and a half together: they are marked slow
(``python -m pytest tests -m slow``).
"""

from __future__ import annotations

import importlib.util
import unittest
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import pytest
import torch
import torch.nn.functional as F
from checkrunner import (
    NO_GPU,
    NO_RUNNING_STATISTICS,
    UNSET_REFERENCES,
    CheckTestCase,
    built_under_seed,
    make_case,
    run_check,
    with_class_attributes,
)
from torch import nn

from dltestkit import DistributedModelTests, ModelTests, SequenceModelTests
from dltestkit.core.contract import checks_of
from dltestkit.models.tensors import take_samples

BATCH = 4
#: Images of two orientations: a batch of copies of one has another padded size.
MIXED_SIZES = [(3, 12, 8), (3, 8, 12)] * 2
SAME_SIZES = [(3, 10, 10)] * BATCH
Images = List[torch.Tensor]
Targets = List[Dict[str, torch.Tensor]]


def images(sizes: Sequence[Tuple[int, int, int]] = MIXED_SIZES) -> Images:
    generator = torch.Generator().manual_seed(3)
    return [torch.rand(size, generator=generator) for size in sizes]


def targets(count: int = BATCH) -> Targets:
    generator = torch.Generator().manual_seed(4)
    return [
        {
            "labels": torch.randint(0, 3, (1,), generator=generator),
            "area": torch.rand(1, generator=generator),
        }
        for _ in range(count)
    ]


class ImageListModel(nn.Module):
    """A correct model of the detection models' shape: a list of images of any size (and of
    target dicts) in; in eval mode a list of per-image dicts of class scores and a heat map
    of the image's size, in training mode with targets a dict of scalar losses."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, 4, 3, padding=1)
        self.classifier = nn.Linear(4, 3)
        self.heat = nn.Conv2d(4, 1, 1)

    def prepare(self, images: Images) -> Images:
        return images

    def forward(self, images: Images, targets: Optional[Targets] = None) -> Any:
        outputs = []
        for image in self.prepare(images):
            features = torch.tanh(self.features(image.unsqueeze(0)))
            outputs.append(
                {
                    "scores": self.classifier(features.mean((2, 3)))[0],
                    "heatmap": self.heat(features)[0, 0],
                }
            )
        if self.training and targets is not None:
            return {
                "loss_classifier": torch.stack(
                    [
                        F.cross_entropy(out["scores"].unsqueeze(0), target["labels"])
                        for out, target in zip(outputs, targets)
                    ]
                ).mean(),
                "loss_heatmap": torch.stack(
                    [
                        (out["heatmap"].mean() - target["area"]).square().sum()
                        for out, target in zip(outputs, targets)
                    ]
                ).mean(),
            }
        return outputs


class NormalisedOverAllImages(ImageListModel):
    """Standardises every image with the mean and std of all the images of the batch."""

    def prepare(self, images: Images) -> Images:
        pixels = torch.cat([image.flatten() for image in images])
        return [(image - pixels.mean()) / pixels.std() for image in images]


class NormalisedWithoutGradient(ImageListModel):
    """The same statistics, taken under torch.no_grad(): no gradient shows the mixing."""

    def prepare(self, images: Images) -> Images:
        with torch.no_grad():
            pixels = torch.cat([image.flatten() for image in images])
            mean, std = pixels.mean(), pixels.std()
        return [(image - mean) / std for image in images]


class DropsTheLastImage(ImageListModel):
    def prepare(self, images: Images) -> Images:
        return images[:-1]


class PadsToTheLargest(nn.Module):
    """Correct by design: pads every image to the largest of its batch (as torchvision's
    detection transform does) and pools over the padded canvas, so an image's scores
    change with the sizes of the other images, never with their values."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, 4, 3, padding=1)
        self.classifier = nn.Linear(4, 3)

    def forward(self, images: Images) -> List[Dict[str, torch.Tensor]]:
        height = max(image.shape[1] for image in images)
        width = max(image.shape[2] for image in images)
        canvas = torch.stack(
            [
                F.pad(image, (0, width - image.shape[2], 0, height - image.shape[1]))
                for image in images
            ]
        )
        scores = self.classifier(torch.tanh(self.features(canvas)).mean((2, 3)))
        return [{"scores": row} for row in scores]


class PadsImagesInTheUnitRange(PadsToTheLargest):
    """Refuses pixel values outside [0, 1], as a model may check its inputs."""

    def forward(self, images: Images) -> List[Dict[str, torch.Tensor]]:
        if any(bool(image.max() > 1) for image in images):
            raise ValueError("pixel values must be in [0, 1]")
        return super().forward(images)


def list_case(
    model: Callable[[], nn.Module],
    inputs: Callable[[], Any] = lambda: (images(), targets()),
    mixin: type = ModelTests,
    make_model: Optional[Callable[[], nn.Module]] = None,
    **attributes: Any,
) -> type:
    def set_up(self: Any) -> None:
        self.model = model()
        self.inputs = inputs()
        self.make_model = make_model or model
        for name, value in attributes.items():
            setattr(self, name, value)

    return make_case(mixin, set_up)


class HandMadeModels(CheckTestCase):
    def test_every_check_passes_on_a_correct_model(self) -> None:
        # no BatchNorm: no running statistics; losses in training, per-image dicts in eval
        allowed = (NO_GPU, NO_RUNNING_STATISTICS, "the model returns other outputs in training")
        for sizes in (MIXED_SIZES, SAME_SIZES):
            case = list_case(ImageListModel, lambda sizes=sizes: (images(sizes), targets()))
            for name in checks_of(case):
                with self.subTest(sizes=sizes[:2], check=name):
                    self.assertPasses(case, name, allowed)

    def test_images_only_in_eval_mode_pass_too(self) -> None:
        case = list_case(ImageListModel, lambda: (images(),))
        for name in checks_of(case):
            with self.subTest(check=name):
                self.assertPasses(case, name, (NO_GPU, NO_RUNNING_STATISTICS))

    def test_statistics_over_all_images_fail_batch_independence(self) -> None:
        self.assertFailsWith(
            list_case(NormalisedOverAllImages),
            "test_batch_independence",
            "sample 0's self.inputs[0][0] gets a gradient from the outputs of the other "
            "samples of the batch (its own output masked out): the model mixes samples",
        )

    def test_statistics_without_gradient_fail_by_their_values(self) -> None:
        for sizes in (MIXED_SIZES, SAME_SIZES):
            with self.subTest(sizes=sizes[:2]):
                self.assertFailsWith(
                    list_case(NormalisedWithoutGradient, lambda s=sizes: (images(s), targets())),
                    "test_batch_independence",
                    "sample 0's output[0]['scores'] changes with the other samples of the "
                    "batch: for a batch of 4 copies of sample 0 it differs from the output "
                    "for self.inputs by up to",
                    "although no gradient flows between the samples",
                )

    def test_a_dropped_image_fails_output_shape(self) -> None:
        self.assertFailsWith(
            list_case(DropsTheLastImage),
            "test_output_shape",
            "for self.inputs (4 samples) the model returns a list of 3 elements for 4 "
            "samples, one element per sample expected",
            "Look for a sample dropped or added in forward",
        )
        self.assertFailsWith(
            list_case(DropsTheLastImage),
            "test_batch_independence",
            "the model returns a list of 3 elements for the 4 samples of self.inputs",
        )

    def test_expected_output_shape_applies_to_each_sample(self) -> None:
        shape = dict(expected_output_shape=(BATCH, 3))
        self.assertPasses(list_case(ImageListModel, **shape), "test_output_shape")
        self.assertFailsWith(
            list_case(ImageListModel, expected_output_shape=(BATCH, 5)),
            "test_output_shape",
            "for self.inputs (4 samples) sample 0's output has shape (3,), expected (5,) "
            "(self.expected_output_shape without its batch dimension)",
        )
        self.assertFailsWith(
            list_case(ImageListModel, output_key="heatmap", expected_output_shape=(BATCH, 12, 8)),
            "test_output_shape",
            "sample 1's output has shape (8, 12), expected (12, 8)",
            "leave it unset when the shape varies from sample to sample",
        )

    def test_padding_to_the_largest_image_is_a_skipped_part_unless_strict(self) -> None:
        case = list_case(PadsToTheLargest, lambda: (images(),))
        outcome = run_check(case, "test_batch_independence")
        self.assertEqual((outcome.failures, outcome.errors), ([], []))
        self.assertEqual(len(outcome.skips), BATCH)  # one skipped part per sample
        self.assertIn(
            "sample 0's output[0]['scores'] changes with the shapes of the other samples of "
            "the batch, not with their values (self.inputs[0] holds samples of shapes "
            "(3, 12, 8), (3, 8, 12))",
            outcome.skips[0],
        )
        self.assertIn("set self.independent_of_batch_shapes = True", outcome.skips[0])
        self.assertFailsWith(
            list_case(PadsToTheLargest, lambda: (images(),), independent_of_batch_shapes=True),
            "test_batch_independence",
            "sample 0's output[0]['scores'] changes with the other samples of the batch",
        )
        same = list_case(PadsToTheLargest, lambda: (images(SAME_SIZES),))
        self.assertPasses(same, "test_batch_independence")

    def test_outputs_drawn_per_position_are_judged_on_each_samples_own_copies(self) -> None:
        """A sample's element holds one of two keys, chosen by a random number drawn per
        position of the batch (a sampling model, by design): where the copies of samples 0
        and 1 do not repeat another sample's element at its position, that sample is judged
        on copies of its own, which draw as self.inputs did there; no false alarm."""
        drawn: List[List[str]] = []  # the keys of every eval-mode pass, by position

        class DrawsItsOutputKeys(ImageListModel):
            def forward(self, images: Images, targets: Optional[Targets] = None) -> Any:
                outputs = super().forward(images, targets)
                if self.training:
                    return outputs
                for output in outputs:
                    key = "low" if float(torch.rand(())) < 0.5 else "high"
                    output[key] = output["scores"] * 2
                drawn.append([next(k for k in ("low", "high") if k in o) for o in outputs])
                return outputs

        # under a seed whose draws differ from position to position (not so under every seed:
        # under 3, all four positions draw "low")
        case = with_class_attributes(
            list_case(DrawsItsOutputKeys, lambda: (images(SAME_SIZES),)), seed=0
        )
        self.assertPasses(case, "test_batch_independence")
        # (the positions drew other keys: the screen did meet elements it could not compare)
        self.assertTrue(any(len(set(keys)) > 1 for keys in drawn), drawn)

    def test_padding_that_cannot_be_told_from_mixing_is_a_skipped_part(self) -> None:
        case = list_case(PadsImagesInTheUnitRange, lambda: (images(),))
        outcome = run_check(case, "test_batch_independence")
        self.assertEqual((outcome.failures, outcome.errors), ([], []))
        self.assertIn(
            "could not be told: the model raises on the other samples' values changed "
            "(x -> 2x + 1), ValueError: pixel values must be in [0, 1]",
            outcome.skips[0],
        )

    def test_copies_of_a_sample_are_clones(self) -> None:
        batch = targets(2)
        copies = take_samples(batch, [1, 1])
        self.assertIsNot(copies[0]["area"], copies[1]["area"])
        self.assertIsNot(copies[0]["area"], batch[1]["area"])
        self.assertTrue(torch.equal(copies[0]["area"], batch[1]["area"]))


class ListContract(CheckTestCase):
    def test_lists_and_tensors_must_agree_on_the_batch_size(self) -> None:
        self.assertErrorsWith(
            list_case(ImageListModel, lambda: (images(), targets(3))),
            "test_output_shape",
            "ContractError",
            "holds arguments whose numbers of samples differ: self.inputs[0] (a list of 4 "
            "samples), self.inputs[1] (a list of 3 samples)",
        )
        self.assertErrorsWith(
            list_case(ImageListModel, lambda: {"images": images(), "extra": torch.ones(3, 2)}),
            "test_output_shape",
            "self.inputs['images'] (a list of 4 samples), self.inputs['extra'] (3, 2)",
        )

    def test_a_list_of_tensors_in_inputs_itself_stays_positional_arguments(self) -> None:
        hint = (
            "A list in self.inputs is the model's positional arguments, one tensor each; for "
            "a model that takes a list of images (torchvision's detection models), set "
            "self.inputs = (images,) or (images, targets)"
        )
        self.assertErrorsWith(  # one image in colour, one in grey: no batch size
            list_case(ImageListModel, lambda: images([(3, 8, 8), (1, 8, 8)])),
            "test_output_shape",
            "ContractError",
            "holds tensors whose first dimensions differ: self.inputs[0] (3, 8, 8), "
            "self.inputs[1] (1, 8, 8)",
            "in self.unbatched_inputs. " + hint,
        )
        self.assertErrorsWith(  # the first dimensions agree: four positional arguments
            list_case(ImageListModel, lambda: images(SAME_SIZES)),
            "test_finite_outputs_and_gradients",
            "TypeError",
            "called as model(*inputs), positional arguments, with self.inputs[0]: (3, 10, 10)",
            hint,
        )

    def test_a_list_that_is_no_batch_can_be_declared_unbatched(self) -> None:
        class ScaledBy(nn.Module):
            def forward(self, x: torch.Tensor, scales: List[torch.Tensor]) -> torch.Tensor:
                return x * torch.stack(scales).sum()

        case = list_case(
            ScaledBy,
            lambda: (torch.randn(BATCH, 3), [torch.tensor(2.0)] * 3),
            unbatched_inputs=[1],
            expected_output_shape=(BATCH, 3),
        )
        for name in ("test_output_shape", "test_batch_independence"):
            self.assertPasses(case, name)

    def test_sequence_and_distributed_checks_refuse_lists(self) -> None:
        sequence = list_case(ImageListModel, mixin=SequenceModelTests, sequence_dim=1, causal=True)
        self.assertErrorsWith(
            sequence,
            "test_causality",
            "ContractError",
            "self.inputs[0] (a list of 4 samples), self.inputs[1] (a list of 4 samples): "
            "test_causality needs every batched input as a tensor",
        )
        self.assertPasses(sequence, "test_batch_independence")  # ModelTests' own checks run
        self.assertErrorsWith(
            list_case(ImageListModel, mixin=DistributedModelTests),
            "test_ddp_gradients",
            "test_ddp_gradients needs every batched input as a tensor",
        )


# -- torchvision ------------------------------------------------------------------------
HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None
SIZE = 64
#: What a check may skip on these models, by check: a part the platform cannot run.
PLATFORM_SKIPS = {
    # torchvision::nms and nonzero have no meta kernel (the output size depends on the data)
    "test_device_moving": ("meta",),
    # torchvision::nms has no bfloat16 kernel on the CPU
    "test_dtype_moving": ("bfloat16", "BFloat16"),
    # and the design: a dict of losses in training mode, detections in eval mode
    "test_train_matches_eval": ("the model returns other outputs in training mode",),
    # and a detection model that detects nothing above its score threshold in an image (as
    # Faster R-CNN's random weights of seed 14 do): no gradient reaches that image's pixels,
    # while changing them can make a detection appear, so the check cannot tell which it reads
    "test_all_inputs_used": ("through a gradient, but changing them changes the outputs",),
}


def detection_targets(masks: bool = False) -> Targets:
    """Three boxes per image: a small and a medium one anywhere, and a large one in a corner
    (a side of 0.6 to 0.9 of the image over the batch), so that every level of an
    anchor-based head has a box to train on (the coarsest grids of SSD have their anchors
    in the corners and the centre)."""
    generator = torch.Generator().manual_seed(5)
    found = []
    for index in range(BATCH):
        sides = torch.tensor([0.12, 0.3, 0.6]) + torch.tensor([0.05, 0.05, 0.1]) * index
        wh = (sides * SIZE).unsqueeze(1).expand(3, 2)
        xy = torch.rand(3, 2, generator=generator) * (SIZE - wh)
        xy[2] = torch.tensor([index % 2, index // 2]) * (SIZE - wh[2])  # corner `index`
        target = {
            "boxes": torch.cat([xy, xy + wh], 1),
            "labels": torch.randint(1, 3, (3,), generator=generator),
        }
        if masks:
            target["masks"] = torch.zeros(3, SIZE, SIZE, dtype=torch.uint8)
            for box, (x0, y0, x1, y1) in enumerate(target["boxes"].long().tolist()):
                target["masks"][box, y0:y1, x0:x1] = 1
        found.append(target)
    return found


def detection_inputs(masks: bool = False) -> Tuple[Images, Targets]:
    generator = torch.Generator().manual_seed(6)
    pictures = [torch.rand(3, SIZE, SIZE, generator=generator) for _ in range(BATCH)]
    return pictures, detection_targets(masks)


SMALL = dict(weights=None, weights_backbone=None, num_classes=3)
RESIZE = dict(min_size=SIZE, max_size=SIZE)


def fasterrcnn_mobilenet() -> nn.Module:
    from torchvision.models import detection

    return detection.fasterrcnn_mobilenet_v3_large_320_fpn(**SMALL, **RESIZE)


def ssdlite() -> nn.Module:
    from torchvision.models import detection

    return detection.ssdlite320_mobilenet_v3_large(**SMALL)


#: The regions the box (and mask) heads see: in training, 16 sampled per image rather than
#: torchvision's 512, which on these 64 x 64 images are nearly every proposal (the mask head's
#: four convolutions run on each positive one, a quarter: about 0.5 GFLOP a region, which made
#: a training pass of Mask R-CNN cost 6 s here); in eval mode, the 100 best proposals per image
#: rather than 1,000 (the box head's first layer: 26 MFLOP a region). The same sampling, heads
#: and post-processing run, on fewer regions.
SAMPLED = dict(box_batch_size_per_image=16, rpn_post_nms_top_n_test=100)


def fasterrcnn_resnet50() -> nn.Module:
    from torchvision.models import detection

    return detection.fasterrcnn_resnet50_fpn(
        **SMALL, **RESIZE, **SAMPLED, box_detections_per_img=20
    )


def retinanet_resnet50() -> nn.Module:
    """Its score threshold lowered: at initialisation every score is about 0.01."""
    from torchvision.models import detection

    return detection.retinanet_resnet50_fpn(
        **SMALL, **RESIZE, score_thresh=0.005, detections_per_img=20
    )


def maskrcnn_resnet50() -> nn.Module:
    from torchvision.models import detection

    return detection.maskrcnn_resnet50_fpn(**SMALL, **RESIZE, **SAMPLED, box_detections_per_img=4)


def lraspp() -> nn.Module:
    from torchvision.models import segmentation

    return segmentation.lraspp_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=3
    )


def detection_case(model: Callable[[], nn.Module], masks: bool = False, once: bool = False) -> type:
    """The detection model ``model`` builds, on detection inputs; built in every setUp, or
    ``once`` and assigned in every setUp (``make_model`` builds a fresh one either way)."""
    if not once:
        return list_case(model, lambda: detection_inputs(masks))
    built = built_under_seed(model)  # (unseeded, its skips depended on the tests run before)
    return list_case(lambda: built, lambda: detection_inputs(masks), make_model=model)


class PlatformCase(CheckTestCase):
    def assertPassesOnPlatform(self, case: type) -> None:
        """Every check passes; the only skips are a GPU's, the platform's (PLATFORM_SKIPS) and
        the opt-in reference checks' until their option is set (UNSET_REFERENCES)."""
        for name in checks_of(case):
            with self.subTest(check=name):
                outcome = run_check(case, name)
                self.assertEqual((outcome.failures, outcome.errors), ([], []))
                allowed = PLATFORM_SKIPS.get(name, ())
                unexpected = [
                    reason
                    for reason in outcome.skips
                    if not reason.startswith((NO_GPU, *UNSET_REFERENCES))
                    and not any(a in reason for a in allowed)
                ]
                self.assertEqual(unexpected, [])


@unittest.skipUnless(HAS_TORCHVISION, "needs torchvision: pip install -e '.[zoo]'")
class TorchvisionModels(PlatformCase):
    @pytest.mark.slow  # (.ci/run's slow step) the same model as test_zoo_design's detection run
    def test_fasterrcnn_mobilenet(self) -> None:
        self.assertPassesOnPlatform(detection_case(fasterrcnn_mobilenet))

    def test_images_of_two_orientations_are_padded_by_design(self) -> None:
        def inputs() -> Tuple[Images, Targets]:
            pictures, found = detection_inputs()
            return [p if i % 2 else p[:, :, : SIZE // 2] for i, p in enumerate(pictures)], [
                dict(t, boxes=t["boxes"] / 2) for t in found
            ]

        outcome = run_check(list_case(fasterrcnn_mobilenet, inputs), "test_batch_independence")
        self.assertEqual((outcome.failures, outcome.errors), ([], []))
        self.assertTrue(outcome.skips)
        for reason in outcome.skips:
            self.assertIn("changes with the shapes of the other samples of the batch", reason)

    def test_a_segmentation_model_on_a_tensor_batch(self) -> None:
        def set_up(self: Any) -> None:
            self.model = lraspp()
            self.inputs = torch.rand(BATCH, 3, SIZE, SIZE)
            self.expected_output_shape = (BATCH, 3, SIZE, SIZE)  # output["out"]
            self.make_model = lraspp

        case = make_case(ModelTests, set_up)
        for name in checks_of(case):
            with self.subTest(check=name):
                self.assertPasses(case, name)


@pytest.mark.slow
@unittest.skipUnless(HAS_TORCHVISION, "needs torchvision: pip install -e '.[zoo]'")
class TorchvisionLargerModels(PlatformCase):
    """SSDlite (its fixed 320x320 resize) and the detection models with a ResNet-50 backbone
    (40M parameters), each built once and assigned in every setUp, the other way users write
    it (the models above are built in every setUp): about a minute together. (Built in every
    setUp, they share no pass between the checks: the first forward pass of each sets
    attributes of its RoI pooling, a change of state that the shared passes refuse.)"""

    def test_ssdlite(self) -> None:  # resizes every image to 320x320
        self.assertPassesOnPlatform(detection_case(ssdlite, once=True))

    def test_fasterrcnn_resnet50(self) -> None:
        self.assertPassesOnPlatform(detection_case(fasterrcnn_resnet50, once=True))

    def test_retinanet_resnet50(self) -> None:
        self.assertPassesOnPlatform(detection_case(retinanet_resnet50, once=True))

    def test_maskrcnn_resnet50(self) -> None:
        self.assertPassesOnPlatform(detection_case(maskrcnn_resnet50, masks=True, once=True))
