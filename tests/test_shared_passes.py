"""The passes the model checks share (dltestkit/models/passes.py): computed once for the checks
of a test class when the model and inputs are the same, whether setUp builds the model once
or for every check; computed again whenever anything the pass depends on differs; never a
stale result."""

from __future__ import annotations

import unittest
from typing import Any, Callable, Dict, List, Optional

import torch
from checkrunner import CheckTestCase, make_case, run_check
from test_model_checks import CountsCalls
from torch import nn

from dltestkit import ModelTests
from dltestkit.models import passes
from dltestkit.models.passes import fingerprint

#: The batch size of every eval-mode pass without gradients that Counted ran.
EVAL_PASSES: List[int] = []
#: A note for every call of the loss functions of SharedTrainingPass.
LOSS_CALLS: List[bool] = []


class Counted(nn.Module):
    """A small model that notes its eval-mode passes without gradients in a global list (so
    that the noting is no state of the model)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.flag = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training and not torch.is_grad_enabled():
            EVAL_PASSES.append(x.shape[0])
        return self.linear(x) * (2.0 if self.flag else 1.0)


class CountsInAnAttribute(Counted):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return super().forward(x) + self.calls


class Recorded:
    """What the two checks of a two-check class got."""

    results: Dict[str, Any] = {}


def two_checks(set_up: Callable[[Any], None], training: bool = False, **attributes: Any) -> type:
    """A ModelTests class with two more tests that each take a shared pass (the eval pass, or
    the training pass) and note what they got."""

    def take(self: Any) -> None:
        Recorded.results[self._testMethodName] = (
            self._training_pass() if training else self._eval_pass()
        )

    return make_case(ModelTests, set_up, test_first=take, test_second=take, **attributes)


def run_both(case: type) -> int:
    """Run the class's two tests in order; return how many eval passes they computed."""
    EVAL_PASSES.clear()
    Recorded.results.clear()
    for name in ("test_first", "test_second"):
        result = unittest.TestResult()
        case(name).run(result)
        assert not result.errors and not result.failures, result.errors + result.failures
    return len(EVAL_PASSES)


def inputs() -> torch.Tensor:
    return torch.randn(4, 4, generator=torch.Generator().manual_seed(0))


BUILT_ONCE = Counted()


class SharedEvalPass(unittest.TestCase):
    def test_a_model_built_once_is_run_once(self) -> None:
        def set_up(self: Any) -> None:
            self.model, self.inputs = BUILT_ONCE, inputs()

        self.assertEqual(run_both(two_checks(set_up)), 1)

    def test_a_model_built_in_every_setup_is_run_once(self) -> None:
        def set_up(self: Any) -> None:  # seeded before setUp: the same model every time
            self.model, self.inputs = Counted(), inputs()

        self.assertEqual(run_both(two_checks(set_up)), 1)

    def test_each_caller_gets_its_own_copy(self) -> None:
        def set_up(self: Any) -> None:
            self.model, self.inputs = Counted(), inputs()

        run_both(two_checks(set_up))
        first, second = Recorded.results["test_first"], Recorded.results["test_second"]
        self.assertTrue(torch.equal(first, second))
        self.assertIsNot(first, second)
        first.zero_()
        self.assertFalse(torch.equal(first, second))

    def test_another_class_computes_its_own(self) -> None:
        def set_up(self: Any) -> None:
            self.model, self.inputs = BUILT_ONCE, inputs()

        EVAL_PASSES.clear()
        for case in (two_checks(set_up), two_checks(set_up)):
            result = unittest.TestResult()
            case("test_first").run(result)
        self.assertEqual(len(EVAL_PASSES), 2)

    def test_sharing_can_be_turned_off(self) -> None:
        def set_up(self: Any) -> None:
            self.model, self.inputs = BUILT_ONCE, inputs()

        passes.SHARING = False
        try:
            self.assertEqual(run_both(two_checks(set_up)), 2)
        finally:
            passes.SHARING = True


