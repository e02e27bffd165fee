"""The checks that build several trainers: resuming from a checkpoint, reproducibility.

``test_resume`` and ``test_reproducible`` are part of ``TrainerTests``; they live here with the
options only they read and the comparison of runs.
"""

from __future__ import annotations

import fnmatch
from typing import Any, ClassVar, Collection, Dict, List, NamedTuple, Sequence, Tuple

from ..core.contract import check
from ..core.messages import by_count, listed
from ..core.options import option
from ..core.validators import is_names, is_non_negative_number
from .contract import TrainerContract
from .logs import Scalar, describe_scalar, first_log_difference, same_scalar
from .state import (
    attributes,
    cloned,
    difference,
    generators,
    global_states,
    numbers,
    persistent_loaders,
)

__all__ = ["ComparedRuns", "RunChecks"]


def _persistent_loaders(trainer: Any) -> str:
    """What the trainer's DataLoaders with persistent workers change about a resumed run
    (the likely cause of a difference that nothing restored explains), or ""."""
    found = list(persistent_loaders(trainer))
    if not found:
        return ""
    return (
        f" Likely here: trainer.{found[0]} is a DataLoader with persistent_workers=True. In the "
        "uninterrupted run its iterator, made once, drew the seed of its workers once, from "
        "the loader's generator (the global one when it has none); the fresh trainer's loader "
        "draws it again in its first epoch, after what the checkpoint restored, so what is "
        "drawn next (the shuffle order, dropout) differs. Give the sampler a generator of its "
        "own (sampler=RandomSampler(dataset, generator=g), with g's state in the checkpoint) "
        "and the DataLoader another (generator=torch.Generator()), which then draws nothing "
        "that training uses."
    )


class _Run(NamedTuple):
    """A trainer the check built, and what it logged."""

    trainer: Any
    logs: List[Scalar]


class ComparedRuns(TrainerContract):
    """What the checks that compare the scalars of two runs share (test_resume,
    test_reproducible, test_reference_losses)."""

    _suite: ClassVar[str] = "TrainerTests"
    nondeterministic_scalars: Collection[str] = option(
        (), is_names, example='["time/*", "throughput"]'
    )
    """Names or glob patterns of logged tags whose values legitimately differ between runs.

    Timings, throughput, memory use: their values are not compared, their tags and steps are."""

    def _same_value(self, a: Scalar, b: Scalar, rtol: float, atol: float) -> bool:
        """Whether two logged scalars agree (always, for nondeterministic_scalars)."""
        if any(
            fnmatch.fnmatchcase(str(a.tag), pattern) for pattern in self.nondeterministic_scalars
        ):
            return True
        return same_scalar(a, b, rtol, atol)


