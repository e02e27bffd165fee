"""Where the ranks that did not finish in time were: their Python stacks (written by
``faulthandler`` when the caller asks), read and told apart: a rank that hung in its own code is
the cause, a rank waiting inside torch (a collective, DDP's all-reduce in backward) waited for
it."""

from __future__ import annotations

import linecache
import os
import re
import sysconfig
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..core.watch import TRACEBACK_FRAME

__all__ = ["Frame", "Stack", "hang_report", "raising_user_frame", "read_stack"]

_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))
_OWN_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_STDLIB_DIR = os.path.abspath(sysconfig.get_paths()["stdlib"])
_THREAD = re.compile(r"^(?:Current thread|Thread) (0x[0-9a-f]+)")
_FRAME = re.compile(r'^\s+File "(?P<path>.*)", line (?P<line>\d+) in (?P<function>.*)$')
#: What a thread waiting for a lock runs (threading's, logging's), or a line that takes one.
_LOCK_FUNCTIONS = {"acquire", "wait", "__enter__", "_acquireLock", "_wait_for_tstate_lock"}
_LOCK_LINE = re.compile(r"lock|acquire|Condition|Semaphore", re.IGNORECASE)


@dataclass(frozen=True)
class Frame:
    path: str
    line: int
    function: str

    def where(self) -> str:
        path = os.path.abspath(self.path)
        shown = (
            os.path.relpath(path, os.path.dirname(_TORCH_DIR))
            if path.startswith(_TORCH_DIR)
            else os.path.basename(path)
        )
        return f"{shown}:{self.line} in {self.function}"

    def source(self) -> str:
        return linecache.getline(self.path, self.line).strip()

    def described(self) -> str:
        source = self.source()
        return f"{self.where()} ({source})" if source else self.where()

    @property
    def in_torch(self) -> bool:
        return os.path.abspath(self.path).startswith(_TORCH_DIR)

    @property
    def in_user_code(self) -> bool:
        path = os.path.abspath(self.path)
        return not path.startswith((_TORCH_DIR, _OWN_DIR, _STDLIB_DIR)) and not path.startswith("<")


@dataclass(frozen=True)
class Stack:
    """The frames of a rank's main thread, the innermost first."""

    frames: Tuple[Frame, ...]

    @property
    def innermost(self) -> Optional[Frame]:
        return self.frames[0] if self.frames else None

    @property
    def user_frame(self) -> Optional[Frame]:
        """The innermost frame of the user's code (the function run on the ranks, the
        model)."""
        return next((frame for frame in self.frames if frame.in_user_code), None)

    @property
    def in_torch(self) -> bool:
        return self.innermost is not None and self.innermost.in_torch

    def waits_for_a_lock(self) -> bool:
        frame = self.innermost
        return frame is not None and (
            frame.function in _LOCK_FUNCTIONS or bool(_LOCK_LINE.search(frame.source()))
        )


def raising_user_frame(traceback_text: str) -> Optional[Frame]:
    """The innermost frame of the user's code in a traceback's text (the line of theirs
    that led to the exception), or None."""
    frames = [
        Frame(found["path"], int(found["line"]), found["function"])
        for found in TRACEBACK_FRAME.finditer(traceback_text)
    ]
    return Stack(tuple(reversed(frames))).user_frame  # a traceback lists the innermost last


def read_stack(path: str) -> Optional[Stack]:
    """The main thread's stack from a file a rank wrote: a line "main 0x<thread id>", then
    faulthandler's dump of every thread; None if it holds no stack of that thread."""
    try:
        with open(path) as stream:
            lines = stream.read().splitlines()
    except OSError:
        return None
    if not lines or not lines[0].startswith("main "):
        return None
    main = int(lines[0].split()[1], 16)
    frames: List[Frame] = []
    current: Optional[int] = None
    for line in lines[1:]:
        thread = _THREAD.match(line)
        if thread is not None:
            if current == main and frames:
                break  # a later dump: the first is enough
            current = int(thread.group(1), 16)
            continue
        frame = _FRAME.match(line)
        if frame is not None and current == main:
            frames.append(Frame(frame["path"], int(frame["line"]), frame["function"]))
    return Stack(tuple(frames)) if frames else None


def _waiting_in(stack: Stack) -> str:
    """What a rank waiting inside torch waits in: "in all_reduce (distributed_c10d.py:...),
    called from train.py:12 in step"."""
    inner = stack.innermost
    assert inner is not None
    user = stack.user_frame
    called = f", called from {user.described()}" if user is not None else ""
    if "backward" in inner.function or "autograd" in inner.path:
        what = "in backward(), where DistributedDataParallel all-reduces the gradients"
    elif "distributed" in inner.path:
        what = f"in the collective {inner.function} of torch.distributed"
    else:
        what = f"inside torch, in {inner.function}"
    return f"{what} ({inner.where()}){called}"


def _hung_at(stack: Stack) -> str:
    inner = stack.innermost
    assert inner is not None
    user = stack.user_frame
    text = f"at {inner.described()}"
    if user is not None and user != inner:
        text += f", called from {user.described()}"
    return text


def _ranks(ranks: Sequence[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {list(ranks)}"


def hang_report(
    stacks: Dict[int, Optional[Stack]], timeout: float, forked_beside: Sequence[str]
) -> Dict[int, str]:
    """What happened to each rank that did not finish within ``timeout`` s, the cause first:
    the ranks that hung in their own code (or said nothing), then those that waited inside
    torch for them. ``forked_beside``: the threads of the caller when it forked the ranks
    (a lock one of them held stays held in the ranks: a fork deadlock)."""
    limit = f"did not finish within {timeout:g} s"
    own = [rank for rank, stack in stacks.items() if stack is None or not stack.in_torch]
    inside = [rank for rank in stacks if rank not in own]
    report: Dict[int, str] = {}
    for rank in own:
        stack = stacks[rank]
        if stack is None:
            report[rank] = (
                f"{limit}: it hung (for example in a collective that not every rank "
                "reaches; it did not say where)"
            )
            continue
        text = f"{limit}: it hung {_hung_at(stack)}"
        if forked_beside and stack.waits_for_a_lock():
            text += (
                f". The ranks were forked while the calling process ran other threads "
                f"({', '.join(forked_beside[:3])}{' and more' if len(forked_beside) > 3 else ''})"
                ": a lock that one of them held at that moment stays held in every rank for "
                "ever (a fork deadlock). Stop those threads before the check (join the threads "
                "that setUp starts), or keep that lock out of the ranks' code"
            )
        report[rank] = text
    for rank in inside:
        stack = stacks[rank]
        assert stack is not None
        if own:
            report[rank] = (
                f"stopped after {timeout:g} s while it waited {_waiting_in(stack)}: it waited "
                f"for {_ranks(own)}, which hung (not hung itself)"
            )
        else:
            report[rank] = (
                f"{limit}: it hung {_waiting_in(stack)}, as did every rank that did not "
                "finish: a collective that not every rank reaches, or that the ranks reach "
                "in another order"
            )
    return report
