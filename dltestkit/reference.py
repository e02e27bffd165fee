"""The reference generated from the code: the checks of each mixin, the options they read, the
public names.

The documentation's check overviews, option lists and "Reads." lines, the mixins' docstrings,
the API page and the README's list of checks all come from here, so that they cannot drift
from the code. Each check's docstring has a first line "Check that ..." and a paragraph
"Catches ...".
"""

from __future__ import annotations

import inspect
from typing import Dict, List, Sequence, Tuple, Type

from .core.contract import SHARED, CheckMixin, checks_of, reads_of
from .core.options import Option

__all__ = [
    "PAGES",
    "api_lines",
    "catches",
    "check_anchor",
    "check_table",
    "contract_table",
    "home_mixin",
    "option_list",
    "own_checks",
    "public_mixins",
    "read_by",
    "reads_line",
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
    "TrainingStackTests": "model-stack",
    "ExportTests": "model-stack",
}

Mixin = Type[CheckMixin]


def public_mixins() -> List[Mixin]:
    import dltestkit

    return [getattr(dltestkit, name) for name in PAGES]


def home_mixin(mixin: type, check: str) -> str:
    """The name of the public mixin whose page documents ``check``: the suite of the feature
    mixin that defines it."""
    for base in mixin.__mro__:
        if check in vars(base):
            suite = str(getattr(base, "_suite", ""))
            if suite in PAGES:
                return suite
    raise LookupError(f"{check} is not defined by a public mixin")


def own_checks(mixin: type) -> Tuple[str, ...]:
    """The checks documented with ``mixin`` (not those it takes from another public mixin)."""
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
    """Markdown lines: for each mixin, a small table of its checks (check, what it catches);
    with several mixins, each under a line naming it, its own checks only."""
    lines: List[str] = []
    for mixin in mixins:
        names = own_checks(mixin) if len(mixins) > 1 else checks_of(mixin)
        rows = []
        for name in names:
            home = home_mixin(mixin, name)
            check = f"[`{name}`](#{check_anchor(home, name)})" if links else f"`{name}`"
            rows.append([check, catches(mixin, name)])
        if len(mixins) > 1:
            label = (
                f"[`{mixin.__name__}`]({PAGES[mixin.__name__]}.md)"
                if links
                else f"`{mixin.__name__}`"
            )
            lines += ["", f"**{label}**", ""]
        lines += _table(["check", "catches"], rows)
    return lines


def read_by(mixin: Mixin, name: str) -> Tuple[str, ...]:
    """The checks of ``mixin`` that read option ``name`` (every check, for the shared ones)."""
    if name in SHARED:
        return checks_of(mixin)
    return tuple(check for check in checks_of(mixin) if name in reads_of(mixin, check))


def _options(mixin: Mixin) -> List[Option]:
    """The options of a mixin, those every mixin reads last."""
    declared = list(mixin._options().values())
    return sorted(declared, key=lambda option: option.name in SHARED)


def option_list(mixin: Mixin) -> List[str]:
    """Markdown lines of a definition list of every option ``mixin`` reads: the name, its
    type, its default and the checks that read it, then what it means."""
    lines: List[str] = []
    for declared in _options(mixin):
        readers = read_by(mixin, declared.name)
        every = declared.name in SHARED or set(readers) == set(checks_of(mixin))
        read = "every check" if every else ", ".join(f"`{name}`" for name in readers)
        kind = f"`{declared.annotation}`; " if declared.annotation else ""
        default = declared.describe_default(readers)
        meaning = declared.meaning[0].upper() + declared.meaning[1:]
        text = f"{meaning}, e.g. `{declared.example}`."
        if declared.details:
            text += " " + declared.details
        lines += [
            f"`{declared.name}` ({kind}default: {default}; read by {read or 'no check'})",
            f": {text}",
            "",
        ]
    return lines


def reads_line(mixin: Mixin, check: str) -> str:
    """The "Reads." line of a check's section: the options it reads, ``seed`` last."""
    names = reads_of(mixin, check)
    return "**Reads.** " + ", ".join(f"`{name}`" for name in names) + "."


def contract_table(mixins: Sequence[Mixin]) -> List[str]:
    """Markdown lines of a table of the required and the optional options of each mixin
    (those every mixin reads, such as ``seed``, in a row of their own)."""
    rows = []
    for mixin in mixins:
        declared = mixin._options()
        required = [f"`{n}`" for n, o in declared.items() if o.required]
        optional = [f"`{n}`" for n, o in declared.items() if not o.required and n not in SHARED]
        rows.append(
            [
                f"[`{mixin.__name__}`]({PAGES[mixin.__name__]}.md)",
                ", ".join(required),
                ", ".join(optional),
            ]
        )
    rows.append(["every mixin", "", ", ".join(f"`{name}`" for name in SHARED)])
    return _table(["mixin", "required", "optional"], rows)


