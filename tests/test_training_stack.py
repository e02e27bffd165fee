"""The trainer checks of the training stack of today: gradient accumulation, retained graphs,
mixed precision and compiled training. Each passes on correct trainers of the common shapes
(a classifier loop with BatchNorm, dropout, a scheduler and a partial last batch; a
language-model loop on padded sequences with the loss averaged over tokens; the example
project's VAE and a Lightning module are tested with their own suites) and fails on one bug
each, with its message asserted. The trainers are in ``stack_trainers.py``.
"""

from __future__ import annotations

import unittest
from typing import Any, Dict, Tuple

import pytest
import stack_trainers as st
from checkrunner import CheckTestCase, make_case, run_check

from dltestkit import TrainerTests

ACCUMULATION = "test_gradient_accumulation"
GRAPHS = "test_no_retained_graphs"
PRECISION = "test_mixed_precision"
COMPILED = "test_compiled_training"
#: the reason of the loss-scaling part of test_mixed_precision for a trainer without a scaler
NO_SCALER = "make_trainer does not take the keyword argument grad_scale"


def stack_case(trainer_type: Any, **attributes: Any) -> type:
    def set_up(self: Any) -> None:
        self.make_trainer = trainer_type
        self.trainer = trainer_type()
        for name, value in attributes.items():
            setattr(self, name, value)

    return make_case(TrainerTests, set_up)


class GradientAccumulation(CheckTestCase):
    def test_correct_accumulation_passes(self) -> None:
        for trainer_type in (
            st.StackTrainer,  # partial last batch and window: sums divided by the window
            st.DividedByTheWindow,  # means divided by the window's length: micro-batches alike
            st.LanguageModelTrainer,  # padded sequences: sums divided by the window's tokens
        ):
            with self.subTest(trainer_type.__name__):
                self.assertPasses(stack_case(trainer_type), ACCUMULATION)

    def test_each_mistake_fails_and_is_named(self) -> None:
        mistakes: Dict[Any, Tuple[str, ...]] = {
            st.NotDividedByK: (
                "it is 2 times the whole batch's (= accumulation_steps): the loss is not "
                "divided by 2 before backward",
            ),
            st.DividedTwice: ("it is 1/2 of the whole batch's: the loss is divided by 2 twice",),
            st.DividedByKInAPartialWindow: (
                "optimizer step 3 (of 3) (a partial window of 1 micro-batch)",
                "the last, partial window of 1 micro-batch divides the loss by 2, not by the "
                "1 it holds",
            ),
            st.StepBeforeTheLastMicroBatch: (
                "the first optimizer step came after 1 of the 2 micro-batches of its window "
                "(steps after 1, 2, 2 micro-batches, where 2, 2, 1 make the whole batches)",
                "`if step % k == 0`",
            ),
            st.DropsThePartialWindow: (
                "the last window, of 1 micro-batch (the epoch's 5 micro-batches are no "
                "multiple of 2), got no optimizer step",
            ),
            st.ZeroesEveryMicroBatch: (
                "it is the gradient of the last micro-batch alone; the gradients are zeroed "
                "before every micro-batch",
            ),
            st.SchedulerEveryMicroBatch: (
                "optimizer step 1 used the learning rate 0.0125, where the whole batches' step "
                "1 used 0.025: the learning rate scheduler is stepped every micro-batch",
            ),
            st.PerMicroBatchTokenMean: (
                "the whole batch's gradient is the micro-batches' gradients weighted 0.529 : "
                "0.471, but the trainer weighs them 0.5 : 0.5",
                "(the per-micro-batch mean, divided by k)",
                "num_items_in_batch",
            ),
        }
        for trainer_type, fragments in mistakes.items():
            with self.subTest(trainer_type.__name__):
                self.assertFailsWith(
                    stack_case(trainer_type),
                    ACCUMULATION,
                    "gradient accumulation changes training: ",
                    *fragments,
                    "with dropout off, random noise at its mean and BatchNorm normalising with "
                    "its running statistics",
                )

    def test_other_accumulation_steps_are_compared(self) -> None:
        case = stack_case(st.NotDividedByK, accumulation_steps=4)
        self.assertFailsWith(case, ACCUMULATION, "it is 4 times the whole batch's")
        self.assertPasses(stack_case(st.StackTrainer, accumulation_steps=4), ACCUMULATION)

    def test_what_cannot_be_compared_skips_saying_why(self) -> None:
        cases = {
            st.CouplesTheBatch: (
                "the whole batch's gradient is no weighting of the micro-batches' gradients: "
                "the loss couples the samples of a batch",
            ),
            st.DrawsRandomIndices: (
                "could not be held at their expected value (torch.randint at stack_trainers.py:",
            ),
            st.KeepsTheBatchSize: (
                "make_trainer(accumulation_steps=2) ran 3 micro-batches (backward calls) in one "
                "epoch, where make_trainer(accumulation_steps=1) took 3 optimizer steps",
                "make_trainer must build batches 2 times smaller",
            ),
        }
        for trainer_type, fragments in cases.items():
            with self.subTest(trainer_type.__name__):
                self.assertSkipsWith(stack_case(trainer_type), ACCUMULATION, *fragments)

    def test_a_make_trainer_without_the_keyword_skips_naming_it(self) -> None:
        def set_up(self: Any) -> None:
            self.make_trainer = lambda: st.StackTrainer()
            self.trainer = self.make_trainer()

        self.assertSkipsWith(
            make_case(TrainerTests, set_up),
            ACCUMULATION,
            "make_trainer does not take the keyword argument accumulation_steps; give it "
            "accumulation_steps=1",
        )

    def test_a_keyword_passed_on_to_a_trainer_that_refuses_it_skips_naming_it(self) -> None:
        def set_up(self: Any) -> None:
            self.make_trainer = lambda **keywords: st.LanguageModelTrainer(**keywords)
            self.trainer = self.make_trainer()

        outcome = run_check(make_case(TrainerTests, set_up), PRECISION)
        self.assertEqual((outcome.failures, outcome.errors), ([], []))
        self.assertIn(
            "make_trainer does not take the keyword argument grad_scale: it raised TypeError",
            "\n".join(outcome.skips),
        )

    def test_accumulation_steps_must_be_two_or_more(self) -> None:
        self.assertErrorsWith(
            stack_case(st.StackTrainer, accumulation_steps=1),
            ACCUMULATION,
            "self.accumulation_steps",
            "is 1, not an int >= 2",
        )


