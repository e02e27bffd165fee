"""test_compiled_training: a trainer that trains a ``torch.compile``d model stops compiling
after its first epochs, and computes the losses eager PyTorch computes.

make_trainer gets ``compile_backend``: the name of the backend ``compile_with`` names, for
``torch.compile(model, backend=compile_backend)`` or any API that takes a backend's name
(Accelerate's ``TorchDynamoPlugin(backend=...)``, transformers'
``TrainingArguments(torch_compile_backend=...)``);
``aot_eager`` runs the graphs as eager PyTorch runs them, forward and backward, with the same
random numbers, in about a second. The graphs are counted with Dynamo's own count of the graphs
it compiles. Three epochs: the first compiles
(a partial last batch and evaluation add a recompile each, for a new batch size and for eval
mode), the second may recompile once for each value that changed since (a learning rate the
scheduler set: torch marks it dynamic then), the third must compile nothing: a trainer that
still recompiles does so every epoch (a dropout probability or a string that changes and that
the graph depends on), until torch gives up at its recompile limit and runs uncompiled.
"""

from __future__ import annotations

import math
import os
from typing import Any, ClassVar, Dict, List, Optional, Tuple

import torch

from ..core.contract import check
from ..core.graph_breaks import counted_breaks
from ..core.messages import listed
from ..core.options import option
from ..core.validators import is_non_negative_number, is_str
from .contract import TrainerContract
from .recording import recording

__all__ = ["CompiledTraining"]

_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))
#: The epochs trained: the third must compile nothing.
EPOCHS = 3
#: Backends that run the graphs as eager PyTorch does, drawing the same random numbers.
EAGER_BACKENDS = ("eager", "aot_eager")


def _graphs_compiled() -> int:
    """How many graphs Dynamo has compiled (with any backend) since it was last reset."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _frames_seen() -> int:
    """How many frames Dynamo was asked to compile since it was last reset (compiled or
    not): none when torch.compile was never called on the way."""
    from torch._dynamo.utils import counters

    return int(counters["frames"]["total"])


def _failures() -> Dict[Any, List[str]]:
    """torch._dynamo's guard failures so far: code object -> the reasons of its recompiles."""
    from torch._dynamo.utils import guard_failures

    return {code: [str(reason) for reason in reasons] for code, reasons in guard_failures.items()}


def _where(code: Any) -> str:
    """A compiled function, as messages name it: ``forward (model.py:12)``; empty for one of
    torch's own (dynamo's wrapper of a compiled method), whose guards say where they are."""
    path = os.path.abspath(code.co_filename)
    if path.startswith(_TORCH_DIR):
        return ""
    return f"{code.co_name} ({os.path.basename(path)}:{code.co_firstlineno})"


def _latest(reasons: List[str]) -> str:
    """Of a recompile's guard failures, the one of the latest cache entry ("0/3: ..."): the
    guard on the value the compiled code saw last."""

    def entry(reason: str) -> int:
        head = reason.partition(": ")[0]
        number = head.rpartition("/")[2]
        return int(number) if number.isdigit() else -1

    return max(reversed(reasons), key=entry)


def _reason(text: str) -> str:
    """A guard failure as messages show it: the guard that failed, then where its value is
    read (``self.p == 0.1, read at dropout.py:73 in forward: return F.dropout(...)``)."""
    line = text.strip().splitlines()[0] if text.strip() else text
    head, _, rest = line.partition(": ")
    if head.replace("/", "").isdigit():
        line = rest
    guard, _, after = line.partition(" # ")
    source, _, location = after.rpartition(" # ")
    guard, source, location = (" ".join(part.split()) for part in (guard, source, location))
    if not location:
        return guard
    return f"{guard}, read at {location}" + (f": {source}" if source else "")


