"""test_fsdp_gradients: a model sharded with ``fully_shard`` (FSDP2) on several CPU processes
trains as one process does on the whole batch.

The model is wrapped unit by unit (the ``fsdp_units`` the test class declares, as the user's
training code wraps it, or the default policy of ``sharding.default_units``), then as a whole,
on ``world_size`` gloo processes; each rank trains two SGD steps on its shard of the batch. The
losses, the gradients and the weights after each step, gathered whole, must be one process's.
With a mixed-precision policy, the comparison is with one rank under the same policy on the
whole batch, within the policy's tolerance.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Collection, Dict, List, NoReturn, Optional, Tuple

import torch
from torch import nn

from ..core.contract import check
from ..core.options import UNSET, option
from ..core.seeds import derived_seed
from ..core.validators import is_names, optional
from ..models.tensors import call_model
from .launch import DistributedError
from .models import DataParallelModel, _Plan, _RankStep, _set_modes, _sgd_steps
from .options import is_tolerance
from .rank_warnings import recorded, show_once
from .sharding import (
    changed_in_forward,
    default_units,
    fsdp_unavailable,
    misuses,
    shard,
    units_matching,
    watch_parameters,
)
from .syncbn import replace_sync_batchnorm

__all__ = ["ShardedGradients"]

#: What an operation says when it meets a sharded parameter (a DTensor) and a plain tensor.
_MIXED = "mixed torch.Tensor and DTensor"
#: How the explanation of a difference in the gradients begins when nothing explains it.
_UNEXPLAINED = "A sample's output depends on the other samples of its batch"
#: Where fully_shard's own warnings come from.
_FSDP = f"distributed{os.sep}fsdp{os.sep}"
#: What fully_shard says about a parameter two units share.
_SHARED = "already managed by another FSDP group"


def _is_policy(value: Any) -> Optional[str]:
    if value is None:
        return None
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy
    except ImportError:
        return "is set, but this PyTorch has no torch.distributed.fsdp.MixedPrecisionPolicy"
    if isinstance(value, MixedPrecisionPolicy):
        return None
    return f"is {value!r}, not a torch.distributed.fsdp.MixedPrecisionPolicy or None"


@dataclass
class _ShardedStep(_RankStep):
    """What the FSDP comparison needs in every rank."""

    units: List[str]
    mp_policy: Any


def _fsdp_rank(rank: int, world_size: int, step: _ShardedStep) -> Dict[str, Any]:
    """One rank of test_fsdp_gradients: the model sharded, on its shard of the batch; its two
    steps (``"steps"``) and the warnings raised (``"warnings"``: shown once by the caller,
    not by every rank)."""
    with recorded() as caught:
        model = copy.deepcopy(step.model)
        _set_modes(model, step.local_statistics)
        model = replace_sync_batchnorm(model)  # SyncBatchNorm refuses the CPU
        shard(model, step.units, world_size, step.mp_policy)
        steps = _sgd_steps(
            model,
            step.shards[rank],
            step.weights[rank],
            step.batch_dims,
            step.batch // world_size,
            step.loss_fn,
            derived_seed(step.seed, 10 * rank),
            gather=True,
        )
    if rank:  # gathered whole, its gradients and weights are rank 0's: only those are compared
        steps = [dict(taken, grads={}, weights={}) for taken in steps]
    return {"steps": steps, "warnings": caught}


class ShardedGradients(DataParallelModel):
    """test_fsdp_gradients: fully sharded data parallel training (FSDP2) on several processes
    trains a model as one process does on the whole batch."""

    fsdp_units: Optional[Collection[str]] = option(
        UNSET,
        optional(is_names),
        example='["encoder", "decoder.blocks.*"]',
        default_text="unset: the default policy",
    )
    """Names or glob patterns of the submodules your training code wraps with `fully_shard`
    (each an FSDP unit) before the model itself.

    Unset, the check takes the default policy: from the model down, each child module that holds
    parameters, whose forward the model calls once, that uses its parameters only inside that
    forward and shares none with another module (tied weights); a child that does not qualify is
    looked into for children that do; where that finds one module holding every parameter, its
    children are taken instead. The model itself is always wrapped last, as the root."""
    fsdp_mixed_precision: Any = option(
        None,
        _is_policy,
        example="MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)",
    )
    """The `MixedPrecisionPolicy` your training code passes to `fully_shard`, or None (float32).

    With a policy the sharded training is compared with one rank that trains with the same policy
    on the whole batch, within `fsdp_mixed_precision_tolerance`."""
    fsdp_mixed_precision_tolerance: Tuple[float, float] = option(
        (5e-2, 5e-2), is_tolerance, example="(1e-1, 1e-1)"
    )
    """The (rtol, atol) within which mixed-precision sharded training must give what one rank with
    the same policy gives on the whole batch; atol is a fraction of the largest magnitude of the
    compared tensor.

    Each rank rounds its gradients to the policy's parameter dtype before they are averaged (one
    process rounds the whole batch's once): in bfloat16, whose resolution is 2**-8, that changes a
    gradient by up to about 0.5 % of the parameter's largest gradient; the bugs this check finds
    change them by tens of percents."""

    @check(
        reads=(
            "model",
            "inputs",
            "unbatched_inputs",
            "loss_fn",
            "world_size",
            "distributed_timeout",
            "local_batch_statistics",
            "ddp_rtol",
            "ddp_atol",
            "fsdp_units",
            "fsdp_mixed_precision",
            "fsdp_mixed_precision_tolerance",
        )
    )
    def test_fsdp_gradients(self) -> None:
        """Check that FSDP (fully_shard) on ``world_size`` processes gives one process's losses,
        gradients and weights.

        Catches what makes fully sharded training differ from one process: layers that use
        batch statistics, outputs or losses that depend on the batch size, samples mixed across
        the batch, units whose parameters are used outside their forward (where they are
        shards), tied weights split across units, parameters that forward changes in place
        (a change fully_shard loses with the gathered copy), and, with a mixed-precision policy,
        computations that break or drift in it; two steps, each rank on its shard of the batch,
        the module whose gradients differ named.
        """
        unavailable = fsdp_unavailable()
        if unavailable:
            self.skipTest(f"test_fsdp_gradients {unavailable}")
        if self.fsdp_mixed_precision is not None:  # compared with one rank under the policy
            self._fsdp_gradients(self._plan("test_fsdp_gradients", double=False))
        else:
            self._judged_in_float64("test_fsdp_gradients", self._fsdp_gradients)

    def _fsdp_gradients(self, plan: _Plan) -> None:
        watched = copy.deepcopy(plan.model)
        _set_modes(watched, self.local_batch_statistics)
        watch = watch_parameters(watched, lambda: call_model(watched, plan.inputs))
        units = self._units(plan.model, watch)
        step = self._rank_step(plan, _ShardedStep, units, self.fsdp_mixed_precision)
        try:
            if self.fsdp_mixed_precision is not None:
                # One step: after it the ranks' rounding has moved the weights a little from
                # one process's, which the next step's low-precision forward amplifies.
                whole = dataclasses.replace(step, shards=[plan.inputs], weights=[plan.full])
                [reference] = self._run_ranks(_fsdp_rank, whole, world_size=1)
                expected = reference["steps"][:1]
            else:
                expected = plan.one_process
            ranks = self._run_ranks(_fsdp_rank, step)
        except DistributedError as error:
            self._explain_sharding_failure(error, plan.model, units, watch)
        show_once(ranks[0]["warnings"])
        found = self._first_difference(
            [rank["steps"] for rank in ranks], expected, plan, units, watch.changed
        )
        if found is not None:
            # What fully_shard warned about (a unit's output that is a view, which an in-place
            # operation detaches from the gradient's all-gather) can explain a difference the
            # check has no other explanation for.
            unexplained = not plan.training and _UNEXPLAINED in found
            fsdp = [
                message for message, _, filename, _ in ranks[0]["warnings"] if _FSDP in filename
            ]
            warned = fsdp if unexplained else []
            self.fail(
                found + "".join(f"\nfully_shard warned in the ranks: {text}" for text in warned)
            )

    def _units(self, model: nn.Module, watch: Any) -> List[str]:
        """The submodules to wrap before the root: fsdp_units's, or the default policy's."""
        patterns = self.fsdp_units
        if not self._is_set("fsdp_units") or patterns is None:
            return default_units(model, watch)
        units = units_matching(model, patterns)
        if patterns and not units:
            children = [name for name, _ in model.named_children()]
            raise self._contract_error(
                "fsdp_units",
                f"matches no submodule of the model (its children: {', '.join(children)})",
            )
        return units

    def _explain_sharding_failure(
        self, error: DistributedError, model: nn.Module, units: List[str], watch: Any
    ) -> NoReturn:
        text = str(error)
        declared = "self.fsdp_units" if self._is_set("fsdp_units") else "the default policy"
        if _MIXED in text:
            found = [misuse for unit in units for misuse in misuses(model, watch, unit)]
            if found:
                first = found[0]
                running = f"in {first.running}" if first.running else "in the model's forward"
                self.fail(
                    f"fully_shard on {self.world_size} ranks fails: {first.parameter} belongs to "
                    f"the FSDP unit {first.unit} ({declared}), but is used outside that unit's "
                    f"forward, {running}, at {first.location}. fully_shard gathers a unit's "
                    "parameters only while its forward runs; elsewhere the parameter is the "
                    f"rank's shard (a DTensor). Leave {first.unit} out of the units (its "
                    "parameters then belong to the enclosing one), or use the parameter only "
                    f"inside the forward of {first.unit}. The error: {error.first_line()}"
                )
        if _SHARED in text:
            self.fail(
                f"fully_shard refused the FSDP units of {declared} "
                f"({', '.join(units) or 'none'}): a parameter is shared by modules of two units "
                "(tied weights). Put the modules that share it in one unit (wrap their common "
                "parent, or leave one of them out of fsdp_units). "
                f"The error: {error.first_line()}"
            )
        described = ", ".join(units) or "the model only"
        if not self._is_set("fsdp_units") and self.fsdp_mixed_precision is None:
            # Nothing says the model is trained sharded: a model fully_shard cannot train (a
            # scalar parameter, sparse gradients) is no bug of a model trained otherwise.
            said = error.first_line()
            if len(said) > 240:  # the first sentence of a long error
                said = said[: said.find(". ", 0, 240) + 1 or 240]
            self.skipTest(
                f"fully_shard cannot train the model with the default units ({described}) on "
                f"{self.world_size} ranks: {said.rstrip('.')}. If your training code "
                "shards this model, set self.fsdp_units to the modules it wraps: the check "
                "then fails on this"
            )
        self.fail(
            f"training the model sharded with fully_shard on {self.world_size} ranks (units: "
            f"{described}) failed: {error.first_line()}\n{text}"
        )

    def _first_difference(
        self,
        results: List[List[Dict[str, Any]]],
        expected: List[Dict[str, Any]],
        plan: _Plan,
        units: List[str],
        changed: Dict[str, str],
    ) -> Optional[str]:
        """What differs first between the sharded steps and ``expected`` (one process's),
        said for a failure; None when nothing does. ``changed``: the parameters forward
        changes in place (a cause of weights that differ)."""
        mixed = self.fsdp_mixed_precision is not None
        reference = (
            "one rank under the same mixed-precision policy on the whole batch"
            if mixed
            else "one process on the whole batch"
        )
        for number, single in enumerate(expected):
            got = results[0][number]
            what = f"at step {number + 1}"
            for kind in ("grads", "weights"):
                for name, value in single[kind].items():
                    other = got[kind].get(name)
                    if value is None or other is None:
                        continue
                    mismatch = self._mismatch(other, value)
                    if mismatch is None:
                        continue
                    if changed and (kind == "weights" or name in changed):
                        cause = changed_in_forward(changed, fsdp=True)
                    else:
                        cause = self._cause(got["grads"], single["grads"], plan.training, "FSDP")
                    loss = sum(r[number]["loss"] for r in results) / len(results)
                    return (
                        f"{what} the {'gradient' if kind == 'grads' else 'updated weight'} of "
                        f"{name} ({self._module_of(plan.model, name, units)}) that fully_shard "
                        f"gives on {self.world_size} ranks, each on its shard of the batch, "
                        f"gathered whole, differs from that of {reference}"
                        + ("" if not mixed else " beyond fsdp_mixed_precision_tolerance")
                        + f" (the loss: {loss:.6g} averaged over the ranks, "
                        f"{single['loss']:.6g} in one process). {cause}\n{mismatch}"
                    )
            loss = sum(r[number]["loss"] for r in results) / len(results)
            mismatch = self._mismatch(torch.tensor(loss), torch.tensor(single["loss"]))
            if mismatch is not None:
                return (
                    f"{what} the loss averaged over the {self.world_size} ranks of fully_shard "
                    f"({loss:.6g}) differs from that of {reference} ({single['loss']:.6g}), "
                    "while the gradients agree: the loss is not a mean over the samples.\n"
                    f"{mismatch}"
                )
        return None

    def _mismatch(self, got: torch.Tensor, expected: torch.Tensor) -> Optional[str]:
        """assert_close's report when ``got`` differs from ``expected`` (None when not), within
        the float32 tolerances, or the mixed-precision ones."""
        if self.fsdp_mixed_precision is not None:
            rtol, atol = self.fsdp_mixed_precision_tolerance
            atol = atol * float(expected.detach().abs().max()) if expected.numel() else atol
        else:
            rtol, atol = self.ddp_rtol, self.ddp_atol
        try:
            torch.testing.assert_close(got.to(expected.dtype), expected, rtol=rtol, atol=atol)
        except AssertionError as mismatch:
            return str(mismatch)
        return None

    @staticmethod
    def _module_of(model: nn.Module, parameter: str, units: List[str]) -> str:
        """ "in encoder.1 (Linear), of the FSDP unit encoder" for encoder.1.weight."""
        owner = parameter.rpartition(".")[0]
        module = dict(model.named_modules()).get(owner)
        kind = type(module).__name__ if module is not None else "module"
        unit = max(
            (u for u in units if owner == u or owner.startswith(u + ".")), key=len, default=""
        )
        where = f"the FSDP unit {unit}" if unit else "the root unit (the model itself)"
        return f"in {owner or 'the model'} ({kind}), of {where}"
