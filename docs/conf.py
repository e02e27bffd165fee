"""Sphinx configuration of the dltestkit documentation.

Build the pages (the docs must build without a single warning)::

    sphinx-build -W --keep-going -b html docs docs/_build/html

and run every code snippet of the pages, comparing what it prints::

    sphinx-build -W -b doctest docs docs/_build/doctest

When a check's message changes, ``python docs/update_outputs.py`` rewrites the output blocks
that no longer match.
"""

from __future__ import annotations

import doctest
import multiprocessing
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Document (and test) the dltestkit of this checkout, also when it is not installed.
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "docs" / "_ext"))

import dltestkit  # noqa: E402

# -- project ------------------------------------------------------------------------
project = "dltestkit"
author = "the dltestkit authors"
copyright = "the dltestkit authors"
release = dltestkit.__version__
version = release

# -- general ------------------------------------------------------------------------
extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.doctest",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "reference",  # docs/_ext/reference.py: the check and attribute tables, from the code
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_ext", "Thumbs.db", ".DS_Store"]
# No intersphinx: the docs must build offline.

myst_heading_anchors = 3
myst_enable_extensions = ["deflist"]

# -- autodoc ------------------------------------------------------------------------
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
napoleon_google_docstring = True
napoleon_numpy_docstring = False

# -- HTML ---------------------------------------------------------------------------
html_theme = "furo"
html_title = f"dltestkit {release}"

# -- doctest: the snippets of the pages are executed ------------------------------------
# Failure messages are long single lines; in the pages they are wrapped at spaces, which
# NORMALIZE_WHITESPACE accepts. "..." stands for numbers that may differ across platforms.
doctest_default_flags = (
    doctest.ELLIPSIS
    | doctest.NORMALIZE_WHITESPACE
    | doctest.IGNORE_EXCEPTION_DETAIL
    | doctest.DONT_ACCEPT_TRUE_FOR_1
)

# DataLoader worker processes started with spawn or forkserver re-import the module that
# defines a dataset class. The snippets' namespace is no importable module, so use fork
# (the default on Linux up to Python 3.13) where it exists. In a real test file the
# classes live in an importable module and every start method works.
if "fork" in multiprocessing.get_all_start_methods():
    multiprocessing.set_start_method("fork", force=True)

# Runs before the snippets of every page (each page has its own namespace).
doctest_global_setup = (
    f"REPO_ROOT = __import__('pathlib').Path({str(ROOT)!r})\n"
    + r'''
import sys as _sys
import types as _types
import unittest as _unittest

# Make the page's namespace look like a module called "docs_snippets", so that the
# classes a snippet defines can be pickled by reference, as module-level classes in a
# test file can (DatasetTests.test_data_loading pickles every split).
__name__ = "docs_snippets"
_module = _types.ModuleType(__name__)


def _module_getattr(name, _namespace=globals()):
    try:
        return _namespace[name]
    except KeyError:
        raise AttributeError(name) from None


_module.__getattr__ = _module_getattr
_sys.modules[__name__] = _module


class _Report(_unittest.TestResult):
    """Collects, for each problem, the lines `python -m unittest` shows about it."""

    def __init__(self):
        super().__init__()
        self.lines = []

    @staticmethod
    def _where(test, params=None, message=None):
        # a subtest stands for its test case; its message goes in brackets, its parameters
        # in parentheses, as unittest shows them
        params = dict(params or getattr(test, "params", {}))
        message = message or getattr(test, "_message", None)
        where = getattr(test, "test_case", test)._testMethodName
        if isinstance(message, str):
            where += f" [{message}]"
        if params:
            where += " (" + ", ".join(f"{k}={v!r}" for k, v in params.items()) + ")"
        return where

    def _add(self, kind, test, err, params=None, message=None):
        exc_type, exc, _ = err
        self.lines.append(
            f"{kind}: {self._where(test, params, message)}\n{exc_type.__name__}: {exc}")

    def addFailure(self, test, err):
        super().addFailure(test, err)
        self._add("FAIL", test, err)

    def addError(self, test, err):
        super().addError(test, err)
        self._add("ERROR", test, err)

    def addSubTest(self, test, subtest, err):
        super().addSubTest(test, subtest, err)
        if err is not None:
            kind = "FAIL" if issubclass(err[0], test.failureException) else "ERROR"
            self._add(kind, test, err, dict(subtest.params), subtest._message)

    def addSkip(self, test, reason):
        super().addSkip(test, reason)
        self.lines.append(f"SKIP: {self._where(test)}\n{reason}")


def show_result(test):
    """Run one check (a TestCase instance) and print what unittest reports about it:
    the header line and the exception message of every failure, error and skip
    (without the traceback), or "ok"."""
    report = _Report()
    test.run(report)
    print("\n\n".join(report.lines) if report.lines else "ok")
'''
)

doctest_global_cleanup = r"""
_sys.modules.pop("docs_snippets", None)
"""
