"""The reference checks: test_reference_outputs and test_reference_losses compare with a file
written once (never in CI, a missing one fails with the command that writes it), whatever the
seed or the initialisation; test_reference_model compares with another implementation.

Each check passes on a correct component and fails, with its message, on a broken one.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import os
import shutil
import tempfile
import textwrap
import unittest
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
from checkrunner import CheckTestCase, make_case, run_check
from torch import nn

from dltestkit import ContractError, ModelTests, TrainerTests
from dltestkit.__main__ import main as dltestkit_main
from dltestkit.core import references

FOLDER = Path(tempfile.mkdtemp(prefix="dltestkit-test-references-"))
atexit.register(shutil.rmtree, FOLDER, ignore_errors=True)  # (unittest's module cleanups are
# global: the runner of write-references, run inside a test here, would run them early)


@contextlib.contextmanager
def environment(**variables: Optional[str]) -> Iterator[None]:
    """Set (or, with None, unset) environment variables for a block; CI unset by default."""
    names = {*variables, *references.CI_VARIABLES}
    saved = {name: os.environ.get(name) for name in names}
    for name in references.CI_VARIABLES:
        os.environ.pop(name, None)
    for name, value in variables.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def writing() -> "contextlib.AbstractContextManager[None]":
    return environment(DLTESTKIT_WRITE_REFERENCES="1")


def reading() -> "contextlib.AbstractContextManager[None]":
    return environment(DLTESTKIT_WRITE_REFERENCES=None)


# -- models ---------------------------------------------------------------------------------
class Net(nn.Module):
    def __init__(self, activation: Any = torch.tanh, dropout: float = 0.0) -> None:
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 3)
        self.drop = nn.Dropout(dropout)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        hidden = self.activation(self.a(x))
        return {"logits": self.b(self.drop(hidden)), "hidden": hidden}


class Relu(Net):  # the bug: another activation
    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__(torch.relu, dropout)


class Nudged(Net):  # a change of the size of rounding
    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        out = super().forward(x)
        return {"logits": out["logits"] * (1 + 2e-6), "hidden": out["hidden"]}


class Deeper(Net):  # another architecture
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Linear(3, 3)


class GradientScaled(Net):
    """The same outputs, other gradients: a straight-through term scales them by 1.5."""

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        out = super().forward(x)
        hidden = out["hidden"]
        half = hidden * 0.5
        hidden = hidden + (half - half.detach())
        return {"logits": self.b(self.drop(hidden)), "hidden": out["hidden"]}


class NumpyMasked(Net):
    """Masks its inputs in training with NumPy's generator, as wav2vec2 masks its features."""

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        if self.training:
            x = x * torch.from_numpy(np.random.rand(*x.shape) > 0.3).to(x.dtype)
        return super().forward(x)


class Reseeds(Net):
    """Draws its dropout after torch.seed() in training mode (as the reversible layers of
    transformers' Reformer do): no seed fixes its training-mode outputs."""

    def __init__(self) -> None:
        super().__init__(dropout=0.5)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        if self.training:
            torch.seed()
        return super().forward(x)


_CALLS = [0]


class CountsCallsGlobally(Net):
    """Adds how often it has been called, kept in a module-level list: state that changes
    from call to call, outside the model (a copy does not reset it)."""

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        _CALLS[0] += 1
        out = super().forward(x)
        return {"logits": out["logits"] + _CALLS[0], "hidden": out["hidden"]}


