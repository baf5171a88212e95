"""Momentum BatchNorm of Momentum² Teacher (Li et al. 2021, arXiv 2101.07525; zengarden/momentum2-teacher
models/resnet_mbn.py), for the teacher network only.

Each layer normalises with a mix of the current batch's statistics and a running history:
    mu~ = alpha * mu_batch + (1 - alpha) * mu_r,    var~ = alpha * var_batch + (1 - alpha) * var_r
and updates the history once per iteration, lazily, after the SECOND view has passed:
    mu_r  <- alpha * (mu_1 + mu_2) / 2 + (1 - alpha) * mu_r
    var_r <- alpha * (s2_1 + s2_2) / 2 + (1 - alpha) * var_r
so both views of an iteration see the same history. alpha goes from 1 (plain per-process batch
statistics) to 0 (pure history) with a half cosine over training: alpha_k = (1 + cos(pi k / K)) / 2,
set from the global step by the training loop (``set_alpha``), so a resumed run continues exactly.

``faithful=True`` (default) keeps the release's arithmetic: the batch variance is torch.var's unbiased
one, multiplied again by n/(n-1) (a double Bessel factor). ``faithful=False`` is ordinary BatchNorm
arithmetic (biased variance to normalise, unbiased to update), equal to F.batch_norm at alpha = 1.

In eval mode the layer is a plain BatchNorm with its running statistics: how the release evaluates the
teacher (its weights and statistics loaded into a vanilla-BN network). Buffer and parameter names are
BatchNorm's, so a teacher's state_dict loads into a torchvision model.

Not a ``_BatchNorm`` subclass on purpose: ``convert_sync_batchnorm`` would silently turn it into SyncBN.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from moco.dtypes import at_least_fp32


class MomentumBatchNorm(nn.Module):
    def __init__(self, num_features, eps=1e-5, faithful=True):
        super().__init__()
        self.num_features, self.eps, self.faithful = num_features, eps, faithful
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer('running_mean', torch.zeros(num_features))
        self.register_buffer('running_var', torch.ones(num_features))
        self.register_buffer('num_batches_tracked', torch.tensor(0, dtype=torch.long))
        self.alpha = 1.0
        self._stash = None  # statistics of the first view of the current iteration

    def set_alpha(self, alpha):
        self.alpha = float(alpha)

    def forward(self, x):
        if not self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0., self.eps)
        dims = [0] + list(range(2, x.dim()))          # all but the channel dim
        shape = [1, -1] + [1] * (x.dim() - 2)
        n = x.numel() // x.shape[1]
        with torch.no_grad():                         # the statistics are not differentiated
            xf = at_least_fp32(x)
            mean = xf.mean(dim=dims)
            var_unbiased = xf.var(dim=dims, unbiased=True)
            if self.faithful:
                var_update = var_norm = var_unbiased * (n / (n - 1))
            else:
                var_update, var_norm = var_unbiased, var_unbiased * ((n - 1) / n)
            a = self.alpha
            mix_mean = a * mean + (1 - a) * self.running_mean
            mix_var = a * var_norm + (1 - a) * self.running_var
        y = (x - mix_mean.view(shape).to(x.dtype)) * torch.rsqrt(mix_var + self.eps).view(shape).to(x.dtype)
        y = y * self.weight.view(shape).to(x.dtype) + self.bias.view(shape).to(x.dtype)
        self._lazy_update(mean, var_update)
        return y

    @torch.no_grad()
    def _lazy_update(self, mean, var):
        if self._stash is None:
            self._stash = (mean, var)
            return
        mean1, var1 = self._stash
        self._stash = None
        a = self.alpha
        self.running_mean.mul_(1 - a).add_(a * (mean1 + mean) / 2)
        self.running_var.mul_(1 - a).add_(a * (var1 + var) / 2)
        self.num_batches_tracked.add_(1)

    def extra_repr(self):
        return f'{self.num_features}, eps={self.eps}, faithful={self.faithful}, alpha={self.alpha:.4g}'


def mbn_alpha(progress):
    """alpha at ``progress`` = k / K in [0, 1]: 1 -> 0.5 -> 0 with a half cosine."""
    return (1. + math.cos(math.pi * progress)) / 2.


def convert_to_momentum_bn(module, faithful=True):
    """Replace every BatchNorm1d/2d of ``module`` (in place, recursively) by a MomentumBatchNorm holding
    the same affine parameters and running statistics; returns the module."""
    for name, child in module.named_children():
        if isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d)):
            if not child.affine or not child.track_running_stats:
                raise ValueError(f'{name}: MomentumBatchNorm needs an affine BatchNorm with running statistics')
            mbn = MomentumBatchNorm(child.num_features, child.eps, faithful)
            with torch.no_grad():
                mbn.weight.copy_(child.weight)
                mbn.bias.copy_(child.bias)
                mbn.running_mean.copy_(child.running_mean)
                mbn.running_var.copy_(child.running_var)
            mbn.weight.requires_grad_(child.weight.requires_grad)  # a frozen teacher stays frozen
            mbn.bias.requires_grad_(child.bias.requires_grad)
            setattr(module, name, mbn)
        else:
            convert_to_momentum_bn(child, faithful)
    return module


def set_alpha(module, alpha):
    for m in module.modules():
        if isinstance(m, MomentumBatchNorm):
            m.set_alpha(alpha)
