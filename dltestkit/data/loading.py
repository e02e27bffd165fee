"""test_data_loading: every split loads as a DataLoader with workers loads it."""

from __future__ import annotations

from ..core.contract import check
from ..core.messages import exception_text, forget
from .callables import describe_callable
from .contract import LOADING, DatasetContract, differences
from .pickling import pickled_size
from .positions import SHOWN, listed, where
from .samples import shape_text
from .scan import Scan
from .split import SplitState

__all__ = ["DataLoading"]


class DataLoading(DatasetContract):
    """Loading with worker processes, as training does."""

    @check(reads=(*LOADING, "sample_shape", "num_classes"))
    def test_data_loading(self) -> None:
        """Check that every split pickles, loads and batches with and without worker processes,
        with equal results.

        Catches datasets that cannot be pickled (so fail with spawned workers), samples that
        raise, are no tensors or cannot be batched, a wrong len(), streams that give every
        worker the whole data, workers that load other data than the main process, workers
        that hang.
        """
        for name in self.splits:
            with self.subTest(split=name):
                state = self._state(name)
                try:
                    pickled_size(self.splits[name])
                except Exception as exc:
                    text = exception_text(exc)
                    forget(exc)
                    self.fail(
                        f"split {name!r} cannot be pickled ({text}), so DataLoader workers "
                        "started with spawn or forkserver (the default on macOS, Windows and, "
                        "from Python 3.14, Linux) fail. Replace lambdas and functions defined "
                        "inside functions with module-level functions or classes, and open "
                        "files and connections lazily (on first use, or in a worker_init_fn) "
                        "instead of in __init__."
                    )
                state.probes  # noqa: B018 (loaded from a copy of the split: pickled, unpickled)
                if state.unpickling_error is not None:
                    self.fail(
                        f"split {name!r} can be pickled but not unpickled "
                        f"({state.unpickling_error}), so DataLoader workers started with "
                        "spawn or forkserver (the default on macOS, Windows and, from Python "
                        "3.14, Linux) fail. Check the split's __getstate__ and __setstate__ "
                        "(or __reduce__): what __setstate__ needs must be in the state."
                    )
                problem = self._load_problem(name, state)
                if problem is not None:
                    self.fail(problem[1])
                self._skip_if_out_of_time(name, state)
                scan = state.scan
                if state.stream:
                    self._check_stream(name, state)
                elif name not in self.augmented_splits:
                    different = self._compared(name, state)
                    if different and self._random(state, sorted(different)):
                        self.skipTest(
                            f"split {name!r} gives different inputs on every load, so "
                            "the loads of workers and of the main process cannot be "
                            "compared; see test_augmentation"
                        )
                    if different:
                        self.fail(
                            f"split {name!r}: inputs loaded by DataLoader worker processes "
                            "differ from those loaded in the main process: "
                            f"{differences(different)}, while two loads in the main process "
                            "agree. Workers must give the same data: look for state that is "
                            "changed while loading (a cache, a counter), a file handle opened in "
                            "__init__ and shared by the workers, or code that depends on "
                            "torch.utils.data.get_worker_info()."
                        )
                if scan.collate_error:
                    self._check_batching(name, scan)

    def _check_stream(self, name: str, state: SplitState) -> None:
        scan = state.scan
        repeats = scan.repeats()
        if repeats.found:
            example = (
                f" (e.g. {where(repeats.example[0])} = {where(repeats.example[1])})"
                if repeats.example is not None
                else ""
            )
            aligned = (
                f", {repeats.aligned} of them as the same sample number of each worker"
                if repeats.aligned
                else ""
            )
            self.fail(
                f"split {name!r}: the DataLoader workers read the same samples: "
                f"{repeats.spread} of the {repeats.groups} inputs read more than once were "
                f"read once by each of several of the {len(scan.per_worker)} workers"
                f"{example}{aligned}; were they duplicates within the stream, a stream that "
                f"gives each worker its own shard would have given about "
                f"{repeats.groups - repeats.expected:.0f} of them to one worker twice, not "
                f"{repeats.groups - repeats.spread}. Each worker reads the whole stream (or the "
                "same shards) instead of its own shard, so every epoch holds the data up to "
                f"{self.num_workers} times. Give each worker its part in __iter__ with "
                "torch.utils.data.get_worker_info() (or set self.worker_init_fn to the "
                "worker_init_fn that does it)."
            )
        if scan.overrun:
            self.fail(
                f"split {name!r}: the stream gives more samples than len() says "
                f"({state.size}): the DataLoader's {self.num_workers} workers had read "
                f"{scan.count} and it had not ended, so the scan stopped there (an endless "
                "stream would be read for ever). Make __len__ count the samples __iter__ gives "
                "over all workers; a stream that never ends has no __len__ (then set "
                "self.max_samples to the number of samples to scan)."
            )
        if scan.complete and state.size is not None and scan.count != state.size:
            self.fail(
                f"split {name!r}: the DataLoader's {self.num_workers} workers read "
                f"{scan.count} samples from the stream, but len() says {state.size}; make "
                "__len__ count the samples __iter__ gives (over all workers)."
            )
        if scan.complete and name not in self.augmented_splits:
            missing = [
                p
                for p, probe in sorted(state.probes.items())
                if probe.hash is not None and not probe.constant and probe.hash not in scan.hashes
            ]
            if missing:
                self.fail(
                    f"split {name!r}: {len(missing)} of the first {len(state.probes)} samples "
                    f"read in the main process were read by no DataLoader worker "
                    f"({listed(missing)}): the workers read other data than the main process "
                    "(shards that leave data out, code that depends on the worker), or the "
                    "stream is random (then add it to self.augmented_splits)."
                )

    def _check_batching(self, name: str, scan: Scan) -> None:
        shapes = scan.collate_shapes
        paths = [path for path, _ in shapes]
        varying = len(set(paths)) < len(paths)  # a tensor of the input with several shapes
        if (
            self._is_set("sample_shape")
            and varying
            and any(shape != tuple(self.sample_shape) for _, shape in scan.shapes)
        ):
            self.skipTest(
                f"split {name!r} has samples of different shapes, which cannot be "
                "batched; see test_sample_shape"
            )
        probe = self._first_probe(name)
        if (
            self._is_set("num_classes")
            and scan.target_problems
            # a target_key that picks a container (a detection target dict) is test_labels'
            # contract error, and says nothing about why the batch failed
            and (probe is None or probe.labels_inside is None)
        ):
            self.skipTest(
                f"split {name!r} has targets that are not class indices, which "
                "cannot be batched; see test_labels"
            )
        more = f" and {len(shapes) - SHOWN} more" if len(shapes) > SHOWN else ""
        shapes_text = (
            f"; the batch of {scan.collate_at} holds inputs of {len(shapes)} shapes: "
            f"{', '.join(shape_text(*key) for key in shapes[:SHOWN])}{more}"
            if varying
            else ""
        )
        self.fail(
            f"split {name!r}: samples cannot be batched by collate_fn "
            f"({describe_callable(self._collate_fn())}): "
            f"{scan.collate_error}{shapes_text}. Set self.collate_fn to the collate function your "
            "DataLoader uses (e.g. one that pads sequences), or fix the samples."
        )
