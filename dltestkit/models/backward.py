"""The backward pass of a comparison: an eval-mode pass that cannot be differentiated (a state
changed in place, the model's own backward code refusing eval mode) leaves the gradients out of
the comparison, said once in a skipped part, rather than failing the check."""

from __future__ import annotations

from typing import Any

import torch

from ..core.messages import no_eval_gradients

__all__ = ["compared_backward"]


def compared_backward(case: Any, loss: torch.Tensor, training: bool, comparison: str) -> bool:
    """``loss.backward()`` for a check (``case``) that compares gradients; False (and the
    parameters' ``.grad`` to be ignored) where an eval-mode pass cannot be differentiated,
    which the first time in the check is a skipped part: ``comparison`` (what the check
    compares, and in which mode), why no gradient can be taken, and that the outputs were
    compared. Any other exception is raised."""
    try:
        torch.autograd.backward(loss)
        return True
    except Exception as exc:
        refused = None if training else no_eval_gradients(exc)
        if refused is None:
            raise
    if not getattr(case, "_said_gradients_refused", False):
        case._said_gradients_refused = True
        case._skip_part(
            "gradients",
            f"{comparison}, and {refused}; the outputs were compared, the gradients not",
        )
    return False
