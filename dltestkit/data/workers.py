"""The scan's DataLoader workers: the folder they share, their watch of the process that
started them, and how the scan finds one that died or blocked, and ends them."""

from __future__ import annotations

import contextlib
import multiprocessing
import re
import shutil
import signal
import tempfile
import time
from typing import Any, Callable, Dict, Iterator, Optional

from ..core.messages import forget
from ..core.processes import watch_parent

__all__ = [
    "DEAD_WORKER",
    "POLL",
    "WatchedWorker",
    "kill_workers",
    "next_batch",
    "unwatch",
    "workers_folder",
]


@contextlib.contextmanager
def workers_folder(workers: int) -> Iterator[None]:
    """A folder for multiprocessing's files (its listeners' sockets) that the scan's forked
    workers share, removed when the scan ends, interrupted or not: each would otherwise make
    one of its own (pymp-*), which a worker killed past loader_timeout, or one that dies,
    leaves behind. Nothing changes where this process has such a folder already (the workers
    share it), or without workers."""
    config = getattr(multiprocessing.current_process(), "_config", None)
    if not workers or not isinstance(config, dict) or config.get("tempdir"):
        yield
        return
    folder = tempfile.mkdtemp(prefix="dltestkit-workers-")
    config["tempdir"] = folder
    try:
        yield
    finally:
        if config.get("tempdir") == folder:
            del config["tempdir"]
        shutil.rmtree(folder, ignore_errors=True)


class WatchedWorker:
    """The worker_init_fn of the scan's workers: each watches the process that started it
    and ends when that is gone (a test process killed while a worker is blocked in the
    dataset's code leaves no worker behind), then runs the split's own worker_init_fn."""

    def __init__(self, then: Optional[Callable[[int], None]]) -> None:
        self.then = then

    def __call__(self, worker_id: int) -> None:
        watch_parent()
        if self.then is not None:
            self.then(worker_id)


def unwatch(iterator: Any) -> bool:
    """Take the DataLoader's workers out of torch's watch of its workers (its SIGCHLD
    handler), as the DataLoader's shutdown does; whether that could be done (not with
    another torch)."""
    try:
        if getattr(iterator, "_worker_pids_set", False):
            from torch.utils.data._utils.signal_handling import (  # type: ignore[attr-defined]
                _remove_worker_pids,
            )

            _remove_worker_pids(id(iterator))
            iterator._worker_pids_set = False
    except Exception:
        return False
    return True


def kill_workers(iterator: Any, interrupted: bool = False) -> None:
    """Kill the DataLoader's workers at once (after an interrupt or a timeout: a blocked
    worker is not waited for, as the DataLoader's shutdown would, 5 s each). They are taken
    out of torch's watch first, so that their deaths raise no error in whatever runs when
    they are seen; where that cannot be done (another torch), only an interrupt kills them,
    and the shutdown ends them otherwise."""
    if not unwatch(iterator) and not interrupted:
        return
    for worker in getattr(iterator, "_workers", ()):
        with contextlib.suppress(Exception):
            worker.kill()


#: A worker that exited: "DataLoader worker (pid(s) 123, 456) exited unexpectedly".
DEAD_WORKER = re.compile(r"DataLoader worker \(pids?(?:\(s\))? ([\d, ]+)\)")

#: How long the scan's DataLoader waits for a batch before it looks at its workers (torch's own
#: interval, without a timeout, is 5 s).
POLL = 0.1


def next_batch(iterator: Any, timeout: float) -> Any:
    """The DataLoader's next batch, waited for at most ``timeout`` seconds.

    The scan's workers are out of torch's SIGCHLD watch (``unwatch``), which raises a
    worker's death into whatever the main process runs at that moment: the scan's own code
    (an error of dltestkit's instead of the check's failure), a file half made, or a
    finaliser, where Python drops the error and the scan then waits out ``loader_timeout``
    for a batch that will never come. The DataLoader waits ``POLL`` seconds at a time
    instead, and looks at its workers after each wait, so that a worker that died is
    reported here, within ``POLL`` seconds, with its pid and how it ended."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return next(iterator)
        except (RuntimeError, EOFError, ConnectionError) as exc:
            message = str(exc)
            if message.startswith("DataLoader timed out"):
                if time.monotonic() < deadline:
                    forget(exc)
                    continue
                raise RuntimeError(f"DataLoader timed out after {timeout:g} seconds") from None
            if not DEAD_WORKER.search(message) and (
                isinstance(exc, RuntimeError) or "Original Traceback" in message
            ):
                raise  # the dataset's own error, raised again from its worker
            # a worker died (a pipe to it breaks when it dies while sending a batch; it is
            # seen to have ended a moment later)
            ended = _how_workers_ended(iterator, wait=1.0)
            if not ended:
                raise
            pids = ", ".join(map(str, ended))
            hows = set(ended.values())
            how = (
                hows.pop()
                if len(hows) == 1
                else (" (" + "; ".join(f"pid {pid}{how}" for pid, how in ended.items()) + ")")
            )
            raise RuntimeError(
                f"DataLoader worker (pid(s) {pids}) exited unexpectedly{how}"
            ) from exc


def _how_workers_ended(iterator: Any, wait: float) -> Dict[int, str]:
    """How each of the DataLoader's workers that ended with an error ended, by pid (" with
    exit code 3", ", killed by SIGKILL"), waiting up to ``wait`` seconds for one to end."""
    deadline = time.monotonic() + wait
    while True:
        ended = {}
        for worker in getattr(iterator, "_workers", ()):
            code = getattr(worker, "exitcode", None)
            if not code:
                continue
            try:
                how = f", killed by {signal.Signals(-code).name}" if code < 0 else ""
            except ValueError:
                how = ""
            ended[worker.pid] = how or f" with exit code {code}"
        if ended or time.monotonic() >= deadline:
            return ended
        time.sleep(0.01)
