"""What the model checks do to cost less, and that each keeps its verdicts: the round trip's
fresh model built without its random initialisation (built in full before anything is
reported), the shape check's other batch sizes kept small (1 and 2), the dtype check on one
sample in eval mode and two in training mode (on all of them when that does not pass), the
device check's meta run without a CPU run until a step needs the data, the batch check's
dependence from one batched backward pass (one pass per sample where that cannot run:
reentrant gradient checkpointing, tested with the batch check)."""

from __future__ import annotations

import copy
from typing import Any, List, Set, Tuple

import torch
import torch.nn.functional as F
from checkrunner import CheckTestCase, run_check
from test_model_checks import (
    FEATURES,
    SHAPE,
    AutoEncoder,
    HardWiredBatch,
    WithBatchNorm,
    model_case,
)
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from dltestkit.core.paths import map_tensors
from dltestkit.core.watch import watching
from dltestkit.models.copies import copy_module
from dltestkit.models.dtype_watch import DtypeWatch, watching_dtypes
from dltestkit.models.meta import Recorder
from dltestkit.models.meta_results import meta_result as _meta_result


class SeedsItselfThenDraws(AutoEncoder):
    """Correct: it seeds torch in __init__, after its layers are initialised, and draws a
    fixed projection that is not in the state dict (the same in every instance)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1234)
        self.register_buffer("projection", torch.randn(SHAPE), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x * self.projection)


class SeedsItselfFirst(AutoEncoder):
    """Correct: it seeds torch before its layers are initialised, then draws a projection
    that is not in the state dict (the same in every instance, because the layers' random
    initialisation drew the same numbers before it)."""

    def __init__(self) -> None:
        torch.manual_seed(1234)
        super().__init__()
        self.register_buffer("projection", torch.randn(SHAPE), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x * self.projection)


class KeepsItsInitialWeights(AutoEncoder):
    """Broken: a copy of the initial weights, outside the state dict, is used in forward."""

    def __init__(self) -> None:
        super().__init__()
        initial = self.decoder[0].weight.detach().clone()
        self.register_buffer("initial", initial, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.initial.sum()


class RoundTrip(CheckTestCase):
    def test_a_model_that_seeds_itself_passes(self) -> None:
        for model_type in (SeedsItselfThenDraws, SeedsItselfFirst):
            with self.subTest(model_type.__name__):
                case = model_case(model_type, make_model=model_type)
                self.assertPasses(case, "test_state_dict_round_trip")

    def test_state_made_from_the_initial_weights_is_still_found(self) -> None:
        self.assertFailsWith(
            model_case(KeepsItsInitialWeights, make_model=KeepsItsInitialWeights),
            "test_state_dict_round_trip",
            "part of the model's state is not in its state dict",
            "initial (buffer with persistent=False)",
        )


class CountsBatchSizes(AutoEncoder):
    """Correct; records the batch size of every forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.shape[0])
        return super().forward(x)


class OutputShape(CheckTestCase):
    def test_the_other_batch_size_is_the_smallest(self) -> None:
        for batch, others in ((4, [1]), (2, [1]), (1, [2])):
            with self.subTest(batch=batch):
                model = CountsBatchSizes()
                case = model_case(
                    lambda model=model: model,
                    inputs=lambda batch=batch: torch.randn(batch, *SHAPE),
                )
                self.assertPasses(case, "test_output_shape")
                self.assertEqual(model.seen, [batch, *others])  # the shared eval pass first

    def test_a_batch_size_hard_wired_for_the_inputs_fails_at_the_other_size(self) -> None:
        outcome = run_check(model_case(HardWiredBatch), "test_output_shape")
        self.assertEqual(len(outcome.failures), 1, outcome.failures)
        self.assertIn("at batch size 1 the model raises RuntimeError", outcome.failures[0])
        self.assertIn("hard-coded batch size", outcome.failures[0])


