"""run_distributed and DistributedModelTests, on real torch.distributed (gloo) CPU processes."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import unittest
from multiprocessing import resource_tracker
from pathlib import Path
from typing import Any, List, Tuple
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from checkrunner import CheckTestCase
from test_distributed_trainer import MODULE as DDP_TRAINER_MODULE
from test_model_checks import (
    SHAPE,
    AutoEncoder,
    BackwardInTrainingOnly,
    CentresOverBatch,
    DeadLayer,
    TokenModel,
    WithBatchNorm,
    tokens,
)
from torch import nn
from torch.utils.data import DataLoader

from dltestkit import (
    DistributedError,
    DistributedModelTests,
    ModelTests,
    SequenceModelTests,
    run_distributed,
)
from dltestkit.core.contract import checks_of
from dltestkit.distributed.rank_setup import import_for_ranks


# -- functions run on every rank (module level: picklable for the spawn start method) -------
def rank_sum(rank: int, world_size: int, offset: float) -> Any:
    value = torch.tensor([float(rank) + offset])
    dist.all_reduce(value)
    return rank, world_size, value.item()


def fails_on_rank_one(rank: int, world_size: int) -> int:
    if rank == 1:
        raise ValueError("rank one cannot go on")
    value = torch.ones(1)
    dist.all_reduce(value)  # waits for rank 1, which is gone
    return rank


def hangs_on_rank_zero(rank: int, world_size: int) -> int:
    if rank == 0:
        time.sleep(600)
    return rank


def returns_a_lambda(rank: int, world_size: int) -> Any:
    return lambda: rank


def returns_its_rank(rank: int, world_size: int) -> int:
    return rank


def barrier_on_rank_zero_only(rank: int, world_size: int) -> int:
    if rank == 0:
        dist.barrier()  # rank 1 never comes
    return rank


#: Loaders whose workers must outlive the function (so that run_distributed has to end them).
_KEPT: list = []


def starts_loader_workers(rank: int, world_size: int, folder: str, then: str) -> Any:
    """Start a DataLoader with 2 persistent workers, note their pids in folder, then return
    what it loads, raise, or hang."""
    loader = DataLoader(list(range(8)), batch_size=2, num_workers=2, persistent_workers=True)
    iterator = iter(loader)
    first = next(iterator)
    _KEPT.append((loader, iterator))  # the workers stay alive after the function returns
    pids = [worker.pid for worker in iterator._workers]  # type: ignore[attr-defined]
    Path(folder, f"rank{rank}").write_text(" ".join(map(str, pids)))
    if then == "raise":
        raise ValueError("a rank with workers fails")
    if then == "hang":
        time.sleep(600)
    return first.tolist()


def is_running(pid: int) -> bool:
    """Whether the process pid exists and is no zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def all_ended(pids: Any, within: float = 5.0) -> bool:
    """Whether every process of pids has ended, waiting up to within seconds (orphans are
    reaped by init, not at once)."""
    deadline = time.monotonic() + within
    while any(is_running(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def child_pids() -> set:
    """The processes this process started that are still alive."""
    path = Path(f"/proc/{os.getpid()}/task")
    found = set()
    for task in path.iterdir() if path.exists() else []:
        children = task / "children"
        if children.exists():
            found |= {int(pid) for pid in children.read_text().split()}
    return found


class RunDistributed(unittest.TestCase):
    def setUp(self) -> None:
        # spawn starts multiprocessing's resource tracker once per process, not per call
        resource_tracker.ensure_running()
        self.before = child_pids()

    def tearDown(self) -> None:
        self.assertEqual(child_pids() - self.before, set(), "a rank outlived run_distributed")

    def test_each_rank_runs_in_a_process_group_and_results_come_back_in_rank_order(self) -> None:
        results = run_distributed(rank_sum, 3, 0.5)
        self.assertEqual(results, [(0, 3, 4.5), (1, 3, 4.5), (2, 3, 4.5)])

    def test_the_spawn_start_method_works_too(self) -> None:
        self.assertEqual(
            run_distributed(rank_sum, 2, 0.0, start_method="spawn"), [(0, 2, 1.0), (1, 2, 1.0)]
        )

    def test_a_failing_rank_is_reported_first_with_its_traceback(self) -> None:
        started = time.monotonic()
        with self.assertRaises(DistributedError) as caught:
            run_distributed(fails_on_rank_one, 2, timeout=30)
        self.assertLess(time.monotonic() - started, 20, "the other rank was waited for")
        error = caught.exception
        self.assertEqual(list(error.failures)[0], 1)
        self.assertEqual(error.first_line(), "rank 1: ValueError: rank one cannot go on")
        self.assertIn(
            'in fails_on_rank_one\n    raise ValueError("rank one cannot go on")', str(error)
        )
        self.assertIn("rank 0 of 2", str(error))

    def test_a_hung_rank_becomes_a_failure_after_the_timeout(self) -> None:
        started = time.monotonic()
        with self.assertRaises(DistributedError) as caught:
            run_distributed(hangs_on_rank_zero, 2, timeout=3)
        self.assertLess(time.monotonic() - started, 15)
        # with where it hung: the user's line the rank's stack was at when it was stopped
        self.assertRegex(
            str(caught.exception),
            r"rank 0 of 2: did not finish within 3 s: it hung at test_distributed.py:\d+ in "
            r"hangs_on_rank_zero \(time.sleep\(600\)\)",
        )

    def test_a_result_that_cannot_be_pickled_is_an_error(self) -> None:
        # Every rank fails the same way; whichever reports first comes first.
        with self.assertRaisesRegex(DistributedError, "(?s)rank [01] of 2:.*pickle"):
            run_distributed(returns_a_lambda, 2)

    def test_a_collective_that_only_some_ranks_reach_names_the_ranks_that_returned(
        self,
    ) -> None:
        started = time.monotonic()
        with self.assertRaises(DistributedError) as caught:
            run_distributed(barrier_on_rank_zero_only, 2, timeout=30)
        self.assertLess(time.monotonic() - started, 15, "the timeout was waited for")
        error = caught.exception
        self.assertEqual((error.returned, list(error.failures)), ([1], [0]))
        expected = (
            "rank 1 returned without reaching the collective that rank 0 was waiting in, "
            "which failed when it left: every rank must call the same collectives"
        )
        self.assertTrue(error.first_line().startswith(expected), error.first_line())
        self.assertIn("(rank 0: RuntimeError: ", error.first_line())
        self.assertTrue(str(error).startswith(expected), str(error))
        self.assertIn("in barrier_on_rank_zero_only\n    dist.barrier()", str(error))

    def test_a_failing_rank_gets_no_collective_diagnosis(self) -> None:
        with self.assertRaises(DistributedError) as caught:
            run_distributed(fails_on_rank_one, 2, timeout=30)
        self.assertIsNone(caught.exception.diagnosis())
        self.assertEqual(caught.exception.returned, [])

    @pytest.mark.slow  # (.ci/run's slow step) a stress run: 20 runs of 4 ranks, ~8 s
    def test_many_short_runs_on_four_ranks_never_trip_over_one_another(self) -> None:
        # Ranks that join the group or leave it at different moments once made about one
        # run in twenty fail ("Connection closed by peer", a hung store connection).
        for run in range(20):
            with self.subTest(run=run):
                self.assertEqual(run_distributed(returns_its_rank, 4, timeout=30), [0, 1, 2, 3])


class NoProcessLeftBehind(unittest.TestCase):
    """Ranks run non-daemonic, so that they may start DataLoader workers; neither they nor
    their workers outlive run_distributed, whichever way it ends."""

    def setUp(self) -> None:
        self.before = child_pids()
        folder = tempfile.TemporaryDirectory()
        self.addCleanup(folder.cleanup)
        self.folder = folder.name

    def workers(self) -> list:
        files = sorted(Path(self.folder).iterdir())
        return [int(pid) for path in files for pid in path.read_text().split()]

    def assertNothingLeft(self, workers: int = 4) -> None:
        self.assertEqual(len(self.workers()), workers, "the ranks did not start their workers")
        self.assertTrue(all_ended(self.workers()), "a DataLoader worker outlived its rank")
        self.assertEqual(child_pids() - self.before, set(), "a rank outlived run_distributed")

    def test_a_rank_may_load_with_workers_which_end_with_it(self) -> None:
        results = run_distributed(starts_loader_workers, 2, self.folder, "return")
        self.assertEqual(results, [[0, 1], [0, 1]])
        self.assertNothingLeft()

    def test_the_workers_of_a_failing_rank_end_with_it(self) -> None:
        with self.assertRaisesRegex(DistributedError, "a rank with workers fails"):
            run_distributed(starts_loader_workers, 2, self.folder, "raise")
        self.assertNothingLeft()

    def test_the_workers_of_a_hung_rank_are_killed_with_it(self) -> None:
        with self.assertRaisesRegex(DistributedError, "did not finish within 4 s"):
            run_distributed(starts_loader_workers, 2, self.folder, "hang", timeout=4)
        self.assertNothingLeft()

    def test_an_interrupted_caller_ends_every_rank_and_worker(self) -> None:
        def interrupt_once_the_workers_run() -> None:
            deadline = time.monotonic() + 30
            while len(list(Path(self.folder).iterdir())) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.2)  # the files are written
            os.kill(os.getpid(), signal.SIGINT)

        # Ctrl-C's KeyboardInterrupt, even where SIGINT is ignored (a shell that runs the tests
        # in the background ignores it for them)
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        self.addCleanup(signal.signal, signal.SIGINT, previous)
        threading.Thread(target=interrupt_once_the_workers_run, daemon=True).start()
        started = time.monotonic()
        with self.assertRaises(KeyboardInterrupt):
            run_distributed(starts_loader_workers, 2, self.folder, "hang", timeout=60)
        self.assertLess(time.monotonic() - started, 30)
        self.assertNothingLeft()

    def test_ranks_end_when_their_caller_is_killed(self) -> None:
        script = textwrap.dedent("""
            import os, time
            from dltestkit import run_distributed

            def hang(rank, world_size):
                os.write(1, f"{os.getpid()}\\n".encode())  # one write: lines never mix
                time.sleep(600)

            run_distributed(hang, 2, timeout=600)
        """)
        # the killed caller cannot remove its folder of rank tracebacks: made in one of ours
        temp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, temp, True)
        caller = subprocess.Popen(
            [sys.executable, "-c", script],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "TMPDIR": temp},
        )
        try:
            assert caller.stdout is not None
            ranks = [int(caller.stdout.readline().strip() or -1) for _ in range(2)]
            self.assertTrue(all(is_running(pid) for pid in ranks))
        finally:
            caller.kill()
            caller.wait()
        self.assertTrue(all_ended(ranks), "a rank outlived its killed caller")

    def test_a_world_of_no_process_is_refused(self) -> None:
        with self.assertRaisesRegex(ValueError, "world_size must be at least 1"):
            run_distributed(rank_sum, 0, 0.0)


