"""test_inputs_unchanged: a forward that changes its inputs in place is named with the input and
the line; one that changes only tensors it made passes; the other checks judge such a model by
what it computes, not by the inputs it corrupted."""

from __future__ import annotations

import inspect
import unittest
from typing import Any

import torch
from checkrunner import CheckTestCase, make_case
from torch import nn
from torch.nn import functional as F

from dltestkit import ModelTests


class Correct(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class InPlaceOnItsOwnTensors(Correct):
    """In-place operations on tensors forward made itself: no change of the inputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x * 2
        h.add_(1)
        h[:, 0] = 0
        return F.relu(self.linear(h), inplace=True)


class Centres(Correct):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x -= x.mean(dim=1, keepdim=True)  # the bug: the caller's batch
        return self.linear(x)


class ActivationFirst(Correct):
    def __init__(self) -> None:
        super().__init__()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.act(x))


class FloatReturnsItself(Correct):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()  # x itself: it is float already
        x.mul_(0.5)
        return self.linear(x)


class DropoutOnTheInput(Correct):
    """Changes the input in training mode only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(F.dropout(x, 0.5, training=self.training, inplace=True))


class ThroughData(Correct):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.data.clamp_(min=0)
        return self.linear(x)


class MasksTokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(10, 3)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        labels[labels == 0] = -100  # the bug: the caller's labels
        return self.embedding(input_ids).mean(1) + labels.float().mean()


def line_of(model: type, code: str) -> str:
    """Where messages put ``code`` of ``model``'s source: test_inputs_check.py:<line>."""
    lines, first = inspect.getsourcelines(model)
    return f"test_inputs_check.py:{first + next(i for i, t in enumerate(lines) if code in t)}"


def case(model: Any) -> type:
    def set_up(self: Any) -> None:
        self.model = model()
        self.inputs = torch.randn(4, 4)
        self.expected_output_shape = (4, 3)

    return make_case(ModelTests, set_up)


class InputsUnchanged(CheckTestCase):
    def test_a_model_that_changes_only_its_own_tensors_passes(self) -> None:
        for model in (Correct, InPlaceOnItsOwnTensors):
            with self.subTest(model.__name__):
                self.assertPasses(case(model), "test_inputs_unchanged")

    def test_an_in_place_change_of_an_input_is_named_with_its_line(self) -> None:
        self.assertFailsWith(
            case(Centres),
            "test_inputs_unchanged",
            "the model's forward changes its input self.inputs in place in eval mode: "
            f"Tensor.sub_ in Centres, at {line_of(Centres, 'x -= ')} in forward; afterwards 16 "
            "of 16 values are other than before, by up to",
            "Work on a copy (x = x.clone() before changing it)",
        )
        self.assertFailsWith(
            case(ActivationFirst),
            "test_inputs_unchanged",
            "changes its input self.inputs in place in eval mode: F.relu in act (ReLU)",
        )
        self.assertFailsWith(
            case(FloatReturnsItself),
            "test_inputs_unchanged",
            f"Tensor.mul_ in FloatReturnsItself, at {line_of(FloatReturnsItself, 'mul_')} in "
            "forward",
            "x.to(device) and x.float() return x itself",
        )

    def test_a_change_in_training_mode_only_is_found_too(self) -> None:
        self.assertFailsWith(
            case(DropoutOnTheInput),
            "test_inputs_unchanged",
            "changes its input self.inputs in place in training mode: F.dropout in "
            "DropoutOnTheInput",
        )

    def test_a_change_through_data_is_found_without_an_operation(self) -> None:
        self.assertFailsWith(
            case(ThroughData),
            "test_inputs_unchanged",
            "changes its input self.inputs in place in eval mode (by no torch operation seen: "
            "through .data",
        )

    def test_token_ids_changed_in_place_are_named(self) -> None:
        def set_up(self: Any) -> None:
            self.model = MasksTokens()
            self.inputs = {
                "input_ids": torch.randint(0, 10, (4, 5)),
                "labels": torch.tensor([[0, 1, 2, 3, 4]] * 4),
            }

        self.assertFailsWith(
            make_case(ModelTests, set_up),
            "test_inputs_unchanged",
            "changes its input self.inputs['labels'] in place in eval mode: "
            f"Tensor.__setitem__ in MasksTokens, at {line_of(MasksTokens, '= -100')} in forward; "
            "afterwards 4 of 20 values are other than before",
        )

    def test_the_other_checks_judge_what_the_model_computes(self) -> None:
        # Before, the inputs changed by one call made two eval passes differ
        # ("not deterministic"), and the probes' leaves raised autograd's in-place error.
        self.assertPasses(case(FloatReturnsItself), "test_eval_deterministic")
        self.assertPasses(case(ActivationFirst), "test_batch_independence")
        self.assertPasses(case(ActivationFirst), "test_all_parameters_updated")


if __name__ == "__main__":
    unittest.main()