class OnlyForFour(AutoEncoder):
    """Runs at a batch of 4 only, and makes a float32 tensor in forward (a dtype bug)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return HardWiredBatch.forward(self, x) + torch.ones(SHAPE)


class _KernelDtypes(TorchDispatchMode):
    """The dtypes of the floating-point tensors the product and convolution kernels get."""

    def __init__(self) -> None:
        super().__init__()
        self.products: Set[torch.dtype] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func.overloadpacket.__name__ in ("mm", "addmm", "bmm", "convolution"):
            flat = [*args, *(kwargs or {}).values()]
            self.products.update(t.dtype for t in flat if isinstance(t, torch.Tensor))
        return func(*args, **(kwargs or {}))


class DtypeMoving(CheckTestCase):
    def test_each_mode_runs_one_sample(self) -> None:
        seen: List[Tuple[torch.dtype, bool, int]] = []

        class Recorded(AutoEncoder):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                seen.append((x.dtype, self.training, len(x)))
                return super().forward(x)

        self.assertPasses(model_case(Recorded), "test_dtype_moving")
        self.assertEqual(
            [pass_ for pass_ in seen if pass_[0] != torch.float32],
            [
                (torch.bfloat16, False, 1),
                (torch.bfloat16, True, 1),
                (torch.float64, False, 1),
                (torch.float64, True, 1),
            ],
        )

    def test_training_mode_runs_two_samples_where_one_cannot_run(self) -> None:
        seen: List[Tuple[torch.dtype, bool, int]] = []

        class BatchNormOfFeatures(AutoEncoder):
            def __init__(self) -> None:
                super().__init__()
                self.norm = nn.BatchNorm1d(FEATURES)  # a single value per channel: no batch

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                seen.append((x.dtype, self.training, len(x)))
                return super().forward(self.norm(x.flatten(1)).view_as(x))

        self.assertPasses(model_case(BatchNormOfFeatures), "test_dtype_moving")
        # the one-sample training pass that raised is tried on two, without the eval pass
        # again and without a float32 copy to judge it
        self.assertEqual(
            seen,
            [
                (torch.bfloat16, False, 1),
                (torch.bfloat16, True, 1),
                (torch.bfloat16, True, 2),
                (torch.float64, False, 1),
                (torch.float64, True, 1),
                (torch.float64, True, 2),
            ],
        )

    def test_the_pass_on_all_samples_after_a_failure_runs_on_a_fresh_copy(self) -> None:
        class Reentrant(AutoEncoder):  # correct: a pass that raised leaves its guard set
            def __init__(self) -> None:
                super().__init__()
                self.norm = nn.BatchNorm1d(FEATURES)
                self.running = False

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                if self.running:
                    raise RuntimeError("forward called again while it runs")
                self.running = True
                out = super().forward(self.norm(x.flatten(1)).view_as(x))
                self.running = False
                return out

        # the one-sample training pass raises in BatchNorm, leaving the guard set; on its
        # copy, the two-sample pass raises at the guard; the pass on all four, whose
        # outcome is reported, runs on a fresh copy
        self.assertPasses(model_case(Reentrant), "test_dtype_moving")

    def test_bfloat16_products_and_convolutions_are_computed_in_float32(self) -> None:
        generator = torch.Generator().manual_seed(0)

        def bf16(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=generator).bfloat16()

        x, weight, bias = bf16(3, 16), bf16(5, 16), bf16(5)
        image, kernel = bf16(1, 4, 9, 9), bf16(6, 4, 3, 3)
        cases = [
            (F.linear, (x, weight, bias)),
            (torch.matmul, (x, weight.t())),
            (torch.einsum, ("ij,kj->ik", [x, weight])),
            (F.conv2d, (image, kernel)),
        ]
        model = nn.Linear(16, 5).bfloat16()
        for func, args in cases:
            with self.subTest(func.__name__):
                with watching_dtypes(torch.bfloat16, model):
                    with torch.no_grad(), _KernelDtypes() as no_grad:
                        watched = func(*args)
                    with _KernelDtypes() as with_grad:  # a pass with gradients: as it is
                        real = func(*args)
                self.assertEqual((watched.dtype, watched.shape), (real.dtype, real.shape))
                torch.testing.assert_close(watched, real)  # within bfloat16's tolerance
                self.assertEqual(no_grad.products, {torch.float32})
                self.assertEqual(with_grad.products, {torch.bfloat16})
        # another dtype among the arguments goes to the real kernel, which raises
        with self.assertRaises(RuntimeError) as outside:
            F.linear(x, weight.float())
        with watching_dtypes(torch.bfloat16, model) as watch, torch.no_grad():
            with self.assertRaises(RuntimeError) as inside:
                F.linear(x, weight.float())
        self.assertEqual(str(inside.exception), str(outside.exception))
        self.assertIsNotNone(watch.failure(inside.exception))

    def test_a_model_that_runs_at_one_batch_size_only_is_checked_on_it(self) -> None:
        self.assertPasses(model_case(HardWiredBatch), "test_dtype_moving")
        self.assertFailsWith(
            model_case(OnlyForFour),
            "test_dtype_moving",
            "returns output (torch.float32, made by torch.ones without dtype=",
        )


class ReadsTheDataThenMixesDevices(AutoEncoder):
    """A device bug after a step that reads what the weights give (the meta run needs the
    CPU run's)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if bool((out > 10).any()):  # reads the data
            out = out / 10
        return out + torch.ones(SHAPE)  # made on the CPU


class ReadsTheInputsThenMixesDevices(AutoEncoder):
    """A device bug after a step that reads what the inputs alone give (their CPU twins)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x > 10).any()):  # reads the data
            x = x / 10
        return super().forward(x) + torch.ones(SHAPE)  # made on the CPU


class MixesDevicesThenReadsTheData(AutoEncoder):
    """A device bug before any step that reads the data (found without a CPU run)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x) + torch.ones(SHAPE)  # made on the CPU
        return out / 10 if bool((out > 10).any()) else out


