"""test_resume_across_world_sizes: a trainer's checkpoint saved on N ranks resumes on M.

For each pair (N, M) of ``resume_world_sizes``, a run on N ranks trains one epoch, saves a
checkpoint with the trainer's own ``save_checkpoint(path)`` (called on every rank) and trains
one more; a fresh trainer on M ranks, built under another seed, loads it and trains one epoch.
The resumed trainer must hold what the saving one held (the weights and the optimizer state,
sharded ones gathered whole), load the next epoch's samples in the order an uninterrupted run
on M ranks loads them in its second epoch, and, with ``single_process_tolerance``, end with the
weights of the uninterrupted run on N ranks. Each run is a launch of its own, so that a
failure names the run it happened in.
"""

from __future__ import annotations

from typing import Any, ClassVar, Dict, List, NoReturn, Optional, Sequence, Tuple
from unittest import mock

from ..core.contract import check
from ..core.messages import listed
from ..core.options import UNSET, option
from ..core.seeds import derived_seed, make_deterministic
from ..trainers.state import difference
from .launch import DistributedError
from .rank_warnings import recorded
from .sharding import gathered
from .trainers import DistributedTraining, _state

__all__ = ["ResumeAcrossWorldSizes"]

#: What a checkpoint of sharded state should be saved with, for any number of ranks to load.
_ADVICE = (
    "Save a checkpoint that any number of ranks can load: with torch.distributed.checkpoint, "
    "every rank saves its shards (dcp.save(get_state_dict(model, optimizer), ...)) and any "
    "number of ranks loads and reshards them (dcp.load, then set_state_dict); or gather the "
    "whole state on every rank (get_state_dict with StateDictOptions(full_state_dict=True)) "
    "before rank 0 writes it. Include the optimizer state and the epoch (or the data "
    "order's position)."
)


def _is_pairs(value: Any) -> Optional[str]:
    pairs = value if isinstance(value, (list, tuple)) and value else [()]
    if all(
        isinstance(pair, (list, tuple))
        and len(pair) == 2
        and all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in pair)
        and pair[0] != pair[1]
        for pair in pairs
    ):
        return None
    return (
        f"is {value!r}, not a list of (saving ranks, loading ranks) pairs of two different "
        "positive ints"
    )


def _snapshot(test: "ResumeAcrossWorldSizes", trainer: Any) -> Dict[str, Any]:
    """What a checkpoint must carry: the model's state and the optimizer's, gathered whole (a
    collective: every rank takes it at the same point)."""
    optimizer = test._optimizer(trainer)
    return {
        "model": _state(test._model(trainer)),
        "optimizer": None if optimizer is None else gathered(optimizer.state_dict()),
    }


def _epoch(test: "ResumeAcrossWorldSizes", trainer: Any, recorder: Any) -> Optional[List[Any]]:
    """Train one epoch; the samples it loaded (None for a stream)."""
    before = len(recorder.epochs) if recorder is not None else 0
    writer = getattr(trainer, test.writer_attribute or "", None)
    if callable(getattr(writer, "add_scalar", None)):
        with mock.patch.object(writer, "add_scalar"):
            trainer.train(1)
    else:
        trainer.train(1)
    if recorder is None or len(recorder.epochs) <= before:
        return None
    return list(recorder.epochs[before])


def _uninterrupted_rank(
    rank: int, world_size: int, test: "ResumeAcrossWorldSizes", path: str
) -> Dict[str, Any]:
    """Two epochs, with the trainer's checkpoint saved to ``path`` after the first; the
    warnings raised in ``"warnings"``."""
    with recorded() as caught:
        result = _uninterrupted(rank, world_size, test, path)
    return {**result, "warnings": caught}


def _uninterrupted(
    rank: int, world_size: int, test: "ResumeAcrossWorldSizes", path: str
) -> Dict[str, Any]:
    make_deterministic(test.seed)
    trainer = test._make_rank_trainer(rank, world_size)
    try:
        missing = test._no_checkpointing(trainer)
        if missing is not None:
            return {"no_checkpointing": missing}
        recorder = test._record_samples(trainer)
        first = _epoch(test, trainer, recorder)
        test._method(trainer, "save_checkpoint_method")(path)
        saved = _snapshot(test, trainer)
        second = _epoch(test, trainer, recorder)
        return {"saved": saved, "epochs": [first, second], "end": _state(test._model(trainer))}
    finally:
        _close(test, trainer)


def _resumed_rank(
    rank: int, world_size: int, test: "ResumeAcrossWorldSizes", path: str, saved_on: int
) -> Dict[str, Any]:
    """A trainer built under another seed that loads ``path`` and trains one epoch; the
    warnings raised in ``"warnings"``."""
    with recorded() as caught:
        result = _resumed(rank, world_size, test, path, saved_on)
    return {**result, "warnings": caught}


