"""test_no_retained_graphs: the autograd graphs a trainer keeps alive do not grow with training.

``total_loss += loss`` keeps a tensor whose ``grad_fn`` links every step's graph; a list of
losses keeps one graph per step; an ``eval()`` without ``no_grad`` that keeps its losses keeps
every evaluation's activations too. Counting live tensors misses the first (it is one tensor),
so the census counts graph nodes: from every tensor with a ``grad_fn`` that the trainer's
attributes reach (and, during training, the local variables of the training loop), following
``grad_fn.next_functions``.
"""

from __future__ import annotations

import collections
import contextlib
import os
import sys
import types
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, Iterator, List, Set, Tuple

import torch
from torch import nn

from ..core.contract import check
from ..core.messages import by_count
from ..core.options import option
from ..core.validators import is_bool
from .setup import SetUpTrainer

__all__ = ["RetainedGraphs"]

#: training and eval() rounds the check runs
ROUNDS = 3
_MAX_DEPTH = 8
_MAX_OBJECTS = 20000
_TORCH_DIR = os.path.dirname(torch.__file__)
_OWN_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ATOMS = (str, bytes, int, float, complex, bool, type(None), torch.dtype, torch.device)
_OPAQUE = (
    type,
    types.ModuleType,
    types.BuiltinFunctionType,
    types.MethodType,
    torch.Generator,
    torch.utils.data.Dataset,
    torch.utils.data.DataLoader,
    torch.utils.data.Sampler,
)
#: objects of these packages hold no training state of the trainer's: files, threads, logs
_FOREIGN = ("threading", "logging", "queue", "multiprocessing", "io", "_io", "numpy", "tensorboard")


@dataclass
class _Census:
    """Graph nodes alive at one moment: in all, and by where the tensors that reach them are."""

    total: int = 0
    by_place: Dict[str, int] = field(default_factory=dict)
    tensors: Dict[str, List[torch.Tensor]] = field(default_factory=dict)


def _nodes(tensors: List[torch.Tensor]) -> Set[Any]:
    """Every autograd node the tensors' grad_fn reach."""
    seen: Set[Any] = set()
    pending = [t.grad_fn for t in tensors if t.grad_fn is not None]
    while pending:
        node = pending.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        pending.extend(following for following, _ in getattr(node, "next_functions", ()))
    return seen


def _holding(tensors: List[torch.Tensor]) -> int:
    """How many of the nodes the tensors reach still hold a tensor they saved for backward
    (an activation): backward frees them, a graph it never ran through keeps them."""
    held = 0
    for node in _nodes(tensors):
        for name in dir(node):
            if name.startswith("_saved_"):
                try:
                    value = getattr(node, name)
                except RuntimeError:  # freed by backward
                    continue
                if isinstance(value, torch.Tensor) or (
                    isinstance(value, (list, tuple))
                    and any(isinstance(v, torch.Tensor) for v in value)
                ):
                    held += 1
                    break
    return held


def _children(obj: Any, path: str) -> Iterator[Tuple[Any, str]]:
    """What ``obj`` holds, each with its path (the items of a list or tuple share one)."""
    if isinstance(obj, dict):
        for key, value in list(obj.items()):
            shown = repr(key) if isinstance(key, (str, int)) else "..."
            yield value, f"{path}[{shown}]"
    elif isinstance(obj, (list, tuple, collections.deque, set, frozenset)):
        for value in list(obj):
            yield value, f"{path}[...]"
    elif isinstance(obj, types.FunctionType):
        for name, cell in zip(obj.__code__.co_freevars, obj.__closure__ or ()):
            with contextlib.suppress(ValueError):  # an empty cell
                yield cell.cell_contents, f"{path}.<{name} in its closure>"
    elif isinstance(obj, nn.Module):
        for name, value in vars(obj).items():
            if name in ("_modules", "_buffers"):
                for child, item in value.items():
                    yield item, f"{path}.{child}"
            elif not name.startswith("_") or name == "_trainer":  # hooks, parameters: no graphs
                yield value, f"{path}.{name}"
    else:
        attributes = getattr(obj, "__dict__", None)
        if isinstance(attributes, dict):
            for name, value in list(attributes.items()):
                yield value, f"{path}.{name}"
        for name in getattr(type(obj), "__slots__", ()):
            if isinstance(name, str) and hasattr(obj, name):
                yield getattr(obj, name), f"{path}.{name}"


def census(roots: List[Tuple[str, Any]]) -> _Census:
    """The graph nodes reachable from tensors with a grad_fn that ``roots`` hold."""
    found: Dict[str, List[torch.Tensor]] = {}
    seen: Set[int] = set()
    pending = [(obj, path, 0) for path, obj in reversed(roots)]
    while pending and len(seen) < _MAX_OBJECTS:
        obj, path, depth = pending.pop()
        if id(obj) in seen or isinstance(obj, _ATOMS):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if obj.grad_fn is not None:
                found.setdefault(path, []).append(obj)
            continue
        if depth >= _MAX_DEPTH or isinstance(obj, _OPAQUE):
            continue
        if (type(obj).__module__ or "").split(".")[0] in _FOREIGN:
            continue
        pending.extend((child, where, depth + 1) for child, where in _children(obj, path))
    nodes = {place: _nodes(tensors) for place, tensors in found.items()}
    every: Set[Any] = set().union(*nodes.values()) if nodes else set()
    return _Census(len(every), {place: len(n) for place, n in nodes.items()}, found)


