"""The reference checks on the zoos of correct components (tests/test_zoo.py,
tests/test_zoo_design.py): no false alarm.

For every component, test_reference_outputs writes its reference (with gradients) and then
passes against it, also under another seed (another initialisation and other inputs: the file's
are used) and with weights drawn from their statistics; test_reference_model passes with a
fresh model of the same architecture as the reference (it gets the model's weights). Sampling
VAEs, ViTMAE's random masking, BatchNorm, spectral norm, quantisation observers, mixtures of
experts, detection models with lists of images and targets are among them.

The whole zoo, with both ways of holding the weights, runs when DLTESTKIT_ZOO_EXTENDED is set
(several minutes); the default run takes a sample of the families whose state or randomness
could trouble a reference. Needs the ``zoo`` extra.
"""

from __future__ import annotations

import os
import tempfile
import unittest
from pathlib import Path
from typing import Any, Dict, Tuple

from checkrunner import NO_GPU, SEED, CheckTestCase, make_case, run_check
from test_references import environment
from test_zoo import MISSING, ZOO
from test_zoo_design import DESIGN_ZOO, DETECTION, quiet_transformers

Case = Tuple[type, Dict[str, Any], Tuple[str, ...]]
EXTENDED = bool(os.environ.get("DLTESTKIT_ZOO_EXTENDED"))
#: transformers' Reformer: its eval-mode pass cannot be differentiated (its reversible layers
#: assert training mode in their backward pass), and its training mode reseeds torch's
#: generator (torch.seed()), so that no seed fixes it: the parts it skips, saying so.
REFORMER = "transformers Reformer, reversible layers and LSH attention"
REFORMER_PARTS = {
    "test_reference_outputs": (
        "the gradients of the reference file are taken in eval mode (the model draws random "
        "numbers in training mode), and no gradient",
        "in training mode two fresh copies of the model give other outputs under one seed",
    ),
    "test_reference_model": (
        "test_reference_model compares the gradients in eval mode too, and no gradient",
        "in training mode the model draws random numbers",
    ),
}


#: transformers' RWKV updates its state in place in its eval-mode pass, so that no gradient can
#: be taken through it: the gradient part of the comparison in eval mode, which it skips.
RWKV = "transformers RWKV, causal LM (its state updated in place at evaluation)"
RWKV_PARTS = {
    "test_reference_outputs": (),
    "test_reference_model": (
        "test_reference_model compares the gradients in eval mode too, and no gradient",
    ),
}


def allowed(label: str, check: str) -> Tuple[str, ...]:
    """The parts of ``check`` that component ``label`` may skip."""
    return {REFORMER: REFORMER_PARTS, RWKV: RWKV_PARTS}.get(label, {}).get(check, ())


#: The default run: one or two of each family (a sampling VAE, random masking, BatchNorm, MoE,
#: encoder-decoder, LoRA, detection, PyTorch's sequence layers, gradient checkpointing).
SAMPLE = (
    "PyTorch examples/vae VAE (samples in both modes)",
    "transformers ViTMAE (random masking in every mode)",
    "BatchNorm2d and BatchNorm1d CNN",
    "torchvision DenseNet, memory-efficient (checkpointed BatchNorm)",
    "spectral-norm GAN discriminator",
    "transformers T5, encoder-decoder",
    "nn.TransformerEncoder, causal mask",
)
#: How the weights are held: both in the extended run, the default in the quick one.
WEIGHTS = ("stored", "drawn") if EXTENDED else ("stored",)


def cases() -> Dict[str, Case]:
    every = {**ZOO, **DESIGN_ZOO}
    if EXTENDED:
        return {**every, **DETECTION}
    return {label: case for label, case in every.items() if label in SAMPLE}


def reference_case(mixin: type, attributes: Dict[str, Any], **extra: Any) -> type:
    def set_up(self: Any) -> None:
        for name, value in {**attributes, **extra}.items():
            setattr(self, name, value() if name in ("model", "inputs") else value)

    return make_case(mixin, set_up)


@unittest.skipIf(MISSING, f"needs {', '.join(MISSING)}: pip install -e '.[zoo]'")
class ZooReferences(CheckTestCase):
    def setUp(self) -> None:
        quiet_transformers()
        self.folder = Path(tempfile.mkdtemp(prefix="dltestkit-zoo-references-"))
        self.addCleanup(__import__("shutil").rmtree, self.folder, ignore_errors=True)

    def test_every_component_passes_against_its_own_reference(self) -> None:
        chosen = cases()
        self.assertTrue(EXTENDED or len(chosen) == len(SAMPLE), sorted(chosen))
        for label, (mixin, attributes, _) in chosen.items():
            for weights in WEIGHTS:
                with self.subTest(label, weights=weights):
                    file = str(self.folder / f"{len(os.listdir(self.folder))}.safetensors")
                    options = dict(
                        reference_file=file, reference_gradients=True, reference_weights=weights
                    )
                    case = reference_case(mixin, attributes, **options)
                    with environment(DLTESTKIT_WRITE_REFERENCES="1"):
                        written = run_check(case, "test_reference_outputs")
                    self.assertEqual((written.failures, written.errors), ([], []))
                    # (after the parts skipped, as a training mode that the seed cannot fix)
                    self.assertTrue(
                        any(skip.startswith("wrote the reference") for skip in written.skips)
                    )
                    with environment():
                        parts = allowed(label, "test_reference_outputs")
                        self.assertPasses(case, "test_reference_outputs", allowed_skips=parts)
                        case.seed = SEED + 1  # another initialisation, other inputs
                        self.assertPasses(case, "test_reference_outputs", allowed_skips=parts)

    def test_a_lightning_trainer_passes_against_its_own_reference(self) -> None:
        try:
            from test_lightning import lightning_case
        except unittest.SkipTest as skip:
            self.skipTest(str(skip))
        case = lightning_case(reference_file=str(self.folder / "lightning.safetensors"))
        with environment(DLTESTKIT_WRITE_REFERENCES="1"):
            self.assertSkipsWith(case, "test_reference_losses", "wrote the reference")
        with environment():
            self.assertPasses(case, "test_reference_losses", allowed_skips=())
            case.seed = SEED + 1
            self.assertPasses(case, "test_reference_losses", allowed_skips=())

    def test_every_component_computes_what_a_copy_of_itself_computes(self) -> None:
        for label, (mixin, attributes, _) in cases().items():
            with self.subTest(label):
                case = reference_case(mixin, attributes, reference_model=attributes["model"])
                parts = (NO_GPU, *allowed(label, "test_reference_model"))
                self.assertPasses(case, "test_reference_model", allowed_skips=parts)


if __name__ == "__main__":
    unittest.main()
