"""What a rank of ``run_distributed`` starts with: torchrun's environment variables, none of the
caller's Accelerate state, gloo on the loopback interface, a temporary folder of its own, and
the modules of torch that the caller imports for it before forking it."""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing
import os
import socket
import sys
import tempfile
from typing import Dict, Optional, Sequence, Set

__all__ = [
    "FIRST_USE_IMPORTS",
    "IMPORTED_BY_RANKS",
    "forget_accelerate_state",
    "import_for_ranks",
    "launcher_environment",
    "loopback_interface",
    "private_temp",
]

#: What DistributedDataParallel, fully_shard, DTensor and torch.distributed.checkpoint import
#: on first use (torch._dynamo: 3 to 6 s on 2 cores): a rank forked from a caller that has
#: imported them starts with them.
FIRST_USE_IMPORTS = (
    "torch._dynamo",
    "torch.distributed.checkpoint",
    "torch.distributed.checkpoint.state_dict",
    "torch.distributed.fsdp",
    "torch.distributed.tensor",
)
#: Those of FIRST_USE_IMPORTS that the ranks of an earlier run imported themselves.
IMPORTED_BY_RANKS: Set[str] = set()


def import_for_ranks(names: Sequence[str] = FIRST_USE_IMPORTS) -> None:
    """Import ``names`` in this process, before it forks ranks that would import them each;
    those this torch lacks, or cannot import here, are left out (a rank that needs one meets
    the error itself)."""
    for name in names:
        with contextlib.suppress(Exception):
            importlib.import_module(name)


def loopback_interface() -> Optional[str]:
    names = {name for _, name in socket.if_nameindex()}
    return next((name for name in ("lo", "lo0") if name in names), None)


def private_temp(folder: str) -> None:
    """Keep this process's temporary files, and its children's, in ``folder``:
    multiprocessing's ``pymp-*`` folders (made by a DataLoader worker that sends tensors)
    included, which a killed process cannot remove."""
    os.makedirs(folder, exist_ok=True)
    tempfile.tempdir = folder
    os.environ["TMPDIR"] = folder  # for children that start Python anew (spawn)
    config = getattr(multiprocessing.current_process(), "_config", None)
    if isinstance(config, dict):  # the caller's pymp folder, inherited: make one here
        config.pop("tempdir", None)


def launcher_environment(rank: int, world_size: int, port: int) -> Dict[str, str]:
    """The environment variables torchrun gives each process it starts (one node), with the
    store's address: code that learns its rank from them (Accelerate's ``Accelerator``,
    Lightning's ``Trainer``, ``transformers.Trainer``, ``init_process_group("env://")``)
    finds the group as under torchrun. ``OMP_NUM_THREADS`` is set to 1 where it is unset, as
    torchrun does for several processes on one machine."""
    environment = {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "GROUP_RANK": "0",
        "ROLE_RANK": str(rank),
        "ROLE_NAME": "default",
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
        "GROUP_WORLD_SIZE": "1",
        "ROLE_WORLD_SIZE": str(world_size),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "TORCHELASTIC_RESTART_COUNT": "0",
        "TORCHELASTIC_MAX_RESTARTS": "0",
        "TORCHELASTIC_RUN_ID": "dltestkit",
        "TORCHELASTIC_USE_AGENT_STORE": "False",
    }
    if "OMP_NUM_THREADS" not in os.environ:
        environment["OMP_NUM_THREADS"] = "1"
    return environment


def forget_accelerate_state() -> None:
    """Clear what Accelerate keeps once per process (its states share one dict each, filled
    by the first ``Accelerator``): a rank forked from a caller that built an Accelerator
    (a ``setUp`` that makes a trainer) would otherwise inherit the caller's one-process
    state, and its own Accelerator would not see the group, as a process started by
    torchrun does."""
    state = sys.modules.get("accelerate.state")
    for name in ("PartialState", "AcceleratorState", "GradientState"):
        shared = getattr(getattr(state, name, None), "_shared_state", None)
        if isinstance(shared, dict):
            shared.clear()
