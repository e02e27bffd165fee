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
process is left behind, not even the ranks' own children (DataLoader workers).

How the ranks start and leave, so that no rank fails because of another's timing:

- every rank is started (forked) before the store listens and before any rank connects to it;
- every rank waits, after ``init_process_group``, in a barrier until all are connected, so a
  fast rank cannot leave while another is still joining the group;
- a rank that returned waits until every rank has reported (or one failed) before it destroys
  the group and leaves, at most ``_HOLD`` seconds: a peer still inside a collective that the
  rank never reached then fails at once, instead of at the timeout;
- each rank leads a process group of its own (its DataLoader workers belong to it), which is
  killed once the rank has ended, and a rank whose caller disappears kills itself;
- each rank carries the environment variables torchrun gives its processes (``RANK``,
  ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``, ``TORCHELASTIC_RUN_ID``,
  ...), and none of the caller's Accelerate state: code that finds its rank as under torchrun
  (Accelerate, Lightning, ``transformers.Trainer``) finds the group;
- each rank keeps its temporary files (multiprocessing's ``pymp-*`` folders, those of its
  DataLoader workers, its own) in a folder that the caller removes once the ranks have ended,
  also when they were killed;
- a rank that has not finished when ``timeout`` has passed writes where it is (its Python
  stack, with ``faulthandler``) before it is stopped: the report names the rank that hung in
  its own code, and the ranks that waited inside torch for it (a collective);
- what the ranks of a run imported on first use among a few of torch's modules (``torch._dynamo``,
  which ``DistributedDataParallel`` and ``fully_shard`` import when first built: seconds), the
  caller imports before it forks the ranks of its next run, which then start with it.
