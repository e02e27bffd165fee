"""test_ddp_gradients, and what the model checks of data-parallel training share.

The bugs of DistributedDataParallel (DDP) training show up only with several processes: a
loss averaged over the wrong number of samples, layers that normalise each rank's shard with
its own statistics, parameters that get no gradient (DDP fails on the next step). These checks
run the real ``torch.distributed`` with the gloo backend on ``world_size`` CPU processes
(``dltestkit.run_distributed``), so they need no GPU and no cluster. ``DataParallelModel`` holds
what the DDP and the FSDP check (``sharded_models.py``) share: the shards of the batch, the
loss, one process's two steps to compare with, and why they differ.
"""

from __future__ import annotations

import copy
import fnmatch
import unittest
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Collection, Dict, List, Optional, Sequence, Tuple, Type, TypeVar

import torch
from torch import nn

from ..core.compare import dense
from ..core.contract import check
from ..core.messages import listed, no_eval_gradients
from ..core.options import ContractError, option
from ..core.paths import floating_tensors, map_tensors
from ..core.seeds import derived_seed, seed_torch
from ..core.validators import is_bool, is_names, is_number
from ..models.contract import ModelContract
from ..models.tensors import batched_entries, call_model, replace_entries
from .launch import DistributedError
from .options import DistributedOptions
from .sharding import changed_in_forward, gathered, watch_parameters
from .syncbn import replace_sync_batchnorm

__all__ = ["DDPGradients", "DataParallelModel"]

#: The normalisation layers that use the statistics of their batch in training mode.
BATCH_STATISTICS = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.LazyBatchNorm1d,
    nn.LazyBatchNorm2d,
    nn.LazyBatchNorm3d,
    nn.SyncBatchNorm,
)
#: DDP's error on the step after a parameter got no gradient (find_unused_parameters=False).
_UNUSED_ERROR = "Expected to have finished reduction in the prior iteration"


@dataclass
class _RankStep:
    """What a comparison of distributed steps with one process's needs in every rank
    (picklable, for the spawn start method)."""

    model: nn.Module
    shards: List[Any]
    weights: List[List[torch.Tensor]]
    batch_dims: List[Optional[int]]
    batch: int
    local_statistics: Collection[str]
    loss_fn: Any
    seed: int


S = TypeVar("S", bound=_RankStep)


@dataclass
class _Step(_RankStep):
    """What the DDP comparison needs in every rank."""

    find_unused_parameters: bool


