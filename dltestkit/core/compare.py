"""One way to compare tensors, for every check: exact equality with NaN equal to NaN, and
``torch.testing.assert_close`` with its report for comparisons within a tolerance."""

from __future__ import annotations

import re
from typing import Any, Optional, Tuple, overload

import torch

from .paths import named_tensors

__all__ = ["dense", "first_difference", "largest_difference", "mismatch", "same", "summary"]


@overload
def dense(tensor: torch.Tensor) -> torch.Tensor: ...
@overload
def dense(tensor: None) -> None: ...
def dense(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A sparse tensor (the gradient of nn.Embedding(sparse=True)) as the dense tensor it
    stands for, to compare it by its values (two sparse tensors of the same values may list
    their entries otherwise); other tensors, and None, as they are."""
    return tensor.to_dense() if tensor is not None and tensor.is_sparse else tensor


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Exactly equal, in shape, dtype and every value; NaN where the other is NaN."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if torch.equal(a, b):
        return True
    if not (a.is_floating_point() or a.is_complex()):
        return False
    nan_a = a.isnan()
    if not bool(nan_a.any()):  # then torch.equal was the whole answer
        return False
    nan_b = b.isnan()
    return bool(torch.equal(nan_a, nan_b) and torch.equal(a[~nan_a], b[~nan_b]))


def mismatch(
    actual: torch.Tensor,
    expected: torch.Tensor,
    rtol: Optional[float] = None,
    atol: Optional[float] = None,
) -> Optional[str]:
    """What ``torch.testing.assert_close`` reports of ``actual`` and ``expected`` (by default
    the dtype's tolerances, for bfloat16 and float16 with the absolute one scaled to the
    largest value; NaN equal to NaN), or None when they are close."""
    if rtol is None and atol is None and expected.dtype in _HALF:
        rtol, atol = _half_tolerances(expected)
    try:
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, equal_nan=True)
    except AssertionError as error:
        return str(error)
    return None


#: The half-precision dtypes, and torch.testing.assert_close's default (rtol, atol) for each.
_HALF = {torch.bfloat16: (1.6e-2, 1e-5), torch.float16: (1e-3, 1e-5)}


def _half_tolerances(expected: torch.Tensor) -> Tuple[float, float]:
    """assert_close's default tolerances for a half-precision tensor, the absolute one raised
    to the relative one times the largest finite magnitude: a value near zero that is the sum
    of larger ones carries their rounding (bfloat16 keeps 8 bits: 0.4 % of them), far above
    the default atol of 1e-5; the same computation done in another order (another batch size or
    length) then differs there, by design."""
    rtol, atol = _HALF[expected.dtype]
    finite = expected.detach()[expected.detach().isfinite()]
    largest = float(finite.abs().max()) if finite.numel() else 0.0
    return rtol, max(atol, rtol * largest)


def summary(report: str) -> str:
    """An ``assert_close`` report in a few words: "3 of 8 values differ beyond
    torch.testing.assert_close's tolerances, by up to 0.12"."""
    counted = re.search(r"Mismatched elements: (\d+) / (\d+)", report)
    largest = re.search(r"Greatest absolute difference: (\S+)", report)
    if counted and largest:
        return (
            f"{counted.group(1)} of {counted.group(2)} values differ beyond "
            f"torch.testing.assert_close's tolerances, by up to {largest.group(1)}"
        )
    return " ".join(report.split())


def largest_difference(a: torch.Tensor, b: torch.Tensor) -> str:
    """The greatest absolute difference of two tensors of one shape, where neither is NaN,
    as text ("0.274"; "NaN" when every value is NaN in one of them)."""
    if a.shape != b.shape:
        return f"n/a: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    if a.dtype != b.dtype:
        return f"n/a: dtype {a.dtype} vs {b.dtype}"
    if not (a.is_floating_point() or a.is_complex()):
        return str(int((a.long() - b.long()).abs().max())) if a.numel() else "0"
    both = ~(a.isnan() | b.isnan())
    difference = (a.double() - b.double()).abs()[both]
    return f"{float(difference.max()):.3g}" if difference.numel() else "NaN"


def first_difference(first: Any, second: Any) -> Optional[Tuple[str, str]]:
    """The path of the first output tensor that differs between two runs (NaN equal to NaN),
    with the greatest difference as text; None if every tensor is the same."""
    for (path, a), (_, b) in zip(named_tensors(first), named_tensors(second)):
        if not same(a, b):
            return path, largest_difference(a, b)
    return None
