"""test_ddp_training, and what the distributed trainer checks share.

The checks build one trainer per rank with ``make_trainer(rank=rank, world_size=world_size)``
inside ``world_size`` gloo processes (``dltestkit.launch.run_distributed``), train each for
two epochs and compare what the ranks did: the weights they start and end with (sharded
parameters gathered whole), the samples each loaded in each epoch, and what they logged.
``DistributedTraining`` holds what test_ddp_training, test_fsdp_training
(``sharded_trainers.py``) and test_resume_across_world_sizes (``resume.py``) share.
"""

from __future__ import annotations

import collections
import re
from typing import (
    Any,
    Callable,
    ClassVar,
    Dict,
    List,
    NoReturn,
    Optional,
    Sequence,
    Tuple,
)
from unittest import mock

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..core.contract import check
from ..core.options import UNSET, ContractError, option
from ..core.validators import is_str, optional
from ..trainers.contract import TrainerContract
from ..trainers.logs import call_arguments
from ..trainers.state import difference
from .launch import DistributedError, _start_method
from .options import DistributedOptions, is_tolerance
from .rank_warnings import recorded, show_once
from .samples import RecordingSampler, watch_indices
from .sharding import gathered, is_sharded, sharded_names
from .stacks import raising_user_frame

__all__ = ["DDPTraining", "DistributedTraining"]

#: The epochs each rank trains: two, to see the data order change between epochs.
EPOCHS = 2
#: Why a trainer that asks for CUDA cannot run here, and what runs here instead.
_CUDA = (
    "it asks for CUDA (a CUDA device, or pinned memory, as fully_shard's CPUOffloadPolicy() "
    "pins by default), which this machine does not have",
    "A trainer that takes its device from torch.cuda.is_available() (and "
    "CPUOffloadPolicy(pin_memory=False) where there is no GPU) runs here.",
)
#: What a trainer meets on a machine without a GPU when it needs one: what it needs, and
#: what runs here instead.
_NEEDS_A_GPU = {
    "FSDP needs a non-CPU accelerator device": (
        "FullyShardedDataParallel (FSDP1) refuses a machine without a GPU",
        "fully_shard (FSDP2) runs on the CPU, and test_fsdp_training checks a trainer that "
        "shards with it.",
    ),
    "Found no NVIDIA driver on your system": _CUDA,
    "Torch not compiled with CUDA enabled": _CUDA,
    "No CUDA GPUs are available": _CUDA,
}
#: What init_process_group raises in a process that has joined a group.
_JOINED_TWICE = "trying to initialize the default process group twice"
#: A call that refused the rank or world_size keyword argument.
_REFUSED_ARGUMENT = re.compile(r"unexpected keyword argument '(rank|world_size)'")


