"""Which samples a training DataLoader hands out, watched where it gets their indices from."""

from __future__ import annotations

import operator
from typing import Any, Iterator, List, Optional

from torch.utils.data import BatchSampler, DataLoader, IterableDataset

__all__ = ["RecordingSampler", "watch_indices"]


class RecordingSampler:
    """Takes the place of what hands out a DataLoader's indices (its sampler, or its batch
    sampler, which hands out lists of indices) and notes the indices, one list per pass
    (epoch); everything else is the sampler's."""

    def __init__(self, sampler: Any, dataset_size: int, batches: bool) -> None:
        self.sampler = sampler
        self.dataset_size = dataset_size
        self.batches = batches  # whether the sampler hands out batches of indices
        self.epochs: List[List[Any]] = []
        self.largest_batch = 1

    def __iter__(self) -> Iterator[Any]:
        seen: List[Any] = []
        self.epochs.append(seen)
        for item in self.sampler:
            if self.batches:
                batch = [_index(index) for index in item]
                seen.extend(batch)
                self.largest_batch = max(self.largest_batch, len(batch))
            else:
                seen.append(_index(item))
            yield item

    def __len__(self) -> int:
        return len(self.sampler)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sampler, name)


def _index(index: Any) -> Any:
    """A sample's index as an int (from a tensor or NumPy number too); other keys as they are."""
    try:
        return operator.index(index)
    except TypeError:
        return index


def watch_indices(loader: DataLoader[Any]) -> Optional[RecordingSampler]:
    """Put a recorder where ``loader`` gets its indices from; None for a loader of an
    IterableDataset, whose samples have no indices."""
    # Accelerate's prepared loader passes for a DataLoader (its __class__ says so) but
    # iterates the DataLoader it wraps, whose indices are the ones to watch.
    inner = vars(loader).get("base_dataloader")
    while isinstance(inner, DataLoader):
        loader, inner = inner, vars(inner).get("base_dataloader")
    if isinstance(loader.dataset, IterableDataset):
        return None
    size = len(loader.dataset)  # type: ignore[arg-type]
    batches = loader.batch_sampler
    recorder: RecordingSampler
    if type(batches) is BatchSampler:  # batch_size=...: the sampler's indices, in batches
        recorder = RecordingSampler(batches.sampler, size, batches=False)
        batches.sampler = recorder
    elif batches is not None:  # batch_sampler=...: the lists of indices it hands out
        recorder = RecordingSampler(batches, size, batches=True)
        object.__setattr__(loader, "batch_sampler", recorder)  # DataLoader forbids it
    else:  # batch_size=None: one sample at a time
        recorder = RecordingSampler(loader.sampler, size, batches=False)
        object.__setattr__(loader, "sampler", recorder)
    return recorder
