"""Fully sharded data parallel training (FSDP2, fully_shard) and distributed checkpoints (DCP)
with real torch.distributed (gloo) CPU processes: test_fsdp_gradients, test_fsdp_training and
test_resume_across_world_sizes on correct components and on one bug each."""

from __future__ import annotations

import multiprocessing
import os
import tempfile
import time
import unittest
from pathlib import Path
from typing import Any, Dict, List, Optional
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from checkrunner import SEED, CheckTestCase
from test_distributed import (
    CancelsInFloat32,
    ClampedScale,
    RenormalisedEmbedding,
    cancelling_inputs,
    child_pids,
    in_float32,
    mean_output,
    token_ids,
)
from test_model_checks import SHAPE, AutoEncoder, CentresOverBatch, WithBatchNorm
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from dltestkit import DistributedModelTests, DistributedTrainerTests
from dltestkit.distributed.sharding import fsdp_unavailable

UNAVAILABLE = fsdp_unavailable()
SAMPLES, FEATURES, CLASSES = 16, 6, 3


def shard_children(model: nn.Module, world_size: int) -> None:
    """fully_shard every child holding parameters, then the model, on a CPU mesh."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world_size,))
    for child in model.children():
        if any(True for _ in child.parameters()):
            fully_shard(child, mesh=mesh)
    fully_shard(model, mesh=mesh)


# -- models ----------------------------------------------------------------------------------
class TiedByAccess(nn.Module):
    """Output logits from the embedding's weight, read outside the embedding's forward."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.body = nn.Sequential(nn.Linear(8, 8), nn.Tanh())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.body(self.embed(ids)) @ self.embed.weight.T


class TiedHead(TiedByAccess):
    """The head's weight is the embedding's (one parameter, two modules); with_access, the
    embedding's weight is also read outside its forward."""

    def __init__(self, with_access: bool = False) -> None:
        super().__init__()
        self.head = nn.Linear(8, 20, bias=False)
        self.head.weight = self.embed.weight
        self.with_access = with_access

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.body(self.embed(ids))
        logits = self.head(hidden)
        return logits + hidden @ self.embed.weight.T if self.with_access else logits


class FixedDtypeScale(AutoEncoder):
    """Scales its features by a float32 buffer with a matrix product: fine in float32, an error
    when a mixed-precision policy makes the activations bfloat16 (buffers are not cast)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.eye(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x) @ self.scale)


class SamplesInEval(AutoEncoder):
    """Adds noise in every mode, as a VAE that samples at evaluation does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(x)
        return self.decoder(hidden + torch.randn_like(hidden))


