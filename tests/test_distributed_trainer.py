"""DistributedTrainerTests on a correct data-parallel trainer and on one bug each, with real
torch.distributed (gloo) processes."""

from __future__ import annotations

import importlib.util
import io
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import unittest
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest
import torch
import torch.distributed as dist
from checkrunner import CheckTestCase
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from dltestkit import ContractError, DistributedTrainerTests, TrainerTests
from dltestkit.core.contract import checks_of

SAMPLES, FEATURES, CLASSES = 24, 6, 3


class Writer:
    """Stands in for a SummaryWriter."""

    def add_scalar(self, tag: str, scalar_value: float, global_step: int = 0) -> None:
        pass

    def close(self) -> None:
        pass


class ClassifierTrainer:
    """Trains a small classifier with distributed data parallel training, done right: DDP,
    DistributedSampler reshuffled every epoch, logging on rank 0, a mean loss."""

    def __init__(
        self, data: TensorDataset, rank: int = 0, world_size: int = 1, global_batch: int = 8
    ) -> None:
        self.rank, self.world_size = rank, world_size
        self.model = self.build_model()
        self.net = self.wrap(self.model)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1)
        self.sampler = self.make_sampler(data)
        self.train_loader = self.make_loader(data, global_batch // world_size)
        self.summary: Optional[Writer] = Writer() if rank == 0 else None
        self.data = data
        self.epoch = 0

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(FEATURES, 8), nn.Tanh(), nn.Linear(8, CLASSES))

    def wrap(self, model: nn.Module) -> nn.Module:
        return nn.parallel.DistributedDataParallel(model) if self.world_size > 1 else model

    def make_sampler(self, data: TensorDataset) -> Any:
        return DistributedSampler(
            data, num_replicas=self.world_size, rank=self.rank, shuffle=True, seed=7
        )

    def make_loader(self, data: TensorDataset, batch_size: int) -> DataLoader:
        return DataLoader(data, batch_size=batch_size, sampler=self.sampler)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(self.net(x), y)

    def start_epoch(self) -> None:
        self.sampler.set_epoch(self.epoch)

    def log(self, tag: str, value: float, step: int) -> None:
        if self.summary is not None:
            self.summary.add_scalar(tag, value, step)

    def train(self, epochs: int) -> None:
        for _ in range(epochs):
            self.start_epoch()
            for x, y in self.train_loader:
                self.optimizer.zero_grad()
                loss = self.loss(x, y)
                loss.backward()
                self.step()
                self.log("train/loss", loss.item(), self.epoch)
            self.epoch += 1

    def step(self) -> None:
        self.optimizer.step()

    def eval(self) -> float:
        with torch.no_grad():
            x, y = self.data.tensors
            return float(nn.functional.cross_entropy(self.model(x), y))


# -- one bug each ----------------------------------------------------------------------------
class SeededPerRankWithoutBroadcast(ClassifierTrainer):
    """Averages gradients by hand, but the ranks start from their own random weights."""

    def build_model(self) -> nn.Module:
        torch.manual_seed(100 + self.rank)
        return super().build_model()

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def step(self) -> None:
        for parameter in self.model.parameters():
            dist.all_reduce(parameter.grad)
            parameter.grad /= self.world_size
        super().step()


class GradientsNotAveraged(ClassifierTrainer):
    def wrap(self, model: nn.Module) -> nn.Module:
        return model  # no DDP: every rank trains on its own