# -- SyncBatchNorm on CPU processes ------------------------------------------------------------
#: Ten samples of 3 channels shared unequally by 2 ranks (4 and 6), and their loss weights.
_SAMPLES = torch.randn(10, 3, 2, 2, generator=torch.Generator().manual_seed(0))
_LOSS_WEIGHTS = torch.randn(10, 3, 2, 2, generator=torch.Generator().manual_seed(1))
_SHARES = [slice(0, 4), slice(4, 10)]


def batchnorm_results(layer: nn.Module, x: torch.Tensor, weights: torch.Tensor) -> Any:
    """What a batch-normalisation layer gives on x: two training steps' outputs and gradients
    (of x and of its parameters), its running statistics, and its output in eval mode."""
    found = []
    for _ in range(2):
        inputs = x.clone().requires_grad_()
        layer.zero_grad()
        output = layer(inputs)
        (output * weights).sum().backward()
        found.append((output.detach(), inputs.grad, layer.weight.grad, layer.bias.grad))
    layer.eval()
    return found, layer.running_mean.clone(), layer.running_var.clone(), layer(x).detach()


def sync_batchnorm_rank(rank: int, world_size: int, momentum: Any) -> Any:
    from dltestkit.distributed.syncbn import replace_sync_batchnorm as _replace_sync_batchnorm

    layer = _replace_sync_batchnorm(nn.SyncBatchNorm(3, momentum=momentum))
    assert not isinstance(layer, nn.SyncBatchNorm)  # which DDP refuses on the CPU
    share = _SHARES[rank]
    steps, mean, var, evaluated = batchnorm_results(layer, _SAMPLES[share], _LOSS_WEIGHTS[share])
    for _, _, weight_grad, bias_grad in steps:  # the sum over the ranks, as DDP's (x world)
        dist.all_reduce(weight_grad)
        dist.all_reduce(bias_grad)
    return steps, mean, var, evaluated


