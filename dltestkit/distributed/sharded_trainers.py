"""test_fsdp_training: a trainer that shards its model with ``fully_shard`` (FSDP2) trains on
several CPU processes as one process does.

As test_ddp_training, the check builds a trainer per rank with ``make_trainer(rank=rank,
world_size=world_size)`` and trains each two epochs; the sharded parameters are gathered whole
to be compared. Besides the data and the logging, what FSDP makes differ from DDP: nothing
broadcasts rank 0's weights, so the start is compared with one process's (one more rank of its
own, ``make_trainer(rank=0, world_size=1)``), shard by shard; and ``fully_shard`` replaces the
parameters, so an optimizer built before it steps tensors the model no longer uses.
"""

from __future__ import annotations

from typing import Any, ClassVar, Dict, Sequence

import torch

from ..core.contract import check
from ..core.messages import listed
from ..trainers.state import difference
from .sharding import fsdp_unavailable
from .trainers import DistributedTraining, _train_rank

__all__ = ["ShardedTraining"]


def _chunk(tensor: torch.Tensor, ranks: int, dim: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s part of ``tensor`` sharded along ``dim`` as fully_shard shards it
    (torch.chunk; the ranks past the last chunk get an empty part)."""
    chunks = torch.chunk(tensor, ranks, dim)
    if rank < len(chunks):
        return chunks[rank]
    shape = list(tensor.shape)
    shape[dim] = 0
    return tensor.new_empty(shape)


def _rows(tensor: torch.Tensor, ranks: int, dim: int, rank: int) -> str:
    """ "rows 4 to 7" of rank's part along dim (or "entries ... along dimension 1")."""
    size = tensor.shape[dim]
    per = -(-size // ranks)
    first, last = min(size, rank * per), min(size, (rank + 1) * per) - 1
    what = "rows" if dim == 0 else f"entries along dimension {dim},"
    return f"{what} {first} to {last}"


class ShardedTraining(DistributedTraining):
    """test_fsdp_training: a trainer's fully sharded data parallel training (FSDP2) on
    ``world_size`` processes."""

    _suite: ClassVar[str] = "DistributedTrainerTests"

    @check(
        reads=(
            "make_trainer",
            "model_attribute",
            "optimizer_attribute",
            "writer_attribute",
            "train_loader_attribute",
            "single_process_tolerance",
            "world_size",
            "distributed_timeout",
        )
    )
    def test_fsdp_training(self) -> None:
        """Check that a trainer sharding its model with fully_shard starts as one process, trains
        its parameters, shares the data and logs once.

        Catches the bugs of fully sharded training: ranks that initialise differently (fully_shard
        keeps each rank's own shard, it broadcasts nothing), an optimizer built before fully_shard
        (it steps parameters the model no longer uses), every rank training on all the data, the
        same data order every epoch, scalars logged by every rank; with two epochs in world_size
        real gloo processes and one more process on its own.
        """
        unavailable = fsdp_unavailable()
        if unavailable:
            self.skipTest(f"test_fsdp_training {unavailable}")
        self._get_or_skip("make_trainer")
        self._check_factory_arguments(rank=0, world_size=self.world_size)
        ranks = self._launch(_train_rank, self, True)
        if not ranks[0]["sharded"]:
            self.skipTest(
                "the model of make_trainer(rank, world_size) holds no sharded parameter (no "
                "DTensor): the trainer does not shard it with fully_shard; test_ddp_training "
                "checks data-parallel training"
            )
        [single] = self._launch(_train_rank, self, None, world_size=1)
        with self.subTest(part="start"):
            self._start_like_one_process(ranks, single)
        with self.subTest(part="optimizer"):
            self._optimizer_holds_parameters(ranks[0])
        with self.subTest(part="data"):
            self._data_part(ranks)
        with self.subTest(part="logging"):
            self._check_logging(ranks)
        with self.subTest(part="one process"):
            if self._failed_subtests:
                self.skipTest(
                    "the ranks' training already went wrong (see the subtests "
                    "above); it is not compared with one process"
                )
            self._check_single_process(ranks[0]["end"], single["end"], "FSDP")

    def _start_like_one_process(
        self, ranks: Sequence[Dict[str, Any]], single: Dict[str, Any]
    ) -> None:
        """The gathered weights at the first training forward are one process's; where they
        are not, which rank's shard differs tells why."""
        expected = single["start"]["parameters"]
        found = difference(expected, ranks[0]["start"]["parameters"])
        if found is None:
            return
        name = found.path[0]
        whole = expected[name]
        entry = ranks[0]["start_shards"].get(name)
        if entry is None or not isinstance(whole, torch.Tensor):
            self.skipTest(
                f"the sharded model starts with another {name} than make_trainer(rank=0, "
                f"world_size=1) ({found.detail}), but {name} is not sharded along one "
                "dimension, so which rank's part differs cannot be told; the start is not "
                "compared"
            )
        dim = entry[0]
        world = self.world_size
        shards = [result["start_shards"][name][1] for result in ranks]
        agrees = [
            shard.shape == _chunk(whole, world, dim, rank).shape
            and torch.equal(shard, _chunk(whole, world, dim, rank))
            for rank, shard in enumerate(shards)
        ]
        if not agrees[0]:
            self.skipTest(
                f"make_trainer(rank=0, world_size=1) starts from other weights than the sharded "
                f"model already in rank 0's shard of {name} ({found.detail}): the trainer "
                "initialises differently with one process, so whether the ranks initialised "
                "alike cannot be told; the start is not compared"
            )
        differing = [rank for rank, same in enumerate(agrees) if not same]
        copies = [
            rank
            for rank in differing
            if shards[rank].shape == shards[0].shape and torch.equal(shards[rank], shards[0])
        ]
        if differing and copies == differing:
            self.skipTest(
                f"every rank's shard of {name} holds the same numbers (rank "
                f"{differing[0]}'s {_rows(whole, world, dim, differing[0])} repeat rank 0's): "
                "the model was initialised after fully_shard, on the sharded parameters "
                "(reset_parameters() after to_empty()), and DTensor's random numbers are not "
                "offset per rank on the CPU (they are on GPUs); the start is not judged here"
            )
        rank = next(r for r in differing if r not in copies)
        self.fail(
            f"rank {rank} starts with another shard of {name} than one process initialises "
            f"({_rows(whole, world, dim, rank)}, its shard; rank 0's agrees; the whole "
            f"{name}: {found.detail}): the ranks built their models from different random "
            "numbers, and fully_shard keeps each rank's own shard of what it built (unlike "
            "DistributedDataParallel it broadcasts nothing), so the sharded model is a mix of "
            "the ranks' initialisations. Seed every rank the same before building the model, "
            "or load rank 0's weights into every rank (torch.distributed.checkpoint.state_dict."
            "set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, "
            "broadcast_from_rank0=True)))."
        )

    def _optimizer_holds_parameters(self, rank: Dict[str, Any]) -> None:
        """The optimizer holds the model's trainable parameters, not tensors it replaced."""
        missing, stale = rank["missing"], rank["stale"]
        if missing is None:
            self.skipTest(
                f"self.optimizer_attribute is {self.optimizer_attribute!r}: no optimizer to "
                "compare with the model's parameters"
            )
        if not (missing and stale):
            return
        total = len(missing) + rank["held"]
        what = (
            "none of the model's trainable parameters"
            if not rank["held"]
            else f"{len(missing)} of the model's {total} trainable parameters not "
            f"({listed(missing, 4)})"
        )
        self.fail(
            f"trainer.{self.optimizer_attribute} holds {what}, but {stale} "
            f"{'tensor' if stale == 1 else 'tensors'} that the model no longer has: it was "
            "built before fully_shard, which replaces every parameter of the modules it wraps "
            "by a new, sharded one (a DTensor), so the optimizer steps the old tensors and "
            f"{'the model never trains' if not rank['held'] else 'those parameters never train'}"
            ". Build the optimizer after fully_shard, from model.parameters()."
        )
