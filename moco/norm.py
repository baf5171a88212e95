"""Synchronised BatchNorm for every device.

MoCo v3 normalises with the statistics of the whole global batch (SyncBatchNorm, paper §4). torch's
``nn.SyncBatchNorm`` refuses CPU modules under DDP, so CPU/gloo runs use ``AllReduceBatchNorm``: the
same semantics (global mean and biased variance for normalisation, unbiased variance for the running
estimate, gradients summed across processes) built from a differentiable all-reduce.
"""
import torch
import torch.distributed as tdist
import torch.distributed.nn.functional as dist_nn
import torch.nn as nn

from moco import dist as moco_dist
from moco.dtypes import at_least_fp32


class AllReduceBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the union of the batches of all processes (any dims >= 2, any device)."""

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f'expected at least 2D input (got {x.dim()}D input)')

    def forward(self, x):
        if not self.training or moco_dist.world_size() == 1:
            return super().forward(x)

        C = x.shape[1]
        shape = [1, C] + [1] * (x.dim() - 2)
        dims = [0] + list(range(2, x.dim()))
        xf = at_least_fp32(x)
        count = xf.new_tensor([xf.numel() // C])
        # two passes (sum, then squared deviations) for a numerically stable variance
        sums = dist_nn.all_reduce(torch.cat([xf.sum(dims), count]), op=tdist.ReduceOp.SUM)
        n = sums[C]
        mean = sums[:C] / n                                                           # (C,)
        var = dist_nn.all_reduce((xf - mean.view(shape)).pow(2).sum(dims), op=tdist.ReduceOp.SUM) / n

        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = (1.0 / self.num_batches_tracked.item()) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(var.detach() * n / (n - 1), alpha=momentum)

        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_sync_batchnorm(module, device):
    """Replace every BatchNorm by its synchronised version: torch's SyncBatchNorm on CUDA, the
    all-reduce one elsewhere. State-dict keys are unchanged."""
    if device.type == 'cuda':
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _convert(module)


def _convert(module):
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, AllReduceBatchNorm):
        out = AllReduceBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                 module.track_running_stats)
        if module.affine:
            with torch.no_grad():
                out.weight = module.weight
                out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
    for name, child in module.named_children():
        out.add_module(name, _convert(child))
    return out
