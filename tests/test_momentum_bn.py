"""moco/momentum_bn.py: Momentum² Teacher's momentum BatchNorm (alpha schedule, statistics after two
views, eval mode, the layout of a torchvision ResNet)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from helpers import small_moco
from moco.momentum_bn import MomentumBatchNorm, convert_to_momentum_bn, mbn_alpha
from moco.norm import convert_sync_batchnorm
from moco.schedules import moco_momentum


def test_momentum_bn_alpha_at_0_half_and_end():
    assert mbn_alpha(0) == 1 and mbn_alpha(0.5) == pytest.approx(0.5) and mbn_alpha(1) == pytest.approx(0)
    # equivalently (1 - tau_k) / (1 - tau_base)
    for progress in (0.1, 0.37, 0.8):
        assert mbn_alpha(progress) == pytest.approx((1 - moco_momentum(progress, 0.99, 1)) / 0.01)


def test_momentum_bn_at_alpha_one_against_batch_norm():
    torch.manual_seed(0)
    for n in (32, 128):
        x = torch.randn(n, 8) * 3 + 1
        ref = F.batch_norm(x, None, None, training=True, eps=1e-12)
        faithful = MomentumBatchNorm(8, eps=1e-12)
        plain = MomentumBatchNorm(8, eps=1e-12, faithful=False)
        assert torch.allclose(plain(x), ref, atol=1e-5)
        ratio = (faithful(x).std(dim=0) / ref.std(dim=0)).mean().item()
        assert ratio == pytest.approx((n - 1) / n, abs=1e-5)    # 0.96875 at 32, 0.99219 at 128


@pytest.mark.parametrize('faithful', [True, False])
@pytest.mark.parametrize('shape', [(16, 4), (4, 4, 3, 3)])
def test_momentum_bn_statistics_after_two_views(faithful, shape):
    torch.manual_seed(1)
    mbn = MomentumBatchNorm(4, faithful=faithful)
    old_mean, old_var = torch.randn(4), torch.rand(4) + 0.5
    mbn.running_mean.copy_(old_mean)
    mbn.running_var.copy_(old_var)
    alpha = 0.3
    mbn.set_alpha(alpha)
    x1, x2 = torch.randn(shape) * 2 + 1, torch.randn(shape) - 1
    dims = [0] + list(range(2, len(shape)))
    n = x1.numel() // 4
    bessel = n / (n - 1) if faithful else 1.

    y1 = mbn(x1)
    assert torch.equal(mbn.running_mean, old_mean)          # first view: nothing moves yet
    view = [1, -1] + [1] * (len(shape) - 2)
    var_norm = x1.var(dim=dims) * bessel if faithful else x1.var(dim=dims, unbiased=False)
    mixed_mean = alpha * x1.mean(dim=dims) + (1 - alpha) * old_mean
    mixed_var = alpha * var_norm + (1 - alpha) * old_var
    assert torch.allclose(y1, (x1 - mixed_mean.view(view)) / torch.sqrt(mixed_var.view(view) + 1e-5), atol=1e-5)

    mbn(x2)
    mean_r = alpha * (x1.mean(dim=dims) + x2.mean(dim=dims)) / 2 + (1 - alpha) * old_mean
    var_r = alpha * (x1.var(dim=dims) + x2.var(dim=dims)) / 2 * bessel + (1 - alpha) * old_var
    assert torch.allclose(mbn.running_mean, mean_r, atol=1e-6)
    assert torch.allclose(mbn.running_var, var_r, atol=1e-6)


def test_momentum_bn_eval_mode_and_vanilla_layout():
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.uniform_()
        bn.bias.uniform_()
        bn.running_mean.uniform_()
        bn.running_var.uniform_(0.5, 2)
    holder = nn.Sequential(bn)
    convert_to_momentum_bn(holder)
    mbn = holder[0]
    assert isinstance(mbn, MomentumBatchNorm)
    bn.weight.requires_grad_(False)
    assert convert_to_momentum_bn(nn.Sequential(bn))[0].weight.requires_grad is False   # frozen stays frozen
    x = torch.randn(3, 4, 5, 5)
    bn.eval()
    mbn.eval()
    assert torch.allclose(mbn(x), bn(x), atol=1e-6)         # eval: the running statistics only
    fresh = nn.BatchNorm2d(4)
    fresh.load_state_dict(mbn.state_dict())                  # same names: loads into a vanilla BN
    # and it is not a _BatchNorm: conversion to SyncBatchNorm must leave it alone
    assert isinstance(convert_sync_batchnorm(holder, torch.device('cpu'))[0], MomentumBatchNorm)


def test_momentum_bn_layers_are_the_only_difference_from_torchvision():
    teacher = small_moco('m2t').momentum_encoder
    vanilla = torchvision.models.resnet18()
    names = {k for k in teacher.state_dict() if not k.startswith('fc.')}
    assert names == {k for k in vanilla.state_dict() if not k.startswith('fc.')}