"""

from __future__ import annotations

import contextlib
import datetime
import faulthandler
import multiprocessing
import os
import pickle
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from multiprocessing import connection
from multiprocessing.connection import Connection
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, TypeVar, cast

import torch
import torch.distributed as dist

from ..core.processes import watch_parent
from .rank_setup import (
    FIRST_USE_IMPORTS,
    IMPORTED_BY_RANKS,
    forget_accelerate_state,
    import_for_ranks,
    launcher_environment,
    loopback_interface,
    private_temp,
)
from .stacks import Stack, hang_report, read_stack

__all__ = ["DistributedError", "run_distributed"]

T = TypeVar("T")

#: Seconds the other ranks get to report after one rank failed, before they are stopped.
_GRACE = 3.0
#: Seconds a rank that returned waits for the others before it leaves the group.
_HOLD = 2.0
#: Seconds a rank that reported gets to leave before it is killed.
_LEAVE = 2.0
#: Seconds the collectives inside the ranks wait longer than the run may take: a rank waiting
#: for a hung peer is still waiting when the caller looks at where each rank is.
_COLLECTIVE_MARGIN = 30.0
#: Seconds the ranks that did not finish get to write where they are.
_STACK_WAIT = 1.0
#: The line of a traceback that names the exception ("RuntimeError: ...").
_EXCEPTION_LINE = re.compile(
    r"^(?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception|Interrupt|Exit)"
    r"\b.*$",
    re.M,
)
#: What a rank meets in a collective whose peers left or never came.
_PEER_GONE = re.compile(
    r"Connection closed by peer|Connection reset by peer|Broken pipe|Timed out waiting|"
    r"timed out after"
)
_STOPPED = "stopped after another rank failed"


class DistributedError(RuntimeError):
    """One or more ranks of ``run_distributed`` failed, hung or died.

    ``failures`` maps each rank that did not return to what happened to it (a traceback, or
    a description such as "did not finish within 60 s"), in the order the failures arrived:
    the first is usually the cause, the others its consequences (a peer that disappeared).
    ``returned`` lists the ranks that returned a result.
    """

    def __init__(
        self, failures: Dict[int, str], world_size: int, returned: Sequence[int] = ()
    ) -> None:
        self.failures = dict(failures)  # in the order they happened: the cause first
        self.world_size = world_size
        self.returned = sorted(returned)
        parts = [
            f"rank {rank} of {world_size}: {text.rstrip()}" for rank, text in self.failures.items()
        ]
        diagnosis = self.diagnosis()
        super().__init__("\n".join(([diagnosis] if diagnosis else []) + parts))

    def diagnosis(self) -> Optional[str]:
        """What the failures mean when some ranks returned and the others failed in a
        collective because their peers had left (a collective only some ranks call); None
        otherwise."""
        waiting = [rank for rank, text in self.failures.items() if _PEER_GONE.search(text)]
        others = [
            r
            for r, text in self.failures.items()
            if r not in waiting and not text.startswith(_STOPPED)
        ]
        if not self.returned or not waiting or others:
            return None
        return (
            f"{_ranks(self.returned)} returned without reaching the collective that "
            f"{_ranks(waiting)} {'was' if len(waiting) == 1 else 'were'} waiting in, "
            f"which failed when {'it' if len(self.returned) == 1 else 'they'} left: every "
            "rank must call the same "
            "collectives (all_reduce, barrier, broadcast, ...) in the same order; look for "
            "one under `if rank == ...` or behind an early return"
        )

    def first_line(self) -> str:
        """The exception that ended the first failing rank (its first line), or what
        happened to that rank; with the diagnosis first when there is one."""
        rank, text = next(iter(self.failures.items()))
        found = _EXCEPTION_LINE.findall(text)
        line = f"rank {rank}: {found[-1] if found else text.strip().splitlines()[-1]}"
        diagnosis = self.diagnosis()
        return f"{diagnosis} ({line})" if diagnosis else line


def _ranks(ranks: Sequence[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {list(ranks)}"


def _start_method() -> str:
    """fork where it exists and CUDA is not initialised in this process (no pickling, no
    re-import: ranks start in a tenth of a second); spawn elsewhere."""
    cuda_initialized = torch.cuda.is_initialized()  # type: ignore[no-untyped-call]
    if "fork" in multiprocessing.get_all_start_methods() and not cuda_initialized:
        return "fork"
    return "spawn"


def _lead_own_group() -> bool:
    """Make this process the leader of a process group of its own (its children join it);
    whether it is one."""
    if not hasattr(os, "setpgid"):
        return False
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)
    return os.getpgrp() == os.getpid()


#: The file each rank writes its stack to when asked (kept open: faulthandler writes to it).
_STACK_FILE: List[Any] = []


def _stack_on_request(path: str) -> None:
    """Write every thread's Python stack to ``path`` on SIGUSR1 (the caller asks a rank that
    did not finish in time where it is); the main thread is named on the first line."""
    if not hasattr(signal, "SIGUSR1"):
        return
    stream = open(path, "w")  # noqa: SIM115 (open for the life of the process)
    stream.write(f"main 0x{threading.main_thread().ident or 0:016x}\n")
    stream.flush()
    _STACK_FILE.append(stream)
    faulthandler.register(signal.SIGUSR1, file=stream, all_threads=True, chain=False)


def _rank_main(
    function: Callable[..., Any],
    rank: int,
    world_size: int,
    timeout: float,
    args: Sequence[Any],
    sender: Any,
    control: Any,
    folder: str,
) -> None:
    """The body of each rank's process."""
    try:
        watch_parent(_lead_own_group())
        private_temp(os.path.join(folder, f"rank-{rank}"))
        _stack_on_request(os.path.join(folder, f"rank-{rank}.stack"))
        interface = loopback_interface()
        if interface is not None:
            os.environ["GLOO_SOCKET_IFNAME"] = interface
        torch.set_num_threads(1)  # world_size processes share the cores
        # The store's port comes once every rank has been started.
        if not control.poll(timeout):
            raise TimeoutError(f"the ranks were not all started within {timeout:g} s")
        port = int(control.recv())
        os.environ.update(launcher_environment(rank, world_size, port))
        forget_accelerate_state()
        wait = datetime.timedelta(seconds=timeout + _COLLECTIVE_MARGIN)
        store = dist.TCPStore(  # type: ignore[attr-defined]
            "127.0.0.1", port, world_size + 1, is_master=False, timeout=wait
        )
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=wait)
        inherited = {name for name in FIRST_USE_IMPORTS if name in sys.modules}
        try:
            dist.barrier()  # every rank has joined before any may go on (and leave)
            result = function(rank, world_size, *args)
            imported = [n for n in FIRST_USE_IMPORTS if n in sys.modules and n not in inherited]
            _send(sender, "result", (result, imported))
        except BaseException:  # SystemExit and KeyboardInterrupt included
            # Reported before the group is destroyed: the other ranks' errors (a peer that
            # disappeared) follow it, and the caller names the cause first.
            _send(sender, "error", traceback.format_exc())
        finally:
            _wait_for_release(control)
            dist.destroy_process_group()
    except BaseException:
        _send(sender, "error", traceback.format_exc())
    finally:
        # Leave without running interpreter teardown: a rank whose work is done may otherwise
        # abort at exit in gloo's threads ("terminate called without an active exception").
        # The caller kills what is left of this rank's process group (DataLoader workers).
        os._exit(0)


def _wait_for_release(control: Any) -> None:
    """Wait until the caller says every rank reported (or one failed), at most _HOLD s."""
    with contextlib.suppress(OSError, EOFError):
        control.poll(_HOLD)


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


