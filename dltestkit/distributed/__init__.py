"""The distributed wing: add-on mixins that run the real ``torch.distributed`` (gloo) on CPU
processes.

- ``launch.py``: ``run_distributed``, the processes, their faults and their cleanup
- ``options.py``: what every distributed mixin reads (``world_size``, ``distributed_timeout``)
- ``models.py``: ``DistributedModelTests``, test_ddp_gradients (``syncbn.py``: SyncBatchNorm on
  CPU processes)
- ``trainers.py``: ``DistributedTrainerTests``, test_ddp_training
"""

from __future__ import annotations

from .launch import DistributedError, run_distributed
from .models import DistributedModelTests
from .trainers import DistributedTrainerTests

__all__ = [
    "DistributedError",
    "DistributedModelTests",
    "DistributedTrainerTests",
    "run_distributed",
]
