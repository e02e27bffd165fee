"""TrainingStackTests and ExportTests on the zoo of correct third-party components
(tests/test_zoo.py, tests/test_zoo_design.py): no false alarm, and every skip for a reason the
docs give.

Each component runs with the setUp its zoo gives it. A check passes, or skips (or skips a part)
for one of the reasons listed below: a feature the component does not have (no images for
channels_last, no switch for activation checkpointing), a limit of the platform or of
torch.compile (an operation without a bfloat16 kernel here, an nn.GRU that torch.compile leaves
to eager PyTorch), a design the check reports (graph breaks, inputs that must be contiguous).
What fails is listed with the reason it is a true finding (a mixture of experts that crashes
under autocast).

A skip's reason is matched anywhere in it, as most begin with the model's name.

The default run checks every check on a sample of each family; the slow run (``-m slow``)
more designs each check skips or reports (a minute); ``DLTESTKIT_ZOO_EXTENDED=1`` every
component, on the seed ``DLTESTKIT_TEST_SEED``
(``python tests/test_model_stack_zoo.py --seeds 0 1 2``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import unittest
from pathlib import Path
from typing import Any, Dict, Iterable, Sequence, Tuple

import pytest
from checkrunner import NO_GPU, CheckTestCase, make_case, run_check
from test_zoo import MISSING, ZOO
from test_zoo_design import (
    DESIGN_ZOO,
    DETECTION,
    EXTENDED,
    NEWER_ARCHITECTURES,
    quiet_transformers,
)

from dltestkit import ExportTests, TrainingStackTests

NEEDS = f"needs {', '.join(MISSING)}: pip install -e '.[zoo]'"
STACK = (
    "test_compile",
    "test_memory_layouts",
    "test_autocast",
    "test_activation_checkpointing",
)
CHECKS = (*STACK, "test_export")

#: Skips any component may have: a feature it does not have.
NO_IMAGES = "self.inputs holds no 4-d floating-point tensor"
NO_SWITCH = "has no switch for activation checkpointing that dltestkit knows"
GRAPH_BREAKS = "torch.compile breaks the model's graph"
NOTHING_COMPILED = "compiled no graph of the model"
CONTIGUOUS_INPUTS = "raises on an input itself"
USE_CACHE = "pass use_cache=False in self.inputs"
CONTROL_FLOW = "its control flow depends on the values of a tensor"
RANDOM_DRAWS = "which the compiled model does not draw alike"
#: torch 2.14's guards of some exported programs name L[...] (pytorch/pytorch#172903)
GUARDS_BUG = "the check of the input shapes that torch.export adds"
GENERAL = {
    "test_memory_layouts": (NO_IMAGES,),
    "test_activation_checkpointing": (NO_SWITCH,),
    # decoders called with their default use_cache=True return a cache object
    "test_export": (GUARDS_BUG, USE_CACHE),
}

#: Per component and check: the skips it may have, each for its reason.
SKIPS: Dict[str, Dict[str, Tuple[str, ...]]] = {
    # torch.compile leaves nn.LSTM and nn.GRU to eager PyTorch; prepare_qat's observers too
    "nn.LSTM tagger": {
        "test_compile": (NOTHING_COMPILED,),
        # oneDNN's bfloat16 LSTM has no primitive on some CPUs ("could not create a primitive
        # descriptor for the LSTM forward propagation primitive")
        "test_autocast": ("a limit of the platform, not a bug of the model",),
    },
    "nn.GRU": {"test_compile": (NOTHING_COMPILED,)},
    "weight tying (GRU language model)": {"test_compile": (NOTHING_COMPILED,)},
    # graph breaks: listed, the results compared
    "nn.LSTM packed with CPU lengths, padding mask": {
        "test_compile": (GRAPH_BREAKS,),
        # pack_padded_sequence's CPU lengths: torch.export cannot trace torch.zeros(lengths)
        "test_export": ("torch.export raises on the model, at test_zoo.py",),
    },
    "torchvision ViT, zero-initialised head": {"test_compile": (GRAPH_BREAKS,)},
    "transformers BERT, reentrant gradient checkpointing": {"test_compile": (GRAPH_BREAKS,)},
    "transformers GPT-2, called with labels (float32 loss)": {"test_compile": (GRAPH_BREAKS,)},
    # their time masks (NumPy) and LayerDrop in training mode, around graph breaks: the
    # compiled model draws otherwise, which the check names (then eval mode is compared)
    "transformers wav2vec2, raw audio": {"test_compile": (GRAPH_BREAKS, RANDOM_DRAWS)},
    "transformers HuBERT, raw audio": {"test_compile": (GRAPH_BREAKS, RANDOM_DRAWS)},
    "transformers WavLM, raw audio": {"test_compile": (GRAPH_BREAKS, RANDOM_DRAWS)},
    # `logger.warning(` and an iterator over a dict's keys in forward
    "transformers big_bird (encoder)": {"test_compile": (GRAPH_BREAKS,)},
    # checkpointed BatchNorm runs again in the backward pass, updating its statistics twice in
    # eager PyTorch only: set equal before the eval comparison, the count not compared
    "torchvision DenseNet, memory-efficient (checkpointed BatchNorm)": {
        "test_compile": ("runs those layers' forward again in the backward pass",),
    },
    # its layers rescaled on the first eval call (one compilation more); its state updated in
    # place at evaluation, so no eval-mode gradient
    "transformers RWKV, causal LM (its state updated in place at evaluation)": {
        "test_compile": ("compiled the model again at a third batch size (6), once",),
        "test_memory_layouts": ("no gradient can be taken through the model's eval-mode",),
    },
    "transformers Mixtral, called with labels and output_router_logits (aux loss)": {
        "test_compile": (GRAPH_BREAKS,)
    },
    "hand-written top-2 MoE layer with a load-balancing loss": {
        "test_compile": (NOTHING_COMPILED, GRAPH_BREAKS),
        # `if token.numel() == 0: continue`, an expert without tokens skipped
        "test_export": (CONTROL_FLOW,),
    },
    "quantisation-aware training (prepare_qat)": {
        "test_compile": (NOTHING_COMPILED, GRAPH_BREAKS),
        # fused_moving_avg_obs_fake_quant takes float32 only, inside torch's own code
        "test_autocast": ("torch.fused_moving_avg_obs_fake_quant",),
        # its observers resize their buffers in place, which torch.export.load's storage refuses
        "test_export": ("the program saved and loaded raises at batch size",),
    },
    # LSH attention draws random rotations, which the compiled model draws otherwise; its
    # reversible layers refuse an eval-mode backward pass: the layouts' outputs compared only
    "transformers Reformer, reversible layers and LSH attention": {
        "test_compile": (GRAPH_BREAKS, RANDOM_DRAWS),
        "test_memory_layouts": (
            "the comparison runs the model in eval mode (its dropout off), and",
        ),
        "test_export": (CONTROL_FLOW,),
    },
    # `if is_global_attn:` on `.item()` of the global attention mask
    "transformers longformer (encoder)": {
        "test_compile": (GRAPH_BREAKS,),
        "test_export": (CONTROL_FLOW,),
    },
    # models that need contiguous inputs: a .view() of an input
    "PyTorch examples/vae VAE (samples in both modes)": {
        "test_memory_layouts": (CONTIGUOUS_INPUTS,)
    },
    "transformers T5, labels only": {"test_memory_layouts": (CONTIGUOUS_INPUTS,)},
    "transformers BART, labels only": {"test_memory_layouts": (CONTIGUOUS_INPUTS,)},
    # `if hidden_states.shape[0] >= 64:` in its upsampling: exported for up to 63 samples
    "diffusers UNet2DConditionModel (timesteps, cross-attention)": {
        "test_export": ("torch.export makes the batch dimension dynamic only for batch sizes",),
    },
    # torchvision's detection models: lists of images of several sizes
    "torchvision Faster R-CNN MobileNetV3 320 FPN, images and targets": {
        "test_export": ("torch.export takes the length of a list as a constant",),
    },
}

#: Per component and check: what fails, and why it is a true finding.
FINDINGS: Dict[str, Dict[str, Tuple[str, ...]]] = {
    # out.index_add_(..., expert(x)) into a float32 tensor: crashes under autocast, as
    # transformers' Mixtral did before it cast with .to(hidden_states.dtype)
    "hand-written top-2 MoE layer with a load-balancing loss": {
        "test_autocast": ("Tensor.index_add_ in TopKMoE raises, given torch.bfloat16 and "),
    },
    # masked_fill(~mask, torch.finfo(query_layer.dtype).min): the float32 minimum into the
    # bfloat16 scores autocast made
    "transformers deberta (encoder)": {
        "test_autocast": (
            "under torch.autocast('cpu', dtype=torch.bfloat16), Tensor.masked_fill in "
            "encoder.layer.0.attention.self (DisentangledSelfAttention) raises, at "
            "modeling_deberta.py:",
            "value cannot be converted to type c10::BFloat16 without overflow",
        ),
    },
    # its cache object counts the tokens it has seen in a Python int, and a graph break on
    # `.item()` leaves the resumed code specialised on the batch size: compiled anew at every
    # batch size (eval mode, use_cache=True, as transformers calls it by default)
    "transformers Reformer, reversible layers and LSH attention": {
        "test_compile": (
            "torch.compile compiled the model again at a third batch size (6)",
            "`self._seen_tokens += states.shape[-2]`, at modeling_reformer.py:",
        ),
    },
}


def components(*zoos: Dict[str, Any]) -> Dict[str, Tuple[type, Dict[str, Any]]]:
    return {
        label: (mixin, attributes) for zoo in zoos for label, (mixin, attributes, _) in zoo.items()
    }


def stack_case(mixin: type, attributes: Dict[str, Any]) -> type:
    """The component's zoo setUp, with the stack's mixins before its own."""

    def set_up(self: Any) -> None:
        for name, value in attributes.items():
            setattr(self, name, value() if name in ("model", "inputs") else value)

    composed = type("Stack", (TrainingStackTests, ExportTests, mixin), {})
    return make_case(composed, set_up)


def _cheap_sample() -> Dict[str, Any]:
    """A transformers component and three hand-written designs, each cheap to compile."""
    bert = "transformers BERT, reentrant gradient checkpointing"
    design = (
        "BatchNorm2d and BatchNorm1d CNN",
        "PyTorch examples/vae VAE (samples in both modes)",
        "hand-written top-2 MoE layer with a load-balancing loss",
    )
    return components({bert: ZOO[bert]}, {k: DESIGN_ZOO[k] for k in design})


@unittest.skipIf(MISSING, NEEDS)
class StackOnTheZoo(CheckTestCase):
    def setUp(self) -> None:
        quiet_transformers()

    def assertVerdicts(
        self, zoo: Dict[str, Tuple[type, Dict[str, Any]]], checks: Iterable[str]
    ) -> None:
        """Each check passes, skips for an allowed reason, or fails as FINDINGS says."""
        for label, (mixin, attributes) in zoo.items():
            case = stack_case(mixin, attributes)
            for check in checks:
                with self.subTest(label, check=check):
                    expected = FINDINGS.get(label, {}).get(check)
                    if expected is not None:
                        outcome = run_check(case, check)
                        self.assertEqual(outcome.errors, [])
                        self.assertTrue(outcome.failures, f"{check} should fail on {label}")
                        for fragment in expected:
                            self.assertIn(fragment, "\n".join(outcome.failures))
                        continue
                    allowed = (
                        NO_GPU,
                        *GENERAL.get(check, ()),
                        *SKIPS.get(label, {}).get(check, ()),
                    )
                    outcome = run_check(case, check)
                    unexpected = [
                        reason
                        for reason in outcome.skips
                        if not any(fragment in reason for fragment in allowed)
                    ]
                    self.assertEqual(
                        (outcome.failures, outcome.errors, unexpected),
                        ([], [], []),
                        f"{check} should pass on {label}",
                    )

    def test_a_sample_of_each_family_passes_every_check(self) -> None:
        """transformers, timm and hand-written components, with a design each check skips
        (inputs that must be contiguous, control flow on values) and a finding; test_compile,
        the slowest check, on the cheapest of them, in the test below (so that pytest -n 2
        runs the two side by side)."""
        zoo = {**_cheap_sample(), **components({"timm ViT": ZOO["timm ViT"]})}
        self.assertVerdicts(zoo, CHECKS[1:])

    def test_the_cheapest_of_the_sample_compile(self) -> None:
        self.assertVerdicts(_cheap_sample(), ("test_compile",))

    @pytest.mark.slow
    def test_the_designs_each_check_skips_or_reports(self) -> None:
        """Graph breaks, an RNN torch.compile leaves to eager, a cache torch.export cannot
        take apart, and more of each family."""
        labels = (
            "transformers BERT, padding mask",
            "transformers GPT-2, called with labels (float32 loss)",
            "nn.GRU",
            "nn.TransformerEncoder, nested tensors (default), key padding mask",
        )
        design = ("timm ConvNeXt (stochastic depth 0.1, layer scale)",)
        sample = components({k: ZOO[k] for k in labels}, {k: DESIGN_ZOO[k] for k in design})
        self.assertVerdicts(sample, CHECKS)

    @unittest.skipUnless(os.environ.get("DLTESTKIT_ZOO_EXTENDED"), "set DLTESTKIT_ZOO_EXTENDED=1")
    def test_every_component_of_the_zoo(self) -> None:
        self.assertVerdicts(components(ZOO, DESIGN_ZOO, EXTENDED), CHECKS)

    @unittest.skipUnless(os.environ.get("DLTESTKIT_ZOO_EXTENDED"), "set DLTESTKIT_ZOO_EXTENDED=1")
    def test_the_newer_architectures(self) -> None:
        self.assertVerdicts(components(NEWER_ARCHITECTURES), CHECKS)  # (20 minutes)

    @unittest.skipUnless(os.environ.get("DLTESTKIT_ZOO_EXTENDED"), "set DLTESTKIT_ZOO_EXTENDED=1")
    def test_the_detection_models(self) -> None:
        # torch.compile takes minutes on them (a graph per image size): not compiled here
        self.assertVerdicts(
            components(DETECTION),
            (
                "test_memory_layouts",
                "test_autocast",
                "test_activation_checkpointing",
                "test_export",
            ),
        )


def every_seed(seeds: Sequence[int]) -> int:
    """Run this file's extended part once per seed; the number of seeds that failed."""
    failed = 0
    for seed in seeds:
        print(f"--- DLTESTKIT_TEST_SEED={seed}", flush=True)
        command = [
            sys.executable,
            "-m",
            "pytest",
            __file__,
            "-q",
            "-n",
            "0",
            "-m",
            "slow or not slow",
        ]
        environment = {
            **os.environ,
            "DLTESTKIT_TEST_SEED": str(seed),
            "DLTESTKIT_ZOO_EXTENDED": "1",
        }
        failed += (
            subprocess.run(command, env=environment, cwd=Path(__file__).parents[1]).returncode != 0
        )
    return failed


if __name__ == "__main__":
    if sys.argv[1:2] == ["--seeds"]:
        sys.exit(every_seed([int(argument) for argument in sys.argv[2:]]))
    unittest.main()
