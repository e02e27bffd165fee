"""Passes the model checks no longer run twice: test_inputs_unchanged reads the eval pass and the
first training step the checks share (the copies of the inputs they were handed) instead of
passes of its own, and runs a watched pass only to name a change; test_all_inputs_used compares
with the shared eval pass and runs the passes of a judge (its seeds, its outputs) only when they
are needed; test_train_matches_eval compares with the shared eval pass first, and runs an eval
pass of its own only to judge a difference, and none at all when the first training step's
outputs agree with it; test_running_statistics reads the first training step's forward pass.
Every verdict stays: a change of the inputs is still found and named, also after another check
computed the passes (test_training_modes.py runs the training-mode checks' verdicts both ways).
"""

from __future__ import annotations

import unittest
from typing import Any, List, Tuple

import torch
from checkrunner import CheckTestCase, make_case
from torch import nn

from dltestkit import ModelTests
from dltestkit.models import passes

#: (id of the model, training, grad enabled) for every forward pass of a Noted model.
CALLS: List[Tuple[int, bool, bool]] = []


class Noted(nn.Module):
    """A small correct model that notes its passes in a global list (no state of the model)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        CALLS.append((id(self), self.training, torch.is_grad_enabled()))
        return self.linear(x)


class CentresInEvalOnly(Noted):
    """Broken: in eval mode, forward centres the caller's batch in place."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            x -= x.mean(dim=1, keepdim=True)
        return super().forward(x)


class CentresInTrainingOnly(Noted):
    """Broken: in training mode, forward centres the caller's batch in place."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            x -= x.mean(dim=1, keepdim=True)
        return super().forward(x)


class GatedFeatures(Noted):
    """Correct: features 2 and 3 pass through a zero-initialised gate (ReZero), so that
    neither their gradients nor their values show them read until the gate trains."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        CALLS.append((id(self), self.training, torch.is_grad_enabled()))
        return self.linear(torch.cat([x[:, :2], self.gate * x[:, 2:]], dim=1))


class RoundsTwoFeatures(Noted):
    """Correct: features 2 and 3 are rounded, so that no gradient reaches them, but their
    values are read."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        CALLS.append((id(self), self.training, torch.is_grad_enabled()))
        return self.linear(torch.cat([x[:, :2], torch.round(4 * x[:, 2:])], dim=1))


class ReadsTwoFeatures(Noted):
    """Broken: features 2 and 3 are never read."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        CALLS.append((id(self), self.training, torch.is_grad_enabled()))
        return self.linear(torch.cat([x[:, :2], x[:, :2]], dim=1))


def inputs() -> torch.Tensor:
    return torch.randn(4, 4, generator=torch.Generator().manual_seed(0))


def eval_pass_first(model: type, training: bool = False) -> type:
    """A ModelTests class whose test_first takes the shared eval pass (and the training pass
    too if ``training``)."""

    def set_up(self: Any) -> None:
        self.model, self.inputs = model(), inputs()

    def take(self: Any) -> None:
        self._eval_pass()
        if training:
            self._training_pass()

    return make_case(ModelTests, set_up, test_first=take)


def passes_of(case: type, name: str, model_only: bool = False) -> List[Tuple[int, bool, bool]]:
    """The passes the check ``name`` ran after test_first (of the model under test only),
    as (model, training, grad enabled); the check must pass."""
    case("test_first").run(unittest.TestResult())
    CALLS.clear()
    test = case(name)
    result = unittest.TestResult()
    test.run(result)
    assert not result.errors and not result.failures, result.errors + result.failures
    return [call for call in CALLS if not model_only or call[0] == id(test.model)]


