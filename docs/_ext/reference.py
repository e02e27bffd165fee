"""Sphinx directives that write the reference tables from the code (dltestkit._reference).

```{dltestkit-checks}
```                                   every check of every mixin, by mixin

```{dltestkit-checks} ModelTests
```                                   the checks of one mixin (inherited ones included)

```{dltestkit-attributes} ModelTests
```                                   every attribute the mixin reads

```{dltestkit-contract}
```                                   the required and optional attributes of every mixin
"""

from __future__ import annotations

from typing import Any, Dict, List

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective

import dltestkit
from dltestkit import _reference


class _TableDirective(SphinxDirective):
    optional_arguments = 1

    def mixin(self) -> Any:
        name = self.arguments[0]
        if name not in _reference.PAGES:
            raise self.error(f"{name} is not a public dltestkit mixin ({list(_reference.PAGES)})")
        return getattr(dltestkit, name)

    def lines(self) -> List[str]:
        raise NotImplementedError

    def run(self) -> List[nodes.Node]:
        container = nodes.container()
        source = f"<{self.name} {' '.join(self.arguments)}>"
        self.state.nested_parse(
            StringList(self.lines(), source=source), self.content_offset, container
        )
        return list(container.children)


class ChecksDirective(_TableDirective):
    def lines(self) -> List[str]:
        mixins = [self.mixin()] if self.arguments else _reference.public_mixins()
        return _reference.check_table(mixins)


class AttributesDirective(_TableDirective):
    required_arguments = 1
    optional_arguments = 0

    def lines(self) -> List[str]:
        return _reference.attribute_table(self.mixin())


class ContractDirective(_TableDirective):
    optional_arguments = 0

    def lines(self) -> List[str]:
        return _reference.contract_table(_reference.public_mixins())


def setup(app: Sphinx) -> Dict[str, Any]:
    app.add_directive("dltestkit-checks", ChecksDirective)
    app.add_directive("dltestkit-attributes", AttributesDirective)
    app.add_directive("dltestkit-contract", ContractDirective)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
