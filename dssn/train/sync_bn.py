"""Synchronised BatchNorm for both networks when training on several workers.

On CUDA this is ``torch.nn.SyncBatchNorm``. PyTorch's SyncBatchNorm refuses CPU tensors, so on
CPU (gloo) the BatchNorm layers become :class:`AllReduceBatchNorm`: the per-channel sum, sum of
squares and pixel count are summed over workers with one differentiable all-reduce, giving the
statistics of the whole global batch, as the reference's SyncBatchNorm does across GPUs.
State-dict keys are those of ``nn.BatchNorm2d``, so checkpoints load into either.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class _SumOverWorkers(torch.autograd.Function):
    """all_reduce(SUM) whose gradient is the all_reduce(SUM) of the incoming gradient."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def _distributed(group) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


class AllReduceBatchNorm(_BatchNorm):
    """BatchNorm whose training statistics cover the batches of all workers (any device).

    In eval mode, or without an initialised process group of more than one worker, it is plain
    BatchNorm.
    """

    def __init__(self, *args, process_group=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.process_group or dist.group.WORLD
        if not (self.training and _distributed(group)):
            return super().forward(x)
        channels = x.shape[1]
        dims = [0, *range(2, x.dim())]
        xf = x.float()
        count = xf.new_full((1,), x.numel() // channels)
        # (2C + 1,): per-channel sum, per-channel sum of squares, element count of this worker
        local = torch.cat([xf.sum(dims), (xf * xf).sum(dims), count])
        total = _SumOverWorkers.apply(local, group)
        n = total[-1]
        mean = total[:channels] / n
        var = (total[channels : 2 * channels] / n - mean * mean).clamp_min(0.0)  # biased
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), n.detach())
        shape = [1, channels] + [1] * (x.dim() - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, n: torch.Tensor):
        self.num_batches_tracked += 1
        momentum = self.momentum
        if momentum is None:  # cumulative moving average, as nn.BatchNorm
            momentum = 1.0 / float(self.num_batches_tracked)
        unbiased = var * n / (n - 1).clamp_min(1.0)
        self.running_mean.mul_(1 - momentum).add_(mean.to(self.running_mean.dtype), alpha=momentum)
        self.running_var.mul_(1 - momentum).add_(
            unbiased.to(self.running_var.dtype), alpha=momentum
        )


def _to_all_reduce_bn(module: nn.Module) -> nn.Module:
    if isinstance(module, _BatchNorm) and not isinstance(
        module, (AllReduceBatchNorm, nn.SyncBatchNorm)
    ):
        new = AllReduceBatchNorm(
            module.num_features,
            eps=module.eps,
            momentum=module.momentum,
            affine=module.affine,
            track_running_stats=module.track_running_stats,
        )
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new.to(next(iter(module.state_dict().values()), torch.empty(0)).device)
    for name, child in module.named_children():
        module.add_module(name, _to_all_reduce_bn(child))
    return module


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm of ``module`` synchronised across workers: torch's SyncBatchNorm on
    CUDA, :class:`AllReduceBatchNorm` elsewhere. Returns the (possibly new) module."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _to_all_reduce_bn(module)
