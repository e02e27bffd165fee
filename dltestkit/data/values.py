"""test_value_range: the inputs lie within their declared bounds and use them."""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch

from ..core.contract import check
from ..core.options import UNSET, option
from ..core.validators import is_fraction
from .contract import LOADING, DatasetContract, round_up
from .positions import listed, where
from .samples import Path, as_key, path_text, value_text
from .scan import Scan
from .statistics import Extreme

__all__ = ["ValueRange"]


def _is_range(value: Any) -> Optional[str]:
    if (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        and value[0] < value[1]
    ):
        return None
    return f"is {value!r}, not a (low, high) pair with low < high"


class ValueRange(DatasetContract):
    """The range of the input values."""

    value_range: Tuple[float, float] = option(UNSET, _is_range, example="(-1.0, 1.0)")
    """The inclusive (low, high) bounds of the input values."""
    range_coverage: float = option(0.1, is_fraction, example="0.1")
    """How close, as a fraction of high - low, the data must come to each bound.

    In [0, 1]; `1.0` checks the bounds only (for data that legitimately stays away from them, like
    quiet audio)."""

    @check(reads=(*LOADING, "value_range", "range_coverage"))
    def test_value_range(self) -> None:
        """Check that every sample of every split lies in ``value_range`` and the split uses
        that range.

        Catches wrong scaling (0-255, data in [0, 1] declared as [-1, 1]), values out of
        range, NaN or Inf.
        """
        low, high = self._get_or_skip("value_range")
        slack = self.range_coverage * (high - low)
        for name in self.splits:
            with self.subTest(split=name):
                scan = self._loaded(name).scan
                if scan.nonfinite:
                    self.fail(
                        f"split {name!r}: {scan.nonfinite.count} of {scan.count} samples "
                        f"contain NaN or Inf: {listed(scan.nonfinite)}. "
                        "Look for a division by a zero standard deviation, a log of 0 or a "
                        "corrupt file."
                    )
                if scan.low.position is None or scan.high.position is None:
                    self.skipTest(f"split {name!r} has no input values (empty tensors)")
                seen = (
                    f"values seen over {scan.count} samples: min {_extreme(scan.low)}, "
                    f"max {_extreme(scan.high)}"
                )
                # floating-point data may pass a bound by its rounding: 4 machine epsilons
                # of float32 (or of a coarser dtype of the data) relative to the bound
                eps = 4 * max(scan.float_eps, _FLOAT32_EPS) if scan.float_eps else 0.0
                below, above = low - eps * abs(low), high + eps * abs(high)
                if scan.low.value < below or scan.high.value > above:
                    culprit = scan.low if scan.low.value < below else scan.high
                    self.fail(
                        f"split {name!r} leaves value_range [{low}, {high}]: {seen}. Fix the "
                        "normalisation, or widen self.value_range if the data is right."
                        + _nested_hint(scan, culprit.path, "lie in value_range")
                    )
                if scan.low.value > low + slack + eps * abs(low) or (
                    scan.high.value < high - slack - eps * abs(high)
                ):
                    needed = max(scan.low.value - low, high - scan.high.value) / (high - low)
                    self.fail(
                        f"split {name!r} does not use value_range [{low}, {high}]: {seen}; each "
                        f"bound must be reached within range_coverage={self.range_coverage} of "
                        "the range. The scaling is probably wrong (e.g. data in [0, 1] declared "
                        "as [-1, 1]): fix the normalisation or self.value_range. If the data is "
                        "right (quiet audio, images that are never fully dark), set "
                        f"self.range_coverage = {round_up(needed)} (1.0 checks the bounds "
                        "only)." + _nested_hint(scan, None, "reach the bounds")
                    )


_FLOAT32_EPS = float(torch.finfo(torch.float32).eps)


def _extreme(extreme: Extreme) -> str:
    """ "0.7 (index 3)", "2.6400001 (index 9, sample[0][1])"."""
    assert extreme.position is not None
    path = f", {path_text(extreme.path)}" if extreme.path else ""
    return f"{value_text(extreme.value)} ({where(extreme.position)}{path})"


def _nested_hint(scan: Scan, culprit: Optional[Path], rule: str) -> str:
    """For a nested input: every tensor is checked; how to check one."""
    if not scan.nested:
        return ""
    others = sorted({path for path, _ in scan.shapes if path != culprit}, key=repr)
    example = f", e.g. self.input_key = {as_key(others[0])!r}" if others else ""
    return (
        f" Every tensor of a nested input must {rule}; to check one of them, set "
        f"self.input_key to its path{example}."
    )