class ComputedAgainWhenTheStateDiffers(unittest.TestCase):
    """Whatever setUp or anything else changes between two checks, the pass is computed again
    (a stale result would let a check pass on a model it never ran)."""

    def assertComputedTwice(self, change: Callable[[Any], None], built_once: bool) -> None:
        model = Counted()

        def set_up(self: Any) -> None:
            self.model = model if built_once else Counted()
            self.inputs = inputs()
            if self._testMethodName == "test_second":
                change(self)

        self.assertEqual(run_both(two_checks(set_up)), 2)

    def test_a_changed_weight(self) -> None:
        def change(test: Any) -> None:
            with torch.no_grad():
                test.model.linear.weight[0, 0] += 1

        for built_once in (False, True):
            with self.subTest(built_once=built_once):
                self.assertComputedTwice(change, built_once)

    def test_a_weight_changed_through_data_which_does_not_count_as_a_change(self) -> None:
        def change(test: Any) -> None:
            test.model.linear.bias.data[1] = 5.0  # no version counter sees this

        for built_once in (False, True):
            with self.subTest(built_once=built_once):
                self.assertComputedTwice(change, built_once)

    def test_a_row_of_a_large_weight(self) -> None:
        def change(test: Any) -> None:
            test.model.big.data[7].fill_(1.0)

        class Large(Counted):
            def __init__(self) -> None:
                super().__init__()
                self.register_buffer("big", torch.zeros(1000, 100))

        def set_up(self: Any) -> None:
            self.model, self.inputs = Large(), inputs()
            if self._testMethodName == "test_second":
                change(self)

        self.assertEqual(run_both(two_checks(set_up)), 2)

    def test_an_attribute(self) -> None:
        def change(test: Any) -> None:
            test.model.flag = True

        for built_once in (False, True):
            with self.subTest(built_once=built_once):
                self.assertComputedTwice(change, built_once)

    def test_the_mode_of_a_submodule(self) -> None:
        def change(test: Any) -> None:
            test.model.linear.eval()

        self.assertComputedTwice(change, built_once=False)

    def test_a_hook(self) -> None:
        def change(test: Any) -> None:
            test.model.register_forward_hook(lambda module, args, output: output * 3)

        self.assertComputedTwice(change, built_once=False)

    def test_the_inputs(self) -> None:
        def change(test: Any) -> None:
            test.inputs = test.inputs.clone()
            test.inputs[3, 2] += 1

        self.assertComputedTwice(change, built_once=True)

    def test_the_number_of_threads(self) -> None:
        def change(test: Any) -> None:
            torch.set_num_threads(2)  # (restored after the test)

        self.assertComputedTwice(change, built_once=True)

    def test_a_pass_that_changes_the_model_is_never_shared(self) -> None:
        for model_type in (CountsCalls, CountsInAnAttribute):
            with self.subTest(model_type.__name__):

                def set_up(self: Any, model_type: type = model_type) -> None:
                    self.model, self.inputs = model_type(), inputs()
                    if model_type is CountsCalls:
                        self.inputs = torch.randn(4, 1, 4, 4)

                case = two_checks(set_up)
                entries = len(passes._ENTRIES)
                run_both(case)
                stored = passes._entry(case)
                self.assertTrue(stored is None or "eval" not in stored.results, entries)


class SharedTrainingPass(unittest.TestCase):
    def test_the_same_loss_fn_shares_and_another_does_not(self) -> None:
        calls = LOSS_CALLS  # (a global: a list the loss_fn closed over would be its state)

        def loss_of(scale: float) -> Callable[[torch.Tensor], torch.Tensor]:
            def loss(output: torch.Tensor) -> torch.Tensor:
                LOSS_CALLS.append(True)
                return output.sum() * scale

            return loss

        for second_scale, expected in ((1.0, 1), (2.0, 2)):
            with self.subTest(second_scale=second_scale):

                def set_up(self: Any, second_scale: float = second_scale) -> None:
                    self.model, self.inputs = Counted(), inputs()
                    scale = second_scale if self._testMethodName == "test_second" else 1.0
                    self.loss_fn = loss_of(scale)

                calls.clear()
                run_both(two_checks(set_up, training=True))
                self.assertEqual(len(calls), expected)

    def test_it_summarises_every_trainable_parameter(self) -> None:
        def set_up(self: Any) -> None:
            self.model, self.inputs = Counted(), inputs()

        run_both(two_checks(set_up, training=True))
        first = Recorded.results["test_second"]
        self.assertEqual(first.names, ("linear.weight", "linear.bias"))
        self.assertTrue(all(g.connected and g.finite and g.nonzero for g in first.gradients))


class TheFingerprint(unittest.TestCase):
    def test_equal_for_the_same_build_and_not_for_another_seed(self) -> None:
        def build(seed: int) -> nn.Module:
            torch.manual_seed(seed)
            return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.LSTM(6, 5))

        same, _ = fingerprint(build(0))
        self.assertEqual(fingerprint(build(0))[0], same)
        self.assertNotEqual(fingerprint(build(1))[0], same)

    def test_real_models_built_twice_are_the_same(self) -> None:
        try:
            import timm
            from transformers import BertConfig, BertModel
        except ImportError:
            self.skipTest("needs timm and transformers")
        builders: Dict[str, Callable[[], nn.Module]] = {
            "timm resnet18": lambda: timm.create_model("resnet18", pretrained=False),
            "BERT": lambda: BertModel(
                BertConfig(
                    vocab_size=50,
                    hidden_size=16,
                    num_hidden_layers=1,
                    num_attention_heads=2,
                    intermediate_size=16,
                )
            ),
        }
        for label, build in builders.items():
            with self.subTest(label):
                torch.manual_seed(0)
                first: Optional[Any] = fingerprint(build())[0]
                torch.manual_seed(0)
                self.assertEqual(fingerprint(build())[0], first)


class NoCheckLosesADetection(CheckTestCase):
    """State that changes between calls is still found when the model is built once, and
    when it is built in every setUp, with the other checks run first."""

    def test_eval_determinism_of_a_model_that_counts_its_calls(self) -> None:
        for built_once in (False, True):
            with self.subTest(built_once=built_once):
                model = CountsCalls()

                def set_up(self: Any, built_once: bool = built_once, model: Any = model) -> None:
                    self.model = model if built_once else CountsCalls()
                    self.inputs = torch.randn(4, 1, 4, 4)

                case = make_case(ModelTests, set_up)
                for name in ("test_batch_independence", "test_output_shape"):
                    run_check(case, name)
                self.assertFailsWith(
                    case,
                    "test_eval_deterministic",
                    "even under the same seed: the model is not deterministic",
                )


if __name__ == "__main__":
    unittest.main()
