"""What the scan's DataLoader workers do: load each sample with its index (a failure stands in
for a sample that raises), inspect the samples of each batch where they are loaded, batch them
with the split's collate function, and send back a small report instead of the batch."""

from __future__ import annotations

import collections
import os
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Set, Tuple, Union

import torch
from torch.utils.data import Dataset, get_worker_info

from ..core.messages import exception_text
from .positions import Position
from .samples import Input, InputProblem, LoadFailure, Path, _combined, _digests, pick_input
from .statistics import Statistics
from .targets import MISSING, Target, batched_target, pick_target

__all__ = ["BatchReport", "Indexed", "Inspection", "Inspector"]


# -- what a worker reports about one batch -------------------------------------------------
@dataclass
class BatchReport(Statistics):
    """What a worker saw in one batch; small (no data but copies of the probe inputs)."""

    worker: int = -1
    pid: int = 0
    positions: List[Position] = field(default_factory=list)
    #: per inspected sample: (position, hash or None, target or None, constant input); a
    #: label (a target of shape ()) as the int itself, which is smaller to send
    samples: List[Tuple[Position, Optional[bytes], Union[int, Target, None], bool]] = field(
        default_factory=list
    )
    #: the shape of the targets in the batch collate_fn made, when it holds them as one
    #: tensor at target_key (None: it keeps them apart, or holds none there)
    batched_target: Optional[Tuple[int, ...]] = None
    kept: Dict[Position, Input] = field(default_factory=dict)
    collate_error: Optional[str] = None
    internal_error: Optional[str] = None


@dataclass(frozen=True)
class Inspection:
    """What the scan's workers look at; also the split's collate function."""

    input_key: Any
    target_key: Any
    collate_fn: Callable[[List[Any]], Any]
    probes: FrozenSet[Any] = frozenset()
    hash_inputs: bool = False
    stream: bool = False


class Inspector:
    """The collate function of the scan: runs in each worker on the samples of a batch,
    inspects them, batches them with the split's collate function, and returns a
    BatchReport instead of the batch."""

    def __init__(self, inspection: Inspection) -> None:
        self.inspection = inspection
        self.read = 0  # samples this worker read from a stream (each worker has its copy)

    def __call__(self, items: List[Any]) -> BatchReport:
        info = get_worker_info()
        report = BatchReport(worker=info.id if info is not None else -1, pid=os.getpid())
        try:
            self._inspect(items, report)
        except Exception:  # a bug of dltestkit, not of the data: reported as an error
            report.internal_error = traceback.format_exc()
        return report

    def _inspect(self, items: List[Any], report: BatchReport) -> None:
        check = self.inspection
        if check.stream:
            positions: List[Position] = [(report.worker, self.read + n) for n in range(len(items))]
            self.read += len(items)
            samples = list(items)
        else:
            positions = [index for index, _ in items]
            samples = [sample for _, sample in items]
        report.positions = positions
        inputs: List[Tuple[Position, Input]] = []
        labels: List[Tuple[Position, Union[int, Target, None]]] = []
        for position, sample in zip(positions, samples):
            if isinstance(sample, LoadFailure):
                report.failures.add((position, sample))
                continue
            picked = pick_input(sample, check.input_key)
            if isinstance(picked, InputProblem):
                report.input_problems.add((position, picked))
                continue
            label, problem = pick_target(sample, check.target_key)
            if problem is MISSING:
                report.unlabelled.add(position)
            elif problem is not None:
                report.target_problems.add((position, problem))
            inputs.append((position, tuple((path, t.detach()) for path, t in picked)))
            plain = label.plain if label is not None else None
            labels.append((position, label if plain is None else plain))
        if report.failures or report.input_problems:
            return
        hashes, constant = _statistics(inputs, report, check.hash_inputs or check.stream)
        report.samples = [(p, hashes.get(p), label, p in constant) for p, label in labels]
        report.kept = {
            position: tuple((path, tensor.clone()) for path, tensor in value)
            for position, value in inputs
            if position in check.probes
        }
        try:
            batch = check.collate_fn(samples)
        except Exception as exc:
            report.collate_error = exception_text(exc)
        else:
            report.batched_target = batched_target(batch, check.target_key)


