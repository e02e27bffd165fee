"""Sphinx directives that write the reference from the code (dltestkit.reference).

```{dltestkit-checks}
```                                   every check of every mixin, a table per mixin

```{dltestkit-checks} ModelTests
```                                   the checks of one mixin (inherited ones included)

```{dltestkit-options} ModelTests
```                                   every option the mixin reads

```{dltestkit-reads} ModelTests test_output_shape
```                                   the options one check reads ("Reads." line)

```{dltestkit-contract}
```                                   the required and optional options of every mixin

```{dltestkit-api}
```                                   every public name of dltestkit.__all__

```{dltestkit-house}
```                                   the wings of the package, a picture and a table
"""

from __future__ import annotations

from typing import Any, Dict, List

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective

import dltestkit
from dltestkit import reference
from dltestkit.core.contract import checks_of


class _Directive(SphinxDirective):
    optional_arguments = 1

    def mixin(self) -> Any:
        name = self.arguments[0]
        if name not in reference.PAGES:
            raise self.error(f"{name} is not a public dltestkit mixin ({list(reference.PAGES)})")
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


class ChecksDirective(_Directive):
    def lines(self) -> List[str]:
        mixins = [self.mixin()] if self.arguments else reference.public_mixins()
        return reference.check_table(mixins)


class OptionsDirective(_Directive):
    required_arguments = 1
    optional_arguments = 0

    def lines(self) -> List[str]:
        return reference.option_list(self.mixin())


class ReadsDirective(_Directive):
    required_arguments = 2
    optional_arguments = 0

    def lines(self) -> List[str]:
        mixin, check = self.mixin(), self.arguments[1]
        if check not in checks_of(mixin):
            raise self.error(f"{check} is not a check of {mixin.__name__}")
        return [reference.reads_line(mixin, check)]


class ContractDirective(_Directive):
    optional_arguments = 0

    def lines(self) -> List[str]:
        return reference.contract_table(reference.public_mixins())


class ApiDirective(_Directive):
    optional_arguments = 0

    def lines(self) -> List[str]:
        return ["```{eval-rst}", *reference.api_lines(), "```"]


class HouseDirective(_Directive):
    optional_arguments = 0

    def lines(self) -> List[str]:
        return reference.house_table()

    def run(self) -> List[nodes.Node]:
        picture = nodes.raw("", reference.house_svg(), format="html")
        return [picture, *super().run()]


def setup(app: Sphinx) -> Dict[str, Any]:
    app.add_directive("dltestkit-checks", ChecksDirective)
    app.add_directive("dltestkit-options", OptionsDirective)
    app.add_directive("dltestkit-reads", ReadsDirective)
    app.add_directive("dltestkit-contract", ContractDirective)
    app.add_directive("dltestkit-api", ApiDirective)
    app.add_directive("dltestkit-house", HouseDirective)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