def _resumed(
    rank: int, world_size: int, test: "ResumeAcrossWorldSizes", path: str, saved_on: int
) -> Dict[str, Any]:
    make_deterministic(derived_seed(test.seed, 1))
    trainer = test._make_rank_trainer(rank, world_size)
    try:
        recorder = test._record_samples(trainer)
        try:
            test._method(trainer, "load_checkpoint_method")(path)
        except Exception as exc:
            raise CheckpointLoadError(
                f"{test.load_checkpoint_method}(path) on {world_size} "
                f"{'rank' if world_size == 1 else 'ranks'}, of a checkpoint saved on "
                f"{saved_on}, raised {type(exc).__name__}: {exc}"
            ) from exc
        loaded = _snapshot(test, trainer)
        epoch = _epoch(test, trainer, recorder)
        return {"loaded": loaded, "epoch": epoch, "end": _state(test._model(trainer))}
    finally:
        _close(test, trainer)


def _close(test: "ResumeAcrossWorldSizes", trainer: Any) -> None:
    close = getattr(getattr(trainer, test.writer_attribute or "", None), "close", None)
    if callable(close):
        close()


def _ranks(count: int) -> str:
    return f"{count} {'rank' if count == 1 else 'ranks'}"


class CheckpointLoadError(RuntimeError):
    """Loading the checkpoint failed in a rank (its message says which load, and why)."""


