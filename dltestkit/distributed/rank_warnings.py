"""The warnings of the ranks, shown once in the calling process.

Every rank runs the same code, so every rank of every launch would print the same warning
(``fully_shard``'s about a unit's output that is a view, say): a check's ranks record theirs
instead and hand them back, and the calling process shows each once, where pytest's warning
summary and ``python -W`` see it.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Dict, Iterator, List, Sequence, Tuple

__all__ = ["recorded", "show_once"]

#: A warning as a rank hands it back: its message, category, file and line.
Caught = Tuple[str, Any, str, int]
#: What has been shown in this process (the registry of warnings.warn_explicit).
_SHOWN: Dict[Any, Any] = {}


@contextlib.contextmanager
def recorded() -> Iterator[List[Caught]]:
    """Record the warnings raised inside, instead of printing them; the list fills in as
    they come."""
    found: List[Caught] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield found
        finally:
            for warning in caught:
                entry = (str(warning.message), warning.category, warning.filename, warning.lineno)
                if entry not in found:
                    found.append(entry)


def show_once(caught: Sequence[Caught]) -> None:
    """Show the ranks' warnings in this process, each once, under the filters in force."""
    for message, category, filename, lineno in caught:
        warnings.warn_explicit(message, category, filename, lineno, registry=_SHOWN)