class SyncBatchNormOnCPU(unittest.TestCase):
    """In the ranks of test_ddp_gradients a SyncBatchNorm is replaced by a layer that does on
    CPU processes what SyncBatchNorm does on GPUs: BatchNorm over all ranks' samples."""

    def test_it_is_batchnorm_over_the_whole_batch_also_for_unequal_shares(self) -> None:
        for momentum in (0.1, None):
            with self.subTest(momentum=momentum):
                single = batchnorm_results(
                    nn.BatchNorm2d(3, momentum=momentum), _SAMPLES, _LOSS_WEIGHTS
                )
                ranks = run_distributed(sync_batchnorm_rank, 2, momentum)
                for step, expected in enumerate(single[0]):
                    output, x_grad, weight_grad, bias_grad = expected
                    got = [ranks[rank][0][step] for rank in range(2)]
                    torch.testing.assert_close(torch.cat([g[0] for g in got]), output)
                    torch.testing.assert_close(torch.cat([g[1] for g in got]), x_grad)
                    for rank in range(2):
                        torch.testing.assert_close(got[rank][2], weight_grad)
                        torch.testing.assert_close(got[rank][3], bias_grad)
                for rank in range(2):
                    torch.testing.assert_close(ranks[rank][1], single[1])  # running mean
                    torch.testing.assert_close(ranks[rank][2], single[2])  # running variance
                evaluated = torch.cat([ranks[rank][3] for rank in range(2)])
                torch.testing.assert_close(evaluated, single[3])  # eval: running statistics


