"""TrainingStackTests and ExportTests pass on correct models and fail, with their message, on
broken ones: a model that recompiles at every batch or computes otherwise when compiled, a
.view() after a convolution, a mask value beyond bfloat16's range, a checkpoint that draws
other dropout masks, a hard-coded batch size.

The runs of every check on the zoo of correct third-party components are in
tests/test_model_stack_zoo.py.
"""

from __future__ import annotations

import importlib.util
import math
import unittest
from typing import Any, Callable, Dict, Tuple
from unittest import mock

import torch
from checkrunner import CheckTestCase, make_case, run_check
from torch import nn
from torch.utils.checkpoint import checkpoint

from dltestkit import ExportTests, ModelTests, TrainingStackTests
from dltestkit.core.contract import checks_of

BATCH = 4


# -- models ----------------------------------------------------------------------------------
class MLP(nn.Module):
    """A correct model with dropout (random in training mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(8, 16)
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.hidden(x).relu()))


class CountsItsCalls(MLP):
    """Divides by a step counter kept in a Python attribute: recompiles at every call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return super().forward(x) / self.calls


class RescalesOnceForEval(MLP):
    """Flips a Python attribute on its first call in eval mode (transformers' RWKV rescales
    its layers so): one compilation more, once."""

    def __init__(self) -> None:
        super().__init__()
        self.rescaled = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training == self.rescaled:
            self.rescaled = not self.training
        return super().forward(x) * (0.5 if self.rescaled else 1.0)


class CNNResettingAState(nn.Module):
    """At evaluation, resets in place a state its backward pass needs (as RWKV updates its
    state cache): no gradient through an eval-mode pass."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.features(x)
        if self.training:
            return out * out
        state = out.clone()
        result = state * state
        state.zero_()
        return result


class CheckpointedBatchNorm(nn.Module):
    """A convolution and BatchNorm under torch.utils.checkpoint in training (as a
    memory-efficient DenseNet): eager PyTorch updates the statistics again when the backward
    pass recomputes them, a compiled graph does not."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 2)

    def block(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x)).relu()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        training = self.training
        hidden = checkpoint(self.block, x, use_reentrant=False) if training else self.block(x)
        return self.head(hidden.mean((2, 3)))


class OtherPathWhenCompiled(MLP):
    """Leaves the activation out when compiled."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return self.head(self.dropout(self.hidden(x)))
        return super().forward(x)


class WithAnAuxiliaryOutput(MLP):
    """Returns an auxiliary output besides the main one; the loss uses the main one only."""

    def __init__(self) -> None:
        super().__init__()
        self.auxiliary = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return super().forward(x), self.auxiliary(x)


def main_output_loss(output: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return output[0].square().mean()


def cumulative_batchnorm() -> nn.Module:
    """BatchNorm with a cumulative average (momentum=None), whose training forward reads
    num_batches_tracked into a Python float: torch.compile compiles nothing there."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=None), nn.ReLU(), nn.Flatten()
    )


class RaisesWhenCompiled(MLP):
    """When compiled, factorises a matrix that is not positive-definite: traced on fake
    tensors, it raises only when the compiled graph runs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            x = x + torch.linalg.cholesky(-torch.eye(x.shape[-1]))[0]
        return super().forward(x)


class Prints(MLP):
    """Prints in forward: a graph break."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] < 0:  # never: a print is a graph break all the same
            print("empty batch")
        print(end="")
        return super().forward(x)


class CNN(nn.Module):
    """A correct convolutional classifier that flattens with .flatten()."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).relu().flatten(1))


class ViewAfterConv(CNN):
    """.view() on a convolution's output: raises when it is channels_last."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.conv(x).relu()
        return self.head(features.view(features.size(0), -1))


class ViewsItsInput(CNN):
    """.view() of its input: needs the input contiguous."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.view(x.size(0), 3, -1).mean(-1)
        return self.head(self.conv(pooled[:, :, None, None].expand(-1, -1, 8, 8)).flatten(1))


class FlattensByStrides(CNN):
    """Flattens with as_strided, as if the memory were contiguous: wrong for channels_last."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.conv(x).relu()
        size = features[0].numel()
        return self.head(features.as_strided((features.size(0), size), (size, 1)))


class NaiveNorm(nn.Module):
    """A layer norm with the variance as E[x²] - E[x]²: cancels in low precision."""

    def __init__(self, features: int, clamp: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(features))
        self.clamp = clamp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(-1, keepdim=True)
        variance = (x * x).mean(-1, keepdim=True) - mean * mean
        if self.clamp:
            variance = variance.clamp_min(0)
        return (x - mean) / torch.sqrt(variance + 1e-5) * self.weight