class RunChecks(ComparedRuns):
    """TrainerTests' checks that compare several runs of a trainer."""

    _suite: ClassVar[str] = "TrainerTests"
    resume_rtol: float = option(0.0, is_non_negative_number, example="1e-6")
    """The relative tolerance comparing a resumed run with an uninterrupted one.

    0: exact, as the same computation is on a CPU. Raise it on hardware whose kernels are not
    bitwise reproducible."""
    resume_atol: float = option(0.0, is_non_negative_number, example="1e-7")
    """The absolute tolerance comparing a resumed run with an uninterrupted one."""

    @check(
        reads=(
            "make_trainer",
            "save_checkpoint_method",
            "load_checkpoint_method",
            "nondeterministic_scalars",
            "resume_rtol",
            "resume_atol",
            "model_attribute",
            "optimizer_attribute",
            "writer_attribute",
            "trainer",
        )
    )
    def test_resume(self) -> None:
        """Check that 1 epoch, a checkpoint loaded into a fresh trainer and 1 more epoch give
        what 2 epochs straight give.

        Catches a resumed run that silently differs from an uninterrupted one: optimizer state
        (Adam moments) not saved, step or epoch counters that restart, data order or random
        state not restored, a learning-rate scheduler left out of the checkpoint.
        """
        self._get_or_skip("make_trainer")
        path = str(self.make_temp_dir() / "checkpoint")
        straight = _Run(*self._trained(self.seed, 2))
        first = _Run(*self._trained(self.seed, 1))
        self._method(first.trainer, "save_checkpoint_method")(path)
        saved = self._snapshot(first.trainer)
        resumed_trainer = self._new_trainer(self._other_seed())
        self._method(resumed_trainer, "load_checkpoint_method")(path)
        loaded = self._snapshot(resumed_trainer)
        resumed = _Run(resumed_trainer, first.logs + self._train(resumed_trainer, 1))
        # the global generators that training draws from are the ones it must restore
        drawn_from = [
            name for name, state in global_states().items() if state != loaded["global"][name]
        ]
        differences = self._resume_differences(straight, resumed)
        if not differences:
            return
        causes = self._not_restored(saved, loaded, drawn_from)
        reproducible = first_log_difference(straight.logs[: len(first.logs)], first.logs)
        if reproducible is not None or any(
            not self._same_value(a, b, 0.0, 0.0) for a, b in zip(straight.logs, first.logs)
        ):
            causes.insert(
                0,
                "reproducibility: the first epoch already differs between two "
                "trainers built by make_trainer() under the same seed, so the "
                "trainer is not reproducible (test_reproducible says why)",
            )
        load = self.load_checkpoint_method
        self.fail(
            f"a resumed run differs from an uninterrupted one. Trained 2 epochs straight, and "
            f"1 epoch, then trainer.{self.save_checkpoint_method}(path), a fresh trainer from "
            f"make_trainer() with trainer.{load}(path) and 1 more epoch:\n  - "
            + "\n  - ".join(differences)
            + (
                f"\nWhat {load} did not restore (the fresh trainer compared with the one that "
                "saved the checkpoint):\n  - " + "\n  - ".join(causes)
                if causes
                else f"\n{load} restored the weights, the optimizer state, the trainer's counters, "
                "its random generators and the global random states, so the difference comes "
                "from state kept elsewhere: a schedule held in an iterator or a closure, a "
                "module-level variable, a data iterator kept across epochs."
                + _persistent_loaders(resumed.trainer)
            )
            + "".join(
                f"\nNot compared: {call} raised {error}."
                for call, error in {**saved["unread"], **loaded["unread"]}.items()
            )
            + "\nSave everything training depends on in the checkpoint and restore it: "
            "model.state_dict(), optimizer.state_dict() (Adam's moments and step count), the "
            "state of schedulers and gradient scalers, the epoch and step counters, the state "
            "of the generator that shuffles the data (or reseed the sampler from the epoch), "
            "and torch.get_rng_state() if training draws random numbers (dropout, sampling). "
            "resume_rtol and resume_atol allow differences, for hardware whose kernels are not "
            "bitwise reproducible."
        )

    def _trained(self, seed: int, epochs: int) -> Tuple[Any, List[Scalar]]:
        trainer = self._new_trainer(seed)
        return trainer, self._train(trainer, epochs)

    def _resume_differences(self, straight: _Run, resumed: _Run) -> List[str]:
        rtol, atol = self.resume_rtol, self.resume_atol
        model = self.model_attribute
        differences = []
        mismatch = first_log_difference(straight.logs, resumed.logs)
        if mismatch is not None:
            expected, actual = mismatch
            differences.append(
                f"logging: the resumed run logged {describe_scalar(actual)} where the "
                f"uninterrupted run logged {describe_scalar(expected)} (usually a step or "
                "epoch counter that was not restored)"
            )
        found = difference(self._state(straight.trainer), self._state(resumed.trainer), rtol, atol)
        if found:
            differences.append(
                f"weights: {model}.{found.path[0]} differs after the second epoch ({found.detail})"
            )
        straight_optimizer = self._optimizer(straight.trainer)
        resumed_optimizer = self._optimizer(resumed.trainer)
        if straight_optimizer is not None and resumed_optimizer is not None:
            found = difference(
                straight_optimizer.state_dict(), resumed_optimizer.state_dict(), rtol, atol
            )
            if found:
                where = self._optimizer_place(straight_optimizer, straight.trainer, found.path)
                differences.append(
                    f"optimizer state: {where} differs after the second epoch ({found.detail})"
                )
        if mismatch is None:
            for a, b in zip(straight.logs, resumed.logs):
                if not self._same_value(a, b, rtol, atol):
                    hint = (
                        ""
                        if differences
                        else " (with equal weights: a timing? list it in nondeterministic_scalars)"
                    )
                    differences.append(
                        f"logged values: {a.where()} is {b.value!r} in the "
                        f"resumed run, {a.value!r} in the uninterrupted "
                        f"one{hint}"
                    )
                    break
        return differences

    def _optimizer_place(self, optimizer: Any, trainer: Any, path: Tuple[Any, ...]) -> str:
        """Where in an optimizer's state dict ``path`` is, with parameter indices named."""
        if len(path) >= 2 and path[0] == "state" and isinstance(path[1], int):
            parameters = [p for group in optimizer.param_groups for p in group["params"]]
            names = {id(p): name for name, p in self._model(trainer).named_parameters()}
            index = path[1]
            known = index < len(parameters) and id(parameters[index]) in names
            name = (
                f"{self.model_attribute}.{names[id(parameters[index])]}"
                if known
                else f"parameter {index}"
            )
            rest = "".join(f"[{key!r}]" for key in path[2:])
            return f"the state of {name}{rest}"
        return "".join(f"[{key!r}]" for key in path) or "the state dict"

    def _snapshot(self, trainer: Any) -> Dict[str, Any]:
        """What a checkpoint should carry, copied from the trainer."""
        model = self._model(trainer)
        optimizer = self._optimizer(trainer)
        others = {}
        unread = {}
        for name, value in attributes(trainer).items():
            if (
                value is model
                or value is optimizer
                or not callable(getattr(value, "state_dict", None))
            ):
                continue
            try:
                others[name] = cloned(value.state_dict())
            except Exception as exc:  # its state is not compared; a failure says why
                unread[f"trainer.{name}.state_dict()"] = f"{type(exc).__name__}: {exc}"
        return {
            "unread": unread,
            "model": self._state(trainer),
            "optimizer": None if optimizer is None else cloned(optimizer.state_dict()),
            "numbers": numbers(trainer),
            "generators": generators(trainer),
            "others": others,
            "global": global_states(),
        }

    def _not_restored(
        self, saved: Dict[str, Any], loaded: Dict[str, Any], drawn_from: Sequence[str]
    ) -> List[str]:
        """What load_checkpoint left different from the trainer that saved the checkpoint."""
        causes = []
        model = self.model_attribute
        weights = [
            f"{model}.{name}"
            for name, value in saved["model"].items()
            if difference(value, loaded["model"].get(name, None))
        ]
        if weights:
            causes.append(
                f"weights: {listed(weights)} {by_count(len(weights), 'differs', 'differ')}"
            )
        if saved["optimizer"] is not None and loaded["optimizer"] is not None:
            found = difference(saved["optimizer"], loaded["optimizer"])
            if found:
                saved_state = saved["optimizer"].get("state", {})
                if found.path[:1] == ("state",) and not loaded["optimizer"].get("state"):
                    keys = sorted({key for entry in saved_state.values() for key in entry})
                    causes.append(
                        f"optimizer state: the fresh trainer's optimizer has no state, the "
                        f"saved one had {', '.join(map(str, keys))} for {len(saved_state)} "
                        "parameters (Adam's moments are lost, so its first steps are "
                        "too large)"
                    )
                else:
                    where = "".join(f"[{key!r}]" for key in found.path)
                    causes.append(
                        f"optimizer state: {self.optimizer_attribute}.state_dict()"
                        f"{where} {found.detail}"
                    )
        numbers = [
            f"trainer.{name} is {loaded['numbers'][name]!r}, was {value!r}"
            for name, value in saved["numbers"].items()
            if name in loaded["numbers"] and difference(value, loaded["numbers"][name])
        ]
        if numbers:
            causes.append("counters: " + "; ".join(numbers))
        generators = [
            name
            for name, state in saved["generators"].items()
            if name in loaded["generators"] and loaded["generators"][name] != state
        ]
        if generators:
            kind = by_count(len(generators), "generator", "generators")
            verb = by_count(len(generators), "is", "are")
            causes.append(
                f"data order: the random {kind} {', '.join(generators)} {verb} not "
                "in the saved state (checkpoint generator.get_state() and restore it "
                "with set_state())"
            )
        others = [
            f"trainer.{name}"
            for name, state in saved["others"].items()
            if name in loaded["others"] and difference(state, loaded["others"][name])
        ]
        if others:
            causes.append(f"other state: the state_dict() of {', '.join(others)}")
        rngs = [name for name in drawn_from if loaded["global"][name] != saved["global"][name]]
        if rngs:
            causes.append(
                f"random state: training draws from {', '.join(rngs)} (dropout, "
                "sampling, DataLoader(shuffle=True) without generator=), whose "
                f"{by_count(len(rngs), 'state is', 'states are')} not restored"
            )
        return causes

    @check(
        reads=(
            "make_trainer",
            "nondeterministic_scalars",
            "model_attribute",
            "writer_attribute",
            "trainer",
        )
    )
    def test_reproducible(self) -> None:
        """Check that two trainers from ``make_trainer()`` trained one epoch under the same
        seed agree exactly.

        Catches a run that cannot be reproduced: data shuffled by an unseeded generator, a
        seed taken from the time, weights initialised outside the seeded RNGs, state shared
        between trainers.
        """
        self._get_or_skip("make_trainer")
        runs = []
        for _ in range(2):
            trainer = self._new_trainer(self.seed)
            initial = self._state(trainer)
            runs.append((initial, self._train(trainer, 1), self._state(trainer)))
        (initial, logs, final), (other_initial, other_logs, other_final) = runs
        model = self.model_attribute
        start = difference(initial, other_initial)
        if start:
            self.fail(
                f"two trainers built by make_trainer() under the same seed start from different "
                f"weights: {model}.{start.path[0]} differs before any training "
                f"({start.detail}). The model is initialised from a source the global seeds do "
                "not control: a generator seeded from the time or os.urandom (torch.seed(), "
                "torch.Generator().seed()), weights loaded from a file that changes, a cache "
                "shared between trainers. Draw the initial weights from torch's global RNG, or "
                "from a generator seeded with a fixed seed."
            )
        found = difference(final, other_final)
        log = first_log_difference(logs, other_logs)
        if log is None:
            log = next(
                ((a, b) for a, b in zip(logs, other_logs) if not self._same_value(a, b, 0.0, 0.0)),
                None,
            )
        if found is None and log is None:
            return
        what = []
        if log is not None:
            a, b = log
            hint = (
                ""
                if found
                else "; with equal weights: a timing? list it in nondeterministic_scalars"
            )
            what.append(
                f"the first logged scalar that differs is {describe_scalar(a)} "
                + (
                    f"({a.value!r} and {b.value!r}{hint})"
                    if a and b and a.where() == b.where()
                    else f"(the other run logged {describe_scalar(b)})"
                )
            )
        if found is not None:
            what.append(
                f"the first parameter or buffer that differs is {model}.{found.path[0]} "
                f"({found.detail})"
            )
        self.fail(
            "two trainers built by make_trainer() under the same seed and trained one epoch "
            f"differ: {'; '.join(what)}. Usual causes: data shuffled by an unseeded generator "
            "(np.random.default_rng() or random.Random() without a seed, "
            "torch.Generator().seed(), a seed taken from the time), randomness in DataLoader "
            "workers that is not derived from the loader's seed, state shared between trainers "
            "(a module-level counter or cache), non-deterministic kernels (on a GPU, set "
            "torch.use_deterministic_algorithms(True)). Derive every seed from the global RNGs "
            "or from a seed argument."
        )

    # -- evaluation and initialisation -------------------------------------------------------