# -- DistributedModelTests -------------------------------------------------------------------
class TrainingOnlyBranch(AutoEncoder):
    """Like a VAE: the noise branch (its parameters) is used in training mode only."""

    def __init__(self) -> None:
        super().__init__()
        self.log_scale = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(x)
        if self.training:
            hidden = hidden + torch.exp(self.log_scale(hidden)) * torch.randn_like(hidden)
        return self.decoder(hidden)


class DividesByTheBatchSize(AutoEncoder):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) / x.shape[0]


class WithSyncBatchNorm(AutoEncoder):
    """Normalises with the statistics of every rank's batch, as the failure message on a
    BatchNorm model advises."""

    def __init__(self, track_running_stats: bool = True) -> None:
        super().__init__()
        self.encoder = nn.SyncBatchNorm.convert_sync_batchnorm(
            WithBatchNorm(track_running_stats).encoder
        )


class SyncAndLocalBatchNorm(WithSyncBatchNorm):
    """SyncBatchNorm, and one plain BatchNorm left behind."""

    def __init__(self) -> None:
        super().__init__()
        self.decoder = nn.Sequential(self.decoder[0], nn.BatchNorm1d(16), self.decoder[1])


class RenormalisedEmbedding(nn.Module):
    """Token ids in, through nn.Embedding(max_norm=1), whose forward renormalises in place
    the rows of its weight that the batch looks up: under DDP each rank those of its shard."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(20, 6, max_norm=1.0)
        self.head = nn.Linear(6, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embedding(ids).mean(1))


def token_ids() -> torch.Tensor:
    return torch.randint(0, 20, (4, 5), generator=torch.Generator().manual_seed(1))


class ClampedScale(AutoEncoder):
    """Clamps its scale in place in every forward, alike whatever the batch: DDP's ranks stay
    equal; fully_shard loses the change with the gathered copy of the parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((1,), 3.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.scale.clamp_(max=2.0)
        return super().forward(x) * self.scale


def resnet_sync_batchnorm() -> nn.Module:
    """torchvision's ResNet with one BasicBlock per stage (ResNet-18 has two), SyncBatchNorm."""
    from torchvision.models.resnet import BasicBlock, ResNet

    return nn.SyncBatchNorm.convert_sync_batchnorm(ResNet(BasicBlock, [1, 1, 1, 1], num_classes=4))


class CancelsInFloat32(nn.Linear):
    """Correct: a linear layer whose first feature is 1e8 in one sample and -1e8 in another
    (cancelling_inputs), so that float32 drops the other samples' contributions to its mean
    gradient (0.5) in one way in one process (0.25) and in another when each rank sums its
    half of the batch (0)."""

    def __init__(self) -> None:
        super().__init__(2, 1)


def cancelling_inputs() -> torch.Tensor:
    return torch.tensor([[1e8, 1.0], [1.0, 3.0], [-1e8, 2.0], [1.0, -1.0]])


def mean_output(output: torch.Tensor) -> torch.Tensor:
    return output.mean()


def in_float32(case: type) -> type:
    """``case`` with the data-parallel comparisons judged in float32 alone, as they were
    before a difference in float32 was judged again in float64."""

    def _judged_in_float64(self: Any, check: str, compare: Any) -> None:
        compare(self._plan(check, double=False))

    return type("InFloat32", (case,), {"_judged_in_float64": _judged_in_float64})


def ddp_case(
    model_type: Any, inputs: Any = None, mixins: tuple = (DistributedModelTests,), **attributes: Any
) -> type:
    def set_up(self: Any) -> None:
        self.model = model_type()
        self.inputs = torch.randn(4, *SHAPE) if inputs is None else inputs()
        for name, value in attributes.items():
            setattr(self, name, value)

    return type("Case", (*mixins, unittest.TestCase), {"setUp": set_up, "seed": 0})


class DDPGradients(CheckTestCase):
    def test_correct_models_pass(self) -> None:
        cases = {
            "autoencoder": ddp_case(AutoEncoder),
            "token ids in a dict, dict out": ddp_case(TokenModel, tokens),
            "four ranks": ddp_case(AutoEncoder, lambda: torch.randn(8, *SHAPE), world_size=4),
            "BatchNorm declared local": ddp_case(WithBatchNorm, local_batch_statistics=["*"]),
            "unused layer, find_unused_parameters": ddp_case(
                DeadLayer, find_unused_parameters=True
            ),
            "a branch used in training mode only": ddp_case(TrainingOnlyBranch),
            "SyncBatchNorm": ddp_case(WithSyncBatchNorm),
            "SyncBatchNorm without running statistics": ddp_case(
                lambda: WithSyncBatchNorm(track_running_stats=False)
            ),
            "SyncBatchNorm, four ranks": ddp_case(
                WithSyncBatchNorm, lambda: torch.randn(8, *SHAPE), world_size=4
            ),
            "a parameter clamped in place in forward, alike on every rank": ddp_case(ClampedScale),
        }
        for label, case in cases.items():
            with self.subTest(label):
                self.assertPasses(case, "test_ddp_gradients")

    def test_a_backward_pass_that_refuses_eval_mode_skips_naming_its_line(self) -> None:
        # (the comparison trains in eval mode, so that dropout does not differ between ranks)
        self.assertSkipsWith(
            ddp_case(BackwardInTrainingOnly),
            "test_ddp_gradients",
            "the comparison trains the model in eval mode (its dropout off, so that the ranks "
            "and one process compute alike), and no gradient can be taken through the "
            "model's eval-mode forward pass: the model's own backward code raises "
            "AssertionError: make sure to use model.train() to train this model, at "
            "test_model_checks.py:",
        )

    def test_float32_rounding_is_no_failure_the_comparison_runs_in_float64(self) -> None:
        case = ddp_case(CancelsInFloat32, cancelling_inputs, loss_fn=mean_output)
        self.assertPasses(case, "test_ddp_gradients")
        # compared in float32, the same correct model fails: float64 is what passes it
        self.assertFailsWith(
            in_float32(case),
            "test_ddp_gradients",
            "at step 1 the gradient of weight that DistributedDataParallel gives rank 0",
        )

    def test_batch_statistics_fail_suggesting_sync_batchnorm(self) -> None:
        self.assertFailsWith(
            ddp_case(WithBatchNorm),
            "test_ddp_gradients",
            "at step 1 the gradient of encoder.1.weight that "
            "DistributedDataParallel gives rank 0 (each of 2 ranks on its shard "
            "of the batch) differs from the gradient of one process on the whole "
            "batch",
            "The model normalises with batch statistics (encoder.2)",
            "torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)",
            "self.local_batch_statistics",
        )

    def test_a_resnet_with_sync_batchnorm_passes(self) -> None:
        try:
            import torchvision  # noqa: F401
        except ImportError:
            self.skipTest("needs torchvision")
        # BatchNorm over a batch of 4 at 1x1 (layer4) amplifies float32 rounding beyond the
        # tolerances: the check compares in float64.
        case = ddp_case(resnet_sync_batchnorm, lambda: torch.randn(4, 3, 16, 16))
        self.assertPasses(case, "test_ddp_gradients")

    def test_a_batchnorm_left_among_sync_batchnorms_is_named_alone(self) -> None:
        self.assertFailsWith(
            ddp_case(SyncAndLocalBatchNorm),
            "test_ddp_gradients",
            "The model normalises with batch statistics (decoder.1): under DDP each rank "
            "uses the statistics of its own shard",
            "torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)",
        )

    def test_an_unused_branch_fails_naming_it_with_ddps_error(self) -> None:
        self.assertFailsWith(
            ddp_case(DeadLayer),
            "test_ddp_gradients",
            "DistributedDataParallel (find_unused_parameters=False) fails on the "
            "second step: parameters that get no gradient in forward "
            "(refine.weight, refine.bias)",
            "DDP's error: rank",
            "RuntimeError: Expected to have finished reduction in the prior iteration",
        )

    def test_a_loss_summed_per_rank_fails(self) -> None:
        case = ddp_case(AutoEncoder, loss_fn=lambda output: output.square().sum())
        self.assertFailsWith(
            case,
            "test_ddp_gradients",
            "Every gradient is 0.5 times the single-process one: the output or "
            "the loss depends on the batch size (a sum over the batch where a "
            "mean belongs",
        )

    def test_an_output_divided_by_the_batch_size_fails(self) -> None:
        self.assertFailsWith(
            ddp_case(DividesByTheBatchSize),
            "test_ddp_gradients",
            "Every gradient is 2 times the single-process one",
        )

    def test_samples_mixed_across_the_batch_fail(self) -> None:
        self.assertFailsWith(
            ddp_case(CentresOverBatch),
            "test_ddp_gradients",
            "A sample's output depends on the other samples of its batch (see "
            "test_batch_independence)",
        )

    def test_a_model_that_fails_under_ddp_fails_with_the_ranks_error(self) -> None:
        class SingleProcessOnly(AutoEncoder):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                if dist.is_initialized():
                    raise RuntimeError("this model reads a file only rank 0 has")
                return super().forward(x)

        self.assertFailsWith(
            ddp_case(SingleProcessOnly),
            "test_ddp_gradients",
            "training the model with DistributedDataParallel on 2 ranks failed: rank",
            "RuntimeError: this model reads a file only rank 0 has",
        )

    def test_outputs_without_a_batch_dimension_need_a_loss_fn(self) -> None:
        class ReturnsItsLoss(AutoEncoder):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return super().forward(x).square().mean()

        self.assertErrorsWith(
            ddp_case(ReturnsItsLoss),
            "test_ddp_gradients",
            "ContractError",
            "no floating-point output has a batch dimension",
            "set self.loss_fn to the mean loss over the batch",
        )
        self.assertPasses(ddp_case(ReturnsItsLoss, loss_fn=lambda loss: loss), "test_ddp_gradients")

    def test_a_weight_changed_in_place_by_each_ranks_batch_fails_naming_the_change(self) -> None:
        # the gradients agree; the ranks' copies of the weight drift apart, which only a
        # comparison of the ranks' weights shows
        self.assertFailsWith(
            ddp_case(RenormalisedEmbedding, token_ids),
            "test_ddp_gradients",
            "after 2 steps the ranks' copies of embedding.weight differ, although "
            "DistributedDataParallel gave every rank the same gradients",
            "The model's forward changes embedding.weight in place (F.embedding, at "
            "test_distributed.py:",
            "nn.Embedding(max_norm=...) does so",
            "But under DDP, each rank changes it by its own shard of the batch",
        )

    def test_a_batch_the_ranks_cannot_share_equally_is_a_contract_error(self) -> None:
        self.assertErrorsWith(
            ddp_case(AutoEncoder, lambda: torch.randn(5, *SHAPE)),
            "test_ddp_gradients",
            "ContractError",
            "holds 5 samples, which 2 ranks cannot share equally",
        )

    def test_a_world_of_one_rank_is_refused(self) -> None:
        self.assertErrorsWith(
            ddp_case(AutoEncoder, world_size=1),
            "test_ddp_gradients",
            "self.world_size set in Case.setUp is 1, not an int of at least 2",
        )

    def test_it_combines_with_the_other_model_mixins(self) -> None:
        alone = checks_of(ddp_case(AutoEncoder))
        self.assertEqual(alone, ("test_ddp_gradients", "test_fsdp_gradients"))
        with_model = ddp_case(AutoEncoder, mixins=(DistributedModelTests, ModelTests))
        names = unittest.TestLoader().getTestCaseNames
        self.assertEqual(set(names(with_model)), {*names(ModelTests), *alone})
        with_sequence = ddp_case(AutoEncoder, mixins=(DistributedModelTests, SequenceModelTests))
        self.assertEqual(set(names(with_sequence)), {*names(SequenceModelTests), *alone})

    def test_no_rank_outlives_a_failing_check(self) -> None:
        before = child_pids()
        self.assertFailsWith(ddp_case(DeadLayer), "test_ddp_gradients", "fails on the second")
        self.assertEqual(child_pids() - before, set())
        self.assertEqual(multiprocessing.active_children(), [])


PARALLEL_MODULE = textwrap.dedent("""
    import unittest
    import torch
    from torch import nn
    from dltestkit import DistributedModelTests


    class TestFirst(DistributedModelTests, unittest.TestCase):
        def setUp(self):
            self.model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 2))
            self.inputs = torch.randn(4, 6)


    class TestSecond(TestFirst):
        world_size = 4


    class TestThird(TestFirst):
        pass
""")


class ParallelRunners(unittest.TestCase):
    @pytest.mark.slow  # (.ci/run's slow step) a pytest -n 2 run of its own: ~10 s
    def test_distributed_checks_of_several_classes_run_side_by_side_under_xdist(self) -> None:
        try:
            import xdist  # noqa: F401
        except ImportError:
            self.skipTest("needs pytest-xdist")
        with tempfile.TemporaryDirectory() as folder:
            Path(folder, "test_parallel.py").write_text(PARALLEL_MODULE)
            completed = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-n", "2", "-p", "no:cacheprovider"],
                cwd=folder,
                capture_output=True,
                text=True,
                timeout=300,
            )
            self.assertEqual(
                sorted(p.name for p in Path(folder).iterdir() if p.name != "__pycache__"),
                ["test_parallel.py"],
            )
        per_class = len(unittest.TestLoader().getTestCaseNames(DistributedModelTests))
        self.assertIn(
            f"{3 * per_class} passed", completed.stdout, completed.stdout + completed.stderr
        )


