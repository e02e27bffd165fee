"""Trainers built on third-party libraries. Distributed: the ranks carry torchrun's
environment, so that Accelerate's ``Accelerator``, Lightning's ``Trainer`` and
``transformers.Trainer`` find the process group as under torchrun; DistributedTrainerTests on
Accelerate trainers, whose prepared DataLoader the checks watch through. One process:
TrainerTests' training-stack checks on an Accelerate trainer that accumulates with
``accelerator.accumulate``, autocasts with ``mixed_precision="bf16"`` and compiles with its
``TorchDynamoPlugin`` (which takes a backend's name)."""

from __future__ import annotations

import os
import tempfile
import unittest
from typing import Any, Dict, List, Optional, Tuple

import torch
from checkrunner import CheckTestCase
from test_distributed_trainer import ClassifierTrainer, data, ddp_trainer_case, outcome_of
from test_fsdp import ShardedTrainer
from test_fsdp import trainer_case as fsdp_trainer_case
from test_training_stack import stack_case
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from dltestkit import DistributedTrainerTests, run_distributed

try:
    import accelerate  # noqa: F401

    MISSING = False
except ImportError:  # the dev extra installs it
    MISSING = True

GLOBAL_BATCH = 8


class AccelerateTrainer:
    """A classifier trained with Accelerate, done right: ``prepare`` wraps the model in DDP and
    shards the data; the seedable sampler gives one process the batches that the ranks share
    out (so that its training equals theirs); ``save_state`` and ``load_state`` checkpoint,
    and every epoch sets the data order's epoch (its own count, which a resumed run restores;
    the prepared loader's count of its passes starts again at 0)."""

    prepared = ("net", "optimizer", "train_loader")

    def __init__(self, dataset: Any, rank: int = 0, world_size: int = 1) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DataLoaderConfiguration, set_seed

        set_seed(0)
        self.accelerator = Accelerator(
            cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True)
        )
        self.model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
        self.net: Any = self.model
        self.optimizer: Any = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9)
        self.train_loader: Any = DataLoader(
            dataset, batch_size=GLOBAL_BATCH // world_size, shuffle=True
        )
        pieces = {"net": self.net, "optimizer": self.optimizer, "train_loader": self.train_loader}
        chosen = [pieces[name] for name in self.prepared]
        for name, piece in zip(self.prepared, self.accelerator.prepare(*chosen)):
            setattr(self, name, piece)
        self.summary = None
        self.epoch = 0

    def train(self, epochs: int) -> None:
        for _ in range(epochs):
            self.set_epoch()
            for x, y in self.train_loader:
                self.optimizer.zero_grad()
                self.accelerator.backward(nn.functional.cross_entropy(self.net(x), y))
                self.optimizer.step()
            self.epoch += 1

    def set_epoch(self) -> None:
        self.train_loader.set_epoch(self.epoch)

    def eval(self) -> float:
        return 0.0

    def save_checkpoint(self, path: str) -> None:
        self.accelerator.save_state(path)
        if self.accelerator.is_main_process:
            torch.save({"epoch": self.epoch}, os.path.join(path, "epoch.pt"))
        self.accelerator.wait_for_everyone()

    def load_checkpoint(self, path: str) -> None:
        self.accelerator.load_state(path)
        self.epoch = torch.load(os.path.join(path, "epoch.pt"))["epoch"]


class LoaderNotPrepared(AccelerateTrainer):
    """The DataLoader is left out of ``prepare``: every rank trains on the whole data."""

    prepared = ("net", "optimizer")

    def set_epoch(self) -> None:  # a plain DataLoader has no epoch to set
        pass


class ModelNotPrepared(AccelerateTrainer):
    """The model is left out of ``prepare``: no DDP, each rank's gradients its own."""

    prepared = ("optimizer", "train_loader")