def api_lines() -> List[str]:
    """reStructuredText lines documenting every public name, in ``dltestkit.__all__`` order:
    the mixins with their checks, then the functions and exceptions."""
    import dltestkit

    lines = [".. currentmodule:: dltestkit", ""]
    for name in dltestkit.__all__:
        value = getattr(dltestkit, name)
        if isinstance(value, type) and issubclass(value, CheckMixin):
            checks = ", ".join(checks_of(value))
            lines += [f".. autoclass:: {name}", f"   :members: {checks}", ""]
        elif isinstance(value, type) and issubclass(value, BaseException):
            lines += [f".. autoexception:: {name}", ""]
        else:
            lines += [f".. autofunction:: {name}", ""]
    return lines


# -- the house: the wings of the package and what flows between them -------------------------
def _wing_of(module: str) -> str:
    """The wing a module belongs to: ``dltestkit.models.batch`` -> ``models``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "dltestkit"


def house() -> Dict[str, Dict[str, object]]:
    """Every wing of the package (its folder, or a top-level module): its first docstring
    paragraph, its modules with their lines, and the modules of the other wings it imports.
    Read from the source with ``ast``, so that the picture cannot drift from the code."""
    import ast
    import importlib
    import pathlib

    root = pathlib.Path(importlib.import_module("dltestkit").__file__ or "").parent
    wings: Dict[str, Dict[str, object]] = {}
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root.parent).with_suffix("")
        module = ".".join(relative.parts)
        if module.endswith(".__init__"):
            module = module[: -len(".__init__")]
        wing = _wing_of(module)
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
        info = wings.setdefault(wing, {"doc": "", "modules": {}, "uses": {}})
        folder_doc = path.name == "__init__.py" and len(relative.parts) == 2
        if folder_doc or (wing == module.split(".")[-1] and not info["doc"]):
            info["doc"] = (ast.get_docstring(tree) or "").split("\n\n")[0].replace("\n", " ")
        modules = info["modules"]
        assert isinstance(modules, dict)
        modules[module] = len(source.splitlines())
        uses = info["uses"]
        assert isinstance(uses, dict)
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom) or not node.level:
                continue
            base = package.split(".")
            base = base[: len(base) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            other = _wing_of(target)
            if other != wing:
                uses.setdefault(other, set()).add(
                    target.split(".", 1)[1] if "." in target else target
                )
    return wings


def house_floors() -> List[List[str]]:
    """The wings by floor: a wing stands above every wing it uses (floor 0 uses none)."""
    wings = house()
    floor: Dict[str, int] = {}

    def height(name: str) -> int:
        if name not in floor:
            uses = wings[name]["uses"]
            assert isinstance(uses, dict)
            floor[name] = 1 + max((height(other) for other in uses if other in wings), default=-1)
        return floor[name]

    for name in wings:
        height(name)
    top = max(floor.values())
    return [sorted(n for n in wings if floor[n] == level) for level in range(top, -1, -1)]


def house_svg() -> str:
    """The house as an SVG picture: a box per wing on its floor (the top floor first), an
    arrow from each wing to every wing it uses."""
    floors = house_floors()
    wings = house()
    width, box_w, box_h, gap_y = 880, 150, 46, 70
    places: Dict[str, Tuple[float, float]] = {}
    for level, names in enumerate(floors):
        step = width / (len(names) + 1)
        for position, name in enumerate(names):
            places[name] = (step * (position + 1), 30 + level * (box_h + gap_y))
    height = 30 + len(floors) * (box_h + gap_y)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
        'font-family="sans-serif" font-size="13">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" '
        'markerHeight="7" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#667"/></marker></defs>',
    ]
    for name, info in wings.items():
        uses = info["uses"]
        assert isinstance(uses, dict)
        x1, y1 = places[name]
        for other in sorted(uses):
            if other in places:
                x2, y2 = places[other]
                parts.append(
                    f'<line x1="{x1:.0f}" y1="{y1 + box_h:.0f}" x2="{x2:.0f}" y2="{y2:.0f}" '
                    'stroke="#667" stroke-width="1.2" marker-end="url(#arrow)"/>'
                )
    for name, (x, y) in places.items():
        modules = wings[name]["modules"]
        assert isinstance(modules, dict)
        label = f"{name}/" if len(modules) > 1 else f"{name}.py"
        lines = sum(modules.values())
        parts.append(
            f'<rect x="{x - box_w / 2:.0f}" y="{y:.0f}" width="{box_w}" height="{box_h}" rx="6" '
            'fill="#e8eef6" stroke="#7a8aa0"/>'
            f'<text x="{x:.0f}" y="{y + 20:.0f}" text-anchor="middle" font-weight="bold">'
            f"{label}</text>"
            f'<text x="{x:.0f}" y="{y + 37:.0f}" text-anchor="middle" fill="#556">'
            f"{len(modules)} module{'s' if len(modules) > 1 else ''}, {lines} lines</text>"
        )
    parts.append("</svg>")
    return "\n".join(parts)


def house_table() -> List[str]:
    """Markdown lines: each wing, what it holds, and the modules of other wings it uses."""
    rows = []
    for level in house_floors():
        for name in level:
            info = house()[name]
            uses = info["uses"]
            assert isinstance(uses, dict)
            taken = ", ".join(f"`{module}`" for names in uses.values() for module in sorted(names))
            rows.append([f"`{name}`", str(info["doc"]), taken or "nothing"])
    return _table(["wing", "what it holds", "what it uses of the wings below"], rows)