class FeatureEmbedding(nn.Module):
    """Each sample's strongest feature looked up in nn.Embedding(max_norm=1), which
    renormalises in place the rows its batch looks up."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(FEATURES, 8, max_norm=1.0)
        self.head = nn.Linear(8, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embedding(x.argmax(dim=1)))


class RenormalisesByItsBatch(ClassifierTrainer):
    """DDP done right, but each rank renormalises the embedding rows of its own batch."""

    def build_model(self) -> nn.Module:
        return FeatureEmbedding()


class NoDistributedSampler(ClassifierTrainer):
    def make_sampler(self, data: TensorDataset) -> Any:
        return torch.utils.data.RandomSampler(data)

    def start_epoch(self) -> None:
        pass


class SetEpochForgotten(ClassifierTrainer):
    def start_epoch(self) -> None:
        pass


class LogsOnEveryRank(ClassifierTrainer):
    def __init__(self, data: TensorDataset, rank: int = 0, world_size: int = 1) -> None:
        super().__init__(data, rank, world_size)
        self.summary = Writer()


class LossSummedPerRank(ClassifierTrainer):
    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(self.net(x), y, reduction="sum")


# -- correct trainers the check once failed --------------------------------------------------
class WithBatchNorm(ClassifierTrainer):
    """BatchNorm: DDP broadcasts rank 0's running statistics at every forward, and each rank's
    last forward updates its own from its shard, so the ranks end with other statistics."""

    def build_model(self) -> nn.Module:
        return nn.Sequential(
            nn.Linear(FEATURES, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, CLASSES)
        )


class BatchNormNotBroadcast(WithBatchNorm):
    def wrap(self, model: nn.Module) -> nn.Module:
        if self.world_size == 1:
            return model
        return nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)


class LoadsWithWorkers(ClassifierTrainer):
    def make_loader(self, data: TensorDataset, batch_size: int) -> DataLoader:
        return DataLoader(data, batch_size=batch_size, sampler=self.sampler, num_workers=2)


class WrapsInTrainSeededPerRank(ClassifierTrainer):
    """Seeds every rank differently (for per-rank augmentation) and wraps the model in DDP
    only when training starts, as Hugging Face's Trainer does: DDP broadcasts rank 0's
    weights then."""

    def build_model(self) -> nn.Module:
        torch.manual_seed(100 + self.rank)
        return super().build_model()

    def wrap(self, model: nn.Module) -> nn.Module:
        return model  # not yet

    def train(self, epochs: int) -> None:
        if self.world_size > 1 and self.net is self.model:
            self.net = nn.parallel.DistributedDataParallel(self.model)
        super().train(epochs)


class Buckets:
    """A distributed batch sampler, as language-model trainers use to batch samples of similar
    length: a shuffled order per epoch, each rank its share, in batches of indices."""

    def __init__(self, size: int, batch: int, rank: int, world_size: int) -> None:
        self.size, self.batch, self.rank, self.world_size = size, batch, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def mine(self) -> List[int]:
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.epoch))
        return order.tolist()[self.rank :: self.world_size]

    def __iter__(self) -> Any:
        mine = self.mine()
        return iter([mine[i : i + self.batch] for i in range(0, len(mine), self.batch)])

    def __len__(self) -> int:
        return -(-len(self.mine()) // self.batch)


class WithBatchSampler(ClassifierTrainer):
    def make_sampler(self, data: TensorDataset) -> Any:
        return Buckets(len(data), 8 // self.world_size, self.rank, self.world_size)

    def make_loader(self, data: TensorDataset, batch_size: int) -> DataLoader:
        return DataLoader(data, batch_sampler=self.sampler)


class OneSampleAtATime(ClassifierTrainer):
    def make_loader(self, data: TensorDataset, batch_size: int) -> DataLoader:
        return DataLoader(data, batch_size=None, sampler=self.sampler)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return super().loss(x[None], y[None])


class Stream(torch.utils.data.IterableDataset):
    def __init__(self, data: TensorDataset, rank: int, world_size: int) -> None:
        self.data, self.rank, self.world_size = data, rank, world_size

    def __iter__(self) -> Any:
        return (self.data[i] for i in range(self.rank, len(self.data), self.world_size))


class Streams(ClassifierTrainer):
    def make_loader(self, data: TensorDataset, batch_size: int) -> DataLoader:
        return DataLoader(Stream(data, self.rank, self.world_size), batch_size=batch_size)


# -- and one bug each, of those --------------------------------------------------------------
class RandomBufferPerRank(ClassifierTrainer):
    """A fixed random projection kept as a buffer, drawn from per-rank seeds, with DDP told
    not to broadcast buffers: the ranks compute different functions."""

    def build_model(self) -> nn.Module:
        model = super().build_model()
        generator = torch.Generator().manual_seed(100 + self.rank)
        model.register_buffer("projection", torch.randn(FEATURES, FEATURES, generator=generator))
        return model

    def wrap(self, model: nn.Module) -> nn.Module:
        if self.world_size == 1:
            return model
        return nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)


class BucketsNotSharded(Buckets):
    def mine(self) -> List[int]:
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.epoch))
        return order.tolist()  # every rank takes every index


class BatchSamplerNotSharded(WithBatchSampler):
    def make_sampler(self, data: TensorDataset) -> Any:
        return BucketsNotSharded(len(data), 8 // self.world_size, self.rank, self.world_size)


def data() -> TensorDataset:
    generator = torch.Generator().manual_seed(3)
    return TensorDataset(
        torch.randn(SAMPLES, FEATURES, generator=generator),
        torch.randint(0, CLASSES, (SAMPLES,), generator=generator),
    )


def ddp_trainer_case(
    trainer_type: Any, mixins: tuple = (DistributedTrainerTests,), **attributes: Any
) -> type:
    def make_trainer(self: Any, rank: int = 0, world_size: int = 1) -> Any:
        return trainer_type(self.data, rank, world_size)

    def set_up(self: Any) -> None:
        self.data = data()
        self.trainer = self.make_trainer()
        for name, value in attributes.items():
            setattr(self, name, value)

    return type(
        "Case",
        (*mixins, unittest.TestCase),
        {"setUp": set_up, "make_trainer": make_trainer, "seed": 0},
    )


def outcome_of(case: type) -> Dict[str, List[str]]:
    """What test_ddp_training reported, per subtest (or "check" outside any)."""
    found: Dict[str, List[str]] = {}

    class Result(unittest.TestResult):
        def addSubTest(self, test: Any, subtest: Any, err: Any) -> None:
            super().addSubTest(test, subtest, err)
            if err is not None:
                found.setdefault(subtest.params["part"], []).append(str(err[1]))

    result = Result()
    case("test_ddp_training").run(result)
    for _, text in result.failures + result.errors:
        found.setdefault("check", []).append(text)
    for _, reason in result.skipped:
        found.setdefault("skipped", []).append(reason)
    return found


class DDPTraining(CheckTestCase):
    def assertOnlySubtestFails(self, case: type, subtest: str, *fragments: str) -> None:
        found = outcome_of(case)
        failed = {name for name in found if name not in ("skipped", "check")}
        self.assertEqual(failed, {subtest}, found)
        for fragment in fragments:
            self.assertIn(fragment, "\n".join(found[subtest]))

    def test_a_correct_trainer_passes_every_part(self) -> None:
        case = ddp_trainer_case(ClassifierTrainer, single_process_tolerance=(1e-5, 1e-6))
        self.assertPasses(case, "test_ddp_training")
        self.assertPasses(
            ddp_trainer_case(ClassifierTrainer, world_size=3),
            "test_ddp_training",
            allowed_skips=["self.single_process_tolerance is not set"],
        )

    def test_correct_trainers_the_check_once_failed_pass(self) -> None:
        cases = {
            "BatchNorm (running statistics differ at the end)": WithBatchNorm,
            "BatchNorm, buffers not broadcast": BatchNormNotBroadcast,
            "a DataLoader with 2 worker processes": LoadsWithWorkers,
            "seeded per rank, wrapped in DDP in train()": WrapsInTrainSeededPerRank,
            "a distributed batch sampler": WithBatchSampler,
            "batch_size=None": OneSampleAtATime,
        }
        for label, trainer in cases.items():
            with self.subTest(label):
                self.assertPasses(
                    ddp_trainer_case(trainer),
                    "test_ddp_training",
                    allowed_skips=["self.single_process_tolerance is not set"],
                )

    def test_a_loader_of_an_iterable_dataset_skips_only_the_data_part(self) -> None:
        found = outcome_of(ddp_trainer_case(Streams))
        self.assertEqual(set(found), {"skipped"}, found)
        self.assertIn(
            "trainer.train_loader loads an IterableDataset, whose samples have no indices: "
            "which rank loaded which sample is not checked",
            found["skipped"],
        )

    def test_buffers_that_differ_at_the_start_fail(self) -> None:
        self.assertOnlySubtestFails(
            ddp_trainer_case(RandomBufferPerRank),
            "start",
            "rank 1 starts with other buffers than rank 0 (projection ",
            "although the weights are the same",
            "with broadcast_buffers=False, build the buffers the same on every rank",
        )

    def test_a_batch_sampler_that_gives_every_rank_everything_fails(self) -> None:
        self.assertOnlySubtestFails(
            ddp_trainer_case(BatchSamplerNotSharded),
            "data",
            "in epoch 0 the 2 ranks together did not load each of the 24 training samples "
            "once: 24 loads of samples another rank had loaded",
            "The batch sampler (BucketsNotSharded) gives every rank the whole dataset: give "
            "each rank its own shard of the indices before batching them",
        )

    def test_ranks_that_start_from_different_weights_fail(self) -> None:
        self.assertOnlySubtestFails(
            ddp_trainer_case(SeededPerRankWithoutBroadcast),
            "start",
            "rank 1 starts with other weights than rank 0 (0.weight",
            "at its first training forward",
            "Wrap the model in DistributedDataParallel, which broadcasts rank 0's weights",
        )

    def test_gradients_that_are_not_averaged_fail(self) -> None:
        self.assertOnlySubtestFails(
            ddp_trainer_case(GradientsNotAveraged),
            "end",
            "after 2 epochs rank 1 has other weights than rank 0",
            "the ranks' gradients are not averaged",
        )

    def test_weights_changed_in_place_by_each_ranks_batch_fail_naming_that_cause_too(
        self,
    ) -> None:
        self.assertOnlySubtestFails(
            ddp_trainer_case(RenormalisesByItsBatch),
            "end",
            "after 2 epochs rank 1 has other weights than rank 0 (embedding.weight",
            "the model's forward changes a parameter in place by each rank's batch, as "
            "nn.Embedding(max_norm=...) does",
        )

    def test_every_rank_training_on_all_the_data_fails(self) -> None:
        self.assertOnlySubtestFails(
            ddp_trainer_case(NoDistributedSampler),
            "data",
            "in epoch 0 the 2 ranks together did not load each of the 24 training samples "
            "once: 24 loads of samples another rank had loaded",
            "(RandomSampler) gives every rank the whole dataset",
            "DistributedSampler(dataset, num_replicas=world_size, rank=rank)",
        )

    def test_a_sampler_never_told_the_epoch_fails(self) -> None:
        self.assertOnlySubtestFails(
            ddp_trainer_case(SetEpochForgotten),
            "data",
            "ranks [0, 1] loaded their samples in the same order in both epochs",
            "call sampler.set_epoch(epoch)",
        )

    def test_logging_from_every_rank_fails(self) -> None:
        self.assertOnlySubtestFails(
            ddp_trainer_case(LogsOnEveryRank),
            "logging",
            "ranks [1] logged scalars too (rank 1: 'train/loss' at step 0",
            "Log from rank 0 only",
        )

    def test_a_loss_summed_per_rank_differs_from_one_process(self) -> None:
        self.assertOnlySubtestFails(
            ddp_trainer_case(LossSummedPerRank, single_process_tolerance=(1e-5, 1e-6)),
            "one process",
            "after 2 epochs on 2 processes the weights differ from those of one "
            "process on the whole data",
            "a mean over the batch (not a sum",
        )

    def test_an_uneven_dataset_is_no_false_alarm(self) -> None:
        class Uneven(ClassifierTrainer):
            def __init__(self, data: TensorDataset, rank: int = 0, world_size: int = 1) -> None:
                odd = TensorDataset(*(t[: SAMPLES - 1] for t in data.tensors))
                super().__init__(odd, rank, world_size)

        self.assertPasses(
            ddp_trainer_case(Uneven),
            "test_ddp_training",
            allowed_skips=["self.single_process_tolerance is not set"],
        )

    def test_without_make_trainer_it_skips_naming_it(self) -> None:
        def set_up(self: Any) -> None:
            pass

        case = type("Case", (DistributedTrainerTests, unittest.TestCase), {"setUp": set_up})
        self.assertSkipsWith(case, "test_ddp_training", "self.make_trainer is not set")

    def test_a_wrong_train_loader_attribute_is_a_contract_error(self) -> None:
        case = ddp_trainer_case(ClassifierTrainer, train_loader_attribute="loader")
        self.assertErrorsWith(
            case,
            "test_ddp_training",
            "ContractError",
            "trainer.loader (train_loader_attribute) is NoneType, not a DataLoader",
        )

    def test_a_skipped_part_is_named_and_the_check_reported_passed(self) -> None:
        class Result(unittest.TestResult):
            passed: List[str] = []

            def addSuccess(self, test: Any) -> None:
                super().addSuccess(test)
                self.passed.append(test._testMethodName)

        result = Result()
        ddp_trainer_case(ClassifierTrainer)("test_ddp_training").run(result)
        self.assertEqual((result.failures, result.errors), ([], []))
        self.assertEqual(result.passed, ["test_ddp_training"])  # not only "skipped"
        [(part, reason)] = result.skipped
        self.assertIn("(part='one process')", str(part))
        self.assertIn(
            "self.single_process_tolerance is not set: the distributed result is not compared "
            "with one process on the whole data (the other parts of the check ran); set it, "
            "e.g. self.single_process_tolerance = (1e-4, 1e-6)",
            reason,
        )

    def test_a_misspelled_make_trainer_is_a_contract_error_naming_it(self) -> None:
        def set_up(self: Any) -> None:
            self.data = data()

        def make_trainr(self: Any, rank: int = 0, world_size: int = 1) -> Any:
            return ClassifierTrainer(self.data, rank, world_size)

        case = type(
            "TestMine",
            (DistributedTrainerTests, unittest.TestCase),
            {"setUp": set_up, "make_trainr": make_trainr},
        )
        self.assertErrorsWith(
            case,
            "test_ddp_training",
            "ContractError: self.make_trainer is not set, but TestMine defines 'make_trainr': "
            "did you mean self.make_trainer? DistributedTrainerTests needs a callable that builds "
            "a fresh trainer",
        )

    def test_a_make_trainer_without_rank_and_world_size_is_a_contract_error(self) -> None:
        def set_up(self: Any) -> None:
            self.data = data()
            self.make_trainer = lambda: ClassifierTrainer(self.data)
            self.trainer = self.make_trainer()

        case = type("Case", (DistributedTrainerTests, unittest.TestCase), {"setUp": set_up})
        self.assertErrorsWith(
            case,
            "test_ddp_training",
            "ContractError: self.make_trainer set in Case.setUp cannot be called as "
            "make_trainer(rank=0, world_size=2) (got an unexpected keyword argument 'rank')",
        )

    def test_it_combines_with_trainer_tests(self) -> None:
        case = ddp_trainer_case(ClassifierTrainer, mixins=(DistributedTrainerTests, TrainerTests))
        self.assertIn("test_ddp_training", checks_of(case))
        self.assertIn("test_resume", checks_of(case))
        self.assertTrue(issubclass(ContractError, TypeError))


MODULE = textwrap.dedent("""
    import unittest

    from test_distributed_trainer import ClassifierTrainer, data
    from dltestkit import DistributedTrainerTests


    class TestDDP(DistributedTrainerTests, unittest.TestCase):
        def setUp(self):
            self.data = data()

        def make_trainer(self, rank=0, world_size=1):
            return ClassifierTrainer(self.data, rank, world_size)
