"""What happens to the processes a check starts, and to the check itself, when the test process
is interrupted (Ctrl-C), terminated (SIGTERM) or killed.

- The processes a check starts (DataLoader workers of the scan, the ranks of a distributed
  check) watch the process that started them and end when it is gone (``watch_parent``),
  even when they are blocked in user code and even when it was killed outright.
- While a check runs in the main thread, SIGTERM is turned into ``Terminated``, an interrupt
  like Ctrl-C (``terminating_as_interrupt``): the code of the check unwinds, its cleanups run
  (temporary folders, workers, ranks), then the process ends by SIGTERM as it would have.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from types import FrameType
from typing import Any, Iterator, Optional

__all__ = ["Terminated", "end_as_terminated", "terminating_as_interrupt", "watch_parent"]


def watch_parent(own_group: bool = False, interval: float = 0.5) -> None:
    """End this process (and, if ``own_group``, the process group it leads) once the process
    that started it is gone: a daemon thread polls the parent's id."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        if own_group:
            with contextlib.suppress(OSError):
                os.killpg(os.getpgrp(), signal.SIGKILL)
        os._exit(1)

    threading.Thread(target=watch, name="dltestkit-watch-parent", daemon=True).start()


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived while a check ran. An interrupt, as Ctrl-C's KeyboardInterrupt is: the
    test runners (unittest, pytest) let it through instead of recording it as an error."""


def _raise_terminated(signum: int, frame: Optional[FrameType]) -> None:
    raise Terminated(f"signal {signum} (SIGTERM) arrived while a dltestkit check ran")


def _default_in_child() -> None:
    """In a process forked while a check ran (a DataLoader worker, a rank): SIGTERM ends it,
    as it would have without the check (``Process.terminate`` relies on it)."""
    if signal.getsignal(signal.SIGTERM) is _raise_terminated:
        with contextlib.suppress(ValueError, OSError):
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_default_in_child)


@contextlib.contextmanager
def terminating_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into ``Terminated`` while the block runs, when SIGTERM would otherwise
    end the process at once (its default action) and this is the main thread; leave any
    other handler alone."""
    if (
        not hasattr(signal, "SIGTERM")
        or threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def end_as_terminated(exc: BaseException) -> Any:
    """After the cleanups of a check that ``Terminated`` interrupted: end the process by
    SIGTERM, as it would have ended without the check. For any other exception, nothing."""
    if isinstance(exc, Terminated):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the signal is delivered meanwhile; should it not be, go on unwinding
    return None