class PositiveScale(nn.Module):
    """Scales whose square roots are taken: negative values give NaN."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.rand(6, 100) + 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.scale.sqrt()


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.head = nn.Linear(8, 20, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(ids)))


def model_case(build: Any, name: Optional[str], **attributes: Any) -> type:
    def set_up(self: Any) -> None:
        self.model = build()
        self.inputs = torch.randn(4, 6)
        if name is not None:
            self.reference_file = str(FOLDER / name)
        for key, value in attributes.items():
            setattr(self, key, value)

    return make_case(ModelTests, set_up)


class ReferenceOutputs(CheckTestCase):
    CHECK = "test_reference_outputs"

    def write(self, case: type) -> str:
        with writing():
            outcome = run_check(case, self.CHECK)
        self.assertEqual((outcome.failures, outcome.errors), ([], []))
        self.assertTrue(outcome.skips and outcome.skips[0].startswith("wrote the reference"))
        return outcome.skips[0]

    def test_a_missing_file_fails_with_the_command_that_writes_it(self) -> None:
        with reading():
            text = self.assertFailsWith(
                model_case(Net, "missing.safetensors"),
                self.CHECK,
                "missing.safetensors does not exist",
                "python -m dltestkit write-references ",
                "checkrunner.py::Case::test_reference_outputs",
            )
        self.assertFalse((FOLDER / "missing.safetensors").exists())
        self.assertIn("DLTESTKIT_WRITE_REFERENCES=1", text)

    def test_it_writes_then_passes_whatever_the_seed_and_fails_on_another_activation(
        self,
    ) -> None:
        self.write(model_case(Net, "net.safetensors"))
        self.assertLess((FOLDER / "net.safetensors").stat().st_size, 20_000)
        with reading():
            self.assertPasses(model_case(Net, "net.safetensors"), self.CHECK)
            other_seed = model_case(Net, "net.safetensors")
            other_seed.seed = 12345  # another initialisation and other inputs
            self.assertPasses(other_seed, self.CHECK)
            self.assertFailsWith(
                model_case(Relu, "net.safetensors"),
                self.CHECK,
                "output['logits'] in eval mode differs from the reference net.safetensors (2 of 2",
                "values differ beyond rtol=0.0001, atol=1e-05; the greatest difference is ",
                ", at position (",
                f"written by torch {torch.__version__}",
                f"read by torch {torch.__version__}",
                "rewrite the reference and commit it:\n    python -m dltestkit write-references",
            )

    def test_seeds_at_the_ends_of_the_range_write_and_read(self) -> None:
        for seed in (2**64 - 1, -1):
            with self.subTest(seed=seed):
                case = model_case(Net, f"seed{seed}.safetensors", reference_gradients=True)
                case.seed = seed
                self.write(case)
                with reading():
                    self.assertPasses(case, self.CHECK)

    def test_never_written_in_ci(self) -> None:
        with environment(DLTESTKIT_WRITE_REFERENCES="1", CI="true"):
            self.assertFailsWith(
                model_case(Net, "ci.safetensors"),
                self.CHECK,
                "DLTESTKIT_WRITE_REFERENCES is set, but so is CI: references are never written",
            )
        with environment(CI="true"):
            self.assertFailsWith(
                model_case(Net, "ci.safetensors"),
                self.CHECK,
                "(CI is set: references are never written in CI.)",
            )
        self.assertFalse((FOLDER / "ci.safetensors").exists())

    def test_a_changed_architecture_or_call_fails_naming_it(self) -> None:
        self.write(model_case(Net, "arch.safetensors"))
        with reading():
            self.assertFailsWith(
                model_case(Deeper, "arch.safetensors"),
                self.CHECK,
                "the model's state dict does not match the reference arch.safetensors's: new "
                "tensors c.weight, c.bias",
            )
            called = model_case(Net, "arch.safetensors", inputs=(torch.randn(4, 6),))
            self.assertFailsWith(
                called,
                self.CHECK,
                "self.inputs is not called as when the reference arch.safetensors was written: "
                "its tensors are now self.inputs[0] (4, 6), then self.inputs (4, 6)",
            )

    def test_gradients_are_compared_when_asked_for(self) -> None:
        self.write(model_case(Net, "grads.safetensors", reference_gradients=True))
        with reading():
            self.assertPasses(model_case(Net, "grads.safetensors"), self.CHECK)
            self.assertFailsWith(
                model_case(GradientScaled, "grads.safetensors"),
                self.CHECK,
                "the gradient of a.weight in training mode differs from the reference",
            )
        self.write(model_case(Net, "no-grads.safetensors"))
        with reading():
            self.assertFailsWith(
                model_case(Net, "no-grads.safetensors", reference_gradients=True),
                self.CHECK,
                "self.reference_gradients is True, but the reference no-grads.safetensors holds "
                "no gradients",
            )

    def test_random_training_outputs_are_compared_while_the_random_streams_agree(self) -> None:
        dropout = lambda: Net(dropout=0.5)  # noqa: E731
        self.write(model_case(dropout, "dropout.safetensors"))
        with reading():
            self.assertPasses(model_case(dropout, "dropout.safetensors"), self.CHECK)
            self.assertFailsWith(
                model_case(lambda: Net(dropout=0.3), "dropout.safetensors"),
                self.CHECK,
                "output['logits'] in training mode differs",
            )
        path = FOLDER / "dropout.safetensors"
        data = path.read_bytes()
        tensors = safetensors.torch.load(data)
        tensors["random/dropout"] = 1 - tensors["random/dropout"]  # another torch's masks
        header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
        safetensors.torch.save_file(tensors, path, metadata=header["__metadata__"])
        with reading():
            outcome = run_check(model_case(dropout, "dropout.safetensors"), self.CHECK)
        self.assertEqual((outcome.failures, outcome.errors), ([], []))
        self.assertEqual(len(outcome.skips), 1)  # the training part; eval is compared
        self.assertIn(
            "the training-mode outputs depend on random numbers (dropout, sampling), and "
            "torch.dropout draws other numbers under one seed here",
            outcome.skips[0],
        )

    def test_a_mode_that_reseeds_torch_has_no_reference_and_says_why(self) -> None:
        unseeded = (
            "in training mode two fresh copies of the model give other outputs under one seed"
        )
        with writing():
            outcome = run_check(model_case(Reseeds, "reseeds.safetensors"), self.CHECK)
        self.assertEqual((outcome.failures, outcome.errors), ([], []))
        self.assertIn(unseeded, outcome.skips[0])
        self.assertIn("torch.seed(), which reseeds from the operating system", outcome.skips[0])
        self.assertIn("eval mode was written", outcome.skips[0])
        self.assertTrue(outcome.skips[-1].startswith("wrote the reference"))
        with reading():
            self.assertPasses(
                model_case(Reseeds, "reseeds.safetensors"), self.CHECK, allowed_skips=(unseeded,)
            )
            # eval mode is still compared: another activation fails
            self.assertFailsWith(
                model_case(lambda: Relu(dropout=0.5), "reseeds.safetensors"),
                self.CHECK,
                "output['logits'] in eval mode differs",
            )

    def test_a_scripted_model_with_dropout_writes_and_passes(self) -> None:
        scripted = lambda: torch.jit.script(Net(dropout=0.5))  # noqa: E731
        self.write(model_case(scripted, "scripted.safetensors"))
        with reading():
            self.assertPasses(model_case(scripted, "scripted.safetensors"), self.CHECK)

    def test_outputs_that_change_from_call_to_call_without_a_reseeding_fail(self) -> None:
        with writing():
            self.assertFailsWith(
                model_case(CountsCallsGlobally, "counts.safetensors"),
                self.CHECK,
                "The reference was just written, and the model run again on its weights and "
                "inputs under the same seed computes something else",
            )

    def test_numpy_randomness_is_seeded_too(self) -> None:
        self.write(model_case(NumpyMasked, "numpy.safetensors", reference_gradients=True))
        with reading():
            self.assertPasses(model_case(NumpyMasked, "numpy.safetensors"), self.CHECK)

    def test_drawn_weights_keep_the_file_small_and_refuse_weights_that_need_structure(
        self,
    ) -> None:
        big = lambda: nn.Sequential(nn.Linear(6, 512), nn.Tanh(), nn.Linear(512, 3))  # noqa: E731
        self.write(model_case(big, "drawn.safetensors", reference_weights="drawn"))
        self.assertLess((FOLDER / "drawn.safetensors").stat().st_size, 16_000)
        with reading():
            self.assertPasses(model_case(big, "drawn.safetensors"), self.CHECK)
        with writing():
            self.assertFailsWith(
                model_case(PositiveScale, "positive.safetensors", reference_weights="drawn"),
                self.CHECK,
                "has NaN or Inf values, which the model's own weights do not give",
                "Set reference_weights = 'stored'",
            )

    def test_tolerances_follow_the_dtype_and_the_options(self) -> None:
        self.write(model_case(Net, "tolerance.safetensors"))
        with reading():
            self.assertPasses(model_case(Nudged, "tolerance.safetensors"), self.CHECK)
            exact = model_case(
                Nudged, "tolerance.safetensors", reference_rtol=0.0, reference_atol=0.0
            )
            self.assertFailsWith(exact, self.CHECK, "beyond rtol=0, atol=0")
        self.assertEqual(references.tolerance(torch.float64), (1e-7, 1e-7))
        self.assertEqual(references.tolerance(torch.bfloat16), (1.6e-2, 1e-3))
        self.assertEqual(references.tolerance(torch.int64), (0.0, 0.0))

    def test_tied_weights_are_stored_once_and_a_damaged_file_fails(self) -> None:
        case = model_case(TiedLM, "tied.safetensors", inputs=torch.randint(0, 20, (4, 5)))
        self.write(case)
        stored = references.read(FOLDER / "tied.safetensors")
        self.assertEqual(stored.meta["aliases"], {"head.weight": "embed.weight"})
        with reading():
            self.assertPasses(case, self.CHECK)
        (FOLDER / "damaged.safetensors").write_bytes(b"not a reference")
        with reading():
            self.assertFailsWith(
                model_case(Net, "damaged.safetensors"), self.CHECK, "cannot be read"
            )

    def test_the_checks_leave_the_model_its_modes_and_its_inputs_as_they_were(self) -> None:
        model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Dropout(0.3), nn.Linear(8, 3))
        model[1].train(False)
        inputs = torch.randn(4, 6)
        saved = [inputs.clone(), {k: v.clone() for k, v in model.state_dict().items()}]
        modes = [m.training for m in model.modules()]

        def set_up(self: Any) -> None:
            self.model, self.inputs = model, inputs
            self.reference_file = str(FOLDER / "unchanged.safetensors")
            self.reference_gradients = True
            self.reference_weights = "drawn"
            self.reference_model = lambda: model

        case = make_case(ModelTests, set_up)
        self.write(case)
        with reading():
            self.assertPasses(case, self.CHECK)
        self.assertPasses(case, "test_reference_model")
        self.assertEqual([m.training for m in model.modules()], modes)
        for key, value in model.state_dict().items():
            self.assertTrue(torch.equal(value, saved[1][key]), key)
        self.assertTrue(all(p.grad is None for p in model.parameters()))
        self.assertTrue(torch.equal(inputs, saved[0]))

    def test_it_skips_naming_the_option_when_no_file_is_set(self) -> None:
        self.assertSkipsWith(
            model_case(Net, None),
            self.CHECK,
            "self.reference_file is not set",
        )


# -- another implementation ------------------------------------------------------------------
class ManualAttention(nn.Module):
    """Self-attention written out, or with F.scaled_dot_product_attention."""

    def __init__(self, fused: bool = False, scale: Optional[float] = None, p: float = 0.0):
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.fused, self.scale, self.p = fused, scale, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        if self.fused:
            p = self.p if self.training else 0.0
            return F.scaled_dot_product_attention(q, k, v, dropout_p=p, scale=self.scale)
        weights = (q @ k.transpose(-1, -2) * (self.scale or 8**-0.5)).softmax(-1)
        if self.training and self.p:  # dropout by hand: other random numbers than SDPA's
            weights = weights * (torch.rand_like(weights) >= self.p) / (1 - self.p)
        return weights @ v


def attention_case(model: Any, reference: Any, inputs: Any = lambda: torch.randn(4, 5, 8)) -> type:
    def set_up(self: Any) -> None:
        self.model = model()
        self.inputs = inputs()
        self.reference_model = reference

    return make_case(ModelTests, set_up)


class ReferenceModel(CheckTestCase):
    CHECK = "test_reference_model"

    def test_sdpa_computes_what_eager_attention_computes(self) -> None:
        fused = lambda: ManualAttention(fused=True)  # noqa: E731
        self.assertPasses(attention_case(fused, ManualAttention()), self.CHECK)
        self.assertPasses(attention_case(fused, lambda: ManualAttention()), self.CHECK)

    def test_a_model_whose_eval_backward_refuses_compares_its_eval_outputs_only(self) -> None:
        from test_model_checks import SHAPE, BackwardInTrainingOnly

        def case(reference: Any) -> type:
            return attention_case(
                BackwardInTrainingOnly, reference, inputs=lambda: torch.randn(4, *SHAPE)
            )

        refused = (
            "test_reference_model compares the gradients in eval mode too, and no gradient "
            "can be taken through the model's eval-mode forward pass: the model's own "
            "backward code raises AssertionError"
        )
        self.assertSkipsWith(case(BackwardInTrainingOnly()), self.CHECK, refused)
        self.assertPasses(case(BackwardInTrainingOnly()), self.CHECK, allowed_skips=(refused,))

        class Doubled(BackwardInTrainingOnly):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return 2 * super().forward(x)

        self.assertFailsWith(case(Doubled()), self.CHECK, "in eval mode, output differs")

    def test_another_scale_fails_naming_the_output(self) -> None:
        self.assertFailsWith(
            attention_case(lambda: ManualAttention(fused=True, scale=1.0), ManualAttention()),
            self.CHECK,
            "in eval mode, output differs from the reference model's (ManualAttention): ",
            "values differ beyond rtol=0.0001, atol=1e-05; the greatest difference is ",
            "in the reference model. Both ran on self.inputs with the same weights",
        )

    def test_gradients_that_differ_fail_naming_the_parameter(self) -> None:
        self.assertFailsWith(
            attention_case(GradientScaled, Net(), inputs=lambda: torch.randn(4, 6)),
            self.CHECK,
            "in eval mode, the outputs agree with the reference model's (Net), but the gradient "
            "of a.weight differs",
        )

    def test_dropout_drawn_differently_skips_the_training_part(self) -> None:
        case = attention_case(
            lambda: ManualAttention(fused=True, p=0.5), lambda: ManualAttention(p=0.5)
        )
        outcome = run_check(case, self.CHECK)
        self.assertEqual((outcome.failures, outcome.errors), ([], []))
        self.assertEqual(len(outcome.skips), 1)
        self.assertIn(
            "in training mode the model draws random numbers (torch.scaled_dot_product_attention",
            outcome.skips[0],
        )
        self.assertIn("Set the dropout probabilities to 0 in both", outcome.skips[0])

    def test_a_reference_that_cannot_take_the_weights_is_a_contract_error(self) -> None:
        self.assertErrorsWith(
            attention_case(Net, Deeper(), inputs=lambda: torch.randn(4, 6)),
            self.CHECK,
            "ContractError",
            "whose state dict has other names or shapes than the model's (only the model has "
            "none; only the reference has c.weight, c.bias)",
        )


# -- trainers -------------------------------------------------------------------------------
class Writer:
    def add_scalar(self, tag: str, scalar_value: float, global_step: int = 0) -> None:
        pass


class TinyTrainer:
    """Fits a linear model to fixed data with SGD, logging its loss each step."""

    lr = 0.1

    def __init__(self, data: Optional[torch.Tensor] = None) -> None:
        self.model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=self.lr)
        self.data = torch.linspace(-1, 1, 24).view(8, 3) if data is None else data
        self.target = self.data.sum(1, keepdim=True)
        self.summary = Writer()
        self.step = 0

    def loss(self) -> torch.Tensor:
        return (self.model(self.data) - self.target).pow(2).mean()

    def train(self, epochs: int) -> None:
        for _ in range(epochs * 3):
            loss = self.loss()
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            self.summary.add_scalar("train/loss", loss.item(), self.step)
            self.step += 1

    def eval(self) -> float:
        with torch.no_grad():
            return float(self.loss())


class FasterTrainer(TinyTrainer):
    lr = 0.2  # the bug: another learning rate


def trainer_case(build: Any, name: str, **attributes: Any) -> type:
    def set_up(self: Any) -> None:
        self.make_trainer = build
        self.trainer = build()
        self.reference_file = str(FOLDER / name)
        for key, value in attributes.items():
            setattr(self, key, value)

    return make_case(TrainerTests, set_up)


class ReferenceLosses(CheckTestCase):
    CHECK = "test_reference_losses"

    def test_it_writes_then_passes_and_fails_on_another_learning_rate(self) -> None:
        with writing():
            self.assertSkipsWith(
                trainer_case(TinyTrainer, "trainer.safetensors"), self.CHECK, "wrote the reference"
            )
        with reading():
            self.assertPasses(trainer_case(TinyTrainer, "trainer.safetensors"), self.CHECK)
            self.assertFailsWith(
                trainer_case(FasterTrainer, "trainer.safetensors"),
                self.CHECK,
                "started from the weights of the reference trainer.safetensors, does not compute "
                "what the reference holds: 'train/loss' at step 1 is ",
                "in the reference (difference ",
                f"written by torch {torch.__version__}",
            )
            self.assertFailsWith(
                trainer_case(TinyTrainer, "absent.safetensors"),
                self.CHECK,
                "absent.safetensors does not exist",
                "::Case::test_reference_losses",
            )

    def test_other_data_skip_unless_strict(self) -> None:
        with writing():
            run_check(trainer_case(TinyTrainer, "data.safetensors"), self.CHECK)
        other = lambda: TinyTrainer(torch.linspace(-2, 2, 24).view(8, 3))  # noqa: E731
        with reading():
            self.assertSkipsWith(
                trainer_case(other, "data.safetensors"),
                self.CHECK,
                "the first batch the model sees in one epoch of a fresh trainer differs from the "
                "one the reference data.safetensors was written with (tensor 0: ",
                "Set strict_reference_data = True to make this a failure",
            )
            self.assertFailsWith(
                trainer_case(other, "data.safetensors", strict_reference_data=True),
                self.CHECK,
                "self.strict_reference_data is True",
            )


# -- the command ----------------------------------------------------------------------------
class WriteReferencesCommand(unittest.TestCase):
    def test_it_writes_the_references_of_a_test_file_and_refuses_in_ci(self) -> None:
        folder = Path(tempfile.mkdtemp(prefix="dltestkit-cli-", dir=FOLDER))
        test_file = folder / "test_cli_written.py"
        test_file.write_text(
            textwrap.dedent(
                """
                import unittest
                import torch
                from dltestkit import ModelTests

                class TestLinear(ModelTests, unittest.TestCase):
                    def setUp(self):
                        self.model = torch.nn.Linear(3, 2)
                        self.inputs = torch.randn(4, 3)
                        self.reference_file = "references/linear.safetensors"
                """
            ),
            encoding="utf-8",
        )
        with environment(CI="1"), contextlib.redirect_stderr(io.StringIO()):
            self.assertEqual(dltestkit_main(["write-references", f"{test_file}::TestLinear"]), 2)
        self.assertFalse((folder / "references").exists())
        printed = io.StringIO()
        with environment(), contextlib.redirect_stderr(io.StringIO()):
            with contextlib.redirect_stdout(printed):
                status = dltestkit_main(["write-references", f"{test_file}::TestLinear"])
            self.assertNotIn("DLTESTKIT_WRITE_REFERENCES", os.environ)
        self.assertEqual(status, 0, printed.getvalue())
        self.assertTrue(
            (folder / "references" / "linear.safetensors").is_file(), printed.getvalue()
        )
        self.assertIn("1 reference file(s) written:", printed.getvalue())


class ContractOfTheOptions(unittest.TestCase):
    def test_a_bad_weights_mode_is_a_contract_error(self) -> None:
        outcome = run_check(
            model_case(Net, "x", reference_weights="saved"), "test_reference_outputs"
        )
        self.assertIn("is 'saved', not one of 'stored', 'drawn'", "".join(outcome.errors))
        self.assertTrue(issubclass(ContractError, TypeError))


if __name__ == "__main__":
    unittest.main()
