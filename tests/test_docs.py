"""The documentation is complete and its code runs.

- Every check of each mixin has a section on the mixin's page in docs/ (an example failure
  produced by running it, and how to skip it); each page shows the mixin's checks and
  attributes with the directives that generate those tables from the code, and README's table
  of checks is the one generated from the code.
- Every ```python block of README.md runs as it is, and the test classes it defines pass.
- The ```python fragments in docs/ compile, and the run.py commands shown in
  docs/example-project.md are accepted by run.py.

The snippets in docs/ themselves are executed by `sphinx-build -b doctest docs <outdir>`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
import shlex
import sys
import tempfile
import unittest
from pathlib import Path
from typing import Any, Dict, Iterator, List

import dltestkit
from dltestkit import reference as _reference

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
EXAMPLE = ROOT / "example_project"

PAGES = {getattr(dltestkit, name): f"{page}.md" for name, page in _reference.PAGES.items()}

HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t]*$")
PYTHON_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)


def public_checks(mixin: type) -> List[str]:
    """The checks the mixin defines itself (inherited ones are documented with their mixin)."""
    return sorted(_reference.own_checks(mixin))


def sections(text: str) -> Dict[str, str]:
    """Each Markdown heading's title (without backticks) -> the text under it, up to the next
    heading of the same or a higher level. Lines inside ``` fences are no headings."""
    headings = []  # (line index, level, title)
    lines = text.splitlines()
    fenced = False
    for index, line in enumerate(lines):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            match = HEADING.match(line)
            if match:
                headings.append((index, len(match.group(1)), match.group(2).strip("`")))
    found = {}
    for position, (start, level, title) in enumerate(headings):
        end = next(
            (later for later, later_level, _ in headings[position + 1 :] if later_level <= level),
            len(lines),
        )
        found[title] = "\n".join(lines[start + 1 : end])
    return found


class MixinPages(unittest.TestCase):
    """docs/<page>.md documents every check and every attribute of its mixin."""

    def page(self, mixin: type) -> str:
        return (DOCS / PAGES[mixin]).read_text(encoding="utf-8")

    def test_every_check_has_a_section_with_a_failure_example_and_a_skip(self) -> None:
        for mixin in PAGES:
            page = sections(self.page(mixin))
            for name in public_checks(mixin):
                with self.subTest(mixin=mixin.__name__, check=name):
                    if name not in page:
                        self.fail(f"docs/{PAGES[mixin]} has no heading `{name}`")
                    section = page[name]
                    self.assertIn(
                        f'("{name}")',
                        section,
                        "the section must run the check on a broken component",
                    )
                    self.assertIn(
                        "```{testoutput}",
                        section,
                        "the section must show the output of running the check",
                    )
                    self.assertIn(
                        "@unittest.skip(", section, "the section must show how to skip the check"
                    )
                    self.assertIn(
                        f"def {name}(self)", section, "the skip example must override the check"
                    )
                    self.assertIn(
                        "**Design or bug.**",
                        section,
                        "the section must say how the check tells design from bug",
                    )

    def test_no_section_documents_a_check_that_does_not_exist(self) -> None:
        for mixin in PAGES:
            documented = {
                title for title in sections(self.page(mixin)) if re.fullmatch(r"test_\w+", title)
            }
            on_the_page = {
                name
                for other, page in PAGES.items()
                if page == PAGES[mixin]
                for name in public_checks(other)
            }
            with self.subTest(mixin=mixin.__name__):
                self.assertEqual(sorted(documented - on_the_page), [])

    def test_each_page_shows_the_generated_tables_of_its_mixin(self) -> None:
        for mixin in PAGES:
            with self.subTest(mixin=mixin.__name__):
                page = self.page(mixin)
                self.assertIn(f"```{{dltestkit-checks}} {mixin.__name__}\n```", page)
                self.assertIn(f"```{{dltestkit-options}} {mixin.__name__}\n```", page)
                self.assertNotRegex(
                    page,
                    r"(?m)^\| attribute \|",
                    "a hand-written attribute table drifts; use the directive",
                )

    def test_the_generated_option_lists_cover_every_option(self) -> None:
        for mixin in PAGES:
            listed = "\n".join(_reference.option_list(mixin))
            for name in mixin._options():
                with self.subTest(mixin=mixin.__name__, option=name):
                    self.assertRegex(listed, rf"(?m)^`{name}` \(.*; read by .*\)\n: ")

    def test_every_check_section_shows_its_generated_reads_line(self) -> None:
        for mixin in PAGES:
            page = sections(self.page(mixin))
            for name in public_checks(mixin):
                with self.subTest(mixin=mixin.__name__, check=name):
                    self.assertIn(
                        f"```{{dltestkit-reads}} {mixin.__name__} {name}\n```", page[name]
                    )
                    self.assertNotIn("**Reads.**", page[name], "a hand-written line drifts")

    def test_every_check_says_what_it_catches(self) -> None:
        for mixin in PAGES:
            for name in public_checks(mixin):
                with self.subTest(check=name):
                    self.assertTrue(_reference.summary(mixin, name).startswith("Check that "))
                    self.assertTrue(_reference.catches(mixin, name))

    def test_the_overview_is_generated_in_one_place_only(self) -> None:
        index = (DOCS / "index.md").read_text(encoding="utf-8")
        self.assertIn("```{dltestkit-checks}\n```", index)
        pages = {page.name: page.read_text(encoding="utf-8") for page in DOCS.glob("*.md")}
        copies = [
            name for name, text in pages.items() if re.search(r"(?m)^\| check \| catches \|", text)
        ]
        self.assertEqual(copies, [], "a hand-written table of checks drifts; use the directive")

    def test_the_readme_shows_the_checks_as_generated_from_the_code(self) -> None:
        sys.path.insert(0, str(DOCS))
        try:
            import update_outputs
        finally:
            sys.path.remove(str(DOCS))
        match = update_outputs.README_CHECKS.search(README.read_text(encoding="utf-8"))
        self.assertIsNotNone(match, "README.md has no generated table of checks")
        assert match is not None
        self.assertEqual(
            match.group(2),
            update_outputs.readme_checks(),
            "README.md's table of checks is stale: run python docs/update_outputs.py",
        )


