"""Run a function on several processes joined by ``torch.distributed`` (gloo, on the CPU).

``run_distributed(function, world_size)`` is what the distributed checks use, and it is public
so that you can write your own distributed tests with it::

    def all_ranks_agree(rank, world_size):
        value = torch.tensor([float(rank)])
        torch.distributed.all_reduce(value)
        return value.item()

    assert run_distributed(all_ranks_agree, world_size=2) == [1.0, 1.0]

Each process initialises a gloo process group over the loopback interface, calls
``function(rank, world_size, *args)``, destroys the group and hands its return value back. The
rendezvous store is opened by the calling process on a port the operating system picks, so
parallel runs (``pytest -n``) cannot collide. A failure on any rank raises
``DistributedError`` with that rank's traceback; a rank that hangs (a collective only some
ranks reach) is stopped after ``timeout`` seconds and reported, never waited for forever; no
process is left behind.
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import pickle
import re
import socket
import time
import traceback
from multiprocessing import connection
from multiprocessing.connection import Connection
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, TypeVar, cast

import torch
import torch.distributed as dist

__all__ = ["DistributedError", "run_distributed"]

T = TypeVar("T")

#: Seconds the other ranks get to report after one rank failed, before they are stopped.
_GRACE = 3.0
#: The line of a traceback that names the exception ("RuntimeError: ...").
_EXCEPTION_LINE = re.compile(
    r"^(?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception|Interrupt|Exit)"
    r"\b.*$",
    re.M,
)


class DistributedError(RuntimeError):
    """One or more ranks of ``run_distributed`` failed, hung or died.

    ``failures`` maps each rank that did not return to what happened to it (a traceback, or
    a description such as "did not finish within 60 s"), in the order the failures arrived:
    the first is usually the cause, the others its consequences (a peer that disappeared).
    """

    def __init__(self, failures: Dict[int, str], world_size: int) -> None:
        self.failures = dict(failures)  # in the order they happened: the cause first
        self.world_size = world_size
        parts = [
            f"rank {rank} of {world_size}: {text.rstrip()}" for rank, text in self.failures.items()
        ]
        super().__init__("\n".join(parts))

    def first_line(self) -> str:
        """The exception that ended the first failing rank (its first line), or what
        happened to that rank."""
        rank, text = next(iter(self.failures.items()))
        found = _EXCEPTION_LINE.findall(text)
        return f"rank {rank}: {found[-1] if found else text.strip().splitlines()[-1]}"


def _loopback_interface() -> Optional[str]:
    names = {name for _, name in socket.if_nameindex()}
    return next((name for name in ("lo", "lo0") if name in names), None)


def _start_method() -> str:
    """fork where it exists and CUDA is not initialised in this process (no pickling, no
    re-import: ranks start in a tenth of a second); spawn elsewhere."""
    cuda_initialized = torch.cuda.is_initialized()  # type: ignore[no-untyped-call]
    if "fork" in multiprocessing.get_all_start_methods() and not cuda_initialized:
        return "fork"
    return "spawn"


def _rank_main(
    function: Callable[..., Any],
    rank: int,
    world_size: int,
    port: int,
    timeout: float,
    args: Sequence[Any],
    sender: Any,
) -> None:
    """The body of each rank's process."""
    try:
        interface = _loopback_interface()
        if interface is not None:
            os.environ["GLOO_SOCKET_IFNAME"] = interface
        torch.set_num_threads(1)  # world_size processes share the cores
        wait = datetime.timedelta(seconds=timeout)
        store = dist.TCPStore(  # type: ignore[attr-defined]
            "127.0.0.1", port, world_size + 1, is_master=False, timeout=wait
        )
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=wait)
        try:
            _send(sender, "result", function(rank, world_size, *args))
        except BaseException:  # SystemExit and KeyboardInterrupt included
            # Reported before the group is destroyed: the other ranks' errors (a peer that
            # disappeared) follow it, and the caller names the cause first.
            _send(sender, "error", traceback.format_exc())
        finally:
            dist.destroy_process_group()
    except BaseException:
        _send(sender, "error", traceback.format_exc())
    finally:
        # Leave without running interpreter teardown: a rank whose work is done may otherwise
        # abort at exit in gloo's threads ("terminate called without an active exception").
        os._exit(0)