class _Rank:
    """A rank's process as the caller sees it: the process, the end of the pipe its result
    comes through, and the end of the pipe the caller tells it things through."""

    def __init__(self, process: Any, receiver: Connection, control: Connection) -> None:
        self.process = process
        self.receiver = receiver
        self.control = control
        self.ended = False

    def tell(self, message: Any) -> None:
        with contextlib.suppress(OSError, ValueError):  # the rank is gone, or the pipe closed
            self.control.send(message)

    def has_ended(self) -> bool:
        """Whether the process has ended, without reaping it: until it is reaped, its pid
        (the id of its process group) cannot be taken by another process. Not from its
        sentinel, which the rank's own children (DataLoader workers) inherit and keep open."""
        pid = self.process.pid
        if pid is None or self.ended:
            return True
        if not hasattr(os, "waitid"):
            return bool(connection.wait([self.process.sentinel], timeout=0))
        try:
            return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:  # reaped already
            return True

    def wait(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for the process to end; whether it has."""
        deadline = time.monotonic() + seconds
        while not self.has_ended():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    def end(self, patience: float) -> None:
        """Give the rank ``patience`` seconds to leave, then kill it; kill what is left of its
        process group (its DataLoader workers, say); reap it. Once; later calls do nothing."""
        if self.ended or self.process.pid is None:  # done already, or never started
            return
        pid = self.process.pid
        if not self.wait(patience):
            _kill_group(pid)
            with contextlib.suppress(OSError):  # it ended meanwhile
                os.kill(pid, signal.SIGKILL)
            self.wait(5.0)
        _kill_group(pid)  # not reaped yet: the group id is still the rank's
        self.ended = True
        self.process.join(timeout=5.0)


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
            running then counts as hung, and is stopped and reported with where it was
            (the ranks waiting for it inside a collective are told apart from it).
        start_method: ``"fork"`` (the default where available), ``"spawn"`` or
            ``"forkserver"``.

    Raises:
        DistributedError: a rank raised, hung or died; it carries each such rank's traceback.
        TypeError, ValueError: ``world_size`` is no int of at least 1, or ``timeout`` no
            positive number of seconds.
    """
    _check_arguments(world_size, timeout, start_method)
    method = start_method or _start_method()
    if method == "fork":
        import_for_ranks(sorted(IMPORTED_BY_RANKS))
    context: Any = multiprocessing.get_context(method)
    ranks: List[_Rank] = []
    store: Any = None
    folder = tempfile.mkdtemp(prefix="dltestkit-ranks-")
    threads = [t.name for t in threading.enumerate() if t is not threading.current_thread()]
    try:
        for rank in range(world_size):
            receiver, sender = context.Pipe(duplex=False)
            listener, control = context.Pipe(duplex=False)
            process = context.Process(
                target=_rank_main,
                name=f"dltestkit-rank-{rank}",
                args=(function, rank, world_size, timeout, args, sender, listener, folder),
            )
            ranks.append(_Rank(process, receiver, control))
            try:
                process.start()
            finally:
                sender.close()
                listener.close()
            _set_group(process.pid)
        # Only now, with every rank started, does the store listen: no rank is forked while
        # another talks to it, and none inherits its socket.
        store = dist.TCPStore(  # type: ignore[attr-defined]
            "127.0.0.1",
            0,
            world_size + 1,
            is_master=True,
            wait_for_workers=False,
            timeout=datetime.timedelta(seconds=timeout),
        )
        for each in ranks:
            each.tell(store.port)
        forked_beside = threads if method == "fork" else []
        results, failures = _collect(ranks, timeout, folder, forked_beside)
    except BaseException:  # KeyboardInterrupt included: every rank is killed at once
        _stop(ranks, patience=0.0)
        raise
    finally:
        for each in ranks:
            each.receiver.close()
            each.control.close()
        del store
        shutil.rmtree(folder, ignore_errors=True)  # the ranks have ended (or were never started)
    if failures:
        raise DistributedError(failures, world_size, returned=sorted(results))
    return [results[rank] for rank in range(world_size)]


def _check_arguments(world_size: Any, timeout: Any, start_method: Any) -> None:
    if isinstance(world_size, bool) or not isinstance(world_size, int):
        raise TypeError(
            f"world_size must be an int (the number of processes), not {world_size!r} "
            f"(a {type(world_size).__name__})"
        )
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, not {world_size}")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(
            f"timeout must be a positive number of seconds (the time the whole run may take), "
            f"not {timeout!r}"
        )
    methods = multiprocessing.get_all_start_methods()
    if start_method is not None and start_method not in methods:
        raise ValueError(
            f"start_method must be None or one of this platform's start methods {methods}, "
            f"not {start_method!r}"
        )