@contextlib.contextmanager
def working_directory(path: str) -> Iterator[None]:
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def run_test_classes(namespace: Dict[str, Any]) -> unittest.TestResult:
    """Run the TestCase classes a snippet defined (not the ones it imported)."""
    loader = unittest.TestLoader()
    suite = unittest.TestSuite(
        loader.loadTestsFromTestCase(value)
        for value in namespace.values()
        if isinstance(value, type)
        and issubclass(value, unittest.TestCase)
        and value.__module__ == namespace["__name__"]
    )
    result = unittest.TestResult()
    suite.run(result)
    return result


class ReadmeSnippets(unittest.TestCase):
    """Every ```python block of README.md runs as it is, in a fresh namespace."""

    def blocks(self) -> List[str]:
        return PYTHON_BLOCK.findall(README.read_text(encoding="utf-8"))

    def test_the_readme_has_python_snippets(self) -> None:
        self.assertTrue(self.blocks(), "README.md has no ```python block")

    def test_every_python_snippet_runs_and_its_tests_pass(self) -> None:
        for number, code in enumerate(self.blocks(), 1):
            with self.subTest(block=number):
                # not "__main__": an `if __name__ == "__main__": unittest.main()` stays idle
                namespace: Dict[str, Any] = {"__name__": f"readme_block_{number}"}
                with tempfile.TemporaryDirectory() as folder, working_directory(folder):
                    exec(compile(code, f"README.md, python block {number}", "exec"), namespace)
                    result = run_test_classes(namespace)
                problems = [text for _, text in result.failures + result.errors]
                self.assertEqual(problems, [], f"the tests of README python block {number}")


class DocsFragments(unittest.TestCase):
    """The ```python blocks in docs/ (fragments, not executed) are valid Python; the pages'
    executed snippets are ```{testcode} blocks, run by the doctest build."""

    def test_every_python_fragment_compiles(self) -> None:
        pages = sorted(DOCS.glob("*.md"))
        self.assertTrue(pages, "docs/ has no Markdown pages")
        for page in pages:
            for number, code in enumerate(PYTHON_BLOCK.findall(page.read_text("utf-8")), 1):
                with self.subTest(page=page.name, block=number):
                    compile(code, f"{page.name}, python block {number}", "exec")


