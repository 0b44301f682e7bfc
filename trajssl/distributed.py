"""Batch normalisation synchronised over processes, on any device.

Under DDP each process sees 1/world of the batch; plain BatchNorm would normalise with per-process statistics and a
2-process run would not match a 1-process run on the same global batch. torch's ``nn.SyncBatchNorm`` does this on
GPUs only, so :func:`convert_sync_batchnorm` uses it on CUDA and :class:`DistBatchNorm` (same parameters and
buffers, statistics all-reduced with gradient, two passes for the variance) elsewhere, e.g. CPU / gloo. In a single
process both are the ordinary BatchNorm. Gathering embeddings for batch losses is
``common.distributed.gather_with_grad``.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from common.distributed import gather_with_grad, is_distributed, world_size

__all__ = ["DistBatchNorm", "convert_sync_batchnorm", "gather_with_grad", "all_reduce_sum"]


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        # d(sum over ranks)/d(own input) = sum over ranks of the upstream gradients.
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over processes, differentiable; the identity in a single process."""
    if not is_distributed() or world_size() == 1:
        return x
    return _AllReduceSum.apply(x)


class DistBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over (N, C) or (N, C, ...) inputs whose training statistics cover the batches of all processes."""

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {input.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed() and world_size() > 1):
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
        count = all_reduce_sum(torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device))
        mean = all_reduce_sum(x.sum(dims)) / count
        centred = x - mean.view(shape)
        var = all_reduce_sum(centred.pow(2).sum(dims)) / count
        y = centred * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
                n = float(count)
                self.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
                self.running_var.mul_(1 - factor).add_(var.detach() * (n / max(n - 1, 1.0)), alpha=factor)
        return y


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Replace every BatchNorm1d/2d by a synchronised one (``nn.SyncBatchNorm`` on CUDA, :class:`DistBatchNorm`
    elsewhere), keeping parameters and running statistics. Returns the converted module."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)) and not isinstance(module, DistBatchNorm):
        new = DistBatchNorm(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        with torch.no_grad():
            if module.affine:
                new.weight.copy_(module.weight)
                new.bias.copy_(module.bias)
                new.weight.requires_grad_(module.weight.requires_grad)
                new.bias.requires_grad_(module.bias.requires_grad)
            if module.track_running_stats:
                new.running_mean.copy_(module.running_mean)
                new.running_var.copy_(module.running_var)
                new.num_batches_tracked.copy_(module.num_batches_tracked)
        new.train(module.training)
        ref = next(iter([*module.parameters(), *module.buffers()]), None)
        return new if ref is None else new.to(ref.device)
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, device))
    return module