def _statistics(
    inputs: List[Tuple[Position, Input]], report: BatchReport, hash_inputs: bool
) -> Tuple[Dict[Position, bytes], Set[Position]]:
    """Shapes, extremes and non-finite samples into ``report``; the hashes of the inputs, if
    asked for, and the positions of the constant inputs (every value equal, or none)."""
    groups: Dict[Tuple[Tuple[int, ...], torch.dtype], List[Tuple[Position, Path, torch.Tensor]]] = (
        collections.defaultdict(list)
    )
    for position, value in inputs:
        for path, tensor in value:
            shape = tuple(tensor.shape)
            groups[shape, tensor.dtype].append((position, path, tensor))
            report.shapes.add((path, shape), position)
        report.tensors += len(value)
    leaf_hashes: Dict[Tuple[Position, Path], bytes] = {}
    spans: Dict[Position, List[float]] = {}
    varying: Set[Position] = set()  # inputs with a NaN, a complex tensor, or unequal values
    nonfinite: Set[Position] = set()
    for (shape, dtype), members in groups.items():
        keys = [(position, path) for position, path, _ in members]
        flat = torch.stack([tensor for _, _, tensor in members]).reshape(len(members), -1)
        if flat.dtype == torch.bool:
            flat = flat.to(torch.uint8)
        if hash_inputs:
            leaf_hashes.update(zip(keys, _digests(shape, dtype, flat)))
        if flat.is_complex():
            varying.update(position for position, _ in keys)
            continue
        if flat.shape[1] == 0:
            continue
        if flat.is_floating_point():
            report.float_eps = max(report.float_eps, torch.finfo(flat.dtype).eps)
            finite = torch.isfinite(flat).all(dim=1)
            if not bool(finite.all()):
                ok = finite.tolist()
                for (position, _), good in zip(keys, ok):
                    if not good:
                        nonfinite.add(position)
                keys = [key for key, good in zip(keys, ok) if good]
                flat = flat[finite]
        if not keys:
            continue
        lows, highs = flat.amin(dim=1), flat.amax(dim=1)
        report.low.offer(float(lows.min()), *keys[int(lows.argmin())])
        report.high.offer(float(highs.max()), *keys[int(highs.argmax())])
        for (position, _), row_low, row_high in zip(keys, lows.tolist(), highs.tolist()):
            span = spans.get(position)
            if span is None:
                spans[position] = [row_low, row_high]
            else:
                span[0], span[1] = min(span[0], row_low), max(span[1], row_high)
    for position, _ in inputs:
        if position in nonfinite:
            report.nonfinite.add(position)
    varying |= nonfinite
    constant = {
        position
        for position, _ in inputs
        if position not in varying
        and (position not in spans or spans[position][0] == spans[position][1])
    }
    hashes = (
        {
            position: _combined([(path, leaf_hashes[position, path]) for path, _ in value])
            for position, value in inputs
        }
        if hash_inputs
        else {}
    )
    return hashes, constant


class Indexed(Dataset[Any]):
    """A map-style split whose samples come with their index; a sample that cannot be
    loaded becomes a LoadFailure instead of an exception that stops the DataLoader.

    It is what ``torch.utils.data.get_worker_info().dataset`` is in the scan's workers:
    reading or setting an attribute on it reads or sets the split's (a worker_init_fn that
    opens a file per worker and stores it on the dataset works as with your DataLoader).
    """

    def __init__(self, dataset: Any) -> None:
        object.__setattr__(self, "dataset", dataset)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Tuple[int, Any]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: List[int]) -> List[Tuple[int, Any]]:
        getitems = getattr(self.dataset, "__getitems__", None)
        batched: Optional[str] = None
        if getitems is not None:
            try:
                samples = getitems(list(indices))
            except Exception as exc:  # find the index that fails, one by one
                batched = exception_text(exc)
            else:
                if len(samples) == len(indices):
                    return list(zip(indices, samples))
                return [
                    (
                        indices[0],
                        LoadFailure(
                            f"the dataset's __getitems__ returned {len(samples)} samples for the "
                            f"{len(indices)} indices {indices[0]} to {indices[-1]}; it must "
                            "return one sample per index",
                            raised=False,
                        ),
                    )
                ]
        loaded = []
        for index in indices:
            try:
                loaded.append((index, self.dataset[index]))
            except Exception as exc:
                loaded.append((index, LoadFailure.of(exc)))
        if batched is not None and not any(isinstance(s, LoadFailure) for _, s in loaded):
            return [
                (
                    indices[0],
                    LoadFailure(
                        f"the dataset's __getitems__ raised {batched} for the indices "
                        f"{indices[0]} to {indices[-1]}, though __getitem__ loads each of them",
                        raised=False,
                    ),
                )
            ]
        return loaded

    def __getattr__(self, name: str) -> Any:
        # worker_init_fn and __iter__ code may read get_worker_info().dataset.<attribute>
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __setattr__(self, name: str, value: Any) -> None:
        # ... and set one there: a handle opened per worker
        setattr(self.dataset, name, value)

    def __delattr__(self, name: str) -> None:
        delattr(self.dataset, name)

    def __getstate__(self) -> Dict[str, Any]:
        return {"dataset": self.dataset}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        object.__setattr__(self, "dataset", state["dataset"])