class ScalarTemperature(AutoEncoder):
    """A scalar parameter (CLIP's logit_scale), which fully_shard refuses."""

    def __init__(self) -> None:
        super().__init__()
        self.temperature = nn.Parameter(torch.tensor(1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.temperature


def tokens() -> torch.Tensor:
    return torch.randint(0, 20, (4, 5), generator=torch.Generator().manual_seed(1))


def model_case(model_type: Any, inputs: Any = None, **attributes: Any) -> type:
    def set_up(self: Any) -> None:
        self.model = model_type()
        self.inputs = torch.randn(4, *SHAPE) if inputs is None else inputs()
        for name, value in attributes.items():
            setattr(self, name, value)

    return type("Case", (DistributedModelTests, unittest.TestCase), {"setUp": set_up, "seed": SEED})


def bfloat16_policy() -> Any:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


@unittest.skipIf(UNAVAILABLE, UNAVAILABLE or "")
class FSDPGradients(CheckTestCase):
    def test_correct_models_pass(self) -> None:
        cases = {
            "autoencoder, default units": model_case(AutoEncoder),
            "tied weights, read outside a unit and shared, default units": model_case(
                lambda: TiedHead(with_access=True), tokens
            ),
        }
        for label, case in cases.items():
            with self.subTest(label):
                self.assertPasses(case, "test_fsdp_gradients")

    @pytest.mark.slow
    def test_more_correct_models_pass(self) -> None:
        cases = {
            "autoencoder, declared units": model_case(AutoEncoder, fsdp_units=["encoder.*"]),
            "tied by reading the weight, default units": model_case(TiedByAccess, tokens),
            "tied head, default units": model_case(TiedHead, tokens),
            "bfloat16 policy": model_case(AutoEncoder, fsdp_mixed_precision=bfloat16_policy()),
            "a float32 buffer, no policy": model_case(FixedDtypeScale),
        }
        for label, case in cases.items():
            with self.subTest(label):
                self.assertPasses(case, "test_fsdp_gradients")

    def test_float32_rounding_is_no_failure_the_comparison_runs_in_float64(self) -> None:
        case = model_case(CancelsInFloat32, cancelling_inputs, loss_fn=mean_output)
        self.assertPasses(case, "test_fsdp_gradients")
        # compared in float32, the same correct model fails: float64 is what passes it
        self.assertFailsWith(
            in_float32(case),
            "test_fsdp_gradients",
            "at step 1 the gradient of weight (in the model (CancelsInFloat32), of the root unit",
        )

    def test_parameters_changed_in_place_in_forward_fail_naming_the_change(self) -> None:
        # fully_shard changes the gathered copy, which it frees: the shards keep the old values
        self.assertFailsWith(
            model_case(ClampedScale),
            "test_fsdp_gradients",
            "at step 1 the updated weight of scale (in the model (ClampedScale), of the root "
            "unit (the model itself)) that fully_shard gives on 2 ranks",
            "The model's forward changes scale in place (Tensor.clamp_, at test_distributed.py:",
            "But under fully_shard, forward runs on a gathered copy of the parameters",
        )
        self.assertFailsWith(
            model_case(RenormalisedEmbedding, token_ids),
            "test_fsdp_gradients",
            "the updated weight of embedding.weight",
            "The model's forward changes embedding.weight in place (F.embedding, at",
            "nn.Embedding(max_norm=...) does so",
        )

    def test_batch_statistics_fail_naming_the_module(self) -> None:
        self.assertFailsWith(
            model_case(WithBatchNorm),
            "test_fsdp_gradients",
            "at step 1 the gradient of encoder.1.weight (in encoder.1 (Linear), of the FSDP "
            "unit encoder) that fully_shard gives on 2 ranks, each on its shard of the batch, "
            "gathered whole, differs from that of one process on the whole batch",
            "The model normalises with batch statistics (encoder.2): under FSDP each rank "
            "uses the statistics of its own shard",
        )

    @pytest.mark.slow
    def test_samples_mixed_across_the_batch_fail(self) -> None:
        self.assertFailsWith(
            model_case(CentresOverBatch),
            "test_fsdp_gradients",
            "differs from that of one process on the whole batch",
            "A sample's output depends on the other samples of its batch",
        )

    def test_a_loss_summed_per_rank_fails(self) -> None:
        self.assertFailsWith(
            model_case(AutoEncoder, loss_fn=lambda output: output.square().sum()),
            "test_fsdp_gradients",
            "Every gradient is 0.5 times the single-process one: the output or the loss "
            "depends on the batch size",
            "FSDP averages the ranks' gradients",
        )

    def test_a_unit_whose_weight_is_read_outside_its_forward_fails(self) -> None:
        self.assertFailsWith(
            model_case(TiedByAccess, tokens, fsdp_units=["embed", "body"]),
            "test_fsdp_gradients",
            "fully_shard on 2 ranks fails: embed.weight belongs to the FSDP unit embed "
            "(self.fsdp_units), but is used outside that unit's forward, in the model's "
            "forward, at test_fsdp.py:",
            "Leave embed out of the units",
            "got mixed torch.Tensor and DTensor",
        )

    def test_tied_weights_split_across_units_fail(self) -> None:
        self.assertFailsWith(
            model_case(TiedHead, tokens, fsdp_units=["embed", "head"]),
            "test_fsdp_gradients",
            "fully_shard refused the FSDP units of self.fsdp_units (embed, head): a parameter "
            "is shared by modules of two units (tied weights)",
            "is shared with a parameter already managed by another FSDP group",
        )

    def test_a_float32_buffer_under_a_bfloat16_policy_fails(self) -> None:
        self.assertFailsWith(
            model_case(FixedDtypeScale, fsdp_mixed_precision=bfloat16_policy()),
            "test_fsdp_gradients",
            "training the model sharded with fully_shard on 2 ranks (units: encoder, decoder)"
            " failed: rank",
            "expected m1 and m2 to have the same dtype",
        )

    def test_a_model_sampling_in_eval_mode_skips_saying_why(self) -> None:
        for check in ("test_ddp_gradients", "test_fsdp_gradients"):
            with self.subTest(check):
                self.assertSkipsWith(
                    model_case(SamplesInEval),
                    check,
                    f"the model draws random numbers in eval mode, which {check} compares in: "
                    "its floating-point output 0 changes with the seed",
                )

    def test_a_model_fully_shard_refuses_skips_unless_it_is_declared_sharded(self) -> None:
        self.assertSkipsWith(
            model_case(ScalarTemperature),
            "test_fsdp_gradients",
            "fully_shard cannot train the model with the default units (encoder, decoder) on 2 "
            "ranks: rank ",
            "fully_shard doesn't support scalar parameters",
            "set self.fsdp_units to the modules it wraps: the check then fails on this",
        )
        self.assertFailsWith(
            model_case(ScalarTemperature, fsdp_units=["encoder"]),
            "test_fsdp_gradients",
            "training the model sharded with fully_shard on 2 ranks (units: encoder) failed",
            "fully_shard doesn't support scalar parameters",
        )

    def test_units_that_match_nothing_are_a_contract_error(self) -> None:
        self.assertErrorsWith(
            model_case(AutoEncoder, fsdp_units=["backbone.*"]),
            "test_fsdp_gradients",
            "ContractError: self.fsdp_units set in Case.setUp matches no submodule of the "
            "model (its children: encoder, decoder)",
        )


# -- trainers --------------------------------------------------------------------------------
class Writer:
    """Stands in for a SummaryWriter."""

    def add_scalar(self, tag: str, scalar_value: float, global_step: int = 0) -> None:
        pass

    def close(self) -> None:
        pass


class ShardedTrainer:
    """Trains a classifier sharded with fully_shard, done right: every rank seeded alike, the
    optimizer built after fully_shard, DistributedSampler reshuffled every epoch, logging on
    rank 0, a mean loss, checkpoints with torch.distributed.checkpoint (DCP)."""

    def __init__(self, data: TensorDataset, rank: int = 0, world_size: int = 1) -> None:
        self.rank, self.world_size = rank, world_size
        self.model = self.build_model()
        self.shard()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9)
        self.sampler = DistributedSampler(
            data, num_replicas=world_size, rank=rank, shuffle=True, seed=7
        )
        self.train_loader = DataLoader(data, batch_size=8 // world_size, sampler=self.sampler)
        self.summary: Optional[Writer] = Writer() if rank == 0 else None
        self.data = data
        self.epoch = 0

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(FEATURES, 8), nn.Tanh(), nn.Linear(8, CLASSES))

    def shard(self) -> None:
        if dist.is_initialized():
            shard_children(self.model, self.world_size)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(self.model(x), y)

    def train(self, epochs: int) -> None:
        for _ in range(epochs):
            self.sampler.set_epoch(self.epoch)
            for x, y in self.train_loader:
                self.optimizer.zero_grad()
                loss = self.loss(x, y)
                loss.backward()
                self.optimizer.step()
                if self.summary is not None:
                    self.summary.add_scalar("train/loss", loss.item(), self.epoch)
            self.epoch += 1

    def eval(self) -> float:
        return 0.0

    def state(self) -> Dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model, optimizer = get_state_dict(self.model, self.optimizer)
        return {"model": model, "optimizer": optimizer, "epoch": self.epoch}

    def save_checkpoint(self, path: str) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(self.state(), checkpoint_id=path)

    def load_checkpoint(self, path: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = self.state()
        dcp.load(state, checkpoint_id=path)
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
        )
        self.epoch = state["epoch"]


# one bug each
class SeededPerRank(ShardedTrainer):
    def build_model(self) -> nn.Module:
        torch.manual_seed(100 + self.rank)  # e.g. for per-rank augmentation, too early
        return super().build_model()


class InitialisedAfterSharding(ShardedTrainer):
    """Built on the meta device and initialised after fully_shard (on the shards)."""

    def build_model(self) -> nn.Module:
        with torch.device("meta"):
            return super().build_model()

    def shard(self) -> None:
        super().shard()
        self.model.to_empty(device="cpu")
        for module in self.model.modules():
            if isinstance(module, nn.Linear):
                module.reset_parameters()


class OptimizerBeforeSharding(ShardedTrainer):
    def shard(self) -> None:
        self.early = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9)
        super().shard()

    def train(self, epochs: int) -> None:
        self.optimizer = self.early
        super().train(epochs)


