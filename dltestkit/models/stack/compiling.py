"""test_compile: torch.compile(model) gives eager's outputs and gradients, compiles once more
for a new batch size and not again for a third, and breaks its graph only where listed."""

from __future__ import annotations

import contextlib
import re
from typing import Any, Callable, ContextManager, Dict, List, Optional, Tuple, TypeVar

import torch
from torch import nn

from ...core.contract import check
from ...core.graph_breaks import counted_breaks, reason_text
from ...core.messages import exception_text, listed
from ...core.options import ContractError, option
from ...core.validators import is_bool, is_str
from ...core.watch import raising_user_line
from ..copies import describe_mode
from ..randomness import describe_draws
from .contract import (
    StackContract,
    differences,
    gradient_differences,
    without_fast_path,
)

__all__ = ["Compile"]

T = TypeVar("T")


class _Graphs:
    """A torch.compile backend that hands every graph to ``backend`` and keeps what Dynamo
    says about it: the graphs, and why each graph ended early (a graph break)."""

    def __init__(self, backend: Any) -> None:
        from torch._dynamo.backends.debugging import ExplainWithBackend

        self.explain = ExplainWithBackend(backend)

    def __call__(self, gm: Any, example_inputs: Any) -> Any:
        return self.explain(gm, example_inputs)

    @property
    def count(self) -> int:
        return len(self.explain.graphs)

    def breaks(self) -> List[str]:
        """Each graph break once: its kind, what Dynamo says about it, and the line."""
        found = []
        for reason in self.explain.break_reasons:
            where = ""
            if reason.user_stack:
                frame = reason.user_stack[-1]
                code = f": `{frame.line.strip()}`" if frame.line else ""
                where = (
                    f", at {frame.filename.rsplit('/', 1)[-1]}:{frame.lineno} in {frame.name}{code}"
                )
            found.append(reason_text(reason.reason) + where)
        return list(dict.fromkeys(found))


_FRAME_SKIPPED = re.compile(r"frame skipped: (\S+) \((\S+) line (\d+)\)")


def _skipped_frames(before: Dict[str, int]) -> List[str]:
    """What made Dynamo give up on a whole frame since ``before`` (its counters of
    unsupported code then), each once with its line where Dynamo names it."""
    from torch._dynamo.utils import counters

    found = []
    for message, count in counters["unimplemented"].items():
        if count <= before.get(message, 0):
            continue
        first = message.split("*** While handling this graph break")[0]
        skipped = _FRAME_SKIPPED.search(message)
        where = (
            f", which skipped {skipped.group(1)} at {skipped.group(2).rsplit('/', 1)[-1]}:"
            f"{skipped.group(3)}"
            if skipped
            else ""
        )
        found.append(reason_text(first) + where)
    return list(dict.fromkeys(found))


def _guard_failures(before: Dict[Any, int]) -> List[str]:
    """The guards that failed since ``before`` (how many each compiled frame had then): what
    made torch.compile compile again, one each, with the code and line that made the guard.
    Of each frame, only the latest compilation's are kept (the earlier ones, for the other
    mode or the first batch size, fail too, as they should)."""
    from torch._dynamo.utils import guard_failures

    found = []
    for code, reasons in guard_failures.items():
        latest: Dict[int, str] = {}
        for reason in reasons[before.get(code, 0) :]:
            numbered = re.match(r"^\d+/(\d+): ", reason)
            entry = int(numbered.group(1)) if numbered else 0
            text = reason[numbered.end() if numbered else 0 :]
            text = " ".join(text.split("(HINT")[0].split("\nUser stack trace")[0].split())
            guard, *notes = [part.strip() for part in text.split(" # ")]
            made = [note for note in notes if note]
            where = f" (`{made[0]}`, at {made[-1].rsplit('/', 1)[-1]})" if len(made) > 1 else ""
            latest[entry] = guard + where
        if latest:
            found.append(latest[max(latest)])
    return list(dict.fromkeys(found))


