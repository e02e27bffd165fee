"""The graph breaks torch.compile's Dynamo counted, in one line each: what the compile checks
of the model (test_compile) and of the trainer (test_compiled_training) say about them."""

from __future__ import annotations

from typing import Dict, List

__all__ = ["counted_breaks", "reason_text"]


def reason_text(message: str) -> str:
    """A graph break's kind and explanation from Dynamo's message, in one line."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    kind = lines[0] if lines else "graph break"
    explanation = next(
        (line[len("Explanation:") :].strip() for line in lines if line.startswith("Explanation:")),
        "",
    )
    return f"{kind} ({explanation})" if explanation else kind


def counted_breaks(before: Dict[str, int], listed_already: List[str]) -> List[str]:
    """The graph breaks Dynamo counted since ``before`` (its counters of graph breaks then)
    that ``listed_already`` does not hold: a break in a frame of which no graph was
    compiled (Tensor.item() in BatchNorm(momentum=None)'s training forward) reaches no
    backend, so only Dynamo's counters name it (without its line)."""
    from torch._dynamo.utils import counters

    found = []
    for message, count in counters["graph_break"].items():
        text = reason_text(message)
        if count > before.get(message, 0) and not any(
            entry.startswith(text) for entry in listed_already
        ):
            found.append(text)
    return list(dict.fromkeys(found))