def _unwrapped(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel (or DataParallel)."""
    inner = getattr(model, "module", None)
    return (
        inner
        if isinstance(model, nn.parallel.DistributedDataParallel) and isinstance(inner, nn.Module)
        else model
    )


def _state(model: nn.Module) -> Dict[str, Dict[str, torch.Tensor]]:
    """The model's parameters and its (persistent) buffers, copied, each by name; sharded ones
    gathered whole (a collective: every rank calls it at the same point)."""
    module = _unwrapped(model)
    names = {name for name, _ in module.named_parameters(remove_duplicate=False)}
    if sharded_names(module):
        # Not state_dict(): fully_shard's state-dict hooks put the sharded parameters back in
        # place, which breaks a forward pass that is running (the start is taken in one).
        state = gathered(
            {**dict(module.named_parameters(remove_duplicate=False)), **_buffers(module)}
        )
    else:
        state = gathered(dict(module.state_dict()))
    return {
        "parameters": {name: value for name, value in state.items() if name in names},
        "buffers": {name: value for name, value in state.items() if name not in names},
    }


def _buffers(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The model's persistent buffers (those its state dict holds), by name."""
    found = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        for name, buffer in module._buffers.items():
            if buffer is not None and name not in module._non_persistent_buffers_set:
                found[f"{prefix}.{name}" if prefix else name] = buffer
    return found


def _local_shards(model: nn.Module) -> Dict[str, Tuple[int, torch.Tensor]]:
    """This rank's shard of each parameter sharded along one dimension, with the dimension."""
    from torch.distributed.tensor import Shard

    found = {}
    for name, parameter in _unwrapped(model).named_parameters():
        placements: Any = getattr(parameter, "placements", ())
        if is_sharded(parameter) and len(placements) == 1 and isinstance(placements[0], Shard):
            local = parameter.to_local().detach().cpu().clone()  # type: ignore[attr-defined]
            found[name] = (int(placements[0].dim), local)
    return found


class _TrainingStart:
    """The model's state when training really starts: at the first forward, in training mode,
    of the model or any of its submodules (DistributedDataParallel has broadcast rank 0's
    weights by then, also when a trainer wraps the model only in train()). Until then, and
    for a model whose forward takes no hooks, its state when this was made."""

    def __init__(self, model: nn.Module) -> None:
        self.members = {id(module) for module in _unwrapped(model).modules()}
        self.model = model
        self.state = _state(model)
        self.shards = _local_shards(model)
        self.seen = False
        self.handle = nn.modules.module.register_module_forward_pre_hook(self._note)

    def _note(self, module: nn.Module, _: Any) -> None:
        if not self.seen and module.training and id(module) in self.members:
            self.seen = True
            self.handle.remove()
            self.state = _state(self.model)
            self.shards = _local_shards(self.model)

    def remove(self) -> None:
        self.handle.remove()


def _train_epochs(trainer: Any, writer: Any) -> List[Tuple[Any, Any]]:
    """Train EPOCHS epochs one call at a time; return what ``writer`` logged, as (tag, step)
    pairs, without writing it; close the writer."""
    try:
        if not callable(getattr(writer, "add_scalar", None)):
            for _ in range(EPOCHS):
                trainer.train(1)
            return []
        with mock.patch.object(writer, "add_scalar") as add_scalar:
            for _ in range(EPOCHS):
                trainer.train(1)
        return [(s.tag, s.step) for s in map(call_arguments, add_scalar.call_args_list)]
    finally:
        close = getattr(writer, "close", None)
        if callable(close):
            close()


def _optimizer_coverage(test: "DistributedTraining", trainer: Any) -> Dict[str, Any]:
    """Which of the model's trainable parameters the trainer's optimizer holds: the names of
    those it does not (``"missing"``; None without an optimizer), how many it does
    (``"held"``), and how many tensors it holds that are no parameter of the model
    (``"stale"``: the parameters fully_shard replaced, when it was built before)."""
    optimizer = test._optimizer(trainer)
    groups = getattr(optimizer, "param_groups", None)
    if not isinstance(groups, list):
        return {"missing": None, "held": 0, "stale": 0}
    held = [p for group in groups for p in group.get("params", [])]
    ids = {id(p) for p in held}
    named = list(_unwrapped(test._model(trainer)).named_parameters())
    model = {id(p) for _, p in named}
    trainable = [(name, p) for name, p in named if p.requires_grad]
    return {
        "missing": [name for name, p in trainable if id(p) not in ids],
        "held": sum(1 for _, p in trainable if id(p) in ids),
        "stale": sum(1 for p in held if id(p) not in model),
    }


def _train_rank(
    rank: int, world_size: int, test: "DistributedTraining", sharded: Optional[bool] = None
) -> Dict[str, Any]:
    """One rank of a distributed trainer check: build, observe and train this rank's trainer.
    When ``sharded`` is True or False and the model's parameters are not, or are, sharded
    (DTensors), it returns at once what it found, without training. The warnings raised come
    back in ``"warnings"``."""
    with recorded() as caught:
        result = _observe_rank(rank, world_size, test, sharded)
    return {**result, "warnings": caught}


def _observe_rank(
    rank: int, world_size: int, test: "DistributedTraining", sharded: Optional[bool]
) -> Dict[str, Any]:
    trainer = test._make_rank_trainer(rank, world_size)
    found = sharded_names(_unwrapped(test._model(trainer)))
    if sharded is not None and bool(found) != sharded:
        return {"sharded": found}
    recorder = test._record_samples(trainer)
    start = _TrainingStart(test._model(trainer))
    try:
        logged = _train_epochs(trainer, getattr(trainer, test.writer_attribute or "", None))
    finally:
        start.remove()
    result = {
        "sharded": found,
        "start": start.state,
        "start_shards": start.shards,
        "end": _state(test._model(trainer)),
        "logged": logged,
        **_optimizer_coverage(test, trainer),
    }
    if recorder is None:
        return {**result, "epochs": None}
    return {
        **result,
        "epochs": recorder.epochs,
        "size": recorder.dataset_size,
        "shuffle": getattr(recorder.sampler, "shuffle", None),
        "sampler": type(recorder.sampler).__name__,
        "batches": recorder.batches,
        "largest_batch": recorder.largest_batch,
    }


class DistributedTraining(DistributedOptions, TrainerContract):
    """What the distributed trainer checks share: the trainers built in the ranks, the samples
    they load, and the comparisons of what the ranks did."""

    _suite: ClassVar[str] = "DistributedTrainerTests"
    train_loader_attribute: str = option("train_loader", is_str, example='"loader"')
    """The name of the trainer's attribute holding the DataLoader of its training data.

    The check watches which samples its sampler hands out on each rank."""
    single_process_tolerance: Optional[Tuple[float, float]] = option(
        UNSET,
        optional(is_tolerance),
        example="(1e-4, 1e-6)",
        default_text="unset: the distributed result is not compared with one process",
    )
    """The (rtol, atol) within which the distributed training must end with the weights of one
    process on the whole data.

    Set it for a trainer whose loss is a mean over the batch, that draws no random numbers while
    training, and whose `make_trainer(rank=0, world_size=1)` takes batches `world_size` times as
    large in the same order (as DistributedSampler with the same seed gives)."""

    # -- what runs in each rank ------------------------------------------------------------
    def _make_rank_trainer(self, rank: int, world_size: int) -> Any:
        try:
            trainer = self._call_make_trainer(rank=rank, world_size=world_size)
        except TypeError as exc:
            # make_trainer(**kwargs) that passes rank and world_size on to something that
            # takes neither: a setUp problem, not a failed training
            if not _REFUSED_ARGUMENT.search(str(exc)) or isinstance(exc, ContractError):
                raise
            raise self._contract_error(
                "make_trainer",
                f"passes the arguments of make_trainer(rank={rank}, world_size={world_size}) "
                f"on to a callable that does not take them ({exc}); DistributedTrainerTests "
                "calls it so in each rank, and the trainer must use them (a "
                "DistributedSampler(dataset, num_replicas=world_size, rank=rank), "
                "DistributedDataParallel): give make_trainer the parameters rank=0, "
                "world_size=1 and use them",
            ) from None
        if not (callable(getattr(trainer, "train", None))):
            raise self._contract_error(
                "make_trainer",
                f"returned a {type(trainer).__name__} when called as make_trainer(rank={rank}, "
                f"world_size={world_size}), which has no train(epochs)",
            )
        return trainer

    def _record_samples(self, trainer: Any) -> Optional[RecordingSampler]:
        """Put a recorder where the training DataLoader gets its indices from; None for a
        loader of an IterableDataset, whose samples have no indices."""
        loader = getattr(trainer, self.train_loader_attribute, None)
        if not isinstance(loader, DataLoader):
            raise ContractError(
                f"trainer.{self.train_loader_attribute} (train_loader_attribute) is "
                f"{type(loader).__name__}, not a DataLoader; {self._testMethodName} watches the "
                "indices of the samples it loads. Set self.train_loader_attribute to the "
                "name of the trainer's training DataLoader."
            )
        return watch_indices(loader)

    def _launch(
        self,
        function: Any,
        *args: Any,
        world_size: Optional[int] = None,
        explain: Optional[Callable[[DistributedError], NoReturn]] = None,
    ) -> List[Any]:
        """Run ``function(rank, world_size, *args)`` on the ranks (fork only: the trainers are
        built there with self.make_trainer, the test handed to them in ``args``); a
        ContractError met in a rank is raised as such, any other failure is given to
        ``explain``, or fails the check with the ranks' tracebacks."""
        check = self._testMethodName
        if _start_method() != "fork":
            self.skipTest(
                f"{check} builds the trainers inside the ranks with "
                "self.make_trainer, which needs the fork start method (Linux, macOS)"
            )
        size = self.world_size if world_size is None else world_size
        self._temp_root = str(self.make_temp_dir())  # make_temp_dir() in the ranks goes here
        try:
            results = self._run_ranks(function, *args, world_size=size)
        except DistributedError as error:
            if "ContractError: " in error.first_line():  # a setUp problem, met in a rank
                raise ContractError(error.first_line().split("ContractError: ", 1)[1]) from None
            if _JOINED_TWICE in str(error):
                raise self._contract_error(
                    "make_trainer",
                    "calls torch.distributed.init_process_group in a process that has joined "
                    f"the group already ({error.first_line()}). {check} calls make_trainer(rank, "
                    "world_size) in processes that joined it, as torchrun's processes have once "
                    "your script called init_process_group: join it where your script starts, "
                    "or only where torch.distributed.is_initialized() is False",
                ) from None
            needs = next((why for seen, why in _NEEDS_A_GPU.items() if seen in str(error)), None)
            if needs is not None:
                frame = raising_user_frame(str(error))
                self.skipTest(
                    f"{check} cannot run this trainer on the CPU processes it starts: "
                    f"{needs[0]} ({error.first_line()})"
                    + (f", at {frame.described()}" if frame else "")
                    + f". Nothing was compared. {needs[1]}"
                )
            if explain is not None:
                explain(error)
            self.fail(
                f"training with make_trainer(rank, world_size) on {size} "
                f"{'process' if size == 1 else 'processes'} failed: {error.first_line()}\n{error}"
            )
        finally:
            self._temp_root = None
        for result in results:
            if isinstance(result, dict):
                show_once(result.pop("warnings", ()))
        return results

    def _first_difference(
        self, ranks: Sequence[Dict[str, Any]], when: str, kind: str
    ) -> Optional[Tuple[int, str]]:
        """The first rank whose ``kind`` ("parameters" or "buffers") differ from rank 0's at
        ``when``, with what differs."""
        for rank, result in enumerate(ranks[1:], 1):
            found = difference(ranks[0][when][kind], result[when][kind])
            if found is not None:
                return rank, f"{'.'.join(map(str, found.path))} {found.detail}"
        return None

    def _same_start(self, ranks: Sequence[Dict[str, Any]]) -> None:
        found = self._first_difference(ranks, "start", "parameters")
        if found is not None:
            rank, what = found
            self.fail(
                f"rank {rank} starts with other weights than rank 0 ({what}) at its first "
                "training forward: the ranks built their models from different random "
                "numbers and nothing made them equal. Wrap the model in "
                "DistributedDataParallel, which broadcasts rank 0's weights when it is "
                "built, or seed every rank the same before building the model."
            )
        found = self._first_difference(ranks, "start", "buffers")
        if found is not None:
            rank, what = found
            self.fail(
                f"rank {rank} starts with other buffers than rank 0 ({what}) at its first "
                "training forward, although the weights are the same: the ranks built "
                "them from different random numbers or data and nothing made them equal, "
                "so the ranks compute different functions. DistributedDataParallel with "
                "broadcast_buffers=True (its default) broadcasts rank 0's buffers when it "
                "is built and before every forward; with broadcast_buffers=False, build the "
                "buffers the same on every rank (the same seed) or broadcast them "
                "(torch.distributed.broadcast(buffer, src=0))."
            )

    def _same_end(self, ranks: Sequence[Dict[str, Any]]) -> None:
        # The parameters only: buffers such as BatchNorm's running statistics differ at the
        # end of correct DDP training, each rank's last forward having updated them from its
        # own shard (DDP broadcasts rank 0's at the start of every forward).
        found = self._first_difference(ranks, "end", "parameters")
        if found is not None:
            rank, what = found
            self.fail(
                f"after {EPOCHS} epochs rank {rank} has other weights than rank 0 ({what}): "
                "the ranks' gradients are not averaged. Train through the "
                "DistributedDataParallel wrapper (call ddp_model(x), not the module inside "
                "it), and give every rank the same optimizer and learning-rate schedule. (Or "
                "the model's forward changes a parameter in place by each rank's batch, as "
                "nn.Embedding(max_norm=...) does: DistributedModelTests' test_ddp_gradients "
                "names the parameter and the line.)"
            )

    def _data_part(self, ranks: Sequence[Dict[str, Any]]) -> None:
        if ranks[0]["epochs"] is None:
            self.skipTest(
                f"trainer.{self.train_loader_attribute} loads an IterableDataset, whose "
                "samples have no indices: which rank loaded which sample is not checked"
            )
        self._check_samples(ranks)

    def _check_samples(self, ranks: Sequence[Dict[str, Any]]) -> None:
        size, world = ranks[0]["size"], self.world_size
        for epoch in range(EPOCHS):
            seen: Dict[int, List[int]] = collections.defaultdict(list)
            for rank, result in enumerate(ranks):
                if len(result["epochs"]) <= epoch:
                    self.fail(
                        f"in epoch {epoch} rank {rank} drew no sample from "
                        f"trainer.{self.train_loader_attribute}: train(1) does not "
                        "iterate that DataLoader (set self.train_loader_attribute), makes "
                        "a new one each epoch, or hands the data to code that makes a "
                        "DataLoader of its own (Lightning's Trainer on several devices makes "
                        "one with a DistributedSampler: give the DataLoader a "
                        "DistributedSampler(dataset, num_replicas=world_size, rank=rank) and "
                        "the Trainer use_distributed_sampler=False)."
                    )
                for index in result["epochs"][epoch]:
                    seen[index].append(rank)
            missing = [index for index in range(size) if index not in seen]
            extra = sum(len(r) - 1 for r in seen.values())
            repeated = {index: r for index, r in seen.items() if len(r) > 1}
            padding, dropped = (-size) % world, size % world  # DistributedSampler's slack
            if ranks[0]["batches"]:  # and a batch sampler's incomplete last batches
                dropped += world * (max(r["largest_batch"] for r in ranks) - 1)
            if extra > padding or (repeated and missing) or len(missing) > dropped:
                shown = "; ".join(
                    f"sample {index} by ranks {r}" for index, r in sorted(repeated.items())[:3]
                )
                problems = [
                    f"{extra} loads of samples another rank had loaded ({shown})" if extra else "",
                    f"{len(missing)} samples loaded by no rank (the first: {missing[:5]})"
                    if missing
                    else "",
                ]
                if extra >= size * (world - 1):
                    gives = "gives every rank the whole dataset"
                else:
                    gives = "gives the ranks overlapping shards" if extra else "leaves samples out"
                advice = (
                    "give each rank its own shard of the indices before batching them (as "
                    "torch.utils.data.DistributedSampler(dataset, num_replicas=world_size, "
                    "rank=rank) does), every index to one rank."
                    if ranks[0]["batches"]
                    else "shard it with torch.utils.data.DistributedSampler(dataset, "
                    "num_replicas=world_size, rank=rank), without shuffle=True on the "
                    "DataLoader."
                )
                self.fail(
                    f"in epoch {epoch} the {world} ranks together did not load each of the "
                    f"{size} training samples once: {', '.join(p for p in problems if p)}. "
                    f"The {'batch sampler' if ranks[0]['batches'] else 'sampler'} "
                    f"({ranks[0]['sampler']}) {gives}: {advice}"
                )
        if ranks[0]["shuffle"]:
            same = [
                rank
                for rank, result in enumerate(ranks)
                if result["epochs"][0] == result["epochs"][1]
            ]
            if same:
                self.fail(
                    f"ranks {same} loaded their samples in the same order in both epochs, "
                    "although the sampler shuffles: DistributedSampler shuffles by epoch; call "
                    "sampler.set_epoch(epoch) at the start of every epoch."
                )

    def _check_logging(self, ranks: Sequence[Dict[str, Any]]) -> None:
        noisy = {
            rank: result["logged"] for rank, result in enumerate(ranks) if rank and result["logged"]
        }
        if noisy:
            rank, logged = next(iter(noisy.items()))
            shown = ", ".join(f"{tag!r} at step {step}" for tag, step in logged[:3])
            self.fail(
                f"ranks {sorted(noisy)} logged scalars too (rank {rank}: {shown}, ...): every "
                f"value is written {len(noisy) + 1} times, from ranks that saw only their "
                "shard. Log from rank 0 only (if torch.distributed.get_rank() == 0), after "
                "averaging what the ranks measured if needed (torch.distributed.all_reduce)."
            )

    def _check_single_process(
        self,
        distributed: Dict[str, Dict[str, torch.Tensor]],
        single: Optional[Dict[str, Dict[str, torch.Tensor]]] = None,
        strategy: str = "DDP",
    ) -> None:
        """Compare the end of the distributed training with that of one process on the whole
        data: ``single`` (from a rank of its own), or make_trainer(rank=0, world_size=1) trained
        here."""
        tolerance = self.single_process_tolerance
        if not self._is_set("single_process_tolerance") or tolerance is None:
            self.skipTest(
                "self.single_process_tolerance is not set: the distributed result is "
                "not compared with one process on the whole data (the other parts of the "
                "check ran); set it, e.g. self.single_process_tolerance = (1e-4, 1e-6), for "
                "a trainer whose loss is a mean over the batch, to compare them"
            )
        if single is None:
            trainer = self._make_rank_trainer(0, 1)
            _train_epochs(trainer, getattr(trainer, self.writer_attribute or "", None))
            single = _state(self._model(trainer))
        rtol, atol = tolerance
        found = difference(single, distributed, rtol, atol)
        if found is not None:
            self.fail(
                f"after {EPOCHS} epochs on {self.world_size} processes the weights differ from "
                f"those of one process on the whole data ({'.'.join(map(str, found.path[1:]))} "
                f"{found.detail}; single_process_tolerance={tolerance}). With the same "
                f"batches, {strategy}'s averaged gradients equal one process's only when the "
                "loss is a mean over the batch (not a sum, which makes every rank's step "
                "world_size times too small), the model uses no batch statistics, and the "
                "learning rate is not scaled differently."
            )


class DDPTraining(DistributedTraining):
    """test_ddp_training: a trainer's distributed data parallel training on ``world_size``
    processes."""

    @check(
        reads=(
            "make_trainer",
            "model_attribute",
            "optimizer_attribute",
            "writer_attribute",
            "train_loader_attribute",
            "single_process_tolerance",
            "world_size",
            "distributed_timeout",
        )
    )
    def test_ddp_training(self) -> None:
        """Check that a distributed trainer's ranks start and end alike, share data, log once.

        Catches the bugs of distributed data parallel training: ranks that start from
        different weights (seeded differently, nothing broadcast), gradients that are not
        averaged, every rank training on all the data (no DistributedSampler), the same data
        order every epoch (set_epoch not called), scalars logged by every rank; with two
        epochs in world_size real gloo processes.
        """
        self._get_or_skip("make_trainer")
        self._check_factory_arguments(rank=0, world_size=self.world_size)
        ranks = self._launch(_train_rank, self, False)
        if ranks[0]["sharded"]:
            self.skipTest(
                f"the model's parameters are sharded ({len(ranks[0]['sharded'])} DTensors, "
                f"e.g. {ranks[0]['sharded'][0]}): the trainer shards its model with "
                "fully_shard (FSDP), which test_fsdp_training checks"
            )
        with self.subTest(part="start"):
            self._same_start(ranks)
        with self.subTest(part="end"):
            if self._first_difference(ranks, "start", "parameters"):
                self.skipTest(
                    "the ranks start from different weights already (see the "
                    "'start' subtest), so they cannot end alike"
                )
            self._same_end(ranks)
        with self.subTest(part="data"):
            self._data_part(ranks)
        with self.subTest(part="logging"):
            self._check_logging(ranks)
        with self.subTest(part="one process"):
            if self._failed_subtests:
                self.skipTest(
                    "the ranks' training already went wrong (see the subtests "
                    "above); it is not compared with one process"
                )
            self._check_single_process(ranks[0]["end"])