def _loop_locals() -> List[Tuple[str, Any]]:
    """The local variables of the training loop's frames now running: the frames between
    the check (dltestkit's) and here that are neither torch's nor dltestkit's."""
    roots: List[Tuple[str, Any]] = []
    frame = sys._getframe(1)
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if path.startswith(_OWN_DIR) and frame.f_code.co_name == "_train":
            break
        if not path.startswith((_TORCH_DIR, _OWN_DIR)):
            where = f"{frame.f_code.co_name}() ({os.path.basename(path)})"
            roots.extend(
                (f"the local variable {name} of {where}", value)
                for name, value in frame.f_locals.items()
                if name != "self"
            )
        frame = frame.f_back  # type: ignore[assignment]
    return roots


class RetainedGraphs(SetUpTrainer):
    """The trainer keeps no growing autograd graph alive."""

    _suite: ClassVar[str] = "TrainerTests"
    strict_graphs: bool = option(False, is_bool, example="True")
    """Whether test_no_retained_graphs fails on graphs that grow within an epoch and are let go
    at its end although backward has freed what they saved.

    Such graphs hold their nodes only, not their activations: Lightning's documentation keeps an
    epoch's losses in `training_step_outputs` this way. `False`: that part of the check is
    skipped, naming what holds them. Graphs that still hold activations, and graphs that grow
    from epoch to epoch, fail either way."""

    @check(reads=("trainer", "model_attribute", "writer_attribute", "strict_graphs"))
    def test_no_retained_graphs(self) -> None:
        """Check that the autograd graph nodes the trainer keeps alive do not grow over
        several epochs and ``eval()`` calls, nor from step to step within an epoch.

        Catches a training loop that keeps every step's autograd graph alive, so memory grows
        until it runs out: ``self.total_loss += loss`` instead of ``loss.item()``, a list of
        loss tensors, an ``eval()`` without ``torch.no_grad()`` that keeps its losses (and
        with them every evaluation's activations).
        """
        trainer = self.trainer
        rounds: List[_Census] = []
        steps: List[List[_Census]] = []
        for _ in range(ROUNDS):
            during: List[_Census] = []
            with self._at_every_step(trainer, during):
                self._train(trainer, 1)
            self._eval_loss(trainer)
            rounds.append(census([("trainer", trainer)]))
            steps.append(during)
        totals = [c.total for c in rounds]
        if totals[0] < totals[1] < totals[2]:
            self._fail_growing(
                rounds[0],
                rounds[-1],
                f"{totals[0]} graph nodes after the first epoch and eval(), {totals[1]} after "
                f"the second, {totals[2]} after the third",
            )
        for epoch, during in enumerate(steps[1:], start=2):
            counts = [c.total for c in during]
            if len(counts) < 3 or not all(a < b for a, b in zip(counts, counts[1:])):
                continue
            how = (
                f"within epoch {epoch}, from step to step: {', '.join(map(str, counts))} graph "
                f"nodes at its {len(counts)} optimizer steps"
            )
            grown = self._grown(during[0], during[-1])
            held = sum(_holding(during[-1].tensors[place]) for place in grown)
            if held or self.strict_graphs:
                self._fail_growing(during[0], during[-1], how)
            self._skip_part(
                "within an epoch",
                f"the autograd graph the trainer keeps alive grows {how} ({grown[0]} holds "
                "it), and is let go when the epoch ends (the first epochs end with as many "
                "nodes as the last); backward has freed the activations these graphs saved, so "
                "they hold their nodes only, which Lightning's documentation does too "
                "(training_step_outputs). Keep loss.detach() or loss.item() to hold none; set "
                "strict_graphs = True to make this a failure",
            )
            return

    @contextlib.contextmanager
    def _at_every_step(self, trainer: Any, during: List[_Census]) -> Iterator[None]:
        """A census after every optimizer step of an optimizer of the trainer's model."""
        from torch.optim.optimizer import register_optimizer_step_post_hook

        ids = {id(p) for p in self._model(trainer).parameters()}

        def after_step(optimizer: Any, args: Any, kwargs: Any) -> None:
            groups = getattr(optimizer, "param_groups", ())
            if any(id(p) in ids for group in groups for p in group["params"]):
                during.append(census([("trainer", trainer), *_loop_locals()]))

        handle = register_optimizer_step_post_hook(after_step)
        try:
            yield
        finally:
            handle.remove()

    @staticmethod
    def _grown(before: _Census, after: _Census) -> List[str]:
        """The places whose graphs grew, the largest first."""
        return [
            place
            for place, count in sorted(after.by_place.items(), key=lambda item: -item[1])
            if count > before.by_place.get(place, 0)
        ]

    def _fail_growing(self, before: _Census, after: _Census, how: str) -> None:
        grown = self._grown(before, after)
        holders = []
        for place in grown[:5]:
            tensors = after.tensors[place]
            kinds = sorted({type(t.grad_fn).__name__ for t in tensors})
            what = (
                f"a tensor with grad_fn={kinds[0]}"
                if len(tensors) == 1
                else f"{len(tensors)} tensors with grad_fn ({', '.join(kinds[:3])})"
            )
            holders.append(
                f"{place}: {what}, reaching {after.by_place[place]} graph nodes "
                f"({before.by_place.get(place, 0)} before)"
            )
        if not holders:
            holders.append(
                "no single attribute: the nodes are reached through several, or through "
                "something the census does not walk into (a C extension, a data loader)"
            )
        self.fail(
            f"the autograd graph the trainer keeps alive grows with training: {how}. What "
            f"holds the growing {by_count(len(grown), 'graph', 'graphs')}:\n  - "
            + "\n  - ".join(holders)
            + "\nEach step's graph stays alive through these tensors (with the activations it "
            "saved, if backward never ran on it, as in an eval() without torch.no_grad()), "
            "so memory grows until it runs out. Keep numbers, not tensors: accumulate "
            "loss.item() or loss.detach() (total_loss += loss.item()), and evaluate under "
            "torch.no_grad()."
        )