def _zeros_for_none(
    compiled: List[Tuple[str, Optional[torch.Tensor]]],
    eager: List[Tuple[str, Optional[torch.Tensor]]],
) -> List[str]:
    """The parameters whose compiled gradient is all zeros where eager's is None."""
    return [
        name
        for (name, got), (_, expected) in zip(compiled, eager)
        if expected is None and got is not None and not bool(got.detach().any())
    ]


class Compile(StackContract):
    """torch.compile gives eager's results without recompiling at every batch."""

    compile_backend: str = option("aot_eager", is_str, example='"inductor"')
    """The backend test_compile compiles the model with.

    `"aot_eager"` traces the forward and backward passes as `torch.compile` does (Dynamo, then
    AOTAutograd) and runs the traced graphs with PyTorch's own kernels: a second or two for a
    small model, and eager's random numbers. `"inductor"`, `torch.compile`'s default, also
    generates kernels (C++ on the CPU, with the compiler installed: tens of seconds); while the
    check runs, it draws random numbers as eager PyTorch does
    (`torch._inductor.config.fallback_random`), so that dropout can be compared."""
    compile_fullgraph: bool = option(False, is_bool, example="True")
    """Whether the model must compile to whole graphs, without graph breaks.

    `False`: graph breaks, and code that torch.compile leaves to eager PyTorch, make a part of
    test_compile skip, listing each with its reason and line; the outputs and gradients are
    compared either way. `True`: they fail, as `torch.compile(model, fullgraph=True)` raises."""

    @check(
        reads=(
            "model",
            "inputs",
            "unbatched_inputs",
            "loss_fn",
            "stack_tolerance",
            "compile_backend",
            "compile_fullgraph",
        )
    )
    def test_compile(self) -> None:
        """Check that torch.compile(model) gives eager's outputs and gradients, and does not
        compile again at every batch size.

        Catches a model that torch.compile changes or that recompiles on every batch: code
        that takes another path when compiled, a Python number in forward that changes every
        call (a step counter), a shape read into a Python int that specialises the graph;
        and graph breaks (print, .item(), .tolist(), unsupported calls), listed with their
        line and failing with compile_fullgraph.

        A copy compiled with ``compile_backend`` is compared with an eager copy: in training
        mode (outputs and every gradient, under the same seed) on ``self.inputs``, in eval
        mode on one more sample, which compiles again (the eval graph, with a dynamic batch
        dimension: PyTorch's automatic dynamic shapes), then on two more, which must not
        compile anything.
        """
        import torch._dynamo

        backend = self._compile_backend()
        torch._dynamo.reset()  # no graph of another test, and none left for the next
        self.addCleanup(torch._dynamo.reset)
        from torch._dynamo.utils import counters

        unsupported_before = dict(counters["unimplemented"])
        breaks_before = dict(counters["graph_break"])
        graphs = _Graphs(backend)
        eager_model, compiled_model = self._copy_model(), self._copy_model()
        compiled = torch.compile(compiled_model, backend=graphs)
        tolerance = self._tolerance(self.model)
        with self._compile_config(), without_fast_path():
            ran = self._compile_training(eager_model, compiled_model, compiled, tolerance)
            trained = graphs.count
            if ran:
                self._recomputed_statistics(eager_model, compiled_model)
            else:  # (reported): eval mode is compared from eager's state
                compiled_model.load_state_dict(eager_model.state_dict())
            sizes = self._compile_eval(eager_model, compiled_model, compiled, tolerance)
            if graphs.count == 0:
                self._compile_nothing(_skipped_frames(unsupported_before))
            if trained == 0:
                self._compile_nothing(counted_breaks(breaks_before, []), mode="training")
            if sizes is not None:
                self._compile_third_batch_size(compiled_model, compiled, graphs, sizes)
        breaks = graphs.breaks() + _skipped_frames(unsupported_before)
        self._compile_graph_breaks(breaks + counted_breaks(breaks_before, breaks))

    # -- the backend ------------------------------------------------------------------------
    def _compile_backend(self) -> Any:
        from torch._dynamo import list_backends
        from torch._dynamo.backends.registry import lookup_backend

        try:
            return lookup_backend(self.compile_backend)
        except Exception:
            known = ", ".join(repr(name) for name in list_backends(exclude_tags=()))
            raise ContractError(
                f"self.compile_backend is {self.compile_backend!r}, which torch.compile does "
                f"not know; the backends here: {known}"
            ) from None

    def _compile_config(self) -> ContextManager[Any]:
        """Inductor's random numbers drawn as eager's, while the check runs."""
        if self.compile_backend != "inductor":
            return contextlib.nullcontext()
        import torch._inductor.config

        patched: ContextManager[Any] = torch._inductor.config.patch(fallback_random=True)
        return patched

    # -- the comparisons ----------------------------------------------------------------------
    def _compiled_run(self, run: Callable[[], T], what: str) -> T:
        """``run()`` of the compiled model; an exception it raises (where eager ran) fails."""
        try:
            return run()
        except ContractError:
            raise
        except Exception as exc:  # AssertionError too: torch's own, no failure of the check
            line = raising_user_line(exc)
            where = f", at {line}" if line else ""
            self.fail(
                f"torch.compile(model, backend={self.compile_backend!r}) raises {what}, where "
                f"the eager model runs: {exception_text(exc)}{where}. torch.compile cannot "
                "run the model as it is: rewrite the line it names, or, if it is a limit of "
                "torch.compile rather than of your code, list test_compile in "
                "expected_failed_checks with the reason."
            )

    def _compile_training(
        self, eager_model: nn.Module, compiled_model: nn.Module, compiled: Any, tolerance: float
    ) -> bool:
        """Compare a training step; whether the compiled one ran (a failure in the subtest,
        reported there, goes on after it)."""
        zeroed: List[str] = []
        ran = False
        with self.subTest(mode="training"):
            eager = self._step_run(eager_model, self.inputs, training=True)
            result = self._compiled_run(
                lambda: self._step_run(compiled_model, self.inputs, training=True, call=compiled),
                "in training mode",
            )
            ran = True
            zeroed = _zeros_for_none(result.gradients, eager.gradients)
            compiled_gradients = [
                (name, None if name in zeroed else gradient) for name, gradient in result.gradients
            ]
            found = differences(result.output, eager.output, tolerance)
            found += gradient_differences(compiled_gradients, eager.gradients, tolerance)
            if found:
                self._compile_differs(found, self.inputs, training=True)
        if zeroed:
            self._skip_part(
                "gradients",
                f"torch.compile gives {len(zeroed)} parameters a gradient of zeros where eager "
                f"PyTorch gives none ({listed(zeroed, 3)}): what they compute does not reach "
                "the loss (an output the loss leaves out, a value handed from one compiled "
                "graph to the next), and the compiled backward pass "
                "computes their gradients from zeros. The other gradients agree, and so would "
                "these under plain SGD; an optimizer that changes a parameter whose gradient "
                "is zero (weight decay, momentum) changes them under torch.compile only.",
            )
        return ran

    def _recomputed_statistics(self, eager_model: nn.Module, compiled_model: nn.Module) -> None:
        """After the training step: where eager PyTorch updated normalisation statistics more
        often than the compiled model (its num_batches_tracked higher: gradient checkpointing
        runs the checkpointed layers' forward again in the backward pass, which updates their
        running statistics a second time; a compiled graph recomputes them without the update),
        give the compiled copy eager's statistics, so that eval mode is compared from the same
        state, and say so in a skipped part. Statistics that differ otherwise are left as they
        are, for the eval comparison to show."""
        compiled_buffers = dict(compiled_model.named_buffers())
        recounted = [
            name.rpartition(".")[0]  # the layer
            for name, buffer in eager_model.named_buffers()
            if name.endswith("num_batches_tracked")
            and name in compiled_buffers
            and int(buffer) > int(compiled_buffers[name])
        ]
        if not recounted:
            return
        with torch.no_grad():
            for name, buffer in eager_model.named_buffers():
                if name.rpartition(".")[0] in recounted and name in compiled_buffers:
                    compiled_buffers[name].copy_(buffer)
        self._skip_part(
            "running statistics",
            f"in the training step, eager PyTorch updated the running statistics of "
            f"{len(recounted)} layers more often than the compiled model (their "
            f"num_batches_tracked: {listed(recounted, 3)}): gradient checkpointing runs "
            "those layers' forward again in the backward pass, which updates them a second "
            "time in eager PyTorch only. The compiled model's statistics were set to eager's "
            "before the eval comparison; how often a training step updates them was not "
            "compared.",
        )

    def _compile_eval(
        self, eager_model: nn.Module, compiled_model: nn.Module, compiled: Any, tolerance: float
    ) -> Optional[Tuple[int, int]]:
        """Compare in eval mode, at one more sample than self.inputs when the model runs
        there; return the batch sizes for the third one (None when there is none)."""
        batch = self._batch_size()
        sizes: Optional[Tuple[int, int]] = (batch, batch + 1)
        inputs = self._resized_inputs(batch + 1)
        if self._has_sample_lists():
            sizes, inputs = None, self.inputs
            self._skip_part(
                "batch sizes",
                f"self.inputs holds {self._compile_sample_lists()}: torch.compile specialises its "
                "graphs on the length of a list, so every batch size compiles anew, by design; "
                "the recompilation at a third batch size was not checked",
            )
        with self.subTest(mode="eval"):
            try:
                eager = self._forward_only(eager_model, inputs, training=False)
            except Exception as exc:
                if sizes is None:
                    raise
                sizes, inputs = None, self.inputs
                self._skip_part(
                    "batch sizes",
                    f"the model raises at batch size {batch + 1} in eval mode "
                    f"({exception_text(exc)}); test_output_shape reports it. The "
                    "recompilation at another batch size was not checked",
                )
                eager = self._forward_only(eager_model, inputs, training=False)
            result = self._compiled_run(
                lambda: self._forward_only(compiled_model, inputs, training=False, call=compiled),
                "in eval mode" + (f" at batch size {batch + 1}" if sizes else ""),
            )
            found = differences(result, eager, tolerance)
            if found:
                self._compile_differs(found, inputs, training=False)
        return sizes

    def _compile_differs(self, found: List[str], inputs: Any, training: bool) -> None:
        """Fail for compiled results that differ from eager's, unless the model draws random
        numbers that torch.compile draws otherwise (then skip, naming them)."""
        mode_name = describe_mode(training)
        lead = (
            f"torch.compile(model, backend={self.compile_backend!r}) gives other results than "
            f"the eager model in {mode_name} mode, under the same seed: {listed(found)}"
        )
        draws = self._random_draws(inputs, training)
        if draws is not None:
            self.skipTest(
                f"{lead}; the model draws random numbers in {mode_name} mode "
                f"({describe_draws(draws)}), which the compiled model does not draw alike "
                f"with this backend, so its {mode_name}-mode results cannot be compared"
            )
        self.fail(
            f"{lead}. The compiled model computes something else than the model: look for "
            "code that takes another path when compiled (torch.compiler.is_compiling()), "
            "state read or changed in forward that the compiled graph captures once (a "
            "Python attribute, a global), or a custom operator whose fake (meta) kernel does "
            "not match it."
        )

    # -- recompilation ------------------------------------------------------------------------
    def _compile_third_batch_size(
        self, compiled_model: nn.Module, compiled: Any, graphs: _Graphs, sizes: Tuple[int, int]
    ) -> None:
        from torch._dynamo.utils import guard_failures

        third = sizes[1] + 1
        with self.subTest(part="batch sizes"):
            before = graphs.count
            failures_before = {code: len(reasons) for code, reasons in guard_failures.items()}
            self._compiled_run(
                lambda: self._forward_only(
                    compiled_model,
                    self._resized_inputs(third),
                    training=False,
                    call=compiled,
                ),
                f"in eval mode at batch size {third}",
            )
            new = graphs.count - before
            if new:
                changed = _guard_failures(failures_before)
                why = (
                    f" What changed, as torch.compile saw it: {listed(changed, 3)}."
                    if changed
                    else ""
                )
                if self._compiles_no_more(compiled_model, compiled, graphs, third + 1):
                    self._skip_part(
                        "batch sizes",
                        f"torch.compile compiled the model again at a third batch size "
                        f"({third}), once: not at a fourth ({third + 1}), so it does not "
                        f"compile at every batch.{why} A state the model changed once (on its "
                        "first call in eval mode, as transformers' RWKV rescales its layers) "
                        "costs one compilation more, no bug.",
                    )
                    return
                self.fail(
                    f"torch.compile compiled the model again at a third batch size ({third}), "
                    f"after compiling it for {sizes[0]} and {sizes[1]} ({new} new "
                    f"graph{'s' if new > 1 else ''}):{why} A model that recompiles at every "
                    "batch pays a compilation each step, and after "
                    "torch._dynamo.config.recompile_limit recompilations falls back to eager "
                    "PyTorch without a word. Usual causes: a Python number in the model that "
                    "changes every call (a step counter in forward: keep it in a tensor "
                    "buffer), a size read into a Python int and used as a constant, "
                    "torch.compile(dynamic=False)."
                )

    def _compiles_no_more(
        self, compiled_model: nn.Module, compiled: Any, graphs: _Graphs, size: int
    ) -> bool:
        """Whether a call at batch size ``size`` (eval mode) compiles no new graph."""
        before = graphs.count
        self._compiled_run(
            lambda: self._forward_only(
                compiled_model, self._resized_inputs(size), training=False, call=compiled
            ),
            f"in eval mode at batch size {size}",
        )
        return graphs.count == before

    # -- graph breaks -------------------------------------------------------------------------
    def _compile_nothing(self, skipped: List[str], mode: str = "") -> None:
        """Skip (or, with compile_fullgraph, fail) for a model of which torch.compile compiled
        no graph: in any mode, or (``mode``) in that mode only, a part of the check."""
        reasons = f": {listed(skipped, 3)}" if skipped else ""
        text = (
            f"torch.compile(model, backend={self.compile_backend!r}) compiled no graph of the "
            f"model{f' in {mode} mode' if mode else ''}, leaving all of it to eager "
            f"PyTorch{reasons}"
        )
        if self.compile_fullgraph:
            self.fail(f"{text}. self.compile_fullgraph is True: the model must compile.")
        if mode:
            self._skip_part(
                f"{mode} mode",
                f"{text}. Its {mode}-mode results were eager PyTorch's on both sides, so "
                f"nothing was compared in {mode} mode; set compile_fullgraph = True to make "
                "this a failure.",
            )
            return
        self.skipTest(
            f"{text}. Nothing was compiled, so nothing could be compared; set "
            "compile_fullgraph = True to make this a failure."
        )

    def _compile_graph_breaks(self, breaks: List[str]) -> None:
        if not breaks:
            return
        text = (
            f"torch.compile breaks the model's graph {len(breaks)} "
            f"time{'s' if len(breaks) > 1 else ''} (each break runs the code around it in "
            "eager PyTorch, between compiled graphs):\n  " + "\n  ".join(breaks)
        )
        if self.compile_fullgraph:
            self.fail(
                f"{text}\nself.compile_fullgraph is True: rewrite these lines so that "
                "torch.compile can trace them (no print, .item(), .tolist() or data-dependent "
                "Python control flow in forward)."
            )
        self._skip_part(
            "graph breaks",
            f"{text}\nThe results were compared, and agree. Graph breaks cost speed, not "
            "correctness; set compile_fullgraph = True to make them a failure.",
        )

    def _compile_sample_lists(self) -> str:
        from ..tensors import describe_batched, sample_lists

        return ", ".join(
            describe_batched(key, value)
            for key, value in sample_lists(self.inputs, self.unbatched_inputs)
        )