class LossSummed(ShardedTrainer):
    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(self.model(x), y, reduction="sum")


class RankZeroSavesItsShards(ShardedTrainer):
    """Rank 0 writes model.state_dict() and optimizer.state_dict(), as one process would: their
    tensors are rank 0's shards."""

    def save_checkpoint(self, path: str) -> None:
        if self.rank == 0:
            state = {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "epoch": self.epoch,
            }
            torch.save(state, path)
        if dist.is_initialized():
            dist.barrier()

    def load_checkpoint(self, path: str) -> None:
        state = torch.load(path, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch = state["epoch"]


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


class OptimizerStateLeftOut(ShardedTrainer):
    def state(self) -> Dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return {"model": get_model_state_dict(self.model), "epoch": self.epoch}

    def load_checkpoint(self, path: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        state = self.state()
        dcp.load(state, checkpoint_id=path)
        set_model_state_dict(self.model, state["model"])
        self.epoch = state["epoch"]


class FilePerRank(ShardedTrainer):
    """Each rank writes and reads a file of its own shards: only as many ranks can load."""

    def save_checkpoint(self, path: str) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        local = {k: _local(v).clone() for k, v in self.model.state_dict().items()}
        torch.save({"model": local, "epoch": self.epoch}, Path(path, f"rank{self.rank}.pt"))

    def load_checkpoint(self, path: str) -> None:
        state = torch.load(Path(path, f"rank{self.rank}.pt"), weights_only=True)
        for name, parameter in self.model.named_parameters():
            with torch.no_grad():
                _local(parameter).copy_(state["model"][name])
        self.epoch = state["epoch"]


class EpochNotSaved(ShardedTrainer):
    def state(self) -> Dict[str, Any]:
        state = super().state()
        del state["epoch"]
        return state

    def load_checkpoint(self, path: str) -> None:
        epoch = self.epoch
        self.epoch = 0
        state = self.state()
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        dcp.load(state, checkpoint_id=path)
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
        )
        self.epoch = epoch  # what a fresh trainer starts with: 0


class DiesOnRankOne(ShardedTrainer):
    def train(self, epochs: int) -> None:
        if self.rank == 1 and self.epoch == 1:
            os._exit(3)  # killed, say, by the out-of-memory killer
        super().train(epochs)


class HangsOnRankOne(ShardedTrainer):
    def train(self, epochs: int) -> None:
        if self.rank == 1 and self.epoch == 1:
            time.sleep(600)
        super().train(epochs)


class DDPTrainer(ShardedTrainer):
    """Data parallel, full checkpoints written by rank 0 with torch.save: resumable on any
    number of ranks."""

    def shard(self) -> None:
        self.net = (
            nn.parallel.DistributedDataParallel(self.model) if self.world_size > 1 else self.model
        )

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(self.net(x), y)

    def save_checkpoint(self, path: str) -> None:
        if self.rank == 0:
            state = {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "epoch": self.epoch,
            }
            torch.save(state, path)
        if dist.is_initialized():
            dist.barrier()

    def load_checkpoint(self, path: str) -> None:
        state = torch.load(path, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch = state["epoch"]


def data() -> TensorDataset:
    generator = torch.Generator().manual_seed(3)
    return TensorDataset(
        torch.randn(SAMPLES, FEATURES, generator=generator),
        torch.randint(0, CLASSES, (SAMPLES,), generator=generator),
    )


def trainer_case(trainer_type: Any, seed: int = SEED, **attributes: Any) -> type:
    def make_trainer(self: Any, rank: int = 0, world_size: int = 1) -> Any:
        return trainer_type(self.data, rank, world_size)

    def set_up(self: Any) -> None:
        self.data = data()
        for name, value in attributes.items():
            setattr(self, name, value)

    return type(
        "Case",
        (DistributedTrainerTests, unittest.TestCase),
        {"setUp": set_up, "make_trainer": make_trainer, "seed": seed},
    )


def outcome_of(case: type, check: str) -> Dict[str, List[str]]:
    """What a check reported, per subtest part ("check" outside any, "skipped" for skips)."""
    found: Dict[str, List[str]] = {}

    class Result(unittest.TestResult):
        def addSubTest(self, test: Any, subtest: Any, err: Any) -> None:
            super().addSubTest(test, subtest, err)
            if err is not None:
                found.setdefault(subtest.params["part"], []).append(str(err[1]))

    result = Result()
    case(check).run(result)
    for _, text in result.failures + result.errors:
        found.setdefault("check", []).append(text)
    for _, reason in result.skipped:
        found.setdefault("skipped", []).append(reason)
    return found


def left_in(folder: str) -> list:
    """What is left in a temporary folder, but the cache folder importing torch._dynamo makes
    (torchinductor_<user>: torch's own, made once and reused, by any process that shards)."""
    return [name for name in os.listdir(folder) if not name.startswith("torchinductor_")]


def shared_memory() -> set:
    """The files in /dev/shm that no running process maps or holds open: what processes that
    ended left behind. (A segment another process of the machine uses while the check runs,
    a semaphore of a test beside this one, is not counted.)"""
    if not os.path.isdir("/dev/shm"):
        return set()
    used = inodes_in_use()
    left = set()
    for entry in os.scandir("/dev/shm"):
        try:
            if entry.inode() not in used:
                left.add(entry.name)
        except OSError:  # removed meanwhile
            continue
    return left


def inodes_in_use() -> set:
    """The inodes of the files in /dev/shm that a running process maps or holds open (a file
    there can be mapped under the name it was made with: glibc's semaphores are)."""
    device = os.stat("/dev/shm").st_dev
    used = set()
    for process in Path("/proc").glob("[0-9]*"):
        try:
            for line in (process / "maps").read_text().splitlines():
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].startswith("/dev/shm/"):
                    major, minor = (int(part, 16) for part in fields[3].split(":"))
                    if os.makedev(major, minor) == device:
                        used.add(int(fields[4]))
            for descriptor in (process / "fd").iterdir():
                found = os.stat(descriptor)
                if found.st_dev == device:
                    used.add(found.st_ino)
        except OSError:  # the process or the descriptor ended, or is not ours to read
            continue
    return used


@unittest.skipUnless(os.path.isdir("/dev/shm") and os.path.isdir("/proc/self/fd"), "Linux")
class SharedMemoryLeftovers(unittest.TestCase):
    """shared_memory(), which the checks for leftovers read, sees a segment nobody holds and
    not one that a running process maps or holds open."""

    def test_an_orphan_is_seen_and_a_segment_in_use_is_not(self) -> None:
        before = shared_memory()
        name = f"dltestkit-test-{os.getpid()}"
        path = os.path.join("/dev/shm", name)
        open(path, "w").close()
        self.addCleanup(os.unlink, path)
        self.assertEqual(shared_memory() - before, {name})
        with open(path):
            self.assertEqual(shared_memory() - before, set())
        lock = multiprocessing.get_context("spawn").Lock()  # a named semaphore, mapped
        self.assertEqual(shared_memory() - before, {name})
        del lock


class PartsTestCase(CheckTestCase):
    def assertLeavesNothing(self, case: type, check: str, *fragments: str) -> None:
        """The check fails with ``fragments``, and leaves no process, file or shared memory."""
        before, segments = child_pids(), shared_memory()
        with tempfile.TemporaryDirectory() as folder:
            with mock.patch.object(tempfile, "tempdir", folder):
                self.assertFailsWith(case, check, *fragments)
            self.assertEqual(left_in(folder), [], "a checkpoint or log folder was left")
        self.assertEqual(child_pids() - before, set(), "a rank outlived the check")
        self.assertEqual(shared_memory() - segments, set(), "a shared-memory segment was left")

    def assertOnlyPartFails(self, case: type, check: str, part: str, *fragments: str) -> None:
        found = outcome_of(case, check)
        failed = {name for name in found if name not in ("skipped", "check")}
        self.assertEqual(failed, {part}, found)
        for fragment in fragments:
            self.assertIn(fragment, "\n".join(found[part]))

    def assertPassesExceptSkips(self, case: type, check: str, *skips: str) -> None:
        found = outcome_of(case, check)
        self.assertEqual(set(found) - {"skipped"}, set(), found)
        self.assertEqual(len(found.get("skipped", [])), len(skips), found)
        for skip in skips:
            self.assertIn(skip, "\n".join(found["skipped"]))


TOLERANCE = (1e-4, 1e-6)


@unittest.skipIf(UNAVAILABLE, UNAVAILABLE or "")
class FSDPTraining(PartsTestCase):
    def test_a_correct_sharded_trainer_passes_every_part(self) -> None:
        case = trainer_case(ShardedTrainer, single_process_tolerance=TOLERANCE)
        self.assertPasses(case, "test_fsdp_training", allowed_skips=())

    @pytest.mark.slow
    def test_a_correct_sharded_trainer_passes_on_other_seeds_and_four_ranks(self) -> None:
        for seed, ranks in ((SEED + 1, 2), (SEED + 2, 2), (SEED, 4)):
            with self.subTest(seed=seed, world_size=ranks):
                case = trainer_case(
                    ShardedTrainer, seed, single_process_tolerance=TOLERANCE, world_size=ranks
                )
                self.assertPasses(case, "test_fsdp_training", allowed_skips=())

    def test_ranks_that_initialise_differently_fail_naming_the_rank(self) -> None:
        self.assertOnlyPartFails(
            trainer_case(SeededPerRank),
            "test_fsdp_training",
            "start",
            "rank 1 starts with another shard of 0.weight than one process initialises (rows "
            "4 to 7, its shard; rank 0's agrees",
            "fully_shard keeps each rank's own shard of what it built (unlike "
            "DistributedDataParallel it broadcasts nothing)",
        )

    def test_a_rank_that_dies_ends_the_check_with_what_happened_leaving_nothing(self) -> None:
        self.assertLeavesNothing(
            trainer_case(DiesOnRankOne),
            "test_fsdp_training",
            "training with make_trainer(rank, world_size) on 2 processes failed: rank 1: the "
            "process died (exit code 3) without a result",
            "rank 0 of 2: Traceback",
        )

    @pytest.mark.slow
    def test_a_rank_that_hangs_ends_the_check_within_its_timeout_leaving_nothing(self) -> None:
        started = time.monotonic()
        self.assertLeavesNothing(
            trainer_case(HangsOnRankOne, distributed_timeout=8),
            "test_fsdp_training",
            # the rank that hung first, with its line; the one that waited for it told apart
            "training with make_trainer(rank, world_size) on 2 processes failed: rank 1: did "
            "not finish within 8 s: it hung at test_fsdp.py:",
            "in train (time.sleep(600))",
            "rank 0 of 2: stopped after 8 s while it waited in the collective",
            "it waited for rank 1, which hung (not hung itself)",
        )
        self.assertLess(time.monotonic() - started, 20)

    @pytest.mark.slow
    def test_an_initialisation_on_the_shards_is_not_judged_on_the_cpu(self) -> None:
        found = outcome_of(trainer_case(InitialisedAfterSharding), "test_fsdp_training")
        self.assertEqual(set(found), {"skipped"}, found)
        self.assertIn(
            "every rank's shard of 0.weight holds the same numbers (rank 1's rows 4 to 7 "
            "repeat rank 0's): the model was initialised after fully_shard",
            "\n".join(found["skipped"]),
        )

    def test_an_optimizer_built_before_fully_shard_fails(self) -> None:
        self.assertOnlyPartFails(
            trainer_case(OptimizerBeforeSharding),
            "test_fsdp_training",
            "optimizer",
            "trainer.optimizer holds none of the model's trainable parameters, but 4 tensors "
            "that the model no longer has: it was built before fully_shard",
            "Build the optimizer after fully_shard",
        )

    @pytest.mark.slow
    def test_a_loss_summed_per_rank_differs_from_one_process(self) -> None:
        self.assertOnlyPartFails(
            trainer_case(LossSummed, single_process_tolerance=TOLERANCE),
            "test_fsdp_training",
            "one process",
            "after 2 epochs on 2 processes the weights differ from those of one process",
            "FSDP's averaged gradients equal one process's only when the loss is a mean",
        )

    def test_the_ddp_check_skips_a_sharded_trainer_and_the_fsdp_check_a_ddp_one(self) -> None:
        self.assertSkipsWith(
            trainer_case(ShardedTrainer),
            "test_ddp_training",
            "the model's parameters are sharded (4 DTensors, e.g. 0.weight): the trainer "
            "shards its model with fully_shard (FSDP), which test_fsdp_training checks",
        )
        self.assertSkipsWith(
            trainer_case(DDPTrainer),
            "test_fsdp_training",
            "holds no sharded parameter (no DTensor): the trainer does not shard it with "
            "fully_shard; test_ddp_training checks data-parallel training",
        )


@unittest.skipIf(UNAVAILABLE, UNAVAILABLE or "")
class ResumeAcrossWorldSizes(PartsTestCase):
    def test_correct_trainers_resume_on_another_number_of_ranks(self) -> None:
        for label, trainer in (("FSDP, DCP", ShardedTrainer), ("DDP, rank 0 saves", DDPTrainer)):
            with self.subTest(label):
                case = trainer_case(trainer, single_process_tolerance=TOLERANCE)
                self.assertPasses(case, "test_resume_across_world_sizes", allowed_skips=())

    @pytest.mark.slow
    def test_a_correct_trainer_resumes_on_other_seeds_and_four_ranks(self) -> None:
        pairs = [(2, 1), (1, 2), (2, 4), (4, 2)]
        for seed in (SEED + 1, SEED + 2):
            with self.subTest(seed=seed):
                case = trainer_case(
                    ShardedTrainer,
                    seed,
                    single_process_tolerance=TOLERANCE,
                    resume_world_sizes=pairs if seed == SEED + 1 else [(2, 1), (1, 2)],
                )
                self.assertPasses(case, "test_resume_across_world_sizes", allowed_skips=())

    def test_rank_zero_saving_its_shards_fails(self) -> None:
        case = trainer_case(RankZeroSavesItsShards, resume_world_sizes=[(2, 1)])
        found = outcome_of(case, "test_resume_across_world_sizes")
        text = "\n".join(found.get("2 -> 1", []))
        self.assertIn(
            "training resumed on 1 rank from the checkpoint that 2 ranks saved failed: rank 0: "
            "dltestkit.distributed.resume.CheckpointLoadError: load_checkpoint(path) on 1 "
            "rank, of a checkpoint saved on 2, raised RuntimeError: Error(s) in loading "
            "state_dict for FSDPSequential",
            text,
        )
        self.assertIn("Cannot run aten.copy_.default on inputs with different meshes", text)
        self.assertIn("Save a checkpoint that any number of ranks can load", text)

    def test_optimizer_state_left_out_fails(self) -> None:
        case = trainer_case(OptimizerStateLeftOut, resume_world_sizes=[(1, 2)])
        found = outcome_of(case, "test_resume_across_world_sizes")
        for part in ("1 -> 2",):
            self.assertIn(
                "optimizer state: the resumed trainer's optimizer has no state, the one that "
                "saved the checkpoint had momentum_buffer for 4 parameters",
                "\n".join(found.get(part, [])),
                found,
            )

    def test_a_checkpoint_only_as_many_ranks_can_load_fails_leaving_nothing_behind(self) -> None:
        before, segments = child_pids(), shared_memory()
        with tempfile.TemporaryDirectory() as folder:
            with mock.patch.object(tempfile, "tempdir", folder):
                case = trainer_case(FilePerRank, resume_world_sizes=[(1, 2)])
                found = outcome_of(case, "test_resume_across_world_sizes")
            self.assertEqual(left_in(folder), [], "a checkpoint or log folder was left")
        self.assertEqual(child_pids() - before, set(), "a rank outlived the check")
        self.assertEqual(shared_memory() - segments, set(), "a shared-memory segment was left")
        text = "\n".join(found.get("1 -> 2", []))
        self.assertIn(
            "training resumed on 2 ranks from the checkpoint that 1 rank saved failed: rank ",
            text,
        )
        self.assertIn("load_checkpoint(path) on 2 ranks, of a checkpoint saved on 1, raised", text)
        self.assertIn("FileNotFoundError", text)
        self.assertIn("The checkpoint cannot be loaded by another number of ranks", text)

    def test_a_data_position_not_restored_fails(self) -> None:
        case = trainer_case(EpochNotSaved, resume_world_sizes=[(2, 1)])
        found = outcome_of(case, "test_resume_across_world_sizes")
        for part in ("2 -> 1",):
            self.assertIn(
                "data position: in the epoch after resuming, rank 0 of 1 loaded other samples "
                "than an uninterrupted run on 1 rank loads in its second epoch",
                "\n".join(found.get(part, [])),
                found,
            )
        self.assertIn("the first epoch's order again: the epoch is not restored", str(found))


if __name__ == "__main__":
    unittest.main()
