"""test_split_overlap: no input of one split is an input of another."""

from __future__ import annotations

import itertools
from typing import List, Tuple

from ..core.contract import check
from ..core.options import option
from ..core.validators import is_fraction
from .contract import LOADING, DatasetContract, order, round_up
from .positions import SHOWN, Position, where
from .samples import same
from .scan import Registered
from .split import SplitState

__all__ = ["SplitOverlap"]


class SplitOverlap(DatasetContract):
    """No sample in two splits."""

    max_shared_fraction: float = option(0.0, is_fraction, example="0.9")
    """The fraction of a split's scanned samples that may also occur in another split.

    For splits that legitimately share inputs (tabular data with few distinct feature values).
    Inputs whose values are all equal (silence, blank images) are never compared."""

    @check(reads=(*LOADING, "max_shared_fraction"))
    def test_split_overlap(self) -> None:
        """Check that no input of one split equals an input of another (splits not in
        ``augmented_splits``).

        Catches test data that is also in the training data (the same file listed in two
        splits, duplicates made before the split), which inflates test scores.
        """
        plain = [name for name in self.splits if name not in self.augmented_splits]
        if len(plain) < 2:
            self.skipTest(
                f"test_split_overlap compares the splits that are not in augmented_splits, and "
                f"there are fewer than two ({plain}); to include an augmented split, add an "
                "un-augmented view of it to self.splits under another name, e.g. "
                "self.splits['train (plain)'] = TrainData(transform=eval_transform)"
            )
        for first, second in itertools.combinations(plain, 2):
            with self.subTest(splits=(first, second)):
                one, other = self._loaded(first), self._loaded(second)
                shared = [
                    (one.scan.hashes[h], r)
                    for h, r in other.scan.hashes.items()
                    if h in one.scan.hashes
                ]
                count = sum(r.count for _, r in shared)
                fraction = count / other.scan.count if other.scan.count else 0.0
                if not count or fraction <= self.max_shared_fraction:
                    continue
                pairs = self._confirmed(one, other, shared)
                if pairs:
                    shown = ", ".join(f"{first} {where(a)} = {second} {where(b)}" for a, b in pairs)
                    self.fail(
                        f"splits {first!r} and {second!r} share inputs: {count} of the "
                        f"{other.scan.count} scanned samples of {second!r} "
                        f"({100 * fraction:.1f}%) also occur in {first!r}, e.g. {shown}. Data "
                        f"in both splits inflates the scores measured on {second!r}; remove the "
                        "duplicates from one split (compare contents, not file names). If the "
                        "splits legitimately share inputs (tabular data with few distinct "
                        "feature values), set self.max_shared_fraction = "
                        f"{round_up(fraction)} (now {self.max_shared_fraction:g}). (Inputs "
                        "whose values are all equal, like silence or a blank image, are not "
                        "compared.)"
                    )

    def _confirmed(
        self,
        one: SplitState,
        other: SplitState,
        shared: List[Tuple[Registered, Registered]],
    ) -> List[Tuple[Position, Position]]:
        """Up to five shared pairs, confirmed by comparing the inputs exactly (loaded again in
        the main process; pairs from a stream are matched by their 128-bit hash)."""
        pairs: List[Tuple[Position, Position]] = []
        ordered = sorted(shared, key=lambda pair: order(pair[1].position))
        chunk = 2 * SHOWN
        for start in range(0, len(ordered), chunk):
            candidates = [(a.position, b.position) for a, b in ordered[start : start + chunk]]
            indexed = [(a, b) for a, b in candidates if isinstance(a, int) and isinstance(b, int)]
            firsts = one.load_again([a for a, _ in indexed]) if indexed else {}
            seconds = other.load_again([b for _, b in indexed]) if indexed else {}
            for a, b in candidates:
                if isinstance(a, int) and isinstance(b, int):
                    x, y = firsts.get(a), seconds.get(b)
                    if x is None or y is None or not same(x, y):
                        continue
                pairs.append((a, b))
                if len(pairs) == SHOWN:
                    return pairs
        return pairs
