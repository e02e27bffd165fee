"""The shape of the package: wings over a core, no circles, small modules, a generated
picture and API page that the docs show."""

from __future__ import annotations

import ast
import graphlib
import inspect
import itertools
import textwrap
import unittest
from pathlib import Path

import dltestkit
from dltestkit import reference
from dltestkit.core.contract import CheckMixin
from dltestkit.data.contract import DatasetContract
from dltestkit.models.contract import ModelContract
from dltestkit.trainers.contract import TrainerContract

DOCS = Path(__file__).resolve().parent.parent / "docs"


class House(unittest.TestCase):
    def test_the_wings_stand_on_floors_without_circles(self) -> None:
        floors = reference.house_floors()
        self.assertEqual(floors[-1], ["core", "integrations"])  # the ground: they use no wing
        self.assertEqual(floors[0], ["dltestkit"])  # the public names, on top
        placed = [name for floor in floors for name in floor]
        self.assertEqual(sorted(placed), sorted(reference.house()))

    def test_the_core_and_the_wings_use_only_what_stands_below_them(self) -> None:
        house = reference.house()
        self.assertEqual(house["core"]["uses"], {})
        for wing in ("data", "models", "trainers"):
            with self.subTest(wing):
                self.assertEqual(set(house[wing]["uses"]), {"core"})  # type: ignore[arg-type]

    def test_no_module_imports_itself_through_others(self) -> None:
        # every relative import counts, those only for the type checker too
        package = Path(dltestkit.__file__).parent
        graph = {}
        for path in package.rglob("*.py"):
            name = ".".join(path.relative_to(package.parent).with_suffix("").parts)
            here = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".")
            uses = set()
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ImportFrom) and node.level:
                    base = here[: len(here) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                    uses.add(target.removesuffix(".__init__"))
            graph[name.removesuffix(".__init__")] = uses - {name.removesuffix(".__init__")}
        # a package's __init__ importing its own modules is how the wings compose: leave out
        # the imports of a package by its own modules (from . import x) only
        graph = {
            module: {used for used in uses if not module.startswith(used + ".")}
            for module, uses in graph.items()
        }
        try:
            graphlib.TopologicalSorter(graph).prepare()
        except graphlib.CycleError as error:
            self.fail(f"modules import each other in a circle: {error.args[1]}")

    def test_no_class_of_a_suite_replaces_anothers_method_by_accident(self) -> None:
        # Features and contracts are composed by inheritance: a helper that two of them define
        # under one name is silently replaced by one of them (test_all_inputs_used's and
        # test_inputs_unchanged's once were, and test_train_matches_eval's eval pass replaced
        # the one the other checks share). A method may replace another only to cooperate
        # (it calls super()) or to fill a hook (a method whose body only returns a constant).
        for suite in _suites():
            owners: dict = {}
            for cls in suite.__mro__[1:]:
                if not cls.__module__.startswith("dltestkit."):
                    continue
                for name, value in vars(cls).items():
                    if name not in _BOOKKEEPING and not name.startswith("__"):
                        owners.setdefault(name, []).append((cls, value))
            clashes = {
                name: [cls.__name__ for cls, _ in found]
                for name, found in owners.items()
                if len(found) > 1
                and not all(_cooperates(value) for _, value in found[:-1])
                and not _is_hook(found[-1][1])
            }
            with self.subTest(suite.__name__):
                self.assertEqual(clashes, {})

    def test_no_module_is_over_600_lines(self) -> None:
        for info in reference.house().values():
            for module, lines in info["modules"].items():  # type: ignore[attr-defined]
                with self.subTest(module):
                    self.assertLessEqual(lines, 600, f"{module} holds {lines} lines")

    def test_the_picture_and_the_table_are_generated_on_the_house_page(self) -> None:
        page = (DOCS / "house.md").read_text(encoding="utf-8")
        self.assertIn("```{dltestkit-house}\n```", page)
        svg = reference.house_svg()
        for wing in ("core/", "models/", "data/", "trainers/", "distributed/"):
            self.assertIn(f">{wing}</text>", svg)


_CONTRACTS = (ModelContract, TrainerContract, DatasetContract)


def _suites() -> list:
    """The public mixins, and every combination of two that a test class can make (an
    add-on with the suite it adds to: DistributedModelTests with ModelTests, ...)."""
    public = [
        value
        for value in vars(dltestkit).values()
        if isinstance(value, type) and issubclass(value, CheckMixin)
    ]
    combined = []
    for first, second in itertools.combinations(public, 2):
        if issubclass(first, second) or issubclass(second, first):
            continue
        if not any(issubclass(first, c) and issubclass(second, c) for c in _CONTRACTS):
            continue  # a model's and a trainer's suite are not one test class
        try:
            combined.append(type(f"{first.__name__}+{second.__name__}", (first, second), {}))
        except TypeError:  # no consistent method resolution order: not combinable
            continue
    return public + combined


_BOOKKEEPING = {"_own_options", "_suite"}  # set per suite by the declaring machinery


def _checks_of(cls: type) -> list:
    return [name for name in vars(cls) if name.startswith("test_")]


def _cooperates(value: object) -> bool:
    """Whether a method hands on to the next class (super()) or is the options' bookkeeping."""
    function = getattr(value, "__func__", value)
    code = getattr(function, "__code__", None)
    return code is not None and "super" in code.co_names


def _is_hook(value: object) -> bool:
    """Whether a method only returns a constant (after its docstring): a hook to fill."""
    function = getattr(value, "__func__", value)
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    except (OSError, TypeError):
        return False
    body = tree.body[0].body if isinstance(tree.body[0], ast.FunctionDef) else []
    statements = [
        statement
        for statement in body
        if not (isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant))
    ]
    return len(statements) == 1 and (
        isinstance(statements[0], ast.Pass)
        or isinstance(statements[0], ast.Return)
        and isinstance(statements[0].value, (ast.Constant, type(None)))
    )


class Api(unittest.TestCase):
    def test_the_api_page_is_generated_from_all(self) -> None:
        page = (DOCS / "api.md").read_text(encoding="utf-8")
        self.assertIn("```{dltestkit-api}\n```", page)
        lines = "\n".join(reference.api_lines())
        for name in dltestkit.__all__:
            with self.subTest(name):
                self.assertRegex(lines, rf"\.\. auto(class|function|exception):: {name}\n")

    def test_every_public_name_is_listed_on_the_public_api_page(self) -> None:
        page = (DOCS / "public-api.md").read_text(encoding="utf-8")
        for name in dltestkit.__all__:
            with self.subTest(name):
                self.assertIn(f"`{name}`", page)


if __name__ == "__main__":
    unittest.main()