""")


class SkippedPartUnderRunners(unittest.TestCase):
    """A check with one part skipped reads as passed, with the part named, under both."""

    def run_in_temp_dir(self, *command: str) -> str:
        here = Path(__file__).resolve().parent
        with tempfile.TemporaryDirectory() as folder:
            Path(folder, "test_ddp.py").write_text(MODULE)
            completed = subprocess.run(
                [sys.executable, *command],
                cwd=folder,
                text=True,
                capture_output=True,
                timeout=300,
                env={**os.environ, "PYTHONPATH": os.pathsep.join([str(here.parent), str(here)])},
            )
        return completed.stdout + completed.stderr

    def test_unittest_reports_the_check_ok_and_the_part_skipped(self) -> None:
        # unittest's own runner, as `python -m unittest -v` runs it, in this process
        class TestDDP(DistributedTrainerTests, unittest.TestCase):
            def setUp(self) -> None:
                self.data = data()

            def make_trainer(self, rank: int = 0, world_size: int = 1) -> ClassifierTrainer:
                return ClassifierTrainer(self.data, rank, world_size)

        stream = io.StringIO()
        runner = unittest.TextTestRunner(stream=stream, verbosity=2)
        runner.run(unittest.TestSuite([TestDDP("test_ddp_training")]))
        output = stream.getvalue()
        name = r"test_ddp_training \(test_distributed_trainer\..*TestDDP.test_ddp_training\)"
        self.assertRegex(
            output,
            name + r" \(part='one process'\)"
            r"\n.*\.\.\. skipped 'self.single_process_tolerance is not set",
        )
        self.assertRegex(output, name + r"\n.* \.\.\. ok\n")
        self.assertIn("OK (skipped=1)", output)

    def test_pytest_reports_the_check_passed_and_the_part_skipped(self) -> None:
        output = self.run_in_temp_dir(
            "-m",
            "pytest",
            "-v",
            "-rs",
            "-p",
            "no:cacheprovider",
            "test_ddp.py::TestDDP::test_ddp_training",
        )
        self.assertIn("test_ddp.py::TestDDP::test_ddp_training PASSED", output)
        self.assertIn("SUBSKIPPED(part='one process') [1] ", output)
        self.assertRegex(output, r"1 passed, 1 skipped, (\d+ warnings?, )?4 subtests passed")


if __name__ == "__main__":
    unittest.main()


class ExampleUnderTorchrun(unittest.TestCase):
    def torchrun(self, folder: str, processes: int, *arguments: str) -> str:
        """run.py under torchrun on ``processes`` CPU processes, in ``folder``; its output."""
        missing = [
            name
            for name in ("torchvision", "tensorboard", "tqdm")
            if importlib.util.find_spec(name) is None
        ]
        if missing or shutil.which("torchrun") is None:
            self.skipTest(f"needs the example extra and torchrun (missing: {missing})")
        run_py = Path(__file__).resolve().parent.parent / "example_project" / "run.py"
        completed = subprocess.run(
            [
                shutil.which("torchrun") or "torchrun",
                "--standalone",
                "--nproc_per_node",
                str(processes),
                str(run_py),
                "--num-workers",
                "0",
                "--data-root",
                f"{folder}/data",
                *arguments,
            ],
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=300,
            # (torchrun's own folders, torchelastic_*, in the test's folder, removed with it)
            env={**os.environ, "PYTHONWARNINGS": "ignore", "TMPDIR": folder},
        )
        self.assertEqual(completed.returncode, 0, completed.stdout + completed.stderr)
        return completed.stdout

    @pytest.mark.slow  # (.ci/run's slow step) torchrun and the example's imports: ~8 s
    def test_run_py_trains_with_ddp_on_two_cpu_processes(self) -> None:
        with tempfile.TemporaryDirectory() as folder:
            output = self.torchrun(
                folder,
                2,
                "--generate-data",
                "--generate-sizes",
                "64,32",
                "--epochs",
                "2",
                "--batch-size",
                "16",
                "--log-dir",
                f"{folder}/runs",
            )
            self.assertIn("Trained mlp for 2 epochs on cpu x 2 processes (ddp)", output)
            self.assertEqual(output.count("Trained"), 1, "only rank 0 reports")
            self.assertTrue((Path(folder) / "runs" / "checkpoint" / ".metadata").exists())
            self.assertEqual(
                len(list((Path(folder) / "runs").glob("events.out.tfevents*"))),
                1,
                "only rank 0 logs",
            )

    @pytest.mark.slow
    def test_run_py_trains_sharded_and_resumes_on_one_process(self) -> None:
        with tempfile.TemporaryDirectory() as folder:
            output = self.torchrun(
                folder,
                2,
                "--generate-data",
                "--generate-sizes",
                "64,32",
                "--strategy",
                "fsdp",
                "--epochs",
                "1",
                "--batch-size",
                "16",
                "--log-dir",
                f"{folder}/sharded",
            )
            self.assertIn("Trained mlp for 1 epochs on cpu x 2 processes (fsdp)", output)
            shards = sorted(p.name for p in (Path(folder) / "sharded" / "checkpoint").iterdir())
            self.assertEqual(shards, [".metadata", "__0_0.distcp", "__1_0.distcp"])
            output = self.torchrun(
                folder,
                1,
                "--strategy",
                "fsdp",
                "--epochs",
                "2",
                "--batch-size",
                "32",
                "--log-dir",
                f"{folder}/resumed",
                "--resume",
                f"{folder}/sharded/checkpoint",
            )
            self.assertIn("Resumed from", output)
            self.assertIn("after epoch 1", output)
            self.assertIn("Trained mlp for 2 epochs on cpu:", output)