def _set_group(pid: Optional[int]) -> None:
    """Make the rank ``pid`` the leader of its own process group (it does so itself too; who
    comes first does not matter)."""
    if pid is None or not hasattr(os, "setpgid"):
        return
    with contextlib.suppress(OSError):  # it did already (or it exec'd: spawn)
        os.setpgid(pid, pid)


def _collect(
    ranks: List[_Rank], timeout: float, folder: str, forked_beside: Sequence[str]
) -> Tuple[Dict[int, Any], Dict[int, str]]:
    """The ranks' results and failures; the ranks are stopped before it returns. Ranks that did
    not finish within ``timeout`` are asked where they are first (their stacks, in
    ``folder``); ``forked_beside`` names the threads the caller ran when it forked them."""
    results: Dict[int, Any] = {}
    failed: List[Tuple[float, int, str]] = []
    pending = {each.receiver: rank for rank, each in enumerate(ranks)}
    deadline = time.monotonic() + timeout
    while pending:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        # Not waiting for ever on the pipes: a rank that died without a result may have
        # children (DataLoader workers) that keep its end of the pipe open.
        ready = connection.wait(list(pending), timeout=min(remaining, 0.5))
        ended = [r for r, rank in pending.items() if r not in ready and ranks[rank].has_ended()]
        for receiver in [cast(Connection, r) for r in ready] + ended:
            rank = pending.pop(receiver)
            seen = time.time()
            if receiver.poll():
                try:
                    message = pickle.loads(receiver.recv_bytes())
                except EOFError:
                    message = None
            else:  # it ended after the wait, with nothing sent
                message = None
            if message is None:
                ranks[rank].end(1.0)
                message = (
                    seen,
                    "error",
                    f"the process died (exit code {ranks[rank].process.exitcode}) without a result",
                )
            stamp, kind, value = message
            if kind == "result":
                results[rank], imported = value
                IMPORTED_BY_RANKS.update(imported)
            else:
                failed.append((stamp, rank, value))
                if len(failed) == 1:  # the ranks that wait for the others may leave now
                    for each in ranks:
                        each.tell("release")
                deadline = min(deadline, time.monotonic() + _GRACE)
    for each in ranks:
        each.tell("release")
    # The cause first: a rank whose peer disappeared failed because of another rank.
    failed.sort(key=lambda failure: (bool(_PEER_GONE.search(failure[2])), failure[0]))
    failures = {rank: text for _, rank, text in failed}
    if pending and not failures:  # nothing failed: they hung; where?
        stacks = _stacks(ranks, sorted(pending.values()), folder)
        failures.update(hang_report(stacks, timeout, forked_beside))
    for rank in pending.values():
        failures.setdefault(rank, _STOPPED)
    hung = set(pending.values())
    _stop([ranks[rank] for rank in hung], 0.0)  # killed at once
    _stop([each for rank, each in enumerate(ranks) if rank not in hung], _LEAVE)
    return results, failures


def _stacks(ranks: List[_Rank], pending: List[int], folder: str) -> Dict[int, Optional[Stack]]:
    """Where each of the ranks ``pending`` is: its main thread's Python stack, which it writes
    on SIGUSR1; None for a rank that did not write it within _STACK_WAIT s."""
    if not hasattr(signal, "SIGUSR1"):
        return dict.fromkeys(pending)
    paths = {rank: os.path.join(folder, f"rank-{rank}.stack") for rank in pending}
    sizes = {rank: _size(path) for rank, path in paths.items()}
    for rank in pending:
        pid = ranks[rank].process.pid
        if pid is not None and sizes[rank] > 0:  # it registered the handler
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + _STACK_WAIT
    found: Dict[int, Optional[Stack]] = dict.fromkeys(pending)
    while time.monotonic() < deadline and any(found[rank] is None for rank in pending):
        time.sleep(0.05)
        for rank, path in paths.items():
            size = _size(path)
            if found[rank] is None and size > sizes[rank] and size == _grown.get(path):
                found[rank] = read_stack(path)  # written, and no longer growing
            _grown[path] = size
    return found


#: The size each stack file had at the last look (a dump is read once it stops growing).
_grown: Dict[str, int] = {}


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _stop(ranks: List[_Rank], patience: float) -> None:
    """Make sure none of ``ranks`` outlives the call, nor any process it started: together
    they get ``patience`` seconds to leave, then those still running are killed."""
    deadline = time.monotonic() + patience
    for each in ranks:
        each.end(max(0.0, deadline - time.monotonic()))


def _kill_group(pid: int) -> None:
    """Kill the process group ``pid`` leads, if it leads one."""
    if not hasattr(os, "killpg"):
        return
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
    except OSError:  # no such process or group
        pass