class RetainedGraphs(CheckTestCase):
    def test_trainers_that_keep_no_growing_graph_pass(self) -> None:
        for trainer_type in (st.StackTrainer, st.KeepsTheLastLoss, st.LanguageModelTrainer):
            with self.subTest(trainer_type.__name__):
                self.assertPasses(stack_case(trainer_type), GRAPHS)

    def test_growing_graphs_fail_naming_what_holds_them(self) -> None:
        mistakes = {
            st.KeepsTheTotalLoss: (
                "graph nodes after the first epoch and eval(),",
                "trainer.total_loss: a tensor with grad_fn=AddBackward0, reaching",
            ),
            st.KeepsAListOfLosses: ("trainer.history['loss'][...]: 9 tensors with grad_fn",),
            st.EvaluatesWithGradients: ("trainer.evaluations[...]: 3 tensors with grad_fn",),
            st.KeepsTheEpochsTrainingOutputs: (
                "within epoch 2, from step to step:",
                "trainer.epoch_outputs[...]: 3 tensors with grad_fn",
            ),
        }
        for trainer_type, fragments in mistakes.items():
            for strict in (False, True):
                with self.subTest(trainer_type.__name__, strict_graphs=strict):
                    self.assertFailsWith(
                        stack_case(trainer_type, strict_graphs=strict),
                        GRAPHS,
                        "the autograd graph the trainer keeps alive grows with training: ",
                        *fragments,
                        "accumulate loss.item() or loss.detach()",
                    )

    #: graphs that grow within an epoch, let go at its end, backward having freed what they saved
    WITHIN_AN_EPOCH = {
        st.ResetsTheTotalEveryEpoch: (
            "within epoch 2, from step to step:",
            "trainer.epoch_loss: a tensor with grad_fn=AddBackward0",
        ),
        st.KeepsLossesInALocalList: (
            "within epoch 2, from step to step:",
            "the local variable losses of train() (stack_trainers.py)[...]",
        ),
    }

    def test_graphs_of_an_epoch_without_activations_skip_a_part_unless_strict(self) -> None:
        for trainer_type, (how, holder) in self.WITHIN_AN_EPOCH.items():
            with self.subTest(trainer_type.__name__):
                self.assertSkipsWith(
                    stack_case(trainer_type),
                    GRAPHS,
                    "the autograd graph the trainer keeps alive grows " + how,
                    f"({holder.split(':')[0]} holds it)",
                    "backward has freed the activations these graphs saved",
                    "training_step_outputs",
                    "set strict_graphs = True to make this a failure",
                )

    def test_graphs_of_an_epoch_without_activations_fail_when_strict(self) -> None:
        for trainer_type, fragments in self.WITHIN_AN_EPOCH.items():
            with self.subTest(trainer_type.__name__):
                self.assertFailsWith(
                    stack_case(trainer_type, strict_graphs=True),
                    GRAPHS,
                    "the autograd graph the trainer keeps alive grows with training: ",
                    *fragments,
                    "accumulate loss.item() or loss.detach()",
                )