class CompiledTraining(TrainerContract):
    """A compiled model trains as eager does and stops recompiling."""

    _suite: ClassVar[str] = "TrainerTests"
    compile_with: str = option("aot_eager", is_str, example='"inductor"')
    """The torch.compile backend the graphs test_compiled_training counts are compiled with.

    `"aot_eager"` runs them as eager PyTorch does, forward and backward, with the same random
    numbers, and compiles in about a second; `"eager"` is faster still (no backward graph).
    `"inductor"` generates code (tens of seconds on a CPU, and other random numbers than eager
    PyTorch: the losses are then compared only when they agree, else that part is skipped)."""
    compiled_loss_rtol: float = option(1e-5, is_non_negative_number, example="1e-3")
    """The relative tolerance comparing the compiled trainer's losses with eager's."""

    @check(
        reads=(
            "make_trainer",
            "compile_with",
            "compiled_loss_rtol",
            "model_attribute",
            "writer_attribute",
            "trainer",
        )
    )
    def test_compiled_training(self) -> None:
        """Check that a trainer that compiles its model with the backend it is given stops
        compiling after two epochs, and that its losses are eager PyTorch's.

        Catches a compiled training loop that recompiles every epoch or every batch (a
        dropout probability, a string or another value the graph depends on changing, until
        torch gives up and runs uncompiled), and one whose losses differ from eager ones.
        """
        import torch._dynamo
        from torch._dynamo.backends.registry import lookup_backend

        self._get_or_skip("make_trainer")
        refused = self._refused(compile_backend=None)
        if refused:
            self.skipTest(
                f"{refused}; give it compile_backend=None (the default: no compiling), and "
                "build with compile_backend=b a trainer that trains "
                "torch.compile(model, backend=b), to enable this check"
            )
        lookup_backend(self.compile_with)  # a name torch.compile knows
        eager = self._losses(self._new_trainer(self.seed, compile_backend=None))
        torch._dynamo.reset()
        self.addCleanup(torch._dynamo.reset)
        trainer = self._new_trainer(self.seed, compile_backend=self.compile_with)
        frames = _frames_seen()
        graphs: List[int] = []
        new: List[Dict[Any, List[str]]] = []
        losses: List[Optional[float]] = []
        for _ in range(EPOCHS):
            before, failures = _graphs_compiled(), _failures()
            losses += self._losses(trainer, epochs=1)
            graphs.append(_graphs_compiled() - before)
            after = _failures()
            new.append(
                {
                    code: reasons[len(failures.get(code, [])) :]
                    for code, reasons in after.items()
                    if len(reasons) > len(failures.get(code, []))
                }
            )
        if not sum(graphs) and _frames_seen() > frames:
            # torch.compile ran on the model, and left it all to eager PyTorch (an nn.GRU, a
            # .item() that ends every frame): nothing compiled, no bug of the trainer
            breaks = counted_breaks({}, [])
            self.skipTest(
                f"the trainer built with compile_backend={self.compile_with!r} ran "
                f"torch.compile, which compiled no graph of its model in {EPOCHS} epochs, "
                "leaving all of it to eager PyTorch"
                + (f" (graph breaks: {listed(breaks, 3)})" if breaks else "")
                + ": nothing was compiled, so nothing could be compared. TrainingStackTests' "
                "test_compile on the model says where torch.compile stops"
            )
        if not sum(graphs):
            raise self._contract_error(
                "make_trainer",
                f"built with compile_backend={self.compile_with!r} a trainer that compiled "
                f"nothing in {EPOCHS} epochs; with compile_backend=b it must train "
                "torch.compile(model, backend=b) (or compile its training step with it)",
            )
        self._recompiles(graphs, new)
        self._compare_losses(eager, losses)

    def _losses(self, trainer: Any, epochs: int = EPOCHS) -> List[Optional[float]]:
        """The losses of ``epochs`` epochs of training (one train(1) call each)."""
        with recording(self._model(trainer), steps=False) as record:
            for _ in range(epochs):
                self._train(trainer, 1)
        return record.losses

    def _recompiles(self, graphs: List[int], new: List[Dict[Any, List[str]]]) -> None:
        from torch._dynamo import config

        limit = int(getattr(config, "recompile_limit", getattr(config, "cache_size_limit", 8)))
        every = _failures()
        at_limit = [code for code, reasons in every.items() if len(reasons) >= limit]
        if not graphs[-1] and not at_limit:
            return
        culprits = new[-1] or {code: every[code] for code in at_limit}
        lines = [
            (f"{_where(code)}: " if _where(code) else "") + _reason(_latest(reasons))
            for code, reasons in culprits.items()
        ]
        self.fail(
            f"the compiled training keeps recompiling: the {EPOCHS} epochs compiled "
            f"{', '.join(map(str, graphs))} graphs, so the last still compiled "
            + (
                f"and {listed([_where(code) for code in at_limit], 3)} hit torch._dynamo's "
                f"recompile limit ({limit}), after which it runs uncompiled"
                if at_limit
                else "(a first epoch compiles, a second may recompile once for a value torch "
                "then marks dynamic, a third should compile nothing)"
            )
            + ". What changed each time (torch._dynamo's guard failures):\n  - "
            + "\n  - ".join(lines or ["(none recorded)"])
            + "\nA value the compiled code depends on changes every epoch and cannot be made "
            "dynamic: a dropout probability or another argument of an operation, a string, a "
            "new object. Keep it fixed, or hold it in a tensor (torch.tensor(p)) that the "
            "compiled code reads."
        )

    def _compare_losses(
        self, eager: List[Optional[float]], compiled: List[Optional[float]]
    ) -> None:
        rtol = self.compiled_loss_rtol
        pairs = [(a, b) for a, b in zip(eager, compiled) if a is not None and b is not None]
        differs: Optional[Tuple[int, float, float]] = next(
            (
                (index, a, b)
                for index, (a, b) in enumerate(pairs)
                if not (a == b or abs(a - b) <= rtol * abs(a) or (math.isnan(a) and math.isnan(b)))
            ),
            None,
        )
        if differs is None and len(eager) == len(compiled):
            return
        what = (
            f"backward call {differs[0] + 1}'s loss is {differs[2]!r} compiled and "
            f"{differs[1]!r} eager (compiled_loss_rtol={rtol})"
            if differs
            else f"the compiled trainer called backward {len(compiled)} times, the eager "
            f"one {len(eager)}"
        )
        if self.compile_with not in EAGER_BACKENDS:
            self._skip_part(
                "losses",
                f"in {EPOCHS} epochs {what}; the {self.compile_with!r} backend draws other "
                "random numbers than eager PyTorch (dropout) and computes in another order, "
                'so losses are compared only with compile_with "aot_eager" or "eager"',
            )
            return
        self.fail(
            f"the compiled training computes other losses than eager PyTorch: in {EPOCHS} "
            f"epochs of make_trainer(compile_backend=None) and make_trainer(compile_backend="
            f"{self.compile_with!r}) (which runs the graphs as eager "
            f"PyTorch does) under the same seed, {what}. Something the compiled code reads "
            "was fixed when it was traced (a Python value it does not guard on, state "
            "changed outside the graph), or the compiled and the trained model differ."
        )
