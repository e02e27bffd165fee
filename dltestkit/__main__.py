"""``python -m dltestkit write-references TEST_ID [TEST_ID ...]``: write reference files.

Runs the reference checks of the given tests with ``DLTESTKIT_WRITE_REFERENCES`` set, so that
each writes its reference file (see docs/references.md). A test id is what a failure names,
``path/to/test_file.py::TestClass::test_reference_outputs``, or a class (``...::TestClass``) or a
file, whose reference checks all run; a unittest name (``package.module.TestClass``) works too.
Refused in CI, where references are never written.
"""

from __future__ import annotations

import argparse
import os
import sys
import unittest
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

from .core.references import WRITE_VARIABLE, WRITING_CHECKS, ci_variable

__all__ = ["main"]


def _location(file: Path) -> Tuple[Path, str]:
    """The folder to import from and the module name of a test file: up through the
    packages (folders with __init__.py) it is in, as unittest's discovery and pytest do."""
    top, parts = file.parent, [file.stem]
    while (top / "__init__.py").is_file():
        parts.insert(0, top.name)
        top = top.parent
    return top, ".".join(parts)


def _load(test_id: str) -> unittest.TestSuite:
    if "::" in test_id or test_id.endswith(".py"):
        path, *rest = test_id.split("::")
        file = Path(path).resolve()
        if not file.is_file():
            raise SystemExit(f"write-references: no test file {path}")
        top, module = _location(file)
        name = ".".join([module, *rest])
    else:
        top, name, rest = Path.cwd(), test_id, test_id.split(".")
    if str(top) not in sys.path:
        sys.path.insert(0, str(top))
    suite = unittest.defaultTestLoader.loadTestsFromName(name)
    if rest and rest[-1].startswith("test"):
        return suite
    return unittest.TestSuite(
        test for test in _tests(suite) if test._testMethodName in WRITING_CHECKS
    )


def _tests(suite: unittest.TestSuite) -> Iterator[unittest.TestCase]:
    for item in suite:
        if isinstance(item, unittest.TestSuite):
            yield from _tests(item)
        else:
            yield item


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dltestkit",
        description="dltestkit's commands. write-references: write the reference files of "
        "tests (their reference checks run with DLTESTKIT_WRITE_REFERENCES=1).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    writing = commands.add_parser(
        "write-references",
        help="write the reference files of the given tests",
        description="Run the reference checks of the given tests so that each writes its "
        "reference file. A test id is what a failure names: "
        "path/to/test_file.py::TestClass::test_reference_outputs, a class or a file.",
    )
    writing.add_argument("tests", nargs="+", metavar="TEST_ID")
    arguments = parser.parse_args(argv)
    ci = ci_variable()
    if ci:
        print(
            f"write-references: {ci} is set; references are never written in CI. Write them on "
            "your machine and commit them.",
            file=sys.stderr,
        )
        return 2
    suite = unittest.TestSuite(_load(test_id) for test_id in arguments.tests)
    if suite.countTestCases() == 0:
        print("write-references: the tests given have no reference check", file=sys.stderr)
        return 2
    before = os.environ.get(WRITE_VARIABLE)
    os.environ[WRITE_VARIABLE] = "1"
    try:
        result = unittest.TextTestRunner(verbosity=2).run(suite)
    finally:
        if before is None:
            del os.environ[WRITE_VARIABLE]
        else:
            os.environ[WRITE_VARIABLE] = before
    written = [reason for _, reason in result.skipped if reason.startswith("wrote the reference")]
    print(f"\n{len(written)} reference file(s) written:")
    for reason in written:
        print("  " + reason.split(" (")[0].removeprefix("wrote the reference "))
    return 0 if result.wasSuccessful() else 1


if __name__ == "__main__":
    sys.exit(main())
