"""``nn.SyncBatchNorm`` on CPU processes, which DDP refuses: BatchNorm over the samples of
all ranks together, as SyncBatchNorm computes it on GPUs."""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["replace_sync_batchnorm"]


class _SyncBatchNormOnCPU(nn.modules.batchnorm._BatchNorm):
    """``nn.SyncBatchNorm`` for CPU processes, which it refuses: in training mode it
    normalises with the mean and variance of all ranks' batches together, all-reduced so
    that the gradient flows through them to every rank's inputs (as SyncBatchNorm's backward
    does), each rank's share counted by its own batch size, and updates its running
    statistics with them; in eval mode, or without a process group, it is BatchNorm."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # a cumulative average
                factor = 1.0 / float(self.num_batches_tracked)
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        count = torch.tensor([input.numel() / max(1, input.shape[1])], dtype=input.dtype)
        totals = _all_reduce(torch.cat([input.sum(dims), count]))
        total = totals[-1]
        if float(total.detach()) <= 1:
            raise ValueError(
                "Expected more than 1 value per channel when training, got input size "
                f"{list(input.shape)} on this rank ({int(total.detach())} values on all ranks)"
            )
        mean = totals[:-1] / total
        centred = input - mean.reshape(shape)
        variance = _all_reduce(centred.square().sum(dims)) / total
        output = centred * torch.rsqrt(variance + self.eps).reshape(shape)
        if self.weight is not None:
            output = output * self.weight.reshape(shape)
        if self.bias is not None:
            output = output + self.bias.reshape(shape)
        if self.track_running_stats and self.running_mean is not None:
            assert self.running_var is not None
            with torch.no_grad():
                unbiased = variance * (total / (total - 1))
                self.running_mean.mul_(1 - factor).add_(factor * mean)
                self.running_var.mul_(1 - factor).add_(factor * unbiased)
        return output


class _SumOverRanks(torch.autograd.Function):
    """The sum of a tensor over the ranks, differentiable: the gradient each rank gets is the
    sum of the ranks' gradients of the result (what SyncBatchNorm's backward all-reduces)."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx: Any, gradient: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, _SumOverRanks.apply(gradient))


def _all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    return cast(torch.Tensor, _SumOverRanks.apply(tensor))


def replace_sync_batchnorm(model: nn.Module) -> nn.Module:
    """``model`` with every SyncBatchNorm replaced by a _SyncBatchNormOnCPU holding the same
    parameters and buffers (so the same names) in the same mode."""
    if isinstance(model, nn.SyncBatchNorm):
        replacement = _SyncBatchNormOnCPU(
            model.num_features,
            model.eps,
            model.momentum,
            model.affine,
            model.track_running_stats,
        )
        for name in ("weight", "bias"):
            setattr(replacement, name, getattr(model, name))
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            replacement.register_buffer(name, getattr(model, name))
        replacement.train(model.training)
        return replacement
    for name, child in model.named_children():
        replaced = replace_sync_batchnorm(child)
        if replaced is not child:
            setattr(model, name, replaced)
    return model
