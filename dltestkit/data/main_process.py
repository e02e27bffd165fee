"""Loads in the main process, each bounded by the loader timeout, in a thread of their own."""

from __future__ import annotations

import multiprocessing
import queue
import threading
from typing import TYPE_CHECKING, Any, Callable, Optional, TypeVar

from ..core.messages import exception_text, forget

if TYPE_CHECKING:
    from .pickling import Pickled

__all__ = ["MainProcess", "TimedOut", "start_method"]

T = TypeVar("T")


def start_method(context: Optional[str]) -> str:
    """The start method of the scan's worker processes."""
    return context or multiprocessing.get_start_method()


# -- loads in the main process, bounded by the loader timeout ----------------------------------
class TimedOut(Exception):
    """A load in the main process did not finish within the loader timeout."""


class _Job:
    def __init__(self, function: Callable[[], Any]) -> None:
        self.function = function
        self.done = threading.Event()
        self.value: Any = None
        self.error: Optional[BaseException] = None

    def run(self) -> None:
        try:
            self.value = self.function()
        except BaseException as exc:  # handed to the caller, who re-raises it
            self.error = exc
        finally:
            self.function = _nothing
            self.done.set()


def _nothing() -> None:
    return None


def _serve(jobs: "queue.SimpleQueue[Optional[_Job]]") -> None:
    while True:
        job = jobs.get()
        if job is None:
            return
        job.run()
        del job


class MainProcess:
    """Where the checks load a few samples in the main process, for one set of loads.

    ``source`` is a copy of the split (``pickled``: loaded by the first job) or the split
    itself. One daemon thread runs every load, so that a handle the dataset opens lazily
    is used by the thread that opened it; the caller waits at most ``timeout`` seconds for
    each. After a load that timed out the thread is left blocked (a daemon thread, which
    ends with the process) and every later load fails at once. ``close`` ends the thread
    (before the scan forks its workers: forking a process that runs threads is unsafe).
    """

    def __init__(
        self, timeout: float, pickled: Optional[Pickled] = None, source: Any = None
    ) -> None:
        self.timeout = timeout
        self.source = source
        self.stuck = False
        self.copy_error: Optional[str] = None
        self._jobs: "queue.SimpleQueue[Optional[_Job]]" = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=_serve, args=(self._jobs,), name="dltestkit main-process loads", daemon=True
        )
        self._thread.start()
        if pickled is not None:
            try:
                self.source = self.call(pickled.load)
            except TimedOut:
                pass
            except Exception as exc:
                self.copy_error = exception_text(exc)
                forget(exc)

    def call(self, function: Callable[[], T]) -> T:
        """``function()`` run by the thread; raises what it raised, or TimedOut."""
        if self.stuck:
            raise TimedOut()
        job = _Job(function)
        self._jobs.put(job)
        if not job.done.wait(self.timeout):
            self.stuck = True
            raise TimedOut()
        if job.error is not None:
            error, job.error = job.error, None
            raise error
        value: T = job.value
        job.value = None
        return value

    def close(self) -> None:
        """End the thread (a blocked one when its load returns, if ever)."""
        self.source = None
        self._jobs.put(None)
        if not self.stuck:
            self._thread.join(self.timeout)