class MixedPrecision(CheckTestCase):
    def test_correct_mixed_precision_passes(self) -> None:
        for trainer_type in (st.StackTrainer, st.ClipsAfterUnscaling, st.FusedAdam):
            with self.subTest(trainer_type.__name__):
                self.assertPasses(stack_case(trainer_type), PRECISION)
        self.assertPasses(stack_case(st.LanguageModelTrainer), PRECISION, allowed_skips=[NO_SCALER])

    def test_loss_scaling_mistakes_fail_and_are_named(self) -> None:
        mistakes = {
            st.ClipsBeforeUnscaling: (
                "they point the same way but are 6.554e+04 times smaller",
                "Call scaler.unscale_(optimizer) before clip_grad_norm_.",
            ),
            st.BypassesTheScaler: (
                "they are 65536 times larger, the scaled gradients themselves",
                "optimizer.step() instead of scaler.step(optimizer)",
            ),
            st.NeverUpdatesTheScaler: (
                "the trainer's GradScaler raised in two epochs of training (RuntimeError: "
                "step() has already been called since the last update().): scaler.update() is "
                "not called after scaler.step(optimizer)",
            ),
        }
        for trainer_type, fragments in mistakes.items():
            with self.subTest(trainer_type.__name__):
                self.assertFailsWith(stack_case(trainer_type), PRECISION, *fragments)

    def test_a_bfloat16_loss_that_saturates_fails(self) -> None:
        self.assertFailsWith(
            stack_case(st.SaturatesInBfloat16),
            PRECISION,
            'one epoch under bfloat16 autocast (make_trainer(precision="bf16")) does not '
            "train as float32 does: ",
            "of its 3 losses are not finite",
            "Compute the loss in float32",
        )

    def test_a_precision_that_changes_nothing_is_a_contract_error(self) -> None:
        self.assertErrorsWith(
            stack_case(st.IgnoresThePrecision),
            PRECISION,
            'ContractError: make_trainer(precision="bf16") built a trainer whose training '
            "ran no forward pass under bfloat16 autocast or with bfloat16 parameters",
        )

    def test_float16_autocast_skips_the_loss_scaling_part(self) -> None:
        outcome = run_check(stack_case(st.ScalesInFloat16), PRECISION)
        self.assertEqual((outcome.failures, outcome.errors), ([], []))
        self.assertTrue(
            any("trains under float16 autocast" in reason for reason in outcome.skips),
            outcome.skips,
        )

    def test_without_either_keyword_the_check_skips_naming_both(self) -> None:
        def set_up(self: Any) -> None:
            self.make_trainer = lambda accumulation_steps=1: st.StackTrainer(accumulation_steps)
            self.trainer = self.make_trainer()

        self.assertSkipsWith(
            make_case(TrainerTests, set_up),
            PRECISION,
            "make_trainer does not take the keyword argument grad_scale or precision",
        )


class CompiledTraining(CheckTestCase):
    """With the "eager" backend (dynamo alone: the recompiles are the same, in a fraction of
    the time); the default "aot_eager" runs in the slow tests."""

    def test_a_compiled_trainer_passes(self) -> None:
        self.assertPasses(stack_case(st.StackTrainer, compile_with="eager"), COMPILED)

    def test_recompiling_every_epoch_fails_naming_the_guard(self) -> None:
        import torch._dynamo
        from torch._dynamo.utils import guard_failures

        config = torch._dynamo.config.get_config_copy()
        self.assertFailsWith(
            stack_case(st.AnnealsDropout, compile_with="eager"),
            COMPILED,
            "the compiled training keeps recompiling: the 3 epochs compiled",
            "forward (",
            "stack_trainers.py:",
            "self._modules['dropout'].p == ",
            "hold it in a tensor",
        )
        self.assertEqual(dict(guard_failures), {}, "dynamo's state is reset after the check")
        self.assertEqual(torch._dynamo.config.get_config_copy(), config)

    def test_losses_that_differ_from_eager_fail(self) -> None:
        self.assertFailsWith(
            stack_case(st.CompilesACopy, compile_with="eager"),
            COMPILED,
            "the compiled training computes other losses than eager PyTorch: ",
            "backward call 2's loss is",
        )

    def test_a_model_torch_compile_compiles_nothing_of_skips(self) -> None:
        # the trainer did compile its model (Dynamo saw its frames): no contract error
        self.assertSkipsWith(
            stack_case(st.TrainsWhatCompilesNothing, compile_with="eager"),
            COMPILED,
            "the trainer built with compile_backend='eager' ran torch.compile, which compiled "
            "no graph of its model in 3 epochs, leaving all of it to eager PyTorch (graph "
            "breaks: Unsupported Tensor.item() call",
            # with Dynamo's explanation, as test_compile names a break
            "(Dynamo does not support tracing `Tensor.item()`",
        )

    def test_a_trainer_that_ignores_the_backend_is_a_contract_error(self) -> None:
        self.assertErrorsWith(
            stack_case(st.IgnoresTheCompileBackend, compile_with="eager"),
            COMPILED,
            "ContractError: self.make_trainer set in Case.setUp built with "
            "compile_backend='eager' a trainer that compiled nothing",
        )


