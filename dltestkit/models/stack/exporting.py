"""test_export: torch.export with a dynamic batch dimension gives eager's outputs at another
batch size, and again after the program is saved and loaded."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import traceback
from typing import Any, ClassVar, Dict, Iterator, List, NoReturn, Optional, Tuple

import torch

from ...core.contract import check
from ...core.messages import exception_text, listed
from ...core.options import ContractError, option
from ...core.paths import named_tensors
from ...core.validators import is_bool
from ...core.watch import raising_user_line
from ..randomness import describe_draws
from ..tensors import batch_entries, describe_batched, sample_lists
from .contract import StackContract, differences, without_fast_path

__all__ = ["Export"]


def _arguments(inputs: Any) -> Tuple[Tuple[Any, ...], Dict[str, Any]]:
    """``self.inputs`` as the positional and keyword arguments of the call."""
    if isinstance(inputs, dict):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    return (inputs,), {}


@contextlib.contextmanager
def _guards_added() -> Iterator[List[Dict[str, Any]]]:
    """The guards on sizes that tracing adds in the block, from torch's structured trace: each
    its expression, the stack that added it and the sources of its symbols (its
    ``guard_added_fast`` and ``create_symbol`` events; the detailed trace that
    ``torch.export.draft_export`` reads costs minutes on a UNet, a stack per expression)."""
    from torch._logging import _internal

    found: List[Dict[str, Any]] = []
    sources: Dict[str, str] = {}

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            metadata = getattr(record, "metadata", None)
            if not isinstance(metadata, dict):
                return
            created = metadata.get("create_symbol")
            if isinstance(created, dict) and "symbol" in created:
                sources[str(created["symbol"])] = str(created.get("source"))
            guard = metadata.get("guard_added_fast")
            if isinstance(guard, dict) and "expr" in guard:
                found.append(
                    {
                        "expr": guard["expr"],
                        "stack": guard.get("stack") or [],
                        "symbol_to_sources": sources,
                    }
                )

    handler = Collect()
    _internal.trace_log.addHandler(handler)
    try:
        yield found
    finally:
        _internal.trace_log.removeHandler(handler)


#: Batch sizes at which a guard is tried: one that holds at all of them (a relation between
#: the batch dimensions of two inputs, all of one size; ``Ne(s0, 1)``) does not bound it.
_TRIED_SIZES = (2, 3, 4, 5, 7, 8, 16, 63, 64, 65, 128, 1000, 4096, 10**6)


def _bounds_the_batch(expression: str) -> bool:
    """Whether a guard on the batch dimensions (every symbol of an exported program's sizes is
    one, as no other dimension is dynamic) fails at some batch size; a guard that cannot be
    evaluated counts as one that does."""
    import sympy  # type: ignore[import-untyped]
    from torch.utils._sympy import functions

    names = {name: value for name, value in vars(functions).items() if isinstance(value, type)}
    try:
        parsed = sympy.sympify(expression, locals=names)
        symbols = parsed.free_symbols
        for size in _TRIED_SIZES:
            held = parsed.subs(dict.fromkeys(symbols, size))
            if held is not sympy.true and held is not True:
                return True
    except Exception:
        return True
    return False


def _batch_guards(guards: List[Dict[str, Any]]) -> List[str]:
    """The guards that fix or bound the batch size, each with the line of the model's code that
    added it (the last frame of its stack outside torch)."""
    from torch._logging.structured import INTERN_TABLE

    filenames = {number: name for name, number in INTERN_TABLE.items()}
    torch_dir = os.path.join(os.path.dirname(torch.__file__), "")
    found = []
    for guard in guards:
        expression = guard.get("expr")
        frames = [
            frame
            for frame in guard.get("stack") or []
            if not str(filenames.get(frame.get("filename"), "")).startswith(torch_dir)
        ]
        if expression is None or not frames or not _bounds_the_batch(str(expression)):
            continue
        frame = frames[-1]
        path = os.path.basename(str(filenames.get(frame.get("filename"), "?")))
        code = f": `{frame['loc'].strip()}`" if frame.get("loc") else ""
        named = _readable(str(expression), guard.get("symbol_to_sources") or {})
        found.append(f"{named}, at {path}:{frame.get('line')} in {frame.get('name')}{code}")
    return list(dict.fromkeys(found))


def _bounded(text: str, shapes: Any, batch: int) -> Optional[Tuple[Any, int, Any]]:
    """The dynamic shapes that torch.export suggests in ``text`` (its error), with the bounds
    they give the batch dimension, where they keep it dynamic over ``batch`` and one more
    sample (a model that branches on the batch size); else None (a batch size fixed)."""
    from torch.export import Dim
    from torch.export.dynamic_shapes import refine_dynamic_shapes_from_suggested_fixes
    from torch.utils import _pytree

    if "Suggested fixes:" not in text:
        return None
    fixes = text.split("Suggested fixes:", 1)[1].strip().split("\n\n")[0]
    try:
        refined = refine_dynamic_shapes_from_suggested_fixes(f"Suggested fixes:\n{fixes}", shapes)
    except Exception:
        return None
    dims = _pytree.tree_leaves(refined)
    if not dims or not all(isinstance(dim, Dim) for dim in dims):
        return None  # a dimension made static, or related to another
    low = max(dim.min for dim in dims)
    high = min(dim.max for dim in dims)
    if low > batch or high < batch + 1:
        return None
    return refined, low, high


def _readable(expression: str, symbols: Dict[str, str]) -> str:
    """A guard as Python reads it: ``Eq(s77, 4)`` with s77 from ``L['x'].size()[0]`` is
    ``x.shape[0] == 4``."""
    for symbol, source in symbols.items():
        source = re.sub(r"L\['(\w+)'\]\.size\(\)\[(\d+)\]", r"\1.shape[\2]", str(source))
        expression = re.sub(rf"\b{re.escape(str(symbol))}\b", source, expression)
    for name, operator in (("Eq", "=="), ("Ne", "!=")):
        match = re.fullmatch(rf"{name}\((.*), (.*)\)", expression)
        if match and all(_balanced(part) for part in match.groups()):
            expression = f"{match.group(1)} {operator} {match.group(2)}"
    return expression


def _balanced(text: str) -> bool:
    """Whether the brackets of ``text`` pair up (``Eq(a, b) | Eq(b, 1)`` is no one call)."""
    depth = 0
    for character in text:
        depth += {"(": 1, ")": -1}.get(character, 0)
        if depth < 0:
            return False
    return depth == 0


class Export(StackContract):
    """torch.export gives a program that runs at any batch size and survives a save and a
    load."""

    _suite: ClassVar[str] = "ExportTests"

    strict_export: bool = option(False, is_bool, example="True")
    """Whether a model that torch.export cannot trace fails test_export.

    `False`: control flow on a tensor's values (`if mask.any():`, a mixture of experts that
    skips an expert without tokens), an output torch.export cannot take apart (transformers'
    caches) or an operation it does not support make test_export skip, naming the line: such a
    model is correct, and can be exported only once rewritten (torch.cond, torch.where) or
    called otherwise (`use_cache=False`). A branch on the batch size beyond the batch sizes
    compared (diffusers' UNets take another path from 64 samples on) is named in a skipped
    part, the program exported and compared within its bound. A batch size fixed by the
    model's code, or a program that computes otherwise, fails either way."""

    @check(reads=("model", "inputs", "unbatched_inputs", "stack_tolerance", "strict_export"))
    def test_export(self) -> None:
        """Check that torch.export with a dynamic batch dimension gives eager's outputs at
        another batch size, and after the program is saved and loaded.

        Catches a model that cannot be exported for any batch size: a hard-coded batch size
        (torch.zeros(4, ...), .reshape(4, -1)), a branch on the batch size, named with their
        line; an exported program that computes something else than the model, or that a
        save and a load change; and, with strict_export, Python control flow on tensor values.

        In eval mode: ``torch.export.export`` with the first dimension of every batched input
        a dynamic ``Dim("batch")``, then the program's module run at the batch size it was
        exported with and at one more, and the program saved with ``torch.export.save`` and
        loaded with ``torch.export.load`` run at one more; each compared with the model.
        """
        from torch.export import Dim, ShapesCollection, export, load, save

        lists = sample_lists(self.inputs, self.unbatched_inputs)
        if lists:
            self.skipTest(
                f"self.inputs holds {', '.join(describe_batched(k, v) for k, v in lists)}: "
                "torch.export takes the length of a list as a constant, so a list of samples "
                "cannot have a dynamic batch size"
            )
        batch = max(2, self._batch_size())  # a batch of 1 is specialised by torch.export
        example = self._resized_inputs(batch)
        args, kwargs = _arguments(example)
        batched = {
            0 if key is None else key for key, _ in batch_entries(example, self.unbatched_inputs)
        }
        dim = Dim("batch")
        # the batched tensors, wherever forward's signature takes them (also *args, **kwargs:
        # PEFT's wrappers), their first dimension dynamic
        collected = ShapesCollection()  # type: ignore[no-untyped-call]
        for key, value in kwargs.items() if kwargs else enumerate(args):
            if key in batched:
                for _, tensor in named_tensors(value):
                    if tensor.dim() > 0:
                        collected[tensor] = {0: dim}
        model = self._copy_model().eval()
        shapes: Any = collected.dynamic_shapes(model, args, kwargs)  # type: ignore[no-untyped-call]
        bounds = None
        with _guards_added() as guards:
            try:
                program = export(model, args, kwargs, dynamic_shapes=shapes)
            except ContractError:
                raise
            except Exception as exc:  # AssertionError too: torch's own, no failure of the check
                bounds = _bounded(str(exc), shapes, batch)
                if bounds is None:
                    self._export_failed(exc, guards)
        if bounds is not None:  # exported again, for the batch sizes the model's branch allows
            program = export(model, args, kwargs, dynamic_shapes=bounds[0])
        tolerance = self._tolerance(self.model)
        path = self.make_temp_dir() / "model.pt2"
        save(program, str(path))
        loaded = load(str(path))
        # what each program is run as: its module(), until its guards raise a bug of PyTorch
        modules = {"the exported program": program.module()}
        modules["the program saved and loaded"] = loaded.module()
        with without_fast_path():
            for size in (batch, batch + 1):
                self._export_compare(program, size, "the exported program", tolerance, modules)
            self._export_compare(
                loaded, batch + 1, "the program saved and loaded", tolerance, modules, True
            )
        if bounds is not None:
            self._batch_bounded(bounds[1], bounds[2], _batch_guards(guards))

    def _export_compare(
        self,
        program: Any,
        size: int,
        what: str,
        tolerance: float,
        modules: Dict[str, Any],
        reloaded: bool = False,
    ) -> None:
        """Compare ``program`` (an ExportedProgram), run as ``modules[what]``, at batch size
        ``size`` with the model; when the input guards of that module raise a bug of PyTorch,
        it is replaced by the program's module without them. ``reloaded``: the program saved
        and loaded, which ran at this size before the save."""
        inputs = self._resized_inputs(size)
        expected = self._fresh_run(inputs, training=False)
        try:
            try:
                actual = self._forward_only(
                    torch.nn.Module(), inputs, training=False, call=modules[what]
                )
            except NameError as exc:
                if not _in_generated_guards(exc):
                    raise
                # (the guards only assert the input shapes the program takes, which these are)
                modules[what] = program.module(check_guards=False)
                self._skip_part(
                    f"input guards of {what}",
                    f"the check of the input shapes that torch.export adds to {what} "
                    f"(ExportedProgram.module()'s guards) raises {exception_text(exc)}: a bug "
                    "of PyTorch (its generated code left naming L[...], pytorch/pytorch#172903), "
                    f"not of the model; {what} was run without it (module(check_guards=False))",
                )
                actual = self._forward_only(
                    torch.nn.Module(), inputs, training=False, call=modules[what]
                )
        except ContractError:
            raise
        except Exception as exc:  # AssertionError too: the program's guards raise it
            line = raising_user_line(exc)
            at = f", at {line}" if line else ""
            if reloaded:  # (the program before the save ran at this size: see test_export)
                self._reloaded_raises(
                    f"{what} raises at batch size {size}: {exception_text(exc)}{at}"
                )
            self.fail(
                f"{what} raises at batch size {size}, where the model runs: "
                f"{exception_text(exc)}{at}. The program was exported with a dynamic batch "
                "dimension; report it to PyTorch if the model's code is not at fault."
            )
        found = differences(actual, expected, tolerance)
        if not found:
            return
        draws = self._random_draws(inputs, training=False)
        if draws is not None:
            self.skipTest(
                f"{what} gives other outputs than the model at batch size {size}: "
                f"{listed(found)}; the model draws random numbers in eval mode "
                f"({describe_draws(draws)}), which the program does not draw alike, so "
                "they cannot be compared"
            )
        self.fail(
            f"{what} gives other outputs than the model at batch size {size} (eval mode, same "
            f"seed): {listed(found)}. The traced program computes something else than the "
            "model: look for state read in forward that the trace takes as a constant (a "
            "Python attribute, a global), code that takes another path when traced "
            "(torch.compiler.is_compiling()), or a custom operator whose fake (meta) kernel "
            "does not match it."
        )

    def _batch_bounded(self, low: int, high: Any, guards: List[str]) -> None:
        """Report a batch dimension that the model's code bounds, with the program compared
        within the bounds: a skipped part, or with strict_export a failure."""
        sizes = " and ".join(
            text
            for text, bound in ((f"at least {low}", low > 2), (f"at most {high}", high < 10**9))
            if bound
        )
        where = f" ({'; '.join(guards)})" if guards else ""
        finding = (
            f"torch.export makes the batch dimension dynamic only for batch sizes {sizes}: the "
            f"model's code branches on the batch size{where}, and the program takes one "
            "branch; it was exported for those batch sizes and gave the model's outputs there. "
            "Another path for large batches (diffusers' upsampling at 64 samples) is a design "
            "as often as a bug"
        )
        if self.strict_export:
            self.fail(
                f"{finding}. strict_export = True: the exported program must take every batch "
                "size; express the branch with torch.cond, or drop it."
            )
        self._skip_part(
            "every batch size",
            f"{finding}; set strict_export = True to make this a failure.",
        )

    def _export_failed(self, exc: Exception, guards: List[Dict[str, Any]]) -> NoReturn:
        text = str(exc)
        line = raising_user_line(exc)
        at = f", at {line}" if line else ""
        if "Constraints violated" in text or "specialized it to be a constant" in text:
            named = _batch_guards(guards)
            found = (
                ": " + "; ".join(named)
                if named
                else " (run torch.export.draft_export to see where)"
            )
            self.fail(
                "torch.export cannot make the batch dimension dynamic: the model's code fixes "
                f"or bounds the batch size{found}. A hard-coded batch size (torch.zeros(4, ...), "
                ".reshape(4, -1), a state of a fixed batch size) or a branch on the batch size "
                "makes the program work for one batch size only; take sizes from the inputs "
                "(x.shape[0], torch.zeros_like, x.new_zeros(x.shape[0], ...))."
            )
        if "data-dependent" in text or type(exc).__name__ == "GuardOnDataDependentSymNode":
            self._export_untraceable(
                f"torch.export cannot trace the model: its control flow depends on the values "
                f"of a tensor{at} ({exception_text(exc)}). A Python if or loop on a tensor's "
                "values takes one branch when traced; to export the model, express it with "
                "torch.where or torch.cond"
            )
        hint = (
            " The model returns an object torch.export cannot take apart into tensors "
            "(transformers' caches: pass use_cache=False in self.inputs if the exported "
            "model needs none; else register the type with "
            "torch.utils._pytree.register_pytree_node)."
            if "register a pytree" in text or "not a known type" in text
            else ""
        )
        self._export_untraceable(
            f"torch.export raises on the model{at}: {exception_text(exc)}.{hint} The model "
            "cannot be exported as it is called"
        )

    def _reloaded_raises(self, finding: str) -> NoReturn:
        """Skip, or with strict_export fail, for a program that raises once saved and loaded,
        where the same program ran before the save: torch.export's saving changed it."""
        finding = (
            f"{finding}, where the same program before torch.export.save ran at that batch size "
            "and gave the model's outputs: saving and loading changed it (a buffer that the "
            "program resizes in place, as quantisation observers do, in storage that "
            "torch.export.load does not let grow, is one known cause)"
        )
        if self.strict_export:
            self.fail(
                f"{finding}. strict_export = True: the model is meant to be exported, saved "
                "and loaded; report it to PyTorch if the model's code is not at fault."
            )
        self.skipTest(
            f"{finding}. A limit of torch.export's saving and loading rather than a bug of the "
            "model's code; set strict_export = True to make this a failure."
        )

    def _export_untraceable(self, finding: str) -> NoReturn:
        """Skip, or with strict_export fail, for a model that torch.export cannot trace but
        that runs: a design of a correct model as often as a bug."""
        if self.strict_export:
            self.fail(
                f"{finding}. strict_export = True: the model is meant to be exported; if it "
                "is not, do not combine ExportTests with its test class."
            )
        self.skipTest(
            f"{finding}. The model runs in eager PyTorch, so this is a limit of tracing rather "
            "than a bug; set strict_export = True to make this a failure."
        )


def _in_generated_guards(exc: BaseException) -> bool:
    """Whether ``exc`` was raised in the function that ``ExportedProgram.module()`` generates
    to check the input shapes (code compiled from a string, named ``_``)."""
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and frames[-1].filename == "<string>" and frames[-1].name == "_"