class Normed(nn.Module):
    """A linear layer, an offset and a normalisation (nn.LayerNorm unless given). The offset
    makes E[x²] - E[x]² cancel in bfloat16 while nn.LayerNorm stays within the tolerance, on
    64 rows, at every seed from 0 to 9 (at an offset of 50, bfloat16's spacing of 0.25 there
    takes nn.LayerNorm itself beyond it at most seeds)."""

    def __init__(self, norm: Callable[[int], nn.Module] = nn.LayerNorm) -> None:
        super().__init__()
        self.inp = nn.Linear(16, 64)
        self.norm = norm(64)
        self.out = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(self.inp(x) + 16.0))


class MaskedAttention(nn.Module):
    """Fills masked scores with float32's minimum: beyond bfloat16's range."""

    def __init__(self, fill: str = "float32") -> None:
        super().__init__()
        self.query = nn.Linear(8, 8)
        self.key = nn.Linear(8, 8)
        self.out = nn.Linear(8, 2)
        self.fill = fill

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        scores = self.query(x) @ self.key(x).transpose(1, 2)
        low = torch.finfo(torch.float32 if self.fill == "float32" else scores.dtype).min
        scores = scores.masked_fill(~mask[:, None, :], low)
        return self.out(scores.softmax(-1) @ x)


class MixtureOfExperts(nn.Module):
    """Adds the experts' outputs into a float32 tensor with index_add_, without a cast."""

    def __init__(self, cast: bool = False) -> None:
        super().__init__()
        self.experts = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))
        self.gate = nn.Linear(8, 2)
        self.cast = cast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        choice = self.gate(x).argmax(-1)
        out = torch.zeros_like(x)
        for index, expert in enumerate(self.experts):
            rows = (choice == index).nonzero().squeeze(-1)
            value = expert(x[rows]) * self.gate(x[rows])[:, index : index + 1]
            out.index_add_(0, rows, value.to(out.dtype) if self.cast else value)
        return out


class SumOfSquares(nn.Module):
    """A sum of squares of large activations: beyond float16's 65504."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(16, 64)
        self.out = nn.Linear(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.inp(x) * 100
        energy = (hidden @ hidden.transpose(0, 1)).diagonal()[:, None]
        return self.out(energy / 1e5)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 16)
        self.dropout = nn.Dropout(0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.dropout(self.linear(x).relu())


class Checkpointable(nn.Module):
    """Blocks with dropout, checkpointed when ``checkpointing`` is on (through
    ``switch``); ``preserve_rng_state=False`` makes the recomputation draw other masks."""

    def __init__(self, preserve_rng_state: bool = True) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(2))
        self.head = nn.Linear(16, 3)
        self.checkpointing = False
        self.preserve_rng_state = preserve_rng_state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.checkpointing:
                x = checkpoint(
                    block, x, use_reentrant=False, preserve_rng_state=self.preserve_rng_state
                )
            else:
                x = block(x)
        return self.head(x)


def switch(model: nn.Module, on: bool) -> None:
    model.checkpointing = on  # type: ignore[assignment]


class Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class FixedBatchState(Linear):
    """Adds a state made for a batch of 4: a hard-coded batch size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = torch.zeros(4, 4)
        return self.linear(x) + state


