"""Reference tables generated from the code: the checks of each mixin and their contracts.

The documentation's check overviews and attribute tables, the mixins' docstrings and the
README's list of checks all come from here, so that they cannot drift from the code. Each
check's docstring has a first line "Check that ..." and a paragraph "Catches ...".
"""

from __future__ import annotations

import inspect
from typing import Dict, List, Sequence, Tuple, Type

from ._base import Attribute, CheckMixin, checks_of, shared_attributes

__all__ = [
    "PAGES",
    "attribute_table",
    "catches",
    "check_anchor",
    "check_table",
    "contract_table",
    "home_mixin",
    "own_checks",
    "public_mixins",
    "summary",
]

#: The documentation page of each public mixin, in reading order.
PAGES: Dict[str, str] = {
    "DatasetTests": "datasets",
    "ModelTests": "models",
    "SequenceModelTests": "sequence-models",
    "TrainerTests": "trainers",
    "DistributedModelTests": "distributed",
    "DistributedTrainerTests": "distributed",
}


Mixin = Type[CheckMixin]


def public_mixins() -> List[Mixin]:
    import dltestkit

    return [getattr(dltestkit, name) for name in PAGES]


def home_mixin(mixin: type, check: str) -> str:
    """The name of the public mixin that defines ``check`` (where it is documented)."""
    for base in mixin.__mro__:
        if check in vars(base) and vars(base).get("_mixin_name") in PAGES:
            return str(vars(base)["_mixin_name"])
    raise LookupError(f"{check} is not defined by a public mixin")


def own_checks(mixin: type) -> Tuple[str, ...]:
    """The checks ``mixin`` itself defines (not those it inherits)."""
    return tuple(name for name in checks_of(mixin) if home_mixin(mixin, name) == mixin.__name__)


def check_anchor(mixin_name: str, check: str) -> str:
    """The label of a check's section: ``models-test-output-shape``."""
    return f"{PAGES[mixin_name]}-{check.replace('_', '-')}"


def _docstring(mixin: type, check: str) -> List[str]:
    doc = inspect.getdoc(getattr(mixin, check)) or ""
    return [" ".join(paragraph.split()) for paragraph in doc.split("\n\n")]


def summary(mixin: type, check: str) -> str:
    """The first line of the check's docstring ("Check that ...")."""
    return _docstring(mixin, check)[0]


def catches(mixin: type, check: str) -> str:
    """The "Catches ..." paragraph of the check's docstring, without the word "Catches"."""
    for paragraph in _docstring(mixin, check):
        if paragraph.startswith("Catches "):
            return paragraph[len("Catches ") :].rstrip(".")
    raise LookupError(f"{mixin.__name__}.{check} has no 'Catches ...' paragraph")


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    return [_row(header), _row(["---"] * len(header)), *(_row(row) for row in rows)]


def check_table(mixins: Sequence[Mixin], links: bool = True) -> List[str]:
    """Markdown lines of a table of the checks: mixin (when several), check, what it catches.
    Each check appears under the mixin that defines it."""
    rows = []
    for mixin in mixins:
        names = own_checks(mixin) if len(mixins) > 1 else checks_of(mixin)
        for position, name in enumerate(names):
            home = home_mixin(mixin, name)
            check = f"[`{name}`](#{check_anchor(home, name)})" if links else f"`{name}`"
            label = (
                f"[`{mixin.__name__}`]({PAGES[mixin.__name__]}.md)"
                if links
                else f"`{mixin.__name__}`"
            )
            first = [label if position == 0 else ""] if len(mixins) > 1 else []
            rows.append([*first, check, catches(mixin, name)])
    header = (["mixin"] if len(mixins) > 1 else []) + ["check", "catches"]
    return _table(header, rows)


def _read_by(attribute: Attribute, mixin: Mixin) -> str:
    if not attribute.read_by:
        return "every check"
    return ", ".join(f"`{name}`" for name in attribute.read_by)


def attribute_table(mixin: Mixin) -> List[str]:
    """Markdown lines of a table of every attribute ``mixin`` reads (its own and inherited):
    attribute, default, the checks that read it, meaning."""
    rows = []
    declarations = mixin._declarations()
    shared = shared_attributes()  # last: every mixin reads them
    names = [name for name in declarations if name not in shared] + shared
    for name in names:
        attribute, _ = declarations[name]
        meaning = attribute.meaning[0].upper() + attribute.meaning[1:]
        text = f"{meaning}, e.g. `{attribute.example}`."
        if attribute.details:
            text += " " + attribute.details
        rows.append([f"`{name}`", attribute.describe_default(), _read_by(attribute, mixin), text])
    return _table(["attribute", "default", "read by", "meaning"], rows)


def contract_table(mixins: Sequence[Mixin]) -> List[str]:
    """Markdown lines of a table of the required and the optional attributes of each mixin
    (those every mixin reads, such as ``seed``, in a row of their own)."""
    rows = []
    shared = shared_attributes()
    for mixin in mixins:
        declarations = mixin._attributes()
        required = [f"`{n}`" for n, a in declarations.items() if a.required]
        optional = [f"`{n}`" for n, a in declarations.items() if not a.required and n not in shared]
        rows.append(
            [
                f"[`{mixin.__name__}`]({PAGES[mixin.__name__]}.md)",
                ", ".join(required),
                ", ".join(optional),
            ]
        )
    rows.append(["every mixin", "", ", ".join(f"`{name}`" for name in shared)])
    return _table(["mixin", "required", "optional"], rows)
