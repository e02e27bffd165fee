"""What every distributed mixin reads: how many processes, and how long they may take."""

from __future__ import annotations

from typing import Any, ClassVar, List, Optional

from ..core.contract import CheckMixin
from ..core.options import option
from ..core.validators import is_number, is_positive_int
from .launch import _start_method, run_distributed
from .rank_setup import import_for_ranks

__all__ = ["DistributedOptions", "is_tolerance"]


def _is_world_size(value: Any) -> Optional[str]:
    if is_positive_int(value) is None and value >= 2:
        return None
    return f"is {value!r}, not an int of at least 2"


def _is_timeout(value: Any) -> Optional[str]:
    if is_number(value) is None and value > 0:
        return None
    return f"is {value!r}, not a positive number of seconds"


def is_tolerance(value: Any) -> Optional[str]:
    """An (rtol, atol) pair of non-negative numbers."""
    if (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in value)
    ):
        return None
    return f"is {value!r}, not an (rtol, atol) pair of non-negative numbers"


class DistributedOptions(CheckMixin):
    """What every distributed mixin reads: how many processes, and how long they may take.

    An add-on: it combines with a contract (the model's, the trainer's), as
    ``DistributedModelTests`` and ``DistributedTrainerTests`` do."""

    _suite: ClassVar[str] = "DistributedModelTests"

    world_size: int = option(2, _is_world_size, example="4")
    """The number of processes (ranks) a distributed check runs.

    Each rank is a CPU process joined to the others by torch.distributed with the gloo backend."""
    distributed_timeout: float = option(60.0, _is_timeout, example="300")
    """The seconds a distributed check may take before a rank counts as hung.

    A rank still running then is stopped and reported, with the others' tracebacks; a check never
    hangs."""

    def _run_ranks(self, function: Any, *args: Any, world_size: Optional[int] = None) -> List[Any]:
        """``run_distributed(function, world_size, *args)``: on ``world_size`` ranks (by default
        self.world_size), within distributed_timeout."""
        if _start_method() == "fork":
            # imported here, once, rather than in every rank of every run: DDP and fully_shard
            # import torch._dynamo when first built (3 to 6 s on 2 cores)
            import_for_ranks()
        return run_distributed(
            function,
            self.world_size if world_size is None else world_size,
            *args,
            timeout=float(self.distributed_timeout),
        )