class BranchesOnBatchSize(Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 4:
            return self.linear(x)
        return -self.linear(x)


class AnotherPathForLargeBatches(Linear):
    """Takes another path from 64 samples on that computes the same, as diffusers' upsampling
    does (a copy made contiguous around a bug of a kernel at large batches)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] >= 64:
            x = x.contiguous()
        return self.linear(x)


class AddsTwoInputsAndAFixedState(Linear):
    """Two batched inputs added (torch relates their batch sizes), then a state of 4 rows."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.linear(x + y) + torch.zeros(4, 4)


class BranchesOnValues(Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.linear(x)
        return -self.linear(x)


def case(
    mixin: type, model: Callable[[], nn.Module], inputs: Callable[[], Any], **attributes: Any
) -> type:
    def set_up(self: Any) -> None:
        self.model = model()
        self.inputs = inputs()
        for name, value in attributes.items():
            setattr(self, name, value)

    return make_case(mixin, set_up)


def features() -> torch.Tensor:
    return torch.randn(BATCH, 8)


def rows() -> torch.Tensor:
    return torch.randn(64, 16)


def images() -> torch.Tensor:
    return torch.randn(BATCH, 3, 8, 8)


def masked_tokens() -> Tuple[torch.Tensor, torch.Tensor]:
    mask = torch.ones(BATCH, 6, dtype=torch.bool)
    mask[0] = False  # a padding row: every key masked
    return torch.randn(BATCH, 6, 8), mask


# -- the mixins ------------------------------------------------------------------------------
class Composition(CheckTestCase):
    def test_the_mixins_add_their_checks_to_model_tests(self) -> None:
        composed = type("Composed", (TrainingStackTests, ExportTests, ModelTests), {})
        own = (
            "test_compile",
            "test_memory_layouts",
            "test_autocast",
            "test_activation_checkpointing",
            "test_export",
        )
        self.assertEqual(checks_of(composed)[: len(own)], own)
        self.assertEqual(len(checks_of(composed)), len(own) + len(checks_of(ModelTests)))

    def test_model_tests_runs_none_of_them(self) -> None:
        self.assertFalse({"test_compile", "test_export"} & set(checks_of(ModelTests)))


# -- test_memory_layouts ---------------------------------------------------------------------
class MemoryLayouts(CheckTestCase):
    def test_a_correct_convolutional_model_passes(self) -> None:
        self.assertPasses(case(TrainingStackTests, CNN, images), "test_memory_layouts")

    def test_a_strided_1x1_convolution_over_few_channels_runs_without_crashing(self) -> None:
        # timm's RepVGG stem: oneDNN's backward pass of it in channels_last, on one thread,
        # corrupts the process's memory in torch 2.14 (a double free); the check runs
        # PyTorch's own kernels, and leaves oneDNN as it found it
        class StridedStem(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.stem = nn.Conv2d(3, 3, 1, stride=2, bias=False)
                self.head = nn.Linear(3, 5)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.head(self.stem(x).mean((2, 3)))

        self.assertTrue(torch.backends.mkldnn.enabled)
        self.assertPasses(
            case(TrainingStackTests, StridedStem, lambda: torch.randn(4, 3, 32, 32)),
            "test_memory_layouts",
        )
        self.assertTrue(torch.backends.mkldnn.enabled)

    def test_a_model_without_eval_mode_gradients_compares_the_outputs_saying_why(self) -> None:
        self.assertSkipsWith(
            case(TrainingStackTests, CNNResettingAState, images),
            "test_memory_layouts",
            "the comparison runs the model in eval mode (its dropout off), and no gradient "
            "can be taken through the model's eval-mode forward pass",
            "modified by an inplace operation",
            "the outputs were compared, the gradients not",
        )
        self.assertPasses(
            case(TrainingStackTests, CNNResettingAState, images),
            "test_memory_layouts",
            allowed_skips=("the comparison runs the model in eval mode (its dropout off), and",),
        )

        class FlattensByStridesResettingAState(CNNResettingAState):
            def features(self, x: torch.Tensor) -> torch.Tensor:
                features = self.conv(x)
                size = features[0].numel()
                return features.as_strided((features.size(0), size), (size, 1))

        self.assertFailsWith(
            case(TrainingStackTests, FlattensByStridesResettingAState, images),
            "test_memory_layouts",
            "the model gives other results than with contiguous inputs",
        )

    def test_a_view_after_a_convolution_fails_with_its_line(self) -> None:
        self.assertFailsWith(
            case(TrainingStackTests, ViewAfterConv, images),
            "test_memory_layouts",
            "with channels_last inputs (self.inputs) and the model in channels_last, "
            "Tensor.view in ViewAfterConv raises, at test_model_stack.py",
            "`return self.head(features.view(features.size(0), -1))`",
            "on a tensor the model computed",
            "use .reshape() or .flatten()",
        )

    def test_a_view_of_an_input_skips_unless_strict(self) -> None:
        self.assertSkipsWith(
            case(TrainingStackTests, ViewsItsInput, images),
            "test_memory_layouts",
            "with non-contiguous inputs, Tensor.view in ViewsItsInput raises on an input "
            "itself, at test_model_stack.py",
            "`pooled = x.view(x.size(0), 3, -1).mean(-1)`",
            "set strict_layouts = True",
        )
        self.assertFailsWith(
            case(TrainingStackTests, ViewsItsInput, images, strict_layouts=True),
            "test_memory_layouts",
            "with non-contiguous inputs, Tensor.view in ViewsItsInput raises",
        )

    def test_memory_read_as_if_contiguous_fails_naming_the_first_submodule_off(self) -> None:
        self.assertFailsWith(
            case(TrainingStackTests, FlattensByStrides, images),
            "test_memory_layouts",
            "the model gives other results than with contiguous inputs",
            "the gradient of self.inputs",
            "The first submodule call whose output differs is head (Linear)",
        )

    def test_without_images_the_channels_last_part_skips(self) -> None:
        self.assertSkipsWith(
            case(TrainingStackTests, MLP, features),
            "test_memory_layouts",
            "self.inputs holds no 4-d floating-point tensor",
        )


class TopScoring(nn.Module):
    """Keeps the two best-scored of 8 items, as a detector keeps its best queries or a router
    its experts; ``precise=False`` scores them after a variance that cancels in bfloat16."""

    def __init__(self, precise: bool = True) -> None:
        super().__init__()
        self.inp = nn.Linear(16, 16)
        self.norm = None if precise else NaiveNorm(16, clamp=True)
        self.score = nn.Linear(16, 1, bias=False)
        nn.init.ones_(self.score.weight)
        self.head = nn.Linear(16, 4)

    def forward(self, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        if self.norm is not None:
            keys = self.norm(self.inp(keys) + 16.0)
        top = self.score(keys).squeeze(-1).topk(2, dim=1)
        chosen = values.gather(1, top.indices[..., None].expand(-1, -1, values.shape[-1]))
        return (self.head(chosen) * top.values[..., None]).flatten(1)


def near_ties() -> Tuple[torch.Tensor, torch.Tensor]:
    """Keys that bfloat16 holds exactly, whose scores (sums of 16) differ by 1/32 near 64,
    where bfloat16's spacing is 0.5; and values to choose."""
    keys = torch.full((BATCH, 8, 16), 4.0)
    keys[:, :, 0] += torch.arange(8) / 32
    return keys, torch.randn(BATCH, 8, 16)


# -- test_autocast ---------------------------------------------------------------------------
class Autocast(CheckTestCase):
    def test_a_choice_among_values_bfloat16_cannot_tell_apart_skips(self) -> None:
        # RT-DETR's top-k queries, Informer's top-k queries: with random weights, bfloat16
        # reorders scores that differ by less than it resolves, and all after differs
        self.assertSkipsWith(
            case(TrainingStackTests, TopScoring, near_ties),
            "test_autocast",
            "under torch.autocast('cpu', dtype=torch.bfloat16), Tensor.topk in TopScoring, at "
            "test_model_stack.py:",
            "chooses other elements than in float32 (8 of its 8 indices differ), among values "
            "as close to float32's as rounding to torch.bfloat16 explains",
            "output by",
            "Set autocast_strict = True to make this a failure.",
        )
        self.assertFailsWith(
            case(TrainingStackTests, TopScoring, near_ties, autocast_strict=True),
            "test_autocast",
            "one training step is farther from float32's than rounding to torch.bfloat16 explains",
        )

    def test_a_choice_among_values_that_lost_their_precision_before_fails(self) -> None:
        self.assertFailsWith(
            case(TrainingStackTests, lambda: TopScoring(precise=False), near_ties),
            "test_autocast",
            "one training step is farther from float32's than rounding to torch.bfloat16 explains",
            "output by",
        )

    def test_a_correct_model_with_layer_norm_passes(self) -> None:
        self.assertPasses(case(TrainingStackTests, Normed, rows), "test_autocast")

    def test_a_variance_that_cancels_to_nan_names_the_operation_and_the_module(self) -> None:
        self.assertFailsWith(
            case(TrainingStackTests, lambda: Normed(NaiveNorm), rows),
            "test_autocast",
            "under torch.autocast('cpu', dtype=torch.bfloat16), one training step gives NaN or "
            "Inf where float32 gives finite values: output",
            "The first operation that makes NaN or Inf of finite values: torch.sqrt in norm "
            "(NaiveNorm), at test_model_stack.py",
            "The first submodule whose output holds NaN or Inf where float32's does not: norm "
            "(NaiveNorm)",
        )

    def test_a_variance_that_loses_its_precision_fails(self) -> None:
        self.assertFailsWith(
            case(
                TrainingStackTests,
                lambda: Normed(lambda n: NaiveNorm(n, clamp=True)),
                rows,
            ),
            "test_autocast",
            "one training step is farther from float32's than rounding to torch.bfloat16 explains",
            "output by",
            "The first submodule whose output is off: norm (NaiveNorm)",
        )

    def test_a_mask_value_beyond_bfloat16s_range_fails(self) -> None:
        self.assertFailsWith(
            case(TrainingStackTests, MaskedAttention, masked_tokens),
            "test_autocast",
            "Tensor.masked_fill in MaskedAttention raises, at test_model_stack.py",
            "without overflow",
            "torch.finfo(x.dtype).min",
        )
        self.assertPasses(
            case(TrainingStackTests, lambda: MaskedAttention("own"), masked_tokens),
            "test_autocast",
        )

    def test_a_mask_value_typed_in_a_doctest_or_notebook_fails_with_its_line(self) -> None:
        source = (
            "class Typed(MaskedAttention):\n"
            "    def forward(self, x, mask):\n"
            "        scores = self.query(x) @ self.key(x).transpose(1, 2)\n"
            "        scores = scores.masked_fill(~mask[:, None, :], -3.4e38)\n"
            "        return self.out(scores.softmax(-1) @ x)\n"
        )
        for filename in ("<doctest page[0]>", "<ipython-input-3-1a2b>"):
            namespace: Dict[str, Any] = {"MaskedAttention": MaskedAttention}
            exec(compile(source, filename, "exec"), namespace)
            self.assertFailsWith(
                case(TrainingStackTests, namespace["Typed"], masked_tokens),
                "test_autocast",
                f"Tensor.masked_fill in Typed raises, at {filename}:4 in forward",
                "torch.finfo(x.dtype).min",
            )

    def test_an_indexed_add_of_another_dtype_fails(self) -> None:
        self.assertFailsWith(
            case(TrainingStackTests, MixtureOfExperts, lambda: torch.randn(6, 8)),
            "test_autocast",
            "Tensor.index_add_ in MixtureOfExperts raises, given torch.bfloat16 and "
            "torch.float32 tensors, at test_model_stack.py",
            "Cast the value to the destination's dtype (.to(out.dtype))",
        )
        self.assertPasses(
            case(
                TrainingStackTests, lambda: MixtureOfExperts(cast=True), lambda: torch.randn(6, 8)
            ),
            "test_autocast",
        )

    def test_float16_overflow_fails_where_bfloat16_passes(self) -> None:
        inputs = lambda: torch.randn(4, 16)  # noqa: E731
        self.assertPasses(case(TrainingStackTests, SumOfSquares, inputs), "test_autocast")
        self.assertFailsWith(
            case(TrainingStackTests, SumOfSquares, inputs, autocast_dtype=torch.float16),
            "test_autocast",
            "under torch.autocast('cpu', dtype=torch.float16), one training step gives NaN or Inf",
            "The first operation that makes NaN or Inf of finite values: Tensor.matmul in "
            "SumOfSquares",
        )

    def test_a_float64_model_skips(self) -> None:
        self.assertSkipsWith(
            case(TrainingStackTests, lambda: MLP().double(), lambda: features().double()),
            "test_autocast",
            "the model is in torch.float64",
        )

    def test_another_dtype_is_a_contract_error(self) -> None:
        self.assertErrorsWith(
            case(TrainingStackTests, MLP, features, autocast_dtype=torch.float64),
            "test_autocast",
            "self.autocast_dtype",
            "not torch.bfloat16 or torch.float16",
        )


# -- test_activation_checkpointing -----------------------------------------------------------
class ActivationCheckpointing(CheckTestCase):
    def test_checkpointing_that_preserves_the_random_state_passes(self) -> None:
        self.assertPasses(
            case(
                TrainingStackTests,
                Checkpointable,
                lambda: torch.randn(4, 16),
                checkpointing_switch=switch,
            ),
            "test_activation_checkpointing",
        )

    def test_checkpointing_that_draws_other_dropout_masks_fails(self) -> None:
        self.assertFailsWith(
            case(
                TrainingStackTests,
                lambda: Checkpointable(preserve_rng_state=False),
                lambda: torch.randn(4, 16),
                checkpointing_switch=switch,
            ),
            "test_activation_checkpointing",
            "with activation checkpointing switched on (self.checkpointing_switch), one "
            "training step gives other results than without it",
            "the gradient of blocks.0.linear.weight",
            "preserve_rng_state=False",
        )

    def test_a_model_without_a_switch_skips(self) -> None:
        self.assertSkipsWith(
            case(TrainingStackTests, Checkpointable, lambda: torch.randn(4, 16)),
            "test_activation_checkpointing",
            "Checkpointable has no switch for activation checkpointing",
            "set checkpointing_switch",
        )

    @unittest.skipUnless(importlib.util.find_spec("diffusers"), "needs diffusers (the zoo extra)")
    def test_a_diffusers_model_is_switched_with_enable_gradient_checkpointing(self) -> None:
        from test_zoo_design import diffusers_unet, latents_and_text

        unet_case = case(TrainingStackTests, diffusers_unet, latents_and_text, output_key="sample")
        self.assertPasses(unet_case, "test_activation_checkpointing", allowed_skips=())

    def test_a_switch_that_checkpoints_nothing_skips(self) -> None:
        self.assertSkipsWith(
            case(
                TrainingStackTests,
                Checkpointable,
                lambda: torch.randn(4, 16),
                checkpointing_switch=lambda model, on: None,
            ),
            "test_activation_checkpointing",
            "no submodule ran forward again during the backward pass",
        )


# -- test_compile ----------------------------------------------------------------------------
class Compile(CheckTestCase):
    def test_a_correct_model_with_dropout_passes(self) -> None:
        self.assertPasses(case(TrainingStackTests, MLP, features), "test_compile")

    def test_a_step_counter_in_forward_recompiles_at_every_batch(self) -> None:
        self.assertFailsWith(
            case(TrainingStackTests, CountsItsCalls, features),
            "test_compile",
            "torch.compile compiled the model again at a third batch size (6), after "
            "compiling it for 4 and 5",
            "What changed, as torch.compile saw it: self.calls ==",
            "test_model_stack.py",
        )

    def test_a_state_changed_once_recompiles_once_and_passes(self) -> None:
        self.assertSkipsWith(
            case(TrainingStackTests, RescalesOnceForEval, features),
            "test_compile",
            "torch.compile compiled the model again at a third batch size (6), once: not at "
            "a fourth (7), so it does not compile at every batch.",
            "What changed, as torch.compile saw it: self.rescaled == False",
        )

    def test_a_compiled_training_step_that_raises_is_not_blamed_on_checkpointing(self) -> None:
        # PatchTST: the compiled step raised before updating its BatchNorm statistics, which
        # the check then ascribed to gradient checkpointing (the model has none)
        from dltestkit.models.stack.compiling import Compile as CompileChecks

        original = CompileChecks._compiled_run

        def raises_in_training(self: Any, run: Callable[[], Any], where: str) -> Any:
            if where == "in training mode":
                raise RuntimeError("view size is not compatible with input tensor's size")
            return original(self, run, where)

        with mock.patch.object(CompileChecks, "_compiled_run", raises_in_training):
            normed = case(
                TrainingStackTests,
                lambda: nn.Sequential(
                    nn.Conv2d(3, 4, 3, padding=1),
                    nn.BatchNorm2d(4),
                    nn.Flatten(),
                    nn.Linear(256, 2),
                ),
                images,
            )
            outcome = run_check(normed, "test_compile")
        self.assertEqual(len(outcome.errors), 1, outcome)
        self.assertIn("view size is not compatible", outcome.errors[0])
        self.assertFalse([skip for skip in outcome.skips if "checkpointing" in skip], outcome)

    def test_statistics_that_eager_checkpointing_updates_twice_are_no_failure(self) -> None:
        self.assertSkipsWith(
            case(TrainingStackTests, CheckpointedBatchNorm, images),
            "test_compile",
            "in the training step, eager PyTorch updated the running statistics of 1 layers "
            "more often than the compiled model (their num_batches_tracked: norm): gradient "
            "checkpointing runs those layers' forward again in the backward pass",
        )
        self.assertPasses(
            case(TrainingStackTests, CheckpointedBatchNorm, images),
            "test_compile",
            allowed_skips=("in the training step, eager PyTorch updated",),
        )

    def test_another_path_when_compiled_fails(self) -> None:
        self.assertFailsWith(
            case(TrainingStackTests, OtherPathWhenCompiled, features),
            "test_compile",
            "torch.compile(model, backend='aot_eager') gives other results than the eager "
            "model in eval mode, under the same seed: output",
            "torch.compiler.is_compiling()",
        )

    def test_a_mode_in_which_nothing_compiles_is_a_skipped_part_naming_the_break(self) -> None:
        # the break reaches no backend (no graph was compiled in training mode): only
        # Dynamo's counters name it; eval mode compiles and is compared
        cumulative = case(TrainingStackTests, cumulative_batchnorm, images)
        nothing = (
            "torch.compile(model, backend='aot_eager') compiled no graph of the model in "
            "training mode, leaving all of it to eager PyTorch: Unsupported Tensor.item() call"
        )
        self.assertSkipsWith(cumulative, "test_compile", nothing, "nothing was compared in")
        self.assertSkipsWith(
            cumulative, "test_compile", "torch.compile breaks the model's graph 1 time"
        )
        self.assertFailsWith(
            case(TrainingStackTests, cumulative_batchnorm, images, compile_fullgraph=True),
            "test_compile",
            nothing,
            "self.compile_fullgraph is True: the model must compile.",
        )

    def test_zero_gradients_where_eager_gives_none_are_no_failure(self) -> None:
        # the compiled backward computes the gradients of an output the loss leaves out from
        # zeros (transformers' DPT: its backbone's last layernorm); eager leaves them None
        with_auxiliary = case(
            TrainingStackTests, WithAnAuxiliaryOutput, features, loss_fn=main_output_loss
        )
        said = (
            "torch.compile gives 2 parameters a gradient of zeros where eager PyTorch gives "
            "none (auxiliary.weight, auxiliary.bias)"
        )
        self.assertSkipsWith(with_auxiliary, "test_compile", said, "weight decay, momentum")
        self.assertPasses(with_auxiliary, "test_compile", allowed_skips=(said,))

    def test_an_error_in_the_compiled_graph_names_the_line_it_was_traced_from(self) -> None:
        # the frames around the graph name only the compiled function's first line
        self.assertFailsWith(
            case(TrainingStackTests, RaisesWhenCompiled, features),
            "test_compile",
            "torch.compile(model, backend='aot_eager') raises in training mode, where the "
            "eager model runs:",
            "at test_model_stack.py:",
            " in forward: `x = x + torch.linalg.cholesky(-torch.eye(x.shape[-1]))[0]`",
        )

    def test_graph_breaks_are_listed_and_fail_with_compile_fullgraph(self) -> None:
        self.assertSkipsWith(
            case(TrainingStackTests, Prints, features),
            "test_compile",
            "torch.compile breaks the model's graph",
            "at test_model_stack.py",
            '`print(end="")`',
            "set compile_fullgraph = True",
        )
        self.assertFailsWith(
            case(TrainingStackTests, Prints, features, compile_fullgraph=True),
            "test_compile",
            "torch.compile breaks the model's graph",
            '`print(end="")`',
            "self.compile_fullgraph is True",
        )

    def test_a_model_torch_compile_leaves_to_eager_skips(self) -> None:
        self.assertSkipsWith(
            case(
                TrainingStackTests,
                lambda: nn.GRU(8, 4, batch_first=True),
                lambda: torch.randn(4, 3, 8),
            ),
            "test_compile",
            "compiled no graph of the model",
            "RNN, GRU, or LSTM",
        )

    def test_an_unknown_backend_is_a_contract_error(self) -> None:
        self.assertErrorsWith(
            case(TrainingStackTests, MLP, features, compile_backend="aot_eagre"),
            "test_compile",
            "self.compile_backend is 'aot_eagre', which torch.compile does not know",
            "'aot_eager'",
        )


# -- test_export -----------------------------------------------------------------------------
class Export(CheckTestCase):
    def test_a_correct_model_passes(self) -> None:
        self.assertPasses(case(ExportTests, MLP, features), "test_export")

    def test_a_hard_coded_batch_size_is_named_with_its_line(self) -> None:
        self.assertFailsWith(
            case(ExportTests, FixedBatchState, features),
            "test_export",
            "torch.export cannot make the batch dimension dynamic: the model's code fixes or "
            "bounds the batch size: x.shape[0] == 4, at test_model_stack.py",
            "`return self.linear(x) + state`",
        )

    def test_a_branch_on_the_batch_size_is_named_with_its_line(self) -> None:
        self.assertFailsWith(
            case(ExportTests, BranchesOnBatchSize, features),
            "test_export",
            "x.shape[0] <= 4, at test_model_stack.py",
            "`if x.shape[0] > 4:`",
        )

    def test_input_guards_that_torch_generates_broken_are_left_out_naming_the_bug(self) -> None:
        from torch.export import ExportedProgram

        module = ExportedProgram.module

        def broken_guards(program: Any, check_guards: bool = True) -> Any:
            """As torch 2.14 gives some programs: guard code compiled from a string, named _,
            that still names L[...] (pytorch/pytorch#172903)."""
            made = module(program, check_guards=False)
            if not check_guards:
                return made
            namespace: Dict[str, Any] = {}
            exec("def _(*args):\n    return L['x'].size()[0] >= 2\n", namespace)

            def guarded(*args: Any, **kwargs: Any) -> Any:
                namespace["_"](*args)
                return made(*args, **kwargs)

            return guarded

        with mock.patch.object(ExportedProgram, "module", broken_guards):
            outcome = run_check(case(ExportTests, MLP, features), "test_export")
            # a model the program computes wrongly still fails without the guards
            self.assertFailsWith(
                case(ExportTests, OtherPathWhenCompiled, features),
                "test_export",
                "the exported program gives other outputs than the model",
            )
        self.assertEqual((outcome.failures, outcome.errors), ([], []))
        self.assertEqual(len(outcome.skips), 2)  # the exported program, and saved and loaded
        for reason in outcome.skips:
            self.assertIn("(ExportedProgram.module()'s guards) raises NameError", reason)
            self.assertIn("pytorch/pytorch#172903", reason)
            self.assertIn("was run without it (module(check_guards=False))", reason)

    def test_a_program_that_raises_once_saved_and_loaded_skips_unless_strict(self) -> None:
        import torch.export

        load = torch.export.load

        class Reloaded:
            """A loaded program whose module raises, as a quantisation observer's in-place
            resize does in the storage torch.export.load gives."""

            def __init__(self, path: str) -> None:
                self.program = load(path)

            def module(self, check_guards: bool = True) -> Callable[..., Any]:
                def run(*args: Any, **kwargs: Any) -> Any:
                    raise RuntimeError("Trying to resize storage that is not resizable")

                return run

        with mock.patch("torch.export.load", Reloaded):
            self.assertSkipsWith(
                case(ExportTests, MLP, features),
                "test_export",
                "the program saved and loaded raises at batch size 5: RuntimeError: Trying to "
                "resize storage that is not resizable",
                "where the same program before torch.export.save ran at that batch size and "
                "gave the model's outputs",
                "set strict_export = True to make this a failure",
            )
            self.assertFailsWith(
                case(ExportTests, MLP, features, strict_export=True),
                "test_export",
                "strict_export = True: the model is meant to be exported, saved and loaded",
            )

    def test_a_branch_for_large_batches_is_exported_within_its_bound_unless_strict(self) -> None:
        said = (
            "torch.export makes the batch dimension dynamic only for batch sizes at most 63: "
            "the model's code branches on the batch size (x.shape[0] < 64, at "
            "test_model_stack.py:"
        )
        large = case(ExportTests, AnotherPathForLargeBatches, features)
        self.assertSkipsWith(
            large,
            "test_export",
            said,
            "`if x.shape[0] >= 64:`), and the program takes one branch; it was exported for "
            "those batch sizes and gave the model's outputs there",
            "set strict_export = True to make this a failure",
        )
        self.assertPasses(large, "test_export", allowed_skips=(said,))
        self.assertFailsWith(
            case(ExportTests, AnotherPathForLargeBatches, features, strict_export=True),
            "test_export",
            said,
            "strict_export = True: the exported program must take every batch size",
        )

    def test_only_the_guards_that_fix_the_batch_size_are_named(self) -> None:
        # torch relates the batch sizes of x and y (x + y): true at every batch size, unnamed
        message = self.assertFailsWith(
            case(ExportTests, AddsTwoInputsAndAFixedState, lambda: (features(), features())),
            "test_export",
            "the model's code fixes or bounds the batch size: ",
            "== 4, at test_model_stack.py",
            "`return self.linear(x + y) + torch.zeros(4, 4)`",
        )
        self.assertEqual(message.count(", at test_model_stack.py"), 1, message)

    def test_control_flow_on_values_skips_with_its_line_unless_strict(self) -> None:
        message = (
            "torch.export cannot trace the model: its control flow depends on the values of "
            "a tensor, at test_model_stack.py"
        )
        self.assertSkipsWith(
            case(ExportTests, BranchesOnValues, features),
            "test_export",
            message,
            "`if x.sum() > 0:`",
            "set strict_export = True to make this a failure",
        )
        self.assertFailsWith(
            case(ExportTests, BranchesOnValues, features, strict_export=True),
            "test_export",
            message,
            "`if x.sum() > 0:`",
            "strict_export = True: the model is meant to be exported",
        )


class Comparisons(unittest.TestCase):
    """The comparisons of two runs, whose first look is in the tensors' own dtype: only values
    well within the tolerance are settled there, the rest in float64."""

    def test_within_and_beyond_the_tolerance(self) -> None:
        from dltestkit.models.stack.contract import differences, gradient_differences

        expected = torch.linspace(1.0, 2.0, 10_000)
        tolerance = 1e-3
        # the bound: the tolerance relative to each value and to the largest value (2)
        bound = tolerance * expected.abs() + tolerance * 2.0
        for factor, close in ((0.25, True), (0.75, True), (0.99, True), (1.01, False)):
            actual = expected + factor * bound
            with self.subTest(factor=factor):
                self.assertEqual(differences(actual, expected, tolerance) == [], close)
                self.assertEqual(
                    gradient_differences([("w", actual)], [("w", expected)], tolerance) == [],
                    close,
                )

    def test_nan_where_both_have_it_and_infinities(self) -> None:
        from dltestkit.models.stack.contract import differences

        expected = torch.tensor([1.0, float("nan"), float("inf"), 2.0])
        self.assertEqual(differences(expected.clone(), expected, 1e-3), [])
        found = differences(torch.tensor([1.0, 0.0, float("inf"), 2.0]), expected, 1e-3)
        self.assertEqual(len(found), 1)
        self.assertIn("1 of 4 values differ beyond the tolerance", found[0])

    def test_the_scale_is_the_largest_finite_value(self) -> None:
        from dltestkit.models.stack.contract import _scale

        self.assertEqual(_scale([torch.tensor([-3.0, 2.0]), torch.tensor([1.0])]), 3.0)
        self.assertEqual(_scale([torch.tensor([float("inf"), -2.5, float("nan")])]), 2.5)
        self.assertEqual(_scale([torch.tensor([float("nan")]), torch.empty(0)]), 0.0)

    def test_autocasts_distance_ignores_what_float32_leaves_non_finite(self) -> None:
        from dltestkit.models.stack.autocasting import _distance

        exact = torch.tensor([1.0, 2.0, float("inf"), 3.0])
        rounded = torch.tensor([1.0, 2.0, float("inf"), 3.0 + 1e-3])
        self.assertIsNone(_distance(exact.clone(), rounded, exact, 2.0**-8))
        far = torch.tensor([1.0, 2.5, 0.0, 3.0])
        distance = _distance(far, rounded, exact, 2.0**-8)
        self.assertIsNotNone(distance)
        assert distance is not None
        torch.testing.assert_close(distance[0], 0.5 / math.sqrt(14.0))


if __name__ == "__main__":
    unittest.main()