class ContractMessages(unittest.TestCase):
    """The message templates docs/contract.md quotes are the ones the checks produce."""

    def template(self, situation: str) -> "re.Pattern[str]":
        text = (DOCS / "contract.md").read_text(encoding="utf-8")
        row = re.search(rf"^\| {re.escape(situation)} \|[^|]*\| `(.+?)`", text, re.M)
        self.assertIsNotNone(row, f"docs/contract.md has no row {situation!r}")
        assert row is not None
        pattern = re.escape(row.group(1))
        pattern = pattern.replace(re.escape(" ..."), ".*").replace(re.escape("..."), ".*")
        pattern = re.sub(r"<[A-Za-z]+>", ".+?", pattern.replace("\\<", "<").replace("\\>", ">"))
        return re.compile(pattern, re.S)

    def message(self, set_up: Any, mixin: type, check: str, **class_attributes: Any) -> str:
        case = type("TestX", (mixin, unittest.TestCase), {"setUp": set_up, **class_attributes})
        result = unittest.TestResult()
        case(check).run(result)
        reported = result.errors + result.failures
        if reported:
            return reported[0][1].strip().splitlines()[-1].split(": ", 1)[1]
        return result.skipped[0][1]

    def test_each_quoted_template_matches_a_real_message(self) -> None:
        import torch
        from torch import nn

        def model(self: Any) -> None:
            self.model, self.inputs = nn.Linear(3, 3), torch.randn(4, 3)

        cases = {
            "required attribute missing": (lambda self: None, dltestkit.ModelTests, {}),
            "attribute with a wrong value": (
                lambda self: (model(self), setattr(self, "output_key", 1.5)),
                dltestkit.ModelTests,
                {},
            ),
            "attributes that do not fit together": (
                lambda self: (model(self), setattr(self, "expected_output_shape", (2, 3))),
                dltestkit.ModelTests,
                {},
            ),
            "attribute close to one a mixin reads": (
                lambda self: (model(self), setattr(self, "output_keys", 0)),
                dltestkit.ModelTests,
                {},
            ),
            "`seed` set in `setUp`": (
                lambda self: (model(self), setattr(self, "seed", 3)),
                dltestkit.ModelTests,
                {},
            ),
            "optional attribute unset": (model, dltestkit.ModelTests, {}),
        }
        for situation, (set_up, mixin, attributes) in cases.items():
            with self.subTest(situation):
                check = (
                    "test_state_dict_round_trip"
                    if situation == "optional attribute unset"
                    else "test_output_shape"
                )
                self.assertRegex(
                    self.message(set_up, mixin, check, **attributes), self.template(situation)
                )

    def test_the_class_line_templates_match_the_real_errors(self) -> None:
        for situation, bases in (
            ("`TestCase` before the mixin", (unittest.TestCase, dltestkit.ModelTests)),
            ("`Test...` class without `TestCase`", (dltestkit.ModelTests,)),
        ):
            with self.subTest(situation):
                with self.assertRaises(TypeError) as caught:
                    type("TestX", bases, {})
                self.assertRegex(str(caught.exception), self.template(situation))


class ExampleProjectCommands(unittest.TestCase):
    """The run.py command lines in docs/example-project.md are accepted by run.py."""

    def test_the_documented_run_py_commands_parse(self) -> None:
        text = (DOCS / "example-project.md").read_text(encoding="utf-8")
        commands = re.findall(
            r"^(?:python|torchrun[^\n]*?) example_project/run\.py(.*?)(?:[ \t]+#.*)?$", text, re.M
        )
        self.assertTrue(commands, "docs/example-project.md shows no run.py command")
        run = self.import_run_py()
        for command in commands:
            with self.subTest(command=command.strip()):
                output = io.StringIO()
                try:
                    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
                        run.parse_args(shlex.split(command))
                except SystemExit as stop:  # --help exits with 0, a bad option with 2
                    self.assertEqual(stop.code, 0, output.getvalue())

    def import_run_py(self) -> Any:
        """run.py as a module; it imports the example's dataset, model and trainer modules."""
        names = ("dataset", "mnist_files", "model", "trainer")
        saved = {name: sys.modules.pop(name) for name in names if name in sys.modules}
        sys.path.insert(0, str(EXAMPLE))
        try:
            spec = importlib.util.spec_from_file_location("example_run", EXAMPLE / "run.py")
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            try:
                spec.loader.exec_module(module)
            except ImportError as error:  # the example's extras are not installed
                self.skipTest(f"run.py needs pip install -e '.[example]': {error}")
            return module
        finally:
            sys.path.remove(str(EXAMPLE))
            for name in names:
                sys.modules.pop(name, None)
            sys.modules.update(saved)


if __name__ == "__main__":
    unittest.main()
