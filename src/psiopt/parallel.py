"""Data-parallel BatchNorm on any device.

``torch.nn.SyncBatchNorm`` runs on CUDA only ("SyncBatchNorm expected input tensor to be on GPU"
on CPU), so a BatchNorm network trained with DDP on CPU (gloo) normalises each rank's part of the
batch with its own statistics: not the network a single process trains.  :class:`SyncBatchNorm`
takes the training statistics over the batch of every rank (Ioffe & Szegedy's batch is the global
one): two ``all_reduce`` calls per layer and forward (the per-channel sums, then the centred sums
of squares), both differentiable, so each rank's gradient is that of the global batch.  In eval
mode, or without an initialised process group of more than one rank, it is a plain BatchNorm.
Its state dict is BatchNorm's; discovery and the running-statistics links see a BatchNorm.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


def _world_size(group) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


class _SumOverRanks(torch.autograd.Function):
    """``all_reduce`` (sum) whose gradient is the sum of every rank's gradient."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group) -> Tensor:
        ctx.group = group
        out = tensor.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class SyncBatchNorm(_BatchNorm):
    """BatchNorm whose training statistics are those of the batch of every rank in ``process_group``
    (default: the world).  Takes inputs of shape ``(N, C, ...)`` like ``torch.nn.SyncBatchNorm``."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group=None,
                 device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input of at least 2 dimensions (got {input.dim()}D)")

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if not self.training or _world_size(self.process_group) == 1:
            return super().forward(input)
        input = input.view_as(input)  # one consumer of the input, as any norm layer (discovery)
        dims = [0, *range(2, input.dim())]
        shape = (1, -1) + (1,) * (input.dim() - 2)
        count = input.new_full((1,), input.numel() // input.shape[1])
        total = _SumOverRanks.apply(torch.cat([input.sum(dims), count]), self.process_group)
        n = total[-1]
        mean = total[:-1] / n
        centred = input - mean.view(shape)
        var = _SumOverRanks.apply(centred.square().sum(dims), self.process_group) / n
        if self.track_running_stats and self.running_mean is not None:
            self._update_running_stats(mean.detach(), var.detach() * (n / (n - 1)))
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        return out * self.weight.view(shape) + self.bias.view(shape) if self.affine else out

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, unbiased_var: Tensor) -> None:
        """As ``_BatchNorm.forward``: an exponential average, or the cumulative one when
        ``momentum`` is ``None``."""
        self.num_batches_tracked.add_(1)
        factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        self.running_mean.mul_(1 - factor).add_(mean * factor)
        self.running_var.mul_(1 - factor).add_(unbiased_var * factor)


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Replace every BatchNorm layer of ``module`` by a :class:`SyncBatchNorm` that shares its
    parameters and buffers (the same tensors: optimizers and statistics links stay valid);
    returns the module (a new one when ``module`` itself is a BatchNorm)."""
    if isinstance(module, _BatchNorm) and not isinstance(module, SyncBatchNorm):
        new = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, process_group, device="meta")
        for name, tensor in [*module.named_parameters(recurse=False),
                             *module.named_buffers(recurse=False)]:
            setattr(new, name, tensor)
        new.train(module.training)
        return new
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, process_group))
    return module


__all__ = ["SyncBatchNorm", "convert_sync_batchnorm"]