class EpochNotRestored(AccelerateTrainer):
    """Leaves the data order's epoch to the prepared loader, which counts its own passes: a
    resumed run shuffles as the first epoch did."""

    def set_epoch(self) -> None:
        pass


class Pairs(torch.utils.data.Dataset):
    """32 samples as dicts, as transformers.Trainer takes them."""

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(3)
        self.x = torch.randn(32, 6, generator=generator)
        self.y = torch.randint(0, 3, (32,), generator=generator)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        return {"x": self.x[index], "labels": self.y[index]}


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> Dict[str, torch.Tensor]:
        logits = self.net(x)
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def lightning_classifier() -> Any:
    """A LightningModule without batch statistics or dropout, trained with SGD on a mean loss:
    its data-parallel training equals one process's. It counts the batches it trains on."""
    import pytorch_lightning as pl

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.classifier = Classifier()
            self.batches = 0

        def training_step(self, batch: Dict[str, torch.Tensor], index: int) -> torch.Tensor:
            self.batches += 1
            loss = self.classifier(**batch)["loss"]
            self.log("train/loss", loss)
            return loss

        def validation_step(self, batch: Dict[str, torch.Tensor], index: int) -> None:
            self.log("val/loss", self.classifier(**batch)["loss"])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return Module()


def lightning_fit(rank: int, world_size: int) -> Tuple[str, str, int, List[float]]:
    """One epoch of Lightning's Trainer with strategy="ddp" on this rank: the strategy, the
    cluster environment, the batches this rank trained on, the weights."""
    import pytorch_lightning as pl

    torch.manual_seed(rank)  # DDP gives every rank rank 0's weights
    module = lightning_classifier()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=world_size,
        strategy="ddp",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(Pairs(), batch_size=4, shuffle=True))
    environment = type(trainer.strategy.cluster_environment).__name__  # type: ignore[attr-defined]
    weights = module.classifier.net.weight.flatten().tolist()
    return type(trainer.strategy).__name__, environment, module.batches, weights


def transformers_train(rank: int, world_size: int) -> Tuple[int, str, int, List[float]]:
    """One epoch of transformers.Trainer on this rank: its world size, how it wrapped the
    model, the batches per epoch, the weights."""
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    model = Classifier()
    with tempfile.TemporaryDirectory() as folder:
        arguments = TrainingArguments(
            output_dir=folder,
            use_cpu=True,
            per_device_train_batch_size=4,
            num_train_epochs=1,
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
            ddp_find_unused_parameters=False,
        )
        trainer = Trainer(model=model, args=arguments, train_dataset=Pairs())
        trainer.train()
        wrapper = type(trainer.model_wrapped).__name__
        batches = len(trainer.get_train_dataloader())
    return arguments.world_size, wrapper, batches, model.net.weight.flatten().tolist()


class JoinsTheGroupItself(AccelerateTrainer):
    """Calls init_process_group in its constructor, as a script started by torchrun may."""

    def __init__(self, dataset: Any, rank: int = 0, world_size: int = 1) -> None:
        if world_size > 1:
            torch.distributed.init_process_group("gloo")
        super().__init__(dataset, rank, world_size)


class FSDP1Trainer(ClassifierTrainer):
    """Shards its model with FullyShardedDataParallel (FSDP1), which needs a GPU."""

    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        if self.world_size > 1:
            self.model = FullyShardedDataParallel(model, use_orig_params=True)
        return self.model


class OffloadsToPinnedMemory(ShardedTrainer):
    """fully_shard with CPUOffloadPolicy(), which pins its CPU copies by default: CUDA's."""

    pin_memory = True

    def shard(self) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

        if self.world_size > 1:
            offload = CPUOffloadPolicy(pin_memory=self.pin_memory)
            mesh = init_device_mesh("cpu", (self.world_size,))
            fully_shard(self.model, mesh=mesh, offload_policy=offload)


class OffloadsToPlainMemory(OffloadsToPinnedMemory):
    pin_memory = False


