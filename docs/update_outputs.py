"""Rewrite what the docs show of the code: stale ```{testoutput} blocks, and README's checks.

When a check's message changes, `sphinx-build -b doctest docs <outdir>` fails on the pages
that show it. This script runs the snippets of the pages the way the doctest builder does
(same setup, same comparison flags) and replaces each output block that no longer matches
with what the snippet printed, wrapped at spaces to fit the page. Blocks that still match,
including those with "..." for varying numbers, are left alone. Review the diff afterwards
(and put back any "..." the new text needs).

    python docs/update_outputs.py                    # every page, and README's list of checks
    python docs/update_outputs.py docs/models.md     # some pages

README.md's table of checks (between its "checks" markers) is rewritten from the code
(dltestkit.reference), like the tables the documentation builds with its directives.
"""

from __future__ import annotations

import contextlib
import doctest
import io
import linecache
import re
import sys
import textwrap
from pathlib import Path
from typing import Any, Dict, List

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS))

import conf  # noqa: E402  (the doctest setup and flags; also selects the fork start method)

BLOCK = re.compile(
    r"^```\{(testsetup|testcode|testoutput|testcleanup)\}[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M
)
WIDTH = 92


#: Parts of an output that vary from run to run, written as "..." (ELLIPSIS) in the pages.
VARYING = [(re.compile(r"Ran (\d+) tests? in [0-9.]+s"), r"Ran \1 tests in ...s")]


def wrap(output: str) -> str:
    """Wrap long lines at spaces, continuation lines indented by four more spaces; parts
    that vary from run to run (a run time) become "..."."""
    for pattern, replacement in VARYING:
        output = pattern.sub(replacement, output)
    lines = []
    for line in output.rstrip("\n").split("\n"):
        indent = line[: len(line) - len(line.lstrip())]
        lines.append(
            textwrap.fill(
                line,
                width=WIDTH,
                subsequent_indent=indent + "    ",
                break_long_words=False,
                break_on_hyphens=False,
            )
            if len(line) > WIDTH
            else line
        )
    return "\n".join(lines) + "\n"


#: The file name the doctest builder gives a snippet (its group, "default", and its one example);
#: messages that quote the user's line name it.
SNIPPET = "<doctest default[0]>"


def run(code: str, namespace: Dict[str, Any], where: str = SNIPPET) -> str:
    """Run a snippet, its source readable as the doctest builder makes it (torch.compile's and
    torch.export's reports quote the line); what it printed."""
    linecache.cache[where] = (len(code), None, code.splitlines(keepends=True), where)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, where, "exec"), namespace)
    return printed.getvalue()


def update(page: Path) -> int:
    """Run the page's snippets; rewrite its stale output blocks. Returns how many changed."""
    text = page.read_text(encoding="utf-8")
    blocks = list(BLOCK.finditer(text))
    namespace: Dict[str, Any] = {}
    exec(conf.doctest_global_setup, namespace)
    for block in blocks:
        if block.group(1) == "testsetup":
            run(block.group(2), namespace, f"{page.name} (setup)")
    checker = doctest.OutputChecker()
    replacements: List[tuple] = []
    printed = ""
    for block in blocks:
        kind, body = block.group(1), block.group(2)
        line = text.count("\n", 0, block.start()) + 1
        if kind == "testcode":
            printed = run(body, namespace)
        elif kind == "testoutput" and not checker.check_output(
            body, printed, conf.doctest_default_flags
        ):
            replacements.append((block.start(2), block.end(2), wrap(printed)))
            print(f"{page.relative_to(DOCS.parent)}:{line}: output updated")
    for block in blocks:
        if block.group(1) == "testcleanup":
            run(block.group(2), namespace, f"{page.name} (cleanup)")
    exec(conf.doctest_global_cleanup, namespace)
    for start, end, new in reversed(replacements):
        text = text[:start] + new + text[end:]
    if replacements:
        page.write_text(text, encoding="utf-8")
    return len(replacements)


README = DOCS.parent / "README.md"
README_CHECKS = re.compile(r"(<!-- checks: [^\n]*-->\n)(.*?)(<!-- end of checks -->)", re.S)


def readme_checks() -> str:
    """The table of checks README.md shows, from the code."""
    from dltestkit import reference as _reference

    return "\n".join(_reference.check_table(_reference.public_mixins(), links=False)) + "\n"


def update_readme() -> bool:
    text = README.read_text(encoding="utf-8")
    new = README_CHECKS.sub(lambda m: m.group(1) + readme_checks() + m.group(3), text)
    if new != text:
        README.write_text(new, encoding="utf-8")
        print("README.md: table of checks updated")
    return new != text


def main(arguments: List[str]) -> None:
    pages = [Path(argument).resolve() for argument in arguments] or sorted(DOCS.glob("*.md"))
    changed = sum(update(page) for page in pages)
    if not arguments:
        update_readme()
    print(f"{changed} output block(s) updated in {len(pages)} page(s)")


if __name__ == "__main__":
    main(sys.argv[1:])