class ExpectedRandomness(unittest.TestCase):
    def test_noise_is_at_its_mean_and_an_initialisation_left_random(self) -> None:
        import torch

        from dltestkit.trainers.expectation import expected_randomness

        torch.manual_seed(0)
        lazy = torch.nn.LazyLinear(16)  # initialised (under no_grad) at its first forward pass
        with expected_randomness():
            lazy(torch.ones(2, 8))
            normal = torch.empty(3).normal_(1.0)
            uniform = torch.empty(3).uniform_(2.0, 4.0)
        self.assertTrue(torch.equal(normal, torch.full((3,), 1.0)))
        self.assertTrue(torch.equal(uniform, torch.full((3,), 3.0)))
        self.assertEqual(lazy.weight.unique().numel(), lazy.weight.numel())


@pytest.mark.slow
class Slow(CheckTestCase):
    """The default backend, other seeds, and models of timm, torchvision and transformers in
    the classifier loop (python -m pytest tests -m slow)."""

    def test_the_compiled_trainers_pass_with_aot_eager(self) -> None:
        for trainer_type in (st.StackTrainer, st.GPT2Trainer):
            with self.subTest(trainer_type.__name__):
                self.assertPasses(stack_case(trainer_type), COMPILED)

    def test_the_gpt2_loop_passes_and_its_per_micro_batch_mean_fails(self) -> None:
        for check in (ACCUMULATION, GRAPHS):
            self.assertPasses(stack_case(st.GPT2Trainer), check)
        self.assertPasses(stack_case(st.GPT2Trainer), PRECISION, allowed_skips=[NO_SCALER])
        self.assertFailsWith(
            stack_case(st.GPT2PerMicroBatchMean),
            ACCUMULATION,
            "the whole batch's gradient is the micro-batches' gradients weighted 0.529 : 0.471",
        )

    def assertThirdPartyPasses(self, name: str) -> None:
        """The model's trainer passes on seeds 0 and 1, and compiled ("eager") on seed 0."""
        trainers = st.third_party_trainers()
        if not trainers:
            self.skipTest("needs timm, torchvision and transformers (the zoo extra)")
        trainer_type = trainers[name]
        for seed in (0, 1):
            case = type("Case", (stack_case(trainer_type),), {"seed": seed})
            for check in (ACCUMULATION, GRAPHS, PRECISION):
                with self.subTest(name, seed=seed, check=check):
                    self.assertPasses(case, check)
        with self.subTest(name, check=COMPILED):
            self.assertPasses(stack_case(trainer_type, compile_with="eager"), COMPILED)

    def test_timm_resnet(self) -> None:
        self.assertThirdPartyPasses("timm test_resnet (BatchNorm)")

    def test_timm_efficientnet(self) -> None:
        self.assertThirdPartyPasses("timm test_efficientnet (BatchNorm, drop path)")

    def test_timm_vit(self) -> None:
        self.assertThirdPartyPasses("timm test_vit (drop path)")

    def test_torchvision_vision_transformer(self) -> None:
        self.assertThirdPartyPasses("torchvision VisionTransformer (dropout)")

    def test_transformers_bert(self) -> None:
        self.assertThirdPartyPasses("transformers BERT (dropout, padding)")

    def test_correct_trainers_pass_on_three_seeds(self) -> None:
        for seed in (1, 2, 3):
            for trainer_type in (st.StackTrainer, st.LanguageModelTrainer):
                case = type("Case", (stack_case(trainer_type),), {"seed": seed})
                for check in (ACCUMULATION, GRAPHS):
                    with self.subTest(trainer_type.__name__, seed=seed, check=check):
                        self.assertPasses(case, check)
                with self.subTest(trainer_type.__name__, seed=seed, check=PRECISION):
                    self.assertPasses(case, PRECISION, allowed_skips=[NO_SCALER])


if __name__ == "__main__":
    unittest.main()