class ReadsTheData(AutoEncoder):
    """Reads a value the weights give: the meta run needs the CPU run's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        scale = 2.0 if out.abs().max().item() > 1 else 1.0
        return out * scale


class ReadsTheInputs(AutoEncoder):
    """Reads values the inputs alone give (as transformers' padding_mask.all() does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        positive = (x > 0).to(torch.int64)  # a mask made from the inputs
        shift = torch.arange(x.shape[-1], device=x.device)
        scale = 2.0 if (positive.sum() + shift.max()).item() > 1 else 1.0
        return super().forward(x) * scale


def counting_calls(model_type: type, calls: List[Tuple[str, bool]]) -> type:
    """``model_type`` noting each call's device and mode in ``calls``."""

    def forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
        calls.append((x.device.type, self.training))
        return model_type.forward(self, x)

    return type(model_type.__name__, (model_type,), {"forward": forward})


class DeviceMoving(CheckTestCase):
    def test_a_model_that_reads_its_data_passes(self) -> None:
        self.assertPasses(model_case(ReadsTheData), "test_device_moving")

    def test_training_mode_goes_straight_to_the_cpu_run_that_eval_mode_needed(self) -> None:
        calls: List[Tuple[str, bool]] = []
        self.assertPasses(model_case(counting_calls(ReadsTheData, calls)), "test_device_moving")
        # eval: a meta run that stops at .item(), the CPU run, its replay; training: those two
        self.assertEqual(
            calls,
            [("meta", False), ("cpu", False), ("meta", False), ("cpu", True), ("meta", True)],
        )

    def test_a_read_of_what_the_inputs_alone_give_needs_no_cpu_run(self) -> None:
        calls: List[Tuple[str, bool]] = []
        self.assertPasses(model_case(counting_calls(ReadsTheInputs, calls)), "test_device_moving")
        self.assertEqual(calls, [("meta", False), ("meta", True)])

    def test_the_twins_change_neither_the_inputs_nor_the_model(self) -> None:
        # a forward pass that edits its input in place before reading it: the edit is
        # repeated on the check's own copy of the inputs, never on self.inputs
        class EditsItsInputThenReads(AutoEncoder):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                x.clamp_(-1, 1)
                return super().forward(x) * (2.0 if x.abs().max().item() > 0.5 else 1.0)

        inputs = torch.randn(4, *SHAPE) * 3
        kept = inputs.clone()
        calls: List[Tuple[str, bool]] = []
        case = model_case(counting_calls(EditsItsInputThenReads, calls), inputs=lambda: inputs)
        self.assertPasses(case, "test_device_moving")
        self.assertEqual(calls, [("meta", False), ("meta", True)])
        self.assertTrue(torch.equal(inputs, kept))

    def test_what_the_twins_cannot_follow_needs_the_cpu_run(self) -> None:
        class DrawsThenReads(AutoEncoder):  # a random draw: not the one the model makes
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                noisy = x + torch.rand_like(x)
                return super().forward(x) * (2.0 if noisy.max().item() > 1 else 1.0)

        class ChangedByAWeightThenReads(AutoEncoder):  # changed in place by a weight's value
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                shifted = x.clone()
                shifted.add_(next(self.parameters()).sum())
                return super().forward(x) * (2.0 if shifted.max().item() > 1 else 1.0)

        for model_type in (DrawsThenReads, ChangedByAWeightThenReads):
            with self.subTest(model_type.__name__):
                calls: List[Tuple[str, bool]] = []
                state = torch.random.get_rng_state()
                case = model_case(counting_calls(model_type, calls))
                self.assertPasses(case, "test_device_moving")
                self.assertIn(("cpu", False), calls)
                self.assertTrue(torch.equal(state, torch.random.get_rng_state()))

    def test_the_cpu_run_keeps_only_the_results_a_meta_run_can_replay(self) -> None:
        class MovesAndCasts(AutoEncoder):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                y = super().forward(x).to(torch.float64).to(x.dtype)  # kept on its device
                return y + y.to("cpu").mean().item()  # moved to the CPU, then read

        model = MovesAndCasts()
        with Recorder() as recorder:
            model(torch.randn(2, *SHAPE[1:]))
        kept = [(name, type(value).__name__) for name, value in recorder.log]
        self.assertEqual(
            kept,
            [("Tensor.to", "NoneType")] * 2 + [("Tensor.to", "Tensor"), ("Tensor.item", "float")],
        )
        self.assertPasses(model_case(MovesAndCasts), "test_device_moving")  # replayed

    def test_a_device_bug_is_found_before_and_after_a_step_that_reads_the_data(self) -> None:
        for model_type in (
            ReadsTheDataThenMixesDevices,
            ReadsTheInputsThenMixesDevices,
            MixesDevicesThenReadsTheData,
        ):
            with self.subTest(model_type.__name__):
                self.assertFailsWith(
                    model_case(model_type),
                    "test_device_moving",
                    "does not move to another device as a whole",
                    "Tensor.add combines a CPU tensor of shape (1, 4, 4)",
                )


class RollBatch(torch.autograd.Function):
    """Rolls the batch by one sample, with a backward pass of its own (which the batched
    backward pass runs through vmap's fallback)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.roll(1, 0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[torch.Tensor]:
        return (grad.roll(-1, 0),)


class Scale(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[torch.Tensor]:
        return (grad * 2,)


class MixesThroughAFunction(AutoEncoder):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(x)
        return self.decoder(hidden + 0.1 * RollBatch.apply(hidden))


class ScalesThroughAFunction(AutoEncoder):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(Scale.apply(self.encoder(x)))


class BatchIndependence(CheckTestCase):
    def test_an_autograd_function_of_the_models_own(self) -> None:
        self.assertPasses(model_case(ScalesThroughAFunction), "test_batch_independence")
        self.assertFailsWith(
            model_case(MixesThroughAFunction),
            "test_batch_independence",
            "gets a gradient from the outputs of the other samples of the batch",
        )

    def test_mixing_by_a_view_is_found_in_the_batched_pass(self) -> None:
        class ViewMixes(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.linear = nn.Linear(FEATURES, FEATURES)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                flat = self.linear(x.flatten(1))
                return F.relu(flat.t().reshape(flat.shape)).view(x.shape)

        self.assertFailsWith(
            model_case(ViewMixes),
            "test_batch_independence",
            "sample 0's self.inputs gets a gradient from the outputs of the other samples",
        )


class RecordsPasses(WithBatchNorm):
    """Correct, with BatchNorm; records (training, grad enabled, batch size) of every pass."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append((self.training, torch.is_grad_enabled(), x.shape[0]))
        return super().forward(x)


class PassesThatOnlyObserve(CheckTestCase):
    """Passes that only observe what the model calls run on fewer samples than self.inputs."""

    def test_the_normalisation_calls_of_eval_mode_are_found_on_one_sample(self) -> None:
        model = RecordsPasses()
        self.assertPasses(model_case(lambda: model), "test_running_statistics")
        self.assertEqual(model.seen[0], (False, False, 1))

    def test_a_model_that_cannot_run_one_sample_is_observed_on_all(self) -> None:
        class NeedsTwo(RecordsPasses):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                if x.shape[0] < 2:
                    raise ValueError("needs two samples")
                return super().forward(x)

        model = NeedsTwo()
        self.assertPasses(model_case(lambda: model), "test_running_statistics")
        self.assertEqual(model.seen[0], (False, False, 4))


class MetaStandIns(CheckTestCase):
    """On meta, normalisation and attention, whose meta kernels cost a millisecond a call,
    are stood in for by empty tensors of their results' shape, after their arguments'
    devices are judged."""

    def test_their_results_have_the_shape_dtype_and_gradient_of_the_real_ones(self) -> None:
        x = torch.randn(2, 4, 5, 5, device="meta", requires_grad=True)
        weight = torch.ones(4, device="meta")
        query, key = torch.randn(2, 3, 7, 8), torch.randn(2, 3, 9, 8)
        value = torch.randn(2, 3, 9, 6)
        cases = [
            (F.batch_norm, (x, weight, weight, weight, weight, True)),
            (F.layer_norm, (x, (5,))),
            (F.group_norm, (x, 2)),
            (F.scaled_dot_product_attention, (query, key, value)),
        ]
        for func, args in cases:
            with self.subTest(func.__name__):
                real = func(*args)
                on_meta = map_tensors(lambda t: t.to("meta"), args)
                made = _meta_result(func, on_meta, {})
                self.assertEqual((made.shape, made.dtype), (real.shape, real.dtype))
                self.assertEqual(made.requires_grad, real.requires_grad)
                self.assertFalse(made.requires_grad and made.is_leaf)  # in-place ops pass
        self.assertIsNone(_meta_result(F.layer_norm, (torch.randn(2, 5), (5,)), {}))  # on CPU

    def test_activations_have_the_shape_dtype_and_layout_of_the_real_ones(self) -> None:
        image = torch.randn(2, 4, 5, 5).to(memory_format=torch.channels_last)
        half = torch.randn(3, 7).bfloat16()
        cases = [
            (F.hardswish, (image,), {}),
            (F.hardsigmoid, (half,), {}),
            (F.relu, (image,), {}),
            (F.relu6, (half,), {"inplace": False}),
            (F.gelu, (half,), {"approximate": "tanh"}),
            (F.leaky_relu, (image, 0.2), {}),
            (F.hardtanh, (image,), {"min_val": -2.0, "max_val": 2.0}),
            (F.elu, (half,), {"alpha": 0.5}),
            (F.log_softmax, (half,), {"dim": -1}),
            (F.dropout, (image, 0.5, False), {}),
            (torch.clamp, (image,), {"min": 0.0}),
            (torch.Tensor.clamp, (half, -1, 1), {}),
            (torch.erf, (half,), {}),
            (torch.Tensor.square, (image,), {}),
        ]
        for func, args, kwargs in cases:
            with self.subTest(func.__name__):
                real = func(*args, **kwargs)
                on_meta = map_tensors(lambda t: t.to("meta"), args)
                made = _meta_result(func, on_meta, kwargs)
                self.assertIsNotNone(made)
                self.assertEqual(
                    (made.shape, made.dtype, made.stride()), (real.shape, real.dtype, real.stride())
                )
        # in place: the input itself, as the operation returns it; a leaf that requires grad
        # (which the kernel refuses to change in place), a tensor bound, a dtype=, or
        # arguments the function does not take: the kernel runs
        x = torch.randn(3, 4, device="meta")
        self.assertIs(_meta_result(F.hardswish, (x,), {"inplace": True}), x)
        self.assertIs(_meta_result(F.leaky_relu, (x, 0.1, True), {}), x)
        leaf = torch.randn(3, 4, device="meta", requires_grad=True)
        for func, args, kwargs in [
            (F.relu, (leaf,), {"inplace": True}),
            (torch.clamp, (x,), {"min": torch.zeros(4, device="meta")}),
            (F.log_softmax, (x,), {"dim": 1, "dtype": torch.float64}),
            (F.relu, (x,), {"slope": 2}),
        ]:
            with self.subTest(f"{func.__name__} {kwargs}"):
                self.assertIsNone(_meta_result(func, args, kwargs))

    def test_element_wise_results_have_the_shape_and_dtype_of_the_real_ones(self) -> None:
        a, row = torch.randn(4, 3, 5), torch.randn(5)
        half, scalar = torch.randn(4, 1, 5).half(), torch.tensor(2.0, dtype=torch.float64)
        cases = [
            (torch.Tensor.mul, (a, row), {}),
            (torch.Tensor.add, (row, a), {"alpha": 2}),
            (torch.sub, (a, 3), {}),
            (torch.Tensor.div, (half, a), {}),
            (torch.Tensor.mul, (half, scalar), {}),  # a 0-dim tensor does not promote
            (torch.Tensor.pow, (a, 2), {}),
            (torch.pow, (a, row), {}),
            (torch.Tensor.neg, (half,), {}),
            (torch.rsqrt, (a,), {}),
            (torch.Tensor.mean, (a, -1), {"keepdim": True}),
            (torch.Tensor.mean, (a, (0, 2)), {}),
            (torch.mean, (a,), {}),
        ]
        for func, args, kwargs in cases:
            with self.subTest(f"{func.__name__}{[getattr(x, 'shape', x) for x in args]}"):
                real = func(*args, **kwargs)
                made = _meta_result(func, map_tensors(lambda t: t.to("meta"), args), kwargs)
                self.assertEqual((made.shape, made.dtype), (real.shape, real.dtype))
        # concatenations (a (0,) tensor left out, as cat does) and linear layers
        empty, weight, bias = torch.randn(0), torch.randn(7, 5), torch.randn(7)
        for func, args, kwargs in [
            (torch.cat, ((a, a[:, :1]),), {"dim": 1}),
            (torch.cat, ([empty, a.transpose(0, 1)],), {"dim": -1}),
            (F.linear, (a, weight, bias), {}),
            (F.linear, (a,), {"weight": weight}),
        ]:
            with self.subTest(f"{func.__name__}"):
                real = func(*args, **kwargs)
                on_meta_args, on_meta_kwargs = map_tensors(lambda t: t.to("meta"), (args, kwargs))
                made = _meta_result(func, on_meta_args, on_meta_kwargs)
                self.assertEqual((made.shape, made.dtype), (real.shape, real.dtype))
        # the layout of the input where the result keeps it: permuted, channels-last, sliced
        for x in (
            torch.randn(4, 3, 5, 6).transpose(1, 2),
            torch.randn(2, 3, 4, 4).to(memory_format=torch.channels_last),
            torch.randn(4, 6)[:, :3],
        ):
            with self.subTest(f"layout {x.stride()}"):
                made = _meta_result(torch.Tensor.neg, (x.to("meta"),), {})
                self.assertEqual(made.stride(), torch.neg(x).stride())
        # what it does not know runs the meta kernel: integers, out=, dtype=, rounding_mode=
        ints = torch.ones(4, 5, dtype=torch.long, device="meta")
        on_meta = a.to("meta")
        for func, args, kwargs in [
            (torch.Tensor.add, (ints, ints), {}),
            (torch.Tensor.mul, (on_meta, ints), {}),
            (torch.add, (on_meta, on_meta), {"out": torch.empty_like(on_meta)}),
            (torch.Tensor.mean, (on_meta, -1), {"dtype": torch.float64}),
            (torch.Tensor.div, (on_meta, 2), {"rounding_mode": "floor"}),
            (torch.Tensor.mean, (on_meta, (1, -2)), {}),
            (torch.Tensor.mul, (on_meta, on_meta[:2]), {}),  # no broadcast: the kernel says so
            (torch.cat, ((on_meta, on_meta.double()),), {}),  # promoted
            (torch.cat, ((on_meta, on_meta[:, :2]),), {}),  # sizes that differ
            (F.linear, (on_meta, torch.ones(2, 4, device="meta")), {}),  # does not fit
            (F.linear, (on_meta, torch.ones(2, 5, device="meta").double()), {}),
        ]:
            with self.subTest(f"{func.__name__} {kwargs}"):
                self.assertIsNone(_meta_result(func, args, kwargs))

    def test_statistics_left_on_the_cpu_are_still_caught(self) -> None:
        class StatisticsOnTheCpu(AutoEncoder):
            def __init__(self) -> None:
                super().__init__()
                self.mean = torch.zeros(8)  # not a buffer: stays on the CPU

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                hidden = self.encoder(x)
                hidden = F.batch_norm(hidden, self.mean, torch.ones_like(self.mean))
                return self.decoder(hidden)

        self.assertFailsWith(
            model_case(StatisticsOnTheCpu),
            "test_device_moving",
            "batch_norm combines a CPU tensor of shape (8,)",
        )


class ParameterWrites(CheckTestCase):
    """test_all_parameters_updated keeps the values before each step, and runs a forward pass
    after the last, only for a model whose first forward pass writes a parameter."""

    def test_a_model_that_writes_no_parameter_runs_no_pass_after_the_last_step(self) -> None:
        model = CountsBatchSizes()
        self.assertPasses(model_case(lambda: model), "test_all_parameters_updated")
        self.assertEqual(model.seen, [])  # (the steps train copies)

        seen: List[Tuple[bool, bool, int]] = []

        class Recorded(AutoEncoder):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                seen.append((self.training, torch.is_grad_enabled(), x.shape[0]))
                return super().forward(x)

        self.assertPasses(model_case(Recorded), "test_all_parameters_updated")
        self.assertEqual(seen, [(True, True, 4)])

    def test_a_model_that_writes_a_parameter_is_looked_at_after_the_last_step(self) -> None:
        seen: List[Tuple[bool, bool, int]] = []

        class ClampsAWeight(AutoEncoder):
            """Correct: keeps a weight within [-1, 1] (weight clipping), which the step
            moves within."""

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                seen.append((self.training, torch.is_grad_enabled(), x.shape[0]))
                with torch.no_grad():
                    self.decoder[0].weight.clamp_(-1, 1)
                return super().forward(x)

        self.assertPasses(model_case(ClampsAWeight), "test_all_parameters_updated")
        self.assertEqual(seen, [(True, True, 4), (True, False, 2)])

    def test_a_weight_replaced_through_data_is_seen_written(self) -> None:
        class ResetsThroughData(AutoEncoder):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                self.decoder[0].bias.data = torch.full_like(self.decoder[0].bias, 0.5)
                return super().forward(x)

        self.assertFailsWith(
            model_case(ResetsThroughData),
            "test_all_parameters_updated",
            "decoder.0.bias: the optimisation step is undone by the next forward pass",
        )


class TrainingCopies(CheckTestCase):
    """test_train_matches_eval's training-mode pass runs on a copy that holds the model's own
    parameters where the first training step showed that forward writes none."""

    def test_the_weights_are_shared_once_a_training_step_showed_no_write(self) -> None:
        seen: List[int] = []

        class RecordsItsWeight(WithBatchNorm):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                if self.training and torch.is_grad_enabled():
                    seen.append(self.decoder[0].weight.data_ptr())
                return super().forward(x)

        model = RecordsItsWeight()
        case = model_case(lambda: model)
        self.assertPasses(case, "test_train_matches_eval")  # alone: a copy in full
        self.assertNotEqual(seen[-1], model.decoder[0].weight.data_ptr())
        self.assertPasses(case, "test_finite_outputs_and_gradients")  # the training step
        self.assertPasses(case, "test_train_matches_eval")
        self.assertEqual(seen[-1], model.decoder[0].weight.data_ptr())

    def test_a_model_whose_forward_writes_a_weight_is_left_as_it_was(self) -> None:
        class ClampsInTraining(WithBatchNorm):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                if self.training:
                    with torch.no_grad():
                        self.decoder[0].weight.mul_(0.5)  # written in every training pass
                return super().forward(x)

        model = ClampsInTraining()
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        case = model_case(lambda: model)
        run_check(case, "test_finite_outputs_and_gradients")
        run_check(case, "test_train_matches_eval")
        for name, parameter in model.named_parameters():
            self.assertTrue(torch.equal(parameter, before[name]), name)


class GatedMask(nn.Module):
    """Features, and a mask read only through a gate that starts at zero (its flag ``read``:
    False, a mask accepted and never used)."""

    def __init__(self, read: bool = True, gate: float = 0.0) -> None:
        super().__init__()
        self.linear = nn.Linear(FEATURES, FEATURES)
        self.gate = nn.Parameter(torch.full((1,), gate))
        self.read = read

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = self.linear(x.flatten(1))
        return out + self.gate * mask.float() if self.read else out


class ZeroParameterCopies(CheckTestCase):
    """test_all_inputs_used makes the copy whose zero parameters are random only once the
    model leaves an input unread (here a mask, which no gradient reaches)."""

    def count_copies(self, model: Any, name: str = "test_all_inputs_used") -> Tuple[Any, int]:
        from unittest import mock

        from dltestkit.models.dependence import Dependence

        made = Dependence._with_zero_parameters_made_random
        inputs = lambda: {  # noqa: E731
            "x": torch.randn(4, *SHAPE),
            "mask": torch.randint(0, 2, (4, FEATURES)),
        }
        with mock.patch.object(
            Dependence, "_with_zero_parameters_made_random", autospec=True, side_effect=made
        ) as spy:
            outcome = run_check(model_case(model, inputs=inputs), name)
        return outcome, spy.call_count

    def test_no_copy_where_the_model_reads_the_suspect(self) -> None:
        outcome, copies = self.count_copies(lambda: GatedMask(gate=1.0))
        self.assertEqual((outcome.failures, outcome.errors, outcome.skips), ([], [], []))
        self.assertEqual(copies, 0)

    def test_the_copy_judges_an_input_read_behind_a_zero_parameter(self) -> None:
        outcome, copies = self.count_copies(GatedMask)
        self.assertEqual((outcome.failures, outcome.errors, outcome.skips), ([], [], []))
        self.assertEqual(copies, 1)

    def test_an_input_the_copy_does_not_read_either_fails(self) -> None:
        outcome, copies = self.count_copies(lambda: GatedMask(read=False))
        self.assertEqual(copies, 1)
        self.assertEqual(len(outcome.failures), 1)
        self.assertIn("inputs['mask'] is not read", outcome.failures[0])


class _SharesALayer(nn.Module):
    """A layer reached twice (tied weights), a hook bound to the model, an attribute that
    refers back to a submodule."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.again = self.first
        self.layers = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
        self.chosen = [self.layers[0]]
        self.register_buffer("steps", torch.zeros(()), persistent=False)
        self.register_forward_hook(self._count)

    def _count(self, module: nn.Module, args: Any, output: Any) -> None:
        self.steps += 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[1](self.chosen[0](self.again(self.first(x))))


class ModuleCopies(CheckTestCase):
    """copy_module copies the module tree itself (copy.deepcopy's generic steps cost most of
    a copy whose weights are made beforehand): the copy must be what copy.deepcopy makes."""

    def assertCopiedAsDeepcopy(self, model: nn.Module, **how: Any) -> None:
        copied, reference = copy_module(model, **how), copy.deepcopy(model)
        originals = {id(t) for t in [*model.parameters(), *model.buffers()]}
        pairs = zip(
            model.named_modules(remove_duplicate=False),
            copied.named_modules(remove_duplicate=False),
            reference.named_modules(remove_duplicate=False),
        )
        for (name, original), (_, made), (_, expected) in pairs:
            with self.subTest(module=name):
                self.assertIs(type(made), type(expected))
                self.assertIsNot(made, original)
                self.assertEqual(made.__dict__.keys(), expected.__dict__.keys())
                for key, value in vars(made).items():  # containers: copies of their own
                    if isinstance(value, (dict, list, set)):
                        self.assertIsNot(value, vars(original)[key], key)
        # the same sharing: what one object held twice, the copy holds twice
        identities = [id(m) for _, m in copied.named_modules(remove_duplicate=False)]
        expected_ids = [id(m) for _, m in reference.named_modules(remove_duplicate=False)]
        self.assertEqual(
            [identities.index(i) for i in identities], [expected_ids.index(i) for i in expected_ids]
        )
        for (name, tensor), (_, expected) in zip(
            copied.state_dict(keep_vars=True).items(), reference.state_dict(keep_vars=True).items()
        ):
            self.assertNotIn(id(tensor), originals, name)
            self.assertEqual(
                (type(tensor), tensor.requires_grad), (type(expected), expected.requires_grad)
            )
            if how.get("device") != "meta":
                self.assertTrue(torch.equal(tensor.to(expected.dtype), expected), name)

    def test_copies_are_what_deepcopy_makes(self) -> None:
        from transformers import BertConfig, BertModel

        bert = BertModel(
            BertConfig(
                vocab_size=50,
                hidden_size=16,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=32,
                max_position_embeddings=16,
            )
        )
        encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16), 2)
        parametrized = nn.utils.parametrizations.orthogonal(nn.Linear(4, 4))  # copies itself
        for label, model in [
            ("tied layers, hooks", _SharesALayer()),
            ("BERT", bert),
            ("nn.TransformerEncoder", encoder),
            ("parametrized", nn.Sequential(parametrized, nn.ReLU())),
        ]:
            for how in ({}, {"device": "meta"}, {"dtype": torch.float64}):
                with self.subTest(label, **how):
                    self.assertCopiedAsDeepcopy(model, **how)

    def test_the_copy_runs_as_the_model_does_with_its_own_hooks_and_state(self) -> None:
        model = _SharesALayer()
        copied = copy_module(model)
        x = torch.randn(2, 4)
        torch.testing.assert_close(copied(x), model(x))
        self.assertEqual((float(copied.steps), float(model.steps)), (1.0, 1.0))
        copied(x)
        self.assertEqual((float(copied.steps), float(model.steps)), (2.0, 1.0))  # its own hook
        self.assertIs(copied.again, copied.first)
        self.assertIs(copied.chosen[0], copied.layers[0])


class CopiesUnderAWatch(CheckTestCase):
    """What the checks copy while a watch runs (the dtype check judging an error copies and
    runs the model again) is not watched: copy.deepcopy hands every tensor its memo of all
    that was copied, which a watch walked at every tensor (3.7 s for EfficientNet-B0's dtype
    check, whose one-sample training pass raises in BatchNorm)."""

    def test_a_deepcopy_under_a_watch_is_not_handled(self) -> None:
        seen: List[str] = []

        class Seen(DtypeWatch):
            def handle(self, func: Any, args: Any, kwargs: Any) -> Any:
                seen.append(getattr(func, "__name__", ""))
                return super().handle(func, args, kwargs)

        model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
        with watching(model, lambda modules: Seen(torch.float64, modules)):
            copied = copy.deepcopy(model)
            model(torch.randn(2, 3))
        self.assertNotIn("__deepcopy__", seen)
        self.assertIn("linear", seen)  # the forward pass is watched
        self.assertTrue(torch.equal(copied[0].weight, model[0].weight))

    def test_metadata_reads_are_not_handled(self) -> None:
        seen: List[str] = []

        class Seen(DtypeWatch):
            def handle(self, func: Any, args: Any, kwargs: Any) -> Any:
                seen.append(f"{getattr(getattr(func, '__self__', None), '__name__', '')}")
                return super().handle(func, args, kwargs)

        class ReadsItsShape(nn.Module):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                rows, columns = x.shape
                return x.T.reshape(columns, rows).to(x.device, x.dtype)

        model = ReadsItsShape()
        with watching(model, lambda modules: Seen(torch.float64, modules)):
            model(torch.randn(2, 3))
        self.assertNotIn("shape", seen)
        self.assertNotIn("device", seen)
        self.assertNotIn("dtype", seen)
        self.assertIn("T", seen)  # a tensor: watched

    def test_the_dtype_check_judges_an_error_unwatched(self) -> None:
        calls: List[str] = []

        class RunsOnFourOnly(AutoEncoder):  # an error of its own on one sample, in any dtype
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                mode = torch.overrides._get_current_function_mode()
                calls.append(f"{x.dtype} {len(x)} {type(mode).__name__}")
                if len(x) != 4:
                    raise ValueError("expected a batch of 4")
                return super().forward(x)

        self.assertPasses(model_case(RunsOnFourOnly), "test_dtype_moving")
        # the float32 pass that judged the one-sample error ran unwatched
        self.assertIn("torch.float32 1 NoneType", calls)
        self.assertNotIn("torch.float32 1 DtypeWatch", calls)