class InputsUnchangedReadsTheEvalPass(CheckTestCase):
    def test_no_eval_pass_of_its_own_when_the_eval_pass_is_shared(self) -> None:
        ran = passes_of(eval_pass_first(Noted), "test_inputs_unchanged")
        self.assertEqual([(training, grad) for _, training, grad in ran], [(True, True)])

    def test_no_pass_of_its_own_when_the_training_pass_is_shared_too(self) -> None:
        self.assertEqual(passes_of(eval_pass_first(Noted, True), "test_inputs_unchanged"), [])

    def test_a_change_in_training_is_found_after_another_check_ran_the_passes(self) -> None:
        case = eval_pass_first(CentresInTrainingOnly, True)
        case("test_first").run(unittest.TestResult())
        self.assertFailsWith(
            case,
            "test_inputs_unchanged",
            "the model's forward changes its input self.inputs in place in training mode: "
            "Tensor.sub_ in CentresInTrainingOnly",
        )

    def test_a_change_is_found_and_named_after_another_check_ran_the_eval_pass(self) -> None:
        case = eval_pass_first(CentresInEvalOnly)
        case("test_first").run(unittest.TestResult())
        self.assertFailsWith(
            case,
            "test_inputs_unchanged",
            "the model's forward changes its input self.inputs in place in eval mode: "
            "Tensor.sub_ in CentresInEvalOnly",
        )

    def test_a_non_contiguous_input_gets_the_checks_own_pass(self) -> None:
        def set_up(self: Any) -> None:
            self.model, self.inputs = Noted(), inputs().t().contiguous().t()

        def take(self: Any) -> None:
            self._eval_pass()

        case = make_case(ModelTests, set_up, test_first=take)
        ran = passes_of(case, "test_inputs_unchanged")
        self.assertEqual(
            [(training, grad) for _, training, grad in ran], [(False, False), (True, True)]
        )


class InputsUsedRunsWhatItNeeds(CheckTestCase):
    def test_a_gated_model_has_the_probed_pass_and_one_pass_on_the_gated_copy(self) -> None:
        case = eval_pass_first(GatedFeatures)
        case("test_first").run(unittest.TestResult())
        CALLS.clear()
        test = case("test_all_inputs_used")
        result = unittest.TestResult()
        test.run(result)
        self.assertEqual(result.errors + result.failures, [])
        copies = {call[0] for call in CALLS} - {id(test.model)}
        self.assertEqual(len(copies), 1)  # the copy whose gate is made random
        # the probed pass the checks share (eval mode, with gradients) leaves the gated
        # features suspected; the copy's shows them read: no value pass
        self.assertEqual(
            [(training, grad) for model, training, grad in CALLS if model == id(test.model)],
            [(False, True)],
        )
        self.assertEqual(
            [(training, grad) for model, training, grad in CALLS if model in copies],
            [(False, True)],
        )

    def test_suspects_no_gradient_can_judge_need_no_pass_with_gradients_on_the_copy(
        self,
    ) -> None:
        class GatedWithAMask(Noted):
            """Correct: reads every feature through its linear layer and the integer mask
            (which no gradient reaches) by values; a zero-initialised gate besides."""

            def __init__(self) -> None:
                super().__init__()
                self.gate = nn.Parameter(torch.zeros(()))

            def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
                return super().forward(x) * mask.unsqueeze(-1) + self.gate * x[:, :3]

        def set_up(self: Any) -> None:
            self.model = GatedWithAMask()
            self.inputs = (inputs(), torch.tensor([1, 0, 1, 1]))
            self.expected_output_shape = (4, 3)

        ran = passes_of(
            make_case(ModelTests, set_up, test_first=lambda self: None), "test_all_inputs_used"
        )
        self.assertEqual([(training, grad) for _, training, grad in ran if grad], [(False, True)])

    def test_a_model_the_probed_pass_shows_read_needs_no_copy(self) -> None:
        case = eval_pass_first(Noted)
        case("test_batch_independence").run(unittest.TestResult())  # (the probed pass)
        CALLS.clear()
        test = case("test_all_inputs_used")
        result = unittest.TestResult()
        test.run(result)
        self.assertEqual(result.errors + result.failures, [])
        self.assertEqual(CALLS, [])  # no pass of its own

    def test_the_gated_copy_shares_the_models_other_parameters_and_changes_none(self) -> None:
        used: List[Tuple[nn.Module, torch.Tensor]] = []  # (module called, its weight)

        class Recorded(GatedFeatures):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                used.append((self, self.linear.weight))
                return super().forward(x)

        case = eval_pass_first(Recorded)
        test = case("test_all_inputs_used")
        result = unittest.TestResult()
        test.run(result)
        self.assertEqual(result.errors + result.failures, [])
        # the copy whose gate is random was called with the model's own weight, and the
        # model was left as it was (its gate zero)
        on_copies = [weight for module, weight in used if module is not test.model]
        self.assertTrue(on_copies)
        self.assertTrue(all(weight is test.model.linear.weight for weight in on_copies))
        self.assertTrue(torch.equal(test.model.gate, torch.zeros(())))

    def test_the_shared_eval_pass_is_the_judges_base(self) -> None:
        counts = []
        sharing = passes.SHARING
        try:
            for shared in (True, False):
                passes.SHARING = shared
                case = eval_pass_first(RoundsTwoFeatures)
                ran = passes_of(case, "test_all_inputs_used", True)
                counts.append(sum(1 for _, training, grad in ran if not training and not grad))
        finally:
            passes.SHARING = sharing
        self.assertEqual(counts[0], counts[1] - 1)

    def test_unread_features_still_fail(self) -> None:
        case = eval_pass_first(ReadsTwoFeatures)
        case("test_first").run(unittest.TestResult())
        self.assertFailsWith(
            case,
            "test_all_inputs_used",
            "self.inputs[:, 2:4] is read by no output (dimension 1, in every sample)",
        )


