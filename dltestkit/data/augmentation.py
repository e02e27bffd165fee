"""test_augmentation: augmented splits are random, the others are not."""

from __future__ import annotations

from ..core.contract import check
from .contract import LOADING, DatasetContract, differences

__all__ = ["Augmentation"]


class Augmentation(DatasetContract):
    """Augmentation where it is declared, and nowhere else."""

    @check(reads=LOADING)
    def test_augmentation(self) -> None:
        """Check that samples of ``augmented_splits`` change between loads and the others are
        identical.

        Catches random augmentation leaking into evaluation data, or missing from the
        training data.
        """
        for name in self.splits:
            with self.subTest(split=name):
                state = self._loaded(name)
                if state.stream:
                    self.skipTest(
                        f"split {name!r} is an IterableDataset: comparing two loads "
                        "of the same sample needs indices"
                    )
                different = self._compared(name, state)
                probes = sorted(state.probes)
                if name in self.augmented_splits and not different:
                    self.fail(
                        f"split {name!r} is in augmented_splits, but loading indices {probes} "
                        "twice gave identical inputs each time: no random augmentation is "
                        "applied. Add it to the split's transforms, or remove the split from "
                        "self.augmented_splits (or raise self.probe_count for an augmentation "
                        "that changes few samples)."
                    )
                if (
                    name not in self.augmented_splits
                    and different
                    and self._random(state, sorted(different))
                ):
                    self.fail(
                        f"split {name!r} is not in augmented_splits, but loading the same index "
                        f"twice gave different inputs: {differences(different)}. Remove the "
                        "random transform from this split (evaluation data must be "
                        "deterministic), or add the split to self.augmented_splits."
                    )