# The head of a script run in a fresh interpreter: an import hook, which the forked ranks
# inherit, writes to the file named by its argument each rank that imports torch._dynamo
# itself (as DistributedDataParallel does when first built).
NOTE_RANK_IMPORTS = textwrap.dedent("""
    import os
    import sys

    PARENT, NOTES = os.getpid(), sys.argv[1]


    class NoteDynamoImports:
        def find_spec(self, name, path=None, target=None):
            if name == "torch._dynamo" and os.getpid() != PARENT:
                with open(NOTES, "a") as notes:
                    notes.write(f"{os.getpid()}\\n")
            return None


    sys.meta_path.insert(0, NoteDynamoImports())

    import torch
    from torch import nn
    from dltestkit import run_distributed

    assert "torch._dynamo" not in sys.modules
""")

TWO_RUNS = textwrap.dedent("""
    def train(rank, world_size):
        model = nn.parallel.DistributedDataParallel(nn.Linear(4, 2))
        model(torch.randn(3, 4)).sum().backward()
        return rank


    for run in ("first", "second"):
        assert run_distributed(train, 2) == [0, 1]
        count = len(open(NOTES).read().split()) if os.path.exists(NOTES) else 0
        print(f"{run} run: {count}")
""")

# test_distributed_trainer's DDP trainer case (TestDDP), run by unittest
A_TRAINER_CHECK = DDP_TRAINER_MODULE + textwrap.dedent("""
    result = unittest.TextTestRunner().run(TestDDP("test_ddp_training"))
    print("passed" if result.wasSuccessful() else "failed")
""")