class ScaledInTrainingOnly(Noted):
    """Broken: training mode doubles the output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * (2.0 if self.training else 1.0)


class Normalised(Noted):
    """A small correct model with BatchNorm, that notes its passes."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(super().forward(x))


class TrainMatchesEvalReadsTheEvalPass(CheckTestCase):
    def test_no_eval_pass_of_its_own_when_the_modes_agree(self) -> None:
        ran = passes_of(eval_pass_first(Noted), "test_train_matches_eval")
        self.assertEqual([(training, grad) for _, training, grad in ran], [(True, True)])

    def test_no_pass_at_all_after_the_first_training_step_when_the_modes_agree(self) -> None:
        ran = passes_of(eval_pass_first(Noted, training=True), "test_train_matches_eval")
        self.assertEqual(ran, [])

    def test_batch_statistics_get_the_passes_of_the_check_after_the_training_step(self) -> None:
        # (training mode normalises with the batch's statistics: the outputs of the modes
        # differ, so the check runs its training pass with the running statistics)
        ran = passes_of(eval_pass_first(Normalised, training=True), "test_train_matches_eval")
        self.assertEqual([(training, grad) for _, training, grad in ran], [(True, True)])


class RunningStatisticsReadsTheTrainingStep(CheckTestCase):
    def test_only_its_watched_eval_pass_after_the_first_training_step(self) -> None:
        ran = passes_of(eval_pass_first(Normalised, training=True), "test_running_statistics")
        self.assertEqual([(training, grad) for _, training, grad in ran], [(False, False)])

    def test_a_training_pass_of_its_own_without_it(self) -> None:
        ran = passes_of(eval_pass_first(Normalised), "test_running_statistics")
        self.assertEqual(
            [(training, grad) for _, training, grad in ran], [(False, False), (True, False)]
        )

    def test_a_difference_is_judged_on_its_own_eval_pass(self) -> None:
        case = eval_pass_first(ScaledInTrainingOnly)
        case("test_first").run(unittest.TestResult())
        self.assertFailsWith(
            case,
            "test_train_matches_eval",
            "output differs between training and eval mode (",
            "nothing in the training pass explains it",
        )
