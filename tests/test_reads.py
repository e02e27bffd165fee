"""Each check declares the options it reads (``@check(reads=...)``); the docs' option lists and
"Reads." lines come from those declarations. These tests hold the declarations to the code:

- statically, over every path: the options a check's method reads, with the helper methods it
  calls (of its class, transitively) and the functions it hands the test to, must be exactly
  those it declares;
- dynamically, on real runs of every check: what a run reads is among what it declares.

``seed``, ``num_threads`` and ``expected_failed_checks`` are read for every check by the
machinery that runs it, and are left out of the declarations.
"""

from __future__ import annotations

import ast
import inspect
import sys
import textwrap
import unittest
from typing import Any, Callable, Dict, Optional, Set, Tuple

import torch
from checkrunner import make_case
from test_model_checks import VAE, AutoEncoder
from torch import nn

from dltestkit import DistributedTrainerTests, ModelTests, SequenceModelTests, reference
from dltestkit.core import contract
from dltestkit.core.contract import SHARED

#: Methods the machinery runs around every check, not as part of it: read by none.
VALIDATION = {"_validate_contract", "_validate_combination", "_validate_expected_failures"}
#: Methods the machinery runs before every check: what they read, every check reads.
PREPARE = "_prepare"
#: Calls whose option-name arguments are messages about the option, not reads of it.
MESSAGES = {"_contract_error", "_unset_factory_error"}


class _Reads(ast.NodeVisitor):
    """The options a function reads through ``self`` (or a parameter standing for it), the
    methods of ``self`` it calls, and the module functions it hands ``self`` to."""

    def __init__(self, options: Set[str], alias: str) -> None:
        self.options = options
        self.alias = alias
        self.reads: Set[str] = set()
        self.methods: Set[str] = set()
        self.functions: Set[str] = set()

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if isinstance(node.value, ast.Name) and node.value.id == self.alias:
            if node.attr in self.options:
                self.reads.add(node.attr)
            else:
                self.methods.add(node.attr)
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        on_self = isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)
        on_self = on_self and func.value.id == self.alias  # type: ignore[union-attr]
        strings = [
            arg.value
            for arg in node.args
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str)
        ]
        hands_self = any(isinstance(arg, ast.Name) and arg.id == self.alias for arg in node.args)
        if (on_self and called not in MESSAGES) or called == "getattr" or hands_self:
            self.reads.update(s for s in strings if s in self.options)
        if hands_self:
            for name in ast.walk(node):
                if isinstance(name, ast.Name) and name.id not in (self.alias, "self"):
                    self.functions.add(name.id)
        self.generic_visit(node)


def _source(function: Callable[..., Any]) -> Optional[ast.AST]:
    try:
        return ast.parse(textwrap.dedent(inspect.getsource(function)))
    except (OSError, TypeError):
        return None


def static_reads(mixin: type, check: str) -> Set[str]:
    """Every option check ``check`` of ``mixin`` can read, on any path."""
    options = set(mixin._options())  # type: ignore[attr-defined]
    seen: Set[Tuple[str, str]] = set()
    reads: Set[str] = set()
    pending = [(check, "self", None), (PREPARE, "self", None)]
    while pending:
        name, alias, module = pending.pop()
        if (name, alias) in seen or name in VALIDATION:
            continue
        seen.add((name, alias))
        if module is None:
            attribute = inspect.getattr_static(mixin, name, None)
            function = getattr(attribute, "__func__", attribute)
            function = getattr(function, "__wrapped__", function)
            if isinstance(attribute, property):
                function = attribute.fget
            if not inspect.isfunction(function):
                continue
            owner = sys.modules[function.__module__]
        else:
            function, owner = getattr(module, name, None), module
            if not inspect.isfunction(function):
                continue
        tree = _source(function)
        if tree is None:
            continue
        visitor = _Reads(options, alias)
        visitor.visit(tree)
        reads |= visitor.reads
        if not function.__module__.startswith("dltestkit"):
            continue
        # a method called on the test, under whichever name a function gave it
        pending += [(method, "self", None) for method in visitor.methods]
        for called in visitor.functions:
            found = getattr(owner, called, None)
            if inspect.isfunction(found) and found.__module__.startswith("dltestkit"):
                parameters = list(inspect.signature(found).parameters)
                alias_there = "test" if "test" in parameters else None
                if alias_there is not None:
                    pending.append((called, alias_there, owner))
    return reads - set(SHARED)


