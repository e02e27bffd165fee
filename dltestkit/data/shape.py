"""test_sample_shape: every sample's input has the declared shape."""

from __future__ import annotations

from ..core.contract import check
from .contract import LOADING, DatasetContract
from .positions import listed
from .samples import as_key, shape_text

__all__ = ["SampleShape"]


class SampleShape(DatasetContract):
    """The shape of each sample's input."""

    # -- the checks ---------------------------------------------------------------------------
    @check(reads=(*LOADING, "sample_shape"))
    def test_sample_shape(self) -> None:
        """Check that every scanned sample of every split has an input of shape ``sample_shape``.

        Catches samples of the wrong shape: a missing channel dimension, a resize or pad
        that is not applied to every sample.
        """
        expected = tuple(self._get_or_skip("sample_shape"))
        for name in self.splits:
            with self.subTest(split=name):
                scan = self._loaded(name).scan
                wrong = {key: seen for key, seen in scan.shapes.items() if key[1] != expected}
                if wrong:
                    count = sum(seen.count for seen in wrong.values())
                    shapes = "; ".join(
                        f"{shape_text(*key)} at {listed(seen)}"
                        for key, seen in sorted(wrong.items(), key=lambda item: repr(item[0]))
                    )
                    if not scan.nested:
                        self.fail(
                            f"split {name!r}: {count} of {scan.count} samples do not have "
                            f"sample_shape {expected}: {shapes}. Fix the split's transforms "
                            "(resize, pad, channel dimension) or self.sample_shape."
                        )
                    fitting = sorted({path for path, shape in scan.shapes if shape == expected})
                    example = f", e.g. self.input_key = {as_key(fitting[0])!r}" if fitting else ""
                    self.fail(
                        f"split {name!r}: {count} of the {scan.tensors} input tensors of "
                        f"{scan.count} samples do not have sample_shape {expected}: {shapes}. "
                        "Every tensor of a nested input must have sample_shape: fix the "
                        "split's transforms or self.sample_shape, or check one tensor of the "
                        f"input by setting self.input_key to its path{example}."
                    )
