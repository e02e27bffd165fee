"""The distributed wing: add-on mixins that run the real ``torch.distributed`` (gloo) on CPU
processes.

- ``launch.py``: ``run_distributed``, the processes, their faults and their cleanup
- ``options.py``: what every distributed mixin reads (``world_size``, ``distributed_timeout``)
- ``models.py``: test_ddp_gradients, and what the model checks share (``syncbn.py``:
  SyncBatchNorm on CPU processes)
- ``sharded_models.py``: test_fsdp_gradients (``sharding.py``: FSDP units, gathering shards)
- ``trainers.py``: test_ddp_training, and what the trainer checks share
- ``sharded_trainers.py``: test_fsdp_training
- ``resume.py``: test_resume_across_world_sizes
"""

from __future__ import annotations

from typing import ClassVar

from .launch import DistributedError, run_distributed
from .models import DDPGradients
from .resume import ResumeAcrossWorldSizes
from .sharded_models import ShardedGradients
from .sharded_trainers import ShardedTraining
from .trainers import DDPTraining

__all__ = [
    "DistributedError",
    "DistributedModelTests",
    "DistributedTrainerTests",
    "run_distributed",
]


class DistributedModelTests(DDPGradients, ShardedGradients):
    """Checks that a model trains the same with DistributedDataParallel, and sharded with
    fully_shard (FSDP2), on several processes as in one process on the whole batch.

    It reads the ``ModelTests`` contract (``model``, ``inputs``, ...) and combines with
    ``ModelTests`` or ``SequenceModelTests``: ``class TestX(DistributedModelTests, ModelTests,
    unittest.TestCase)``. Used alone, it runs its own checks only (e.g. in a separate CI job).
    """

    _suite: ClassVar[str] = "DistributedModelTests"


class DistributedTrainerTests(DDPTraining, ShardedTraining, ResumeAcrossWorldSizes):
    """Checks a trainer's distributed training on ``world_size`` processes: data parallel
    (DDP), fully sharded (FSDP2), and resumed from a checkpoint on another number of ranks.

    ``make_trainer(rank=rank, world_size=world_size)`` is called in each process after it
    joined the gloo process group; the trainer it returns shards its training data (e.g.
    with ``DistributedSampler``), synchronises gradients (with ``DistributedDataParallel``,
    or shards its model with ``fully_shard``) and logs from rank 0 only. It combines with
    ``TrainerTests``, which calls the same ``make_trainer`` with no arguments.
    """

    _suite: ClassVar[str] = "DistributedTrainerTests"