class RanksImportOnce(unittest.TestCase):
    """DistributedDataParallel imports torch._dynamo when first built (3 to 6 s on 2 cores): in
    every rank of every run when the ranks are forked from a process that has not imported it."""

    def run_script(self, body: str) -> Tuple[str, List[str]]:
        """NOTE_RANK_IMPORTS and ``body`` run in a fresh interpreter: its output, and the
        ranks that imported torch._dynamo."""
        here = Path(__file__).resolve().parent
        with tempfile.TemporaryDirectory() as folder:
            script, notes = Path(folder, "script.py"), Path(folder, "notes")
            script.write_text(NOTE_RANK_IMPORTS + body)
            completed = subprocess.run(
                [sys.executable, str(script), str(notes)],
                cwd=folder,
                capture_output=True,
                text=True,
                timeout=300,
                env={**os.environ, "PYTHONPATH": os.pathsep.join([str(here.parent), str(here)])},
            )
            ranks = notes.read_text().split() if notes.exists() else []
        return completed.stdout + completed.stderr, ranks

    def test_a_module_that_cannot_be_imported_here_is_left_out(self) -> None:
        # (an older torch lacks torch.distributed.tensor; one on a Python it does not support
        # raises RuntimeError on importing torch._dynamo)
        import_for_ranks(["dltestkit_no_such_module"])
        with mock.patch("importlib.import_module", side_effect=RuntimeError("not supported")):
            import_for_ranks(["torch._dynamo"])

    @pytest.mark.slow  # (.ci/run's slow step) a fresh interpreter: ~12 s
    def test_what_the_ranks_of_a_run_imported_is_imported_before_the_next(self) -> None:
        output, ranks = self.run_script(TWO_RUNS)
        # (the ranks of the first run import it, each; none of the second's does)
        self.assertIn("first run: 2\nsecond run: 2\n", output)
        self.assertEqual(len(ranks), 2)

    @pytest.mark.slow  # (.ci/run's slow step) a fresh interpreter: ~10 s
    def test_the_ranks_of_a_check_do_not_import_torch_dynamo_again(self) -> None:
        output, ranks = self.run_script(A_TRAINER_CHECK)
        self.assertIn("passed", output)
        self.assertEqual(ranks, [], "ranks that imported torch._dynamo themselves")


if __name__ == "__main__":
    unittest.main()