def _send(sender: Any, kind: str, value: Any) -> None:
    """Send one message (once: later calls do nothing), stamped with the time."""
    if sender.closed:
        return
    try:
        # Plain pickle, by value: Connection.send would pass tensors as shared-memory file
        # descriptors, which vanish with this process (it leaves with os._exit right after).
        message = pickle.dumps((time.time(), kind, value))
    except Exception:  # a result that cannot be pickled
        message = pickle.dumps((time.time(), "error", traceback.format_exc()))
    sender.send_bytes(message)
    sender.close()


def run_distributed(
    function: Callable[..., T],
    world_size: int = 2,
    *args: Any,
    timeout: float = 60.0,
    start_method: Optional[str] = None,
) -> List[T]:
    """Run ``function(rank, world_size, *args)`` on ``world_size`` processes joined by a gloo
    process group; return the results in rank order.

    Args:
        function: called in each process after ``torch.distributed.init_process_group``;
            its return value must be picklable. Module-level when ``start_method`` is
            ``"spawn"``.
        world_size: the number of processes (ranks).
        timeout: seconds the whole run may take (process start included); a rank still
            running then counts as hung, and is stopped and reported. Collectives time out
            after the same time inside the ranks.
        start_method: ``"fork"`` (the default where available), ``"spawn"`` or
            ``"forkserver"``.

    Raises:
        DistributedError: a rank raised, hung or died; it carries each such rank's traceback.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, not {world_size}")
    context: Any = multiprocessing.get_context(start_method or _start_method())
    store = dist.TCPStore(  # type: ignore[attr-defined]
        "127.0.0.1",
        0,
        world_size + 1,
        is_master=True,
        wait_for_workers=False,
        timeout=datetime.timedelta(seconds=timeout),
    )
    receivers: Dict[Connection, int] = {}
    processes: List[Any] = []
    try:
        for rank in range(world_size):
            receiver, sender = context.Pipe(duplex=False)
            process = context.Process(
                target=_rank_main,
                daemon=True,
                name=f"dltestkit-rank-{rank}",
                args=(function, rank, world_size, store.port, timeout, args, sender),
            )
            process.start()
            sender.close()
            receivers[receiver] = rank
            processes.append(process)
        results, failures = _collect(receivers, processes, timeout)
    finally:
        _stop(processes)
        for receiver in receivers:
            receiver.close()
        del store
    if failures:
        raise DistributedError(failures, world_size)
    return [results[rank] for rank in range(world_size)]


def _collect(
    receivers: Dict[Connection, int], processes: List[Any], timeout: float
) -> Tuple[Dict[int, Any], Dict[int, str]]:
    results: Dict[int, Any] = {}
    failed: List[Tuple[float, int, str]] = []
    pending = dict(receivers)
    deadline = time.monotonic() + timeout
    while pending:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        for ready in connection.wait(list(pending), timeout=remaining):
            receiver = cast(Connection, ready)
            rank = pending.pop(receiver)
            try:
                stamp, kind, value = pickle.loads(receiver.recv_bytes())
            except EOFError:
                processes[rank].join(1)
                stamp, kind, value = (
                    time.time(),
                    "error",
                    (f"the process died (exit code {processes[rank].exitcode}) without a result"),
                )
            if kind == "result":
                results[rank] = value
            else:
                failed.append((stamp, rank, value))
                deadline = min(deadline, time.monotonic() + _GRACE)
    failures = {rank: text for _, rank, text in sorted(failed)}
    for rank in pending.values():
        failures[rank] = (
            f"did not finish within {timeout:g} s: it hung (for example in a "
            "collective that not every rank reaches)"
            if not failures
            else "stopped after another rank failed"
        )
    return results, failures


def _stop(processes: List[Any]) -> None:
    """Make sure no rank outlives the call: those that reported leave at once (os._exit);
    any still running after two seconds hung and are killed."""
    deadline = time.monotonic() + 2.0
    for process in processes:
        process.join(timeout=max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join(timeout=5.0)