def lightning_ddp_case(own_sampler: bool) -> type:
    """DistributedTrainerTests on the LightningAdapter with strategy="ddp" on world_size
    devices: with a DistributedSampler of the test's (and use_distributed_sampler=False), or
    with the one Lightning makes."""
    from dltestkit.integrations.lightning import LightningAdapter

    def make_trainer(self: Any, rank: int = 0, world_size: int = 1) -> Any:
        torch.manual_seed(0)
        if own_sampler:
            sampler = DistributedSampler(Pairs(), num_replicas=world_size, rank=rank, seed=3)
            loader = DataLoader(Pairs(), batch_size=GLOBAL_BATCH // world_size, sampler=sampler)
            options = {"use_distributed_sampler": False}
        else:
            order = torch.Generator().manual_seed(3)
            loader = DataLoader(
                Pairs(), batch_size=GLOBAL_BATCH // world_size, shuffle=True, generator=order
            )
            options = {}
        return LightningAdapter(
            lightning_classifier(),
            loader,
            DataLoader(Pairs(), batch_size=GLOBAL_BATCH),
            log_dir=self.make_temp_dir(),
            devices=world_size,
            strategy="ddp" if world_size > 1 else "auto",
            **options,
        )

    return type(
        "Case",
        (DistributedTrainerTests, unittest.TestCase),
        {"make_trainer": make_trainer, "single_process_tolerance": (1e-5, 1e-6), "seed": 0},
    )


def torchrun_environment(rank: int, world_size: int) -> Dict[str, str]:
    names = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR")
    found = {name: os.environ.get(name, "") for name in names}
    found["launched"] = str(torch.distributed.is_torchelastic_launched())
    return found


class TorchrunEnvironment(unittest.TestCase):
    def test_each_rank_has_torchruns_variables_and_the_caller_none_of_them(self) -> None:
        before = dict(os.environ)
        found = run_distributed(torchrun_environment, 2)
        self.assertEqual(
            found,
            [
                {
                    "RANK": str(rank),
                    "LOCAL_RANK": str(rank),
                    "WORLD_SIZE": "2",
                    "LOCAL_WORLD_SIZE": "2",
                    "MASTER_ADDR": "127.0.0.1",
                    "launched": "True",
                }
                for rank in range(2)
            ],
        )
        self.assertEqual(dict(os.environ), before)

    @unittest.skipIf(MISSING, "needs accelerate (the dev extra)")
    def test_lightning_and_transformers_trainers_train_data_parallel_over_the_ranks(
        self,
    ) -> None:
        # (without torchrun's variables Lightning starts processes of its own, running this
        # process's command line again, and names its LightningEnvironment)
        import pytorch_lightning  # noqa: F401  (imported once here, not in every rank)
        import transformers.trainer  # noqa: F401

        first, second = run_distributed(lightning_fit, 2)
        self.assertEqual(first[:3], ("DDPStrategy", "TorchElasticEnvironment", 4))
        self.assertEqual(first, second)  # the same weights: the gradients were averaged
        first, second = run_distributed(transformers_train, 2)
        self.assertEqual(first[:3], (2, "DistributedDataParallel", 4))
        self.assertEqual(first, second)


class StackTrainer:
    """An Accelerate trainer whose make_trainer keywords set Accelerate's own switches:
    gradient_accumulation_steps (with ``accelerator.accumulate``), mixed_precision and a
    TorchDynamoPlugin; a fresh Accelerate state each time (it is one per process)."""

    def __init__(
        self,
        accumulation_steps: int = 1,
        precision: str = "32",
        compile_backend: Optional[str] = None,
    ) -> None:
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import TorchDynamoPlugin, set_seed

        AcceleratorState._reset_state(reset_partial_state=True)
        set_seed(0)
        plugin = None if compile_backend is None else TorchDynamoPlugin(backend=compile_backend)
        self.accelerator = Accelerator(
            cpu=True,
            gradient_accumulation_steps=accumulation_steps,
            mixed_precision="bf16" if precision == "bf16" else "no",
            dynamo_plugin=plugin,
        )
        self.model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 3))
        optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-2)
        dataset = data()
        loader = DataLoader(dataset, batch_size=GLOBAL_BATCH // accumulation_steps)
        self.net, self.optimizer, self.train_loader = self.accelerator.prepare(
            self.model, optimizer, loader
        )
        self.validation = dataset.tensors

    def train(self, epochs: int) -> None:
        for _ in range(epochs):
            self.net.train()
            for x, y in self.train_loader:
                with self.accelerator.accumulate(self.net):
                    self.micro_batch(x, y)

    def micro_batch(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.accelerator.backward(nn.functional.cross_entropy(self.net(x), y))
        self.optimizer.step()
        self.optimizer.zero_grad()

    def eval(self) -> float:
        x, y = self.validation
        with torch.no_grad():
            return nn.functional.cross_entropy(self.net(x).float(), y).item()


class AccumulatesOutsideItsContext(StackTrainer):
    """Leaves out ``accelerator.accumulate``: Accelerate divides each loss by the number of
    steps all the same, and the optimizer steps after every micro-batch."""

    def train(self, epochs: int) -> None:
        for _ in range(epochs):
            self.net.train()
            for x, y in self.train_loader:
                self.micro_batch(x, y)


class LightningDDP(CheckTestCase):
    def test_the_adapter_with_a_distributed_sampler_passes_and_resumes(self) -> None:
        case = lightning_ddp_case(own_sampler=True)
        for check in ("test_ddp_training", "test_resume_across_world_sizes"):
            with self.subTest(check):
                self.assertPasses(case, check)

    def test_the_sampler_lightning_makes_is_out_of_sight_and_the_message_says_so(self) -> None:
        found = outcome_of(lightning_ddp_case(own_sampler=False))
        self.assertEqual(set(found) - {"skipped"}, {"data", "check"}, found)
        self.assertIn(
            "in epoch 0 rank 0 drew no sample from trainer.train_loader: ", found["data"][0]
        )
        self.assertIn(
            "Lightning's Trainer on several devices makes one with a DistributedSampler: give "
            "the DataLoader a DistributedSampler(dataset, num_replicas=world_size, rank=rank) "
            "and the Trainer use_distributed_sampler=False",
            found["data"][0],
        )


class FSDP1(CheckTestCase):
    @unittest.skipIf(torch.cuda.is_available(), "FSDP1 runs where there is a GPU")
    def test_a_trainer_sharding_with_fsdp1_skips_on_the_cpu_naming_the_line(self) -> None:
        for check in ("test_ddp_training", "test_fsdp_training"):
            with self.subTest(check):
                self.assertSkipsWith(
                    ddp_trainer_case(FSDP1Trainer),
                    check,
                    f"{check} cannot run this trainer on the CPU processes it starts: "
                    "FullyShardedDataParallel (FSDP1) refuses a machine without a GPU (rank ",
                    "RuntimeError: FSDP needs a non-CPU accelerator device",
                    "in wrap (self.model = FullyShardedDataParallel(model, use_orig_params=True))"
                    ". Nothing was compared. fully_shard (FSDP2) runs on the CPU",
                )

    @unittest.skipIf(torch.cuda.is_available(), "pinned memory is there with a GPU")
    def test_an_offload_to_pinned_memory_skips_on_the_cpu_and_one_to_plain_memory_runs(
        self,
    ) -> None:
        self.assertSkipsWith(
            fsdp_trainer_case(OffloadsToPinnedMemory),
            "test_fsdp_training",
            "test_fsdp_training cannot run this trainer on the CPU processes it starts: it "
            "asks for CUDA (a CUDA device, or pinned memory, as fully_shard's "
            "CPUOffloadPolicy() pins by default), which this machine does not have (rank ",
            "RuntimeError: Found no NVIDIA driver on your system",
            "in shard (fully_shard(self.model, mesh=mesh, offload_policy=offload))",
        )
        self.assertPasses(
            fsdp_trainer_case(OffloadsToPlainMemory, single_process_tolerance=(1e-5, 1e-6)),
            "test_fsdp_training",
        )


@unittest.skipIf(MISSING, "needs accelerate (the dev extra)")
class AccelerateTrainers(CheckTestCase):
    def test_a_correct_trainer_passes_every_part_and_resumes_on_another_number_of_ranks(
        self,
    ) -> None:
        case = ddp_trainer_case(AccelerateTrainer, single_process_tolerance=(1e-5, 1e-6))
        self.assertPasses(case, "test_ddp_training")
        self.assertPasses(case, "test_resume_across_world_sizes")

    def test_a_loader_left_out_of_prepare_fails_in_the_data_part(self) -> None:
        found = outcome_of(ddp_trainer_case(LoaderNotPrepared))
        self.assertEqual(set(found) - {"skipped"}, {"data", "check"}, found)
        self.assertIn(
            "in epoch 0 the 2 ranks together did not load each of the "
            f"{len(data())} training samples once",
            found["data"][0],
        )
        self.assertIn("gives every rank the whole dataset", found["data"][0])

    def test_a_model_left_out_of_prepare_fails_at_the_end(self) -> None:
        found = outcome_of(ddp_trainer_case(ModelNotPrepared))
        self.assertEqual(set(found) - {"skipped"}, {"end", "check"}, found)
        self.assertIn(
            "after 2 epochs rank 1 has other weights than rank 0 (0.weight Mismatched elements",
            found["end"][0],
        )
        self.assertIn("the ranks' gradients are not averaged", found["end"][0])

    def test_accumulation_mixed_precision_and_compiling_by_accelerates_switches_pass(
        self,
    ) -> None:
        case = stack_case(StackTrainer, writer_attribute=None)
        for check in ("test_gradient_accumulation", "test_compiled_training"):
            self.assertPasses(case, check)
        self.assertPasses(
            case,
            "test_mixed_precision",
            allowed_skips=["make_trainer does not take the keyword argument grad_scale"],
        )

    def test_accumulation_outside_accelerates_context_fails(self) -> None:
        self.assertFailsWith(
            stack_case(AccumulatesOutsideItsContext, writer_attribute=None),
            "test_gradient_accumulation",
            "the first optimizer step came after 1 of the 2 micro-batches of its window",
            "with Accelerate, a micro-batch trained outside `with accelerator.accumulate(model)`",
        )

    def test_a_trainer_that_joins_the_group_itself_is_told_where_to_join_it(self) -> None:
        self.assertErrorsWith(
            ddp_trainer_case(JoinsTheGroupItself),
            "test_ddp_training",
            "ContractError: self.make_trainer (a method of Case) calls "
            "torch.distributed.init_process_group in a process that has joined the group "
            "already (rank ",  # (whichever rank came first)
            ": ValueError: trying to initialize the default process group twice!). "
            "test_ddp_training calls make_trainer(rank, world_size) in processes that joined it",
            "only where torch.distributed.is_initialized() is False",
        )

    def test_an_epoch_not_restored_fails_to_resume_naming_the_data_position(self) -> None:
        case = ddp_trainer_case(EpochNotRestored, single_process_tolerance=(1e-5, 1e-6))
        self.assertFailsWith(
            case,
            "test_resume_across_world_sizes",
            "a run resumed on 1 rank from the checkpoint that 2 ranks saved differs from an "
            "uninterrupted one",
            "- data position: in the epoch after resuming, rank 0 of 1 loaded other samples "
            "than an uninterrupted run on 1 rank loads in its second epoch",
            "the first epoch's order again: the epoch is not restored",
        )


if __name__ == "__main__":
    unittest.main()