def _to_double(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.double() if tensor.is_floating_point() else tensor


def _set_modes(model: nn.Module, local_statistics: Collection[str]) -> List[str]:
    """Eval mode, but batch-normalisation layers in training mode (they are what differs
    under DDP), except those in ``local_statistics``; returns the latter's names. The
    observers of quantisation-aware training stop observing: their ranges are statistics of
    each rank's batch, as a BatchNorm's are, which DDP does not share either."""
    model.eval()
    for module in model.modules():
        stop = getattr(module, "disable_observer", None)
        if callable(stop) and hasattr(module, "observer_enabled"):  # a FakeQuantize
            stop()
    training = []
    for name, module in model.named_modules():
        if isinstance(module, BATCH_STATISTICS) and not any(
            fnmatch.fnmatchcase(name, pattern) for pattern in local_statistics
        ):
            module.train()
            training.append(name)
    return training


def _batch_loss(
    output: Any, weights: Sequence[torch.Tensor], batch_dims: Sequence[Optional[int]], batch: int
) -> torch.Tensor:
    """The mean over the samples of each sample's randomly weighted outputs: a loss whose
    gradient DDP's averaging over equal shards reproduces exactly."""
    total = torch.zeros(())
    outputs = [t for _, t in floating_tensors(output)]
    for tensor, weight, dim in zip(outputs, weights, batch_dims):
        if dim is not None:
            total = total + (tensor * weight).sum()
    return total / batch


def _sgd_steps(
    model: nn.Module,
    inputs: Any,
    weights: Sequence[torch.Tensor],
    batch_dims: Sequence[Optional[int]],
    batch: int,
    loss_fn: Any,
    seed: int,
    parameters: Optional[Sequence[Tuple[str, nn.Parameter]]] = None,
    gather: bool = False,
) -> List[Dict[str, Any]]:
    """Two SGD steps of ``model`` (maybe DDP-wrapped or sharded) on ``inputs`` (``batch``
    samples); of each step, the gradients by parameter name (``"grads"``), the loss
    (``"loss"``) and, with ``gather`` (sharded parameters, gathered whole), the weights after
    it (``"weights"``)."""
    named = list(parameters if parameters is not None else model.named_parameters())
    named = [(name, p) for name, p in named if p.requires_grad]
    optimizer = torch.optim.SGD([p for _, p in named], lr=0.01)
    seen: List[Dict[str, Any]] = []
    for step in range(2):
        seed_torch(derived_seed(seed, step))
        optimizer.zero_grad(set_to_none=True)
        output = call_model(model, inputs)
        loss = (
            loss_fn(output)
            if loss_fn is not None
            else _batch_loss(output, weights, batch_dims, batch)
        )
        loss.backward()
        grads = {name: None if p.grad is None else dense(gathered(p.grad)) for name, p in named}
        optimizer.step()
        seen.append(
            {
                "grads": grads,
                "loss": float(loss.detach()),
                "weights": {name: gathered(p) for name, p in named} if gather else {},
            }
        )
    return seen


def _ddp_rank(rank: int, world_size: int, step: _Step) -> Dict[str, Any]:
    """One rank of test_ddp_gradients: the model in DDP, on its shard of the batch; its two
    steps, and the parameters whose values differ between the ranks after them."""
    model = copy.deepcopy(step.model)
    _set_modes(model, step.local_statistics)
    model = replace_sync_batchnorm(model)  # DDP refuses SyncBatchNorm on the CPU
    wrapped = nn.parallel.DistributedDataParallel(
        model, find_unused_parameters=step.find_unused_parameters
    )
    named = list(model.named_parameters())
    steps = _sgd_steps(
        wrapped,
        step.shards[rank],
        step.weights[rank],
        step.batch_dims,
        step.batch // world_size,
        step.loss_fn,
        derived_seed(step.seed, 10 * rank),
        parameters=named,
    )
    return {"steps": steps, "diverged": _diverged([(n, p) for n, p in named if p.requires_grad])}


def _diverged(named: Sequence[Tuple[str, torch.Tensor]]) -> List[str]:
    """The parameters whose values differ between the ranks (a collective: each rank's
    values against the greatest and the least of all ranks, exactly; NaN is counted as +inf,
    so that NaN on every rank agrees). DDP keeps the ranks' copies equal only by giving them
    equal gradients."""
    import torch.distributed as dist

    diverged = []
    by_dtype: Dict[torch.dtype, List[Tuple[str, torch.Tensor]]] = {}
    for name, parameter in named:
        if parameter.is_floating_point():
            by_dtype.setdefault(parameter.dtype, []).append((name, parameter))
    for group in by_dtype.values():
        flat = torch.cat([p.detach().reshape(-1) for _, p in group])
        if flat.dtype not in (torch.float32, torch.float64):  # what gloo reduces for sure
            flat = flat.float()
        greatest = torch.where(flat.isnan(), float("inf"), flat)
        least = greatest.clone()
        dist.all_reduce(greatest, op=dist.ReduceOp.MAX)
        dist.all_reduce(least, op=dist.ReduceOp.MIN)
        differs = greatest != least
        start = 0
        for name, parameter in group:
            if bool(differs[start : start + parameter.numel()].any()):
                diverged.append(name)
            start += parameter.numel()
    return diverged


@dataclass
class _Plan:
    """What a comparison of data-parallel training with one process needs: the model to train
    (the branches that only training mode uses frozen, in float64 when ``double``), the shards
    of the batch, the loss weights (of the whole batch and of each rank's shard) and the batch
    dimensions of the outputs, the batch-normalisation layers in training mode (``training``),
    the parameters unused in forward (``unused``), and one process's two steps."""

    model: nn.Module
    inputs: Any
    shards: List[Any]
    full: List[torch.Tensor]
    per_rank: List[List[torch.Tensor]]
    dims: List[Optional[int]]
    training: List[str]
    unused: List[str]
    one_process: List[Dict[str, Any]]
    double: bool


class DataParallelModel(DistributedOptions, ModelContract):
    """What the checks of data-parallel training share (DDP's and FSDP's): the model's shards
    of the batch, the loss, one process's training to compare with, why they differ."""

    _suite: ClassVar[str] = "DistributedModelTests"
    local_batch_statistics: Collection[str] = option((), is_names, example='["backbone.*"]')
    """Names or glob patterns of the batch-normalisation layers that may normalise each rank's shard
    on its own.

    With DDP or FSDP each rank's BatchNorm uses the statistics of its own shard; `nn.SyncBatchNorm`
    shares them (it passes: the checks run it on CPU processes as it runs on GPUs). List the layers
    for which per-rank statistics are intended; the checks then compare with them in eval mode."""
    ddp_rtol: float = option(1e-4, is_number, example="1e-3")
    """The relative tolerance comparing DDP's gradients (and FSDP's, without a mixed-precision
    policy) with one process's.

    Averaging over ranks adds the samples' contributions in another order than one process does,
    so float32 gradients agree to about 1e-6 of their size, a deep network's to about 1e-5 after a
    step; the bugs these checks find change them by percents. A difference beyond the tolerances in
    float32 is judged again with both sides in float64 (where the model can run so), in which the
    rounding is a billion times smaller."""
    ddp_atol: float = option(1e-5, is_number, example="1e-4")
    """The absolute tolerance comparing DDP's gradients (and FSDP's, without a mixed-precision
    policy) with one process's."""

    def _shards(self, inputs: Any, check: str) -> List[Any]:
        """``inputs`` (self.inputs, maybe in float64) split into world_size equal, contiguous
        shards of the batch."""
        batch, ranks = self._batch_size(), self.world_size
        if batch % ranks:
            raise self._contract_error(
                "inputs",
                f"holds {batch} samples, which {ranks} ranks cannot share equally; "
                f"{check} needs a multiple of world_size ({ranks}), e.g. "
                f"{ranks * max(1, batch // ranks)}",
            )
        entries = batched_entries(inputs, self.unbatched_inputs)
        return [
            replace_entries(inputs, {key: tensor.chunk(ranks)[rank] for key, tensor in entries})
            for rank in range(ranks)
        ]

    def _batch_dims(
        self, model: nn.Module, inputs: Any, shard: Any
    ) -> Tuple[List[torch.Tensor], List[Optional[int]]]:
        """The floating-point outputs for ``inputs``, and the batch dimension of each (the one
        whose size follows the batch size), or None for an output without one (a scalar loss)."""
        with torch.no_grad():
            full = [t for _, t in floating_tensors(self._forward(model, inputs))]
            part = [t for _, t in floating_tensors(self._forward(model, shard))]
        batch, size = self._batch_size(), self._batch_size() // self.world_size
        dims: List[Optional[int]] = []
        for whole, piece in zip(full, part):
            changed = (
                [d for d in range(whole.dim()) if whole.shape[d] != piece.shape[d]]
                if whole.dim() == piece.dim()
                else []
            )
            ok = (
                len(changed) == 1
                and whole.shape[changed[0]] == batch
                and piece.shape[changed[0]] == size
            )
            dims.append(changed[0] if ok else None)
        return full, dims

    def _reference(self, double: bool) -> Tuple[nn.Module, List[str], Any]:
        """A copy of the model in the modes of the comparison, in float64 if ``double``; the
        names of its batch-normalisation layers in training mode that use their own batch's
        statistics (not SyncBatchNorm); self.inputs, in float64 if ``double``."""
        reference = self._copy_model()
        modules = dict(reference.named_modules())
        in_training = _set_modes(reference, self.local_batch_statistics)
        local = [name for name in in_training if not isinstance(modules[name], nn.SyncBatchNorm)]
        inputs = self.inputs
        if double:
            reference.double()
            inputs = map_tensors(_to_double, inputs)
        return reference, local, inputs

    def _rank_step(self, plan: _Plan, kind: Type[S], *own: Any) -> S:
        """``kind`` (a _RankStep) for ``plan``: the fields every comparison needs, then
        ``own``, the fields of its kind."""
        return kind(
            plan.model,
            plan.shards,
            plan.per_rank,
            plan.dims,
            self._batch_size(),
            self.local_batch_statistics,
            self.loss_fn,
            self.seed,
            *own,
        )

    def _plan(self, check: str, double: Optional[bool] = None) -> _Plan:
        """Prepare the comparison of ``check`` (see _Plan), in float64 if ``double`` (None:
        with SyncBatchNorm layers, whose statistics over a few values per channel always
        amplify float32's rounding), else in float32; in float32 too when the model cannot
        run in float64 (an operation without a float64 kernel, a fixed dtype)."""
        self._refuse_sample_lists(check)
        if double is None:
            double = any(isinstance(m, nn.SyncBatchNorm) for m in self.model.modules())
        in_float64 = self._plan_in_float64(check) if double else None
        return in_float64 or self._plan_in(check, double=False)

    def _plan_in_float64(self, check: str) -> Optional[_Plan]:
        """The comparison of ``check`` in float64; None when the model cannot run so."""
        try:
            return self._plan_in(check, double=True)
        except (unittest.SkipTest, ContractError):
            raise
        except Exception:  # an operation without a float64 kernel, a fixed dtype
            return None

    def _judged_in_float64(self, check: str, compare: Callable[[_Plan], None]) -> None:
        """``compare(plan)`` (which fails on a difference) in float32, and, when that fails,
        again in float64, which judges: the ranks add their samples' contributions in another
        order than one process does, and float32 rounds each sum, which a deep network, one
        that normalises over a few values (a spectrogram's frames) or inputs of very different
        magnitudes amplify beyond any tolerance that still shows a bug; in float64 that is a
        billion times smaller, so what differs there is the model's, never the rounding's
        (and what fails in float32 only was rounding). A model that cannot run in float64 is
        judged in float32."""
        plan = self._plan(check)
        try:
            compare(plan)
        except self.failureException:
            again = None if plan.double else self._plan_in_float64(check)
            if again is None:  # float64 already, or the model cannot run so: the failure stands
                raise
            compare(again)

    def _plan_in(self, check: str, double: bool) -> _Plan:
        reference, training, inputs = self._reference(double)
        shards = self._shards(inputs, check)
        outputs, dims = self._batch_dims(reference, inputs, shards[0])
        self._skip_if_random(reference, inputs, outputs, check)
        if self.loss_fn is None and not any(d is not None for d in dims):
            raise self._contract_error(
                "loss_fn",
                "is unset and no floating-point output has a batch dimension to "
                "average over; set self.loss_fn to the mean loss over the batch",
            )
        full = self._weights(outputs)
        ranks = self.world_size
        per_rank = [
            [w.chunk(ranks, dim)[rank] if dim is not None else w for w, dim in zip(full, dims)]
            for rank in range(ranks)
        ]
        try:
            one_process = _sgd_steps(
                reference,
                inputs,
                full,
                dims,
                self._batch_size(),
                self.loss_fn,
                self.seed,
                gather=True,
            )
        except Exception as exc:
            refused = no_eval_gradients(exc)
            if refused is None:
                raise
            self.skipTest(
                "the comparison trains the model in eval mode (its dropout off, so that the "
                f"ranks and one process compute alike), and {refused}"
            )
        unused = {name for name, grad in one_process[0]["grads"].items() if grad is None}
        in_training = self._copy_model()
        _, grads = self._gradients(in_training, self._trainable(in_training))
        used_in_training = {
            name for (name, _), grad in zip(self._trainable(in_training), grads) if grad is not None
        }
        # A branch that only training mode uses (a VAE's log-sigma head feeds the sampling)
        # is frozen for the comparison: distributed training runs it in training mode, where
        # it is used.
        frozen = unused & used_in_training
        model = self._copy_model().double() if double else self._copy_model()
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(parameter.requires_grad and name not in frozen)
        return _Plan(
            model,
            inputs,
            shards,
            full,
            per_rank,
            dims,
            training,
            [name for name in one_process[0]["grads"] if name in unused and name not in frozen],
            one_process,
            double,
        )

    def _skip_if_random(
        self, reference: nn.Module, inputs: Any, outputs: List[torch.Tensor], check: str
    ) -> None:
        """Skip when the model's outputs, in the modes compared, change with the random seed:
        each rank draws other random numbers than one process does."""
        with torch.no_grad():
            other = self._forward(reference, inputs, seed=derived_seed(self.seed, 7))
        for index, (tensor, again) in enumerate(zip(outputs, floating_tensors(other))):
            if not torch.equal(tensor, again[1]):
                difference = float((tensor.double() - again[1].double()).abs().max())
                self.skipTest(
                    f"the model draws random numbers in eval mode, which {check} compares in: "
                    "its floating-point output "
                    f"{index} changes with the seed (max difference {difference:.3g}), as a "
                    "VAE's sampling or a random mask does; the ranks draw other numbers than "
                    "one process, so the gradients cannot be compared (test_eval_deterministic "
                    "says which operation draws them)"
                )

    def _cause(
        self,
        ddp: Dict[str, Any],
        single: Dict[str, Any],
        training: List[str],
        strategy: str = "DDP",
    ) -> str:
        """Why the gradients of data-parallel training (``strategy``: "DDP" or "FSDP")
        differ from one process's, judged from how they differ."""
        ratios = {
            float((d.double() * s.double()).sum() / s.double().square().sum())
            for name, s in single.items()
            if s is not None
            and (d := ddp.get(name)) is not None
            and float(s.double().square().sum()) > 0
        }
        constant = len({round(r, 3) for r in ratios}) == 1
        if constant and ratios and abs(next(iter(ratios)) - 1.0) > 1e-3:
            factor = next(iter(ratios))
            return (
                f"Every gradient is {factor:.3g} times the single-process one: the output or "
                "the loss depends on the batch size (a sum over the batch where a mean "
                f"belongs, or a division by the batch size); {strategy} averages the ranks' "
                "gradients, which matches one process only for a mean over the samples."
            )
        if training:
            return (
                f"The model normalises with batch statistics ({', '.join(training)}): "
                f"under {strategy} each rank uses the statistics of its own shard. Convert the "
                "layers with torch.nn.SyncBatchNorm.convert_sync_batchnorm(model) before "
                f"wrapping the model in {strategy} (it normalises with the statistics of all "
                "ranks' batches; in training it needs GPUs, this check runs it on the CPU), or "
                "list them in self.local_batch_statistics if per-rank statistics are intended."
            )
        return (
            "A sample's output depends on the other samples of its batch (see "
            "test_batch_independence), or the loss is not a mean over the samples."
        )


class DDPGradients(DataParallelModel):
    """test_ddp_gradients: DistributedDataParallel on several processes trains a model as one
    process does on the whole batch."""

    find_unused_parameters: bool = option(False, is_bool, example="True")
    """The find_unused_parameters argument the model is wrapped in DistributedDataParallel with.

    Set it as your training code does; False, DDP's default, fails on parameters that get no
    gradient."""

    @check(
        reads=(
            "model",
            "inputs",
            "unbatched_inputs",
            "loss_fn",
            "world_size",
            "distributed_timeout",
            "local_batch_statistics",
            "find_unused_parameters",
            "ddp_rtol",
            "ddp_atol",
        )
    )
    def test_ddp_gradients(self) -> None:
        """Check that DDP on ``world_size`` processes gives one process's gradients on the batch.

        Catches what makes data-parallel training differ from one process: layers that use
        batch statistics (BatchNorm without SyncBatchNorm), parameters unused in forward (DDP
        fails on the next step), outputs or losses that depend on the batch size, parameters
        that forward changes in place by the batch (nn.Embedding's max_norm), which makes the
        ranks' weights drift apart; two steps, each rank on its shard of the batch, with the
        real torch.distributed (gloo).
        """
        self._judged_in_float64("test_ddp_gradients", self._ddp_gradients)

    def _ddp_gradients(self, plan: _Plan) -> None:
        step = self._rank_step(plan, _Step, self.find_unused_parameters)
        try:
            results = self._run_ranks(_ddp_rank, step)
        except DistributedError as error:
            self._explain_failure(error, plan.unused)
        for rank, result in enumerate(results):
            for number, (ddp, single) in enumerate(zip(result["steps"], plan.one_process), 1):
                self._compare(ddp["grads"], single["grads"], rank, number, plan.training)
        diverged = results[0]["diverged"]
        if diverged:
            watched = copy.deepcopy(plan.model)
            _set_modes(watched, self.local_batch_statistics)
            changed = watch_parameters(watched, lambda: call_model(watched, plan.inputs)).changed
            self.fail(
                f"after {len(plan.one_process)} steps the ranks' copies of "
                f"{listed(diverged, 3)} differ, although DistributedDataParallel gave every "
                "rank the same gradients: something changes the weights on each rank by what "
                "that rank saw, which DDP does not synchronise, so the ranks' models drift "
                "apart and train otherwise than one process. "
                + changed_in_forward(changed, fsdp=False)
            )

    def _explain_failure(self, error: DistributedError, unused: List[str]) -> None:
        text = str(error)
        if _UNUSED_ERROR in text:
            self.fail(
                f"DistributedDataParallel (find_unused_parameters={self.find_unused_parameters}) "
                f"fails on the second step: parameters that get no gradient in forward"
                + (f" ({', '.join(unused)})" if unused else "")
                + ". Use every parameter in forward (or freeze the ones that are not), or wrap "
                "the model with find_unused_parameters=True (slower) and set it here too. "
                f"DDP's error: {error.first_line()}"
            )
        self.fail(
            f"training the model with DistributedDataParallel on {self.world_size} ranks "
            f"failed: {error.first_line()}\n{text}"
        )

    def _compare(
        self, ddp: Dict[str, Any], single: Dict[str, Any], rank: int, step: int, training: List[str]
    ) -> None:
        for name, expected in single.items():
            got = ddp.get(name)
            if expected is None or got is None:
                continue
            try:
                torch.testing.assert_close(got, expected, rtol=self.ddp_rtol, atol=self.ddp_atol)
            except AssertionError as mismatch:
                cause = self._cause(ddp, single, training)
                self.fail(
                    f"at step {step} the gradient of {name} that DistributedDataParallel gives "
                    f"rank {rank} (each of {self.world_size} ranks on its shard of the batch) "
                    f"differs from the gradient of one process on the whole batch. {cause}\n"
                    f"{mismatch}"
                )