def declared(mixin: type, check: str) -> Set[str]:
    return set(reference.reads_of(mixin, check)) - set(SHARED)


class StaticReads(unittest.TestCase):
    def test_every_check_declares_exactly_the_options_it_can_read(self) -> None:
        for mixin in reference.public_mixins():
            for check in reference.own_checks(mixin):
                with self.subTest(mixin=mixin.__name__, check=check):
                    found, said = static_reads(mixin, check), declared(mixin, check)
                    self.assertEqual(
                        sorted(found),
                        sorted(said),
                        f"{mixin.__name__}.{check} reads {sorted(found - said)} without "
                        f"declaring them, and declares {sorted(said - found)} without reading",
                    )


class AnUndeclaredRead(ModelTests):
    """A check that reads an option it does not declare (for the test that this is seen)."""

    @contract.check(reads=("model", "inputs"))
    def test_output_shape(self) -> None:
        """Check that nothing."""
        self.assertTrue(self.strict_output_dtypes is not None)


class TheStaticReaderSees(unittest.TestCase):
    def test_an_undeclared_read_is_found(self) -> None:
        found = static_reads(AnUndeclaredRead, "test_output_shape")
        self.assertIn("strict_output_dtypes", found)
        self.assertNotEqual(found, declared(AnUndeclaredRead, "test_output_shape"))

    def test_reads_through_helpers_and_functions_handed_the_test_are_found(self) -> None:
        self.assertIn(
            "independent_of_batch_shapes", static_reads(ModelTests, "test_batch_independence")
        )
        self.assertIn(
            "writer_attribute", static_reads(DistributedTrainerTests, "test_ddp_training")
        )


def recording(case: type, log: Set[str]) -> type:
    """``case`` noting every option a check reads once the options are validated."""
    options = set(case._options())  # type: ignore[attr-defined]

    class Recording(case):  # type: ignore[valid-type, misc]
        _recording = False

        def __getattribute__(self, name: str) -> Any:
            if name in options and object.__getattribute__(self, "_recording"):
                log.add(name)
            return super().__getattribute__(name)

        def _validate_contract(self) -> None:
            self._recording = False
            super()._validate_contract()
            self._recording = True

    Recording.__name__ = case.__name__
    return Recording


def _model_setup(model: Callable[[], nn.Module], **extra: Any) -> Callable[[Any], None]:
    def set_up(self: Any) -> None:
        self.model = model()
        self.inputs = torch.randn(4, 1, 4, 4)
        for name, value in extra.items():
            setattr(self, name, value)

    return set_up


class DynamicReads(unittest.TestCase):
    """Runs of the model checks (a correct model, a sampling one, a sequence model): what
    each run reads is among what the check declares, for the checks the mixin owns (a check's
    reads are documented with the mixin that owns it)."""

    def test_what_a_run_reads_is_declared(self) -> None:
        cases: Dict[str, type] = {
            "autoencoder": make_case(ModelTests, _model_setup(AutoEncoder, make_model=AutoEncoder)),
            "sampling VAE": make_case(ModelTests, _model_setup(VAE)),
        }

        def sequence(self: Any) -> None:
            self.model = nn.GRU(3, 5, batch_first=True)
            self.inputs = torch.randn(4, 6, 3)
            self.sequence_dim = 1
            self.causal = True

        cases["GRU"] = make_case(SequenceModelTests, sequence)
        owner = {"autoencoder": ModelTests, "sampling VAE": ModelTests, "GRU": SequenceModelTests}
        for label, case in cases.items():
            for check in reference.own_checks(owner[label]):
                with self.subTest(label, check=check):
                    log: Set[str] = set()
                    result = unittest.TestResult()
                    recording(case, log)(check).run(result)
                    self.assertEqual(result.errors, [])
                    extra = log - declared(case, check) - set(SHARED)
                    self.assertEqual(sorted(extra), [], f"{check} read undeclared {extra}")


if __name__ == "__main__":
    unittest.main()