class ResumeAcrossWorldSizes(DistributedTraining):
    """test_resume_across_world_sizes: a checkpoint saved on N ranks resumes on M ranks."""

    _suite: ClassVar[str] = "DistributedTrainerTests"
    resume_world_sizes: Optional[Sequence[Tuple[int, int]]] = option(
        UNSET,
        _is_pairs,
        example="[(2, 1), (1, 2), (2, 4)]",
        default_text="(world_size, 1) and (1, world_size)",
    )
    """The (saving ranks, loading ranks) pairs the checkpoint is resumed across."""

    def _no_checkpointing(self, trainer: Any) -> Optional[str]:
        """The method a trainer lacks to save or load checkpoints, when the test class left
        their names at the defaults (a trainer that does not checkpoint); None otherwise."""
        chosen = set(self._user_names())
        for option_name in ("save_checkpoint_method", "load_checkpoint_method"):
            name = getattr(self, option_name)
            if not callable(getattr(trainer, name, None)) and option_name not in chosen:
                return f"{name}(path) ({option_name})"
        return None

    def _pairs(self) -> List[Tuple[int, int]]:
        if self._is_set("resume_world_sizes") and self.resume_world_sizes is not None:
            return [(int(n), int(m)) for n, m in self.resume_world_sizes]
        return [(self.world_size, 1), (1, self.world_size)]

    @check(
        reads=(
            "make_trainer",
            "model_attribute",
            "optimizer_attribute",
            "writer_attribute",
            "train_loader_attribute",
            "save_checkpoint_method",
            "load_checkpoint_method",
            "single_process_tolerance",
            "resume_world_sizes",
            "world_size",
            "distributed_timeout",
        )
    )
    def test_resume_across_world_sizes(self) -> None:
        """Check that a checkpoint saved on N ranks resumes on M ranks as if never interrupted.

        Catches checkpoints that only work on the number of ranks that saved them: a sharded
        model saved by rank 0 alone (its shard only), optimizer state left out, per-rank files
        that another number of ranks cannot load, a data position (epoch, sampler seed) not
        restored; saved with the trainer's own checkpointing on N ranks and loaded on M, by
        default 2 -> 1 and 1 -> 2.
        """
        self._get_or_skip("make_trainer")
        pairs = self._pairs()
        for size in {n for pair in pairs for n in pair}:
            self._check_factory_arguments(rank=0, world_size=size)
        folder = self.make_temp_dir()
        paths = {size: str(folder / f"checkpoint-on-{size}") for size, _ in pairs}
        runs: Dict[int, Dict[str, Any]] = {}
        for size in sorted({n for pair in pairs for n in pair}):
            path = paths.get(size, str(folder / f"unused-{size}"))
            ranks = self._launch(_uninterrupted_rank, self, path, world_size=size)
            if "no_checkpointing" in ranks[0]:
                self.skipTest(
                    f"the trainer has no method {ranks[0]['no_checkpointing']}: it saves no "
                    "checkpoint to resume from; set save_checkpoint_method and "
                    "load_checkpoint_method to the names of its methods if it has them"
                )
            runs[size] = {"ranks": ranks}
        for saved_on, loaded_on in pairs:
            with self.subTest(part=f"{saved_on} -> {loaded_on}"):
                self._resume_pair(saved_on, loaded_on, paths[saved_on], runs)
        if not self._is_set("single_process_tolerance") or self.single_process_tolerance is None:
            self._skip_part(
                "weights after resuming",
                "self.single_process_tolerance is not set: the weights after the resumed epoch "
                "are not compared with the uninterrupted run's (the weights and optimizer "
                "state loaded and the data order were); set it for a trainer whose loss is a "
                "mean over the batch and that draws no random numbers while training",
            )

    def _resume_pair(
        self, saved_on: int, loaded_on: int, path: str, runs: Dict[int, Dict[str, Any]]
    ) -> None:
        saving, loading = _ranks(saved_on), _ranks(loaded_on)
        where = f"resumed on {loading} from the checkpoint that {saving} saved"

        def explain(error: DistributedError) -> NoReturn:
            self.fail(
                f"training {where} failed: {error.first_line()}. The checkpoint cannot be "
                f"loaded by another number of ranks than saved it. {_ADVICE}\n{error}"
            )

        resumed = self._launch(
            _resumed_rank, self, path, saved_on, world_size=loaded_on, explain=explain
        )
        saved = runs[saved_on]["ranks"][0]
        differences = self._loaded_differences(saved["saved"], resumed[0]["loaded"])
        data = self._data_difference(runs[loaded_on]["ranks"], resumed, loaded_on)
        if data:
            differences.append(data)
        end = self._end_difference(saved["end"], resumed[0]["end"], saved_on)
        if end:
            differences.append(end)
        if not differences:
            return
        self.fail(
            f"a run {where} differs from an uninterrupted one. Trained 1 epoch on "
            f"{saving}, then trainer.{self.save_checkpoint_method}(path) on every rank; "
            f"on {loading}, fresh trainers from make_trainer(rank, world_size={loaded_on})"
            f" with trainer.{self.load_checkpoint_method}(path) and 1 more epoch:\n  - "
            + "\n  - ".join(differences)
            + f"\n{_ADVICE}"
        )

    def _loaded_differences(self, saved: Dict[str, Any], loaded: Dict[str, Any]) -> List[str]:
        """What the resumed trainer holds that differs from what the saving one held."""
        found: List[str] = []
        model = self.model_attribute
        for kind in ("parameters", "buffers"):
            difference_found = difference(saved["model"][kind], loaded["model"][kind])
            if difference_found is None:
                continue
            name = difference_found.path[0]
            found.append(
                f"weights: {model}.{name} is not what the trainer held when it saved the "
                f"checkpoint ({difference_found.detail})"
            )
            break
        before, after = saved["optimizer"], loaded["optimizer"]
        if before is not None and after is not None:
            missing = difference(before, after)
            if missing is not None:
                state = before.get("state", {})
                if state and not after.get("state"):
                    keys = sorted({str(key) for entry in state.values() for key in entry})
                    found.append(
                        f"optimizer state: the resumed trainer's optimizer has no state, the "
                        f"one that saved the checkpoint had {', '.join(keys)} for {len(state)} "
                        "parameters: the checkpoint leaves the optimizer state out, or loading "
                        "does not restore it (Adam's moments or SGD's momentum are lost, so the "
                        "steps after resuming differ)"
                    )
                else:
                    where = "".join(f"[{key!r}]" for key in missing.path)
                    found.append(
                        f"optimizer state: {self.optimizer_attribute}.state_dict(){where} "
                        f"{missing.detail}"
                    )
        return found

    def _data_difference(
        self,
        uninterrupted: Sequence[Dict[str, Any]],
        resumed: Sequence[Dict[str, Any]],
        loaded_on: int,
    ) -> Optional[str]:
        """Where the resumed epoch's samples differ from the uninterrupted run's second
        epoch on the same ranks; None when they do not (or have no indices)."""
        for rank, (straight, again) in enumerate(zip(uninterrupted, resumed)):
            expected, got = straight["epochs"][1], again["epoch"]
            if expected is None or got is None or expected == got:
                continue
            first = straight["epochs"][0]
            position = next(
                (i for i, (a, b) in enumerate(zip(expected, got)) if a != b),
                min(len(expected), len(got)),
            )
            restarted = got == first
            return (
                f"data position: in the epoch after resuming, rank {rank} of {loaded_on} loaded "
                f"other samples than an uninterrupted run on {_ranks(loaded_on)} loads in its "
                "second "
                f"epoch (from position {position}: "
                f"{listed([str(x) for x in got[position : position + 3]], 3)} where "
                f"{listed([str(x) for x in expected[position : position + 3]], 3)})"
                + (
                    ", the first epoch's order again: the epoch is not restored (save it, and "
                    "call sampler.set_epoch(epoch) with the restored epoch)"
                    if restarted
                    else ": the data order's seed or position is not restored (save the "
                    "sampler's seed and the epoch with the checkpoint)"
                )
            )
        return None

    def _end_difference(
        self, uninterrupted: Dict[str, Any], resumed: Dict[str, Any], saved_on: int
    ) -> Optional[str]:
        tolerance = self.single_process_tolerance
        if not self._is_set("single_process_tolerance") or tolerance is None:
            return None
        rtol, atol = tolerance
        found = difference(uninterrupted["parameters"], resumed["parameters"], rtol, atol)
        if found is None:
            return None
        return (
            f"weights after the resumed epoch: {self.model_attribute}.{found.path[0]} differs "
            f"from the uninterrupted run on {_ranks(saved_on)} ({found.detail}; "
            f"single_process_tolerance={tolerance})"
        )
