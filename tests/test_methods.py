"""BYOL and Momentum² Teacher (--method byol|m2t): the checks of section 4.5 of
shared/reference/byol-m2t.md, plus heads, momentum BN, teacher evaluation and exact resume."""
import math
import os
import shutil
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from conftest import assert_identical, load, start, wait_output
from moco.checkpoint import load_backbone, read_pretrained_encoder
from moco.data.sampler import EpochSampler
from moco.schedules import scaled_lr
from moco.losses import regression_loss
from moco.methods import apply_method_defaults, method_defaults
from moco.models import build_moco
from moco.momentum_bn import MomentumBatchNorm, convert_to_momentum_bn, mbn_alpha
from moco.norm import convert_sync_batchnorm
from moco.schedules import moco_momentum


def _small(method, arch='resnet18_cifar', **kw):
    return build_moco(arch, dim=16, mlp_dim=32, image_size=8 if 'vit' in arch else None, method=method, **kw)


# ---------------------------------------------------------------- heads

def test_heads_of_each_method():
    def layers(seq):
        return [(type(m).__name__, getattr(m, 'bias', None) is not None) for m in seq]
    moco, byol, m2t = (_small(m) for m in ('mocov3', 'byol', 'm2t'))
    assert layers(moco.base_encoder.fc) == [('Linear', False), ('BatchNorm1d', True), ('ReLU', False),
                                            ('Linear', False), ('BatchNorm1d', False)]
    assert layers(byol.base_encoder.fc) == [('Linear', True), ('BatchNorm1d', True), ('ReLU', False),
                                            ('Linear', False)]
    assert layers(byol.predictor) == layers(byol.base_encoder.fc)
    assert layers(m2t.base_encoder.fc) == [('Linear', True), ('BatchNorm1d', True), ('ReLU', False), ('Linear', True)]
    assert layers(m2t.predictor) == layers(m2t.base_encoder.fc)
    # Momentum² Teacher: momentum BN everywhere in the teacher, plain BN in the student
    assert not any(isinstance(m, nn.BatchNorm2d) for m in m2t.momentum_encoder.modules())
    n_mbn = sum(isinstance(m, MomentumBatchNorm) for m in m2t.momentum_encoder.modules())
    n_bn = sum(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in m2t.base_encoder.modules())
    assert n_mbn == n_bn == 21   # resnet18: 20 in the backbone + 1 in the projector
    vit = _small('byol', 'vit_tiny_patch4')
    assert [type(m).__name__ for m in vit.base_encoder.head] == ['Linear', 'BatchNorm1d', 'ReLU', 'Linear',
                                                                  'BatchNorm1d', 'ReLU', 'Linear']


def test_only_mocov3_zero_initialises_residual_branches():
    gammas = {m: _small(m).base_encoder.layer1[0].bn2.weight for m in ('mocov3', 'byol', 'm2t')}
    assert torch.all(gammas['mocov3'] == 0)
    assert torch.all(gammas['byol'] == 1) and torch.all(gammas['m2t'] == 1)


# ---------------------------------------------------------------- losses (4.5.1, 4.5.2)

def test_regression_loss_range_and_values():
    p = torch.randn(64, 16)
    assert regression_loss(p, p).abs() < 1e-6                           # aligned: 0
    assert abs(regression_loss(p, -p).item() - 4) < 1e-6                 # opposite: 4 per direction
    q = torch.tensor([[1., 0.], [0., 2.]])
    z = torch.tensor([[0., 3.], [0., 1.]])                               # cos 0 and 1
    assert abs(regression_loss(q, z).item() - (2 + 0) / 2) < 1e-6
    both = regression_loss(p, torch.randn(64, 16)) + regression_loss(torch.randn(64, 16), p)
    assert 0 <= both <= 8
    assert regression_loss(p.half(), p.half()).dtype == torch.float32   # computed in fp32


@pytest.mark.parametrize('method', ['byol', 'm2t'])
def test_initial_loss_about_four(method):
    """Random R50 at 64 px, batch 64, two views of the same random images: the sum of both directions
    is 4 - 2 cos(p1, z'2) - 2 cos(p2, z'1), about 4. At init p and z' point along unrelated directions
    (each net has its own common ReLU-mean component), so the mean cosine is a few hundredths either
    side of 0 depending on the seed: the reference notes measured 3.78-3.92 (seeds 0-2), this code
    3.94-4.02 (seeds 0-2). Far outside that band means a wrong convention (BYOL-PyTorch's halved loss
    gives ~1.9) or a broken head."""
    torch.manual_seed(0)
    model = build_moco('resnet50', method=method).train()
    x = torch.randn(64, 3, 64, 64)
    with torch.no_grad():
        loss = model(x, x.flip(3), 0.99).item()
    assert 3.7 < loss < 4.15, loss


def test_mocov3_initial_loss_is_about_4_log_batch():
    torch.manual_seed(0)
    model = build_moco('resnet50').train()
    with torch.no_grad():
        loss = model(torch.randn(32, 3, 64, 64), torch.randn(32, 3, 64, 64), 0.99).item()
    assert abs(loss - 4 * math.log(32)) < 0.1, loss


# ---------------------------------------------------------------- schedules (4.5.3, 4.5.4, 4.5.6, 4.5.7)

@pytest.mark.parametrize('base', [0.99, 0.996, 0.97])
def test_target_momentum_at_0_half_and_end(base):
    K = 100
    assert moco_momentum(0, base, K) == pytest.approx(base, abs=1e-12)
    assert moco_momentum(K / 2, base, K) == pytest.approx((1 + base) / 2, abs=1e-12)
    assert moco_momentum(K, base, K) == pytest.approx(1, abs=1e-12)


def test_momentum_bn_alpha_at_0_half_and_end():
    assert mbn_alpha(0) == 1 and mbn_alpha(0.5) == pytest.approx(0.5) and mbn_alpha(1) == pytest.approx(0)
    # equivalently (1 - tau_k) / (1 - tau_base)
    for progress in (0.1, 0.37, 0.8):
        assert mbn_alpha(progress) == pytest.approx((1 - moco_momentum(progress, 0.99, 1)) / 0.01)


@pytest.mark.parametrize('method, epochs, batch, peak, optimizer', [
    ('mocov3', 100, 4096, 9.6, 'lars'), ('byol', 40, 4096, 7.2, 'lars'), ('byol', 100, 4096, 7.2, 'lars'),
    ('byol', 300, 4096, 4.8, 'lars'), ('byol', 1000, 4096, 3.2, 'lars'), ('m2t', 100, 4096, 7.2, 'lars'),
    ('m2t', 200, 4096, 7.2, 'lars'), ('m2t', 300, 4096, 4.8, 'lars'), ('m2t', 100, 1024, 0.2, 'sgd')])
def test_peak_learning_rates(method, epochs, batch, peak, optimizer):
    args = SimpleNamespace(method=method, epochs=epochs, batch_size=batch, lr=None, weight_decay=None, moco_m=None,
                           optimizer=None, moco_m_cos=False, world_size=1, workers=0, multiprocessing_distributed=False)
    apply_method_defaults(args)
    args.lr = scaled_lr(args.lr, args.batch_size)
    assert args.lr == pytest.approx(peak) and args.optimizer == optimizer
    assert args.moco_m_cos == (method != 'mocov3')


def test_presets_and_given_flags_win():
    assert method_defaults('byol', 1000, 4096) == dict(lr=0.2, weight_decay=1.5e-6, moco_m=0.996, optimizer='lars',
                                                       moco_m_cos=True)
    assert method_defaults('byol', 40, 4096)['moco_m'] == 0.97
    assert method_defaults('m2t', 100, 256)['weight_decay'] == 1e-4
    args = SimpleNamespace(method='byol', epochs=300, batch_size=4096, lr=1.0, weight_decay=None, moco_m=0.9,
                           optimizer='adamw', moco_m_cos=False)
    apply_method_defaults(args)
    assert (args.lr, args.weight_decay, args.moco_m, args.optimizer) == (1.0, 1e-6, 0.9, 'adamw')
    plain = SimpleNamespace(method='mocov3', epochs=300, batch_size=4096, lr=None, weight_decay=None, moco_m=None,
                            optimizer=None, moco_m_cos=False)
    apply_method_defaults(plain)   # the original main_moco.py defaults, momentum schedule as the flag says
    assert (plain.lr, plain.weight_decay, plain.moco_m, plain.optimizer, plain.moco_m_cos) == \
        (0.6, 1e-6, 0.99, 'lars', False)


def test_imagenet_iterations_per_epoch():
    sampler = EpochSampler(1_281_167, 4096, shuffle=True, drop_last=True, seed=0)
    iters = len(sampler) // 4096
    assert iters == 312 and [iters * e for e in (100, 300, 1000)] == [31_200, 93_600, 312_000]
    assert iters * 10 == 3_120   # warmup iterations


# ---------------------------------------------------------------- EMA (4.5.3)

@pytest.mark.parametrize('method', ['byol', 'm2t'])
def test_one_ema_step_is_exact_and_leaves_buffers(method):
    torch.manual_seed(0)
    model = _small(method)
    with torch.no_grad():
        for p in model.base_encoder.parameters():
            p.add_(torch.randn_like(p))
    theta = [p.clone() for p in model.base_encoder.parameters()]
    xi = [p.clone() for p in model.momentum_encoder.parameters()]
    buffers = {k: v.clone() for k, v in model.momentum_encoder.named_buffers()}
    tau = 0.97
    model._update_momentum_encoder(tau)
    for t, x, new in zip(theta, xi, model.momentum_encoder.parameters()):
        assert torch.equal(new, x * tau + t * (1 - tau))
    for k, v in model.momentum_encoder.named_buffers():
        assert torch.equal(v, buffers[k]), k


# ---------------------------------------------------------------- momentum BN (4.5.4)

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


def test_teacher_passes_update_each_momentum_bn_once_per_step():
    model = _small('m2t').train()
    x = torch.randn(4, 3, 8, 8)
    model(x, x.flip(3), 0.99, mbn_alpha(0.25))
    counts = {m.num_batches_tracked.item() for m in model.momentum_encoder.modules() if isinstance(m, MomentumBatchNorm)}
    alphas = {m.alpha for m in model.momentum_encoder.modules() if isinstance(m, MomentumBatchNorm)}
    assert counts == {1} and alphas == {mbn_alpha(0.25)}


# ---------------------------------------------------------------- LARS partition (4.5.5)

@pytest.mark.parametrize('method, adapted, excluded', [('mocov3', 57, 110), ('byol', 57, 112), ('m2t', 57, 114)])
def test_lars_partition_resnet50(method, adapted, excluded):
    """Tensors LARS adapts (ndim > 1: 53 convs + 4 Linear weights) and excludes (BN and biases). The
    reference's 171 = 57 + 114 is for heads with a bias on every Linear (the BYOL-PyTorch and M2 heads);
    official BYOL heads have no bias on the last Linear, hence 112."""
    model = build_moco('resnet50', method=method)
    trained = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.ndim > 1 for p in trained) == adapted
    assert sum(p.ndim <= 1 for p in trained) == excluded


# ---------------------------------------------------------------- evaluation of the teacher

def test_linear_probe_reads_the_m2t_teacher_with_its_statistics(tmp_path):
    model = _small('m2t').train()
    x = torch.randn(8, 3, 8, 8)
    for step in range(3):
        model(x, x.flip(3), 0.99, mbn_alpha(step / 3))
    state = {'module.' + k: v for k, v in model.state_dict().items()}
    path = tmp_path / 'm2t.pth.tar'
    torch.save({'state_dict': state, 'epoch': 1, 'arch': 'resnet18_cifar', 'method': 'm2t'}, path)
    encoder, arch, _ = read_pretrained_encoder(str(path), 'fc')
    assert arch == 'resnet18_cifar'
    teacher_mean = model.momentum_encoder.bn1.running_mean
    assert torch.equal(encoder['bn1.running_mean'], teacher_mean)
    assert not torch.equal(teacher_mean, model.base_encoder.bn1.running_mean)
    from moco.models import CIFAR_ARCHS
    backbone = CIFAR_ARCHS['resnet18_cifar'](num_classes=10)
    load_backbone(backbone, encoder, 'fc', str(path))     # everything but the classifier, MBN stats included
    assert torch.equal(backbone.layer1[0].bn1.running_var, model.momentum_encoder.layer1[0].bn1.running_var)


def test_momentum_bn_layers_are_the_only_difference_from_torchvision():
    teacher = _small('m2t').momentum_encoder
    vanilla = torchvision.models.resnet18()
    names = {k for k in teacher.state_dict() if not k.startswith('fc.')}
    assert names == {k for k in vanilla.state_dict() if not k.startswith('fc.')}


# ---------------------------------------------------------------- end to end, resume

def _command(data, out_dir, method, epochs=2):
    return [sys.executable, 'main_moco.py', str(data), '--method', method, '-a', 'resnet18_cifar', '--image-size', '8',
            '--moco-dim', '16', '--moco-mlp-dim', '32', '-b', '8', '--epochs', str(epochs), '--warmup-epochs', '1',
            '-j', '0', '-p', '100', '--seed', '2', '--data-pipeline', 'gpu', '--output-dir', str(out_dir)]


@pytest.mark.parametrize('method', ['byol', 'm2t'])
def test_resume_continues_the_schedules_exactly(tiny_folder, tmp_path, method):
    """A 2-epoch run, and the same run resumed from its epoch-1 checkpoint, end identical: the target
    momentum and (m2t) the momentum-BN alpha come from the global step, and the momentum-BN statistics
    are in the checkpoint. (Read through the GPU data pipeline, run on the CPU: its views resume too.)"""
    rc, out = wait_output(start(_command(tiny_folder, tmp_path / 'full', method)))
    assert rc == 0, out
    assert f'{method} model:' in out and '(cosine to 1)' in out and '(gpu data pipeline)' in out
    os.makedirs(tmp_path / 'cut')
    shutil.copy(tmp_path / 'full' / 'checkpoint_0000.pth.tar', tmp_path / 'cut')
    rc, out = wait_output(start(_command(tiny_folder, tmp_path / 'cut', method) + ['--resume', 'auto']))
    assert rc == 0, out
    a, b = load(tmp_path / 'full' / 'checkpoint_0001.pth.tar'), load(tmp_path / 'cut' / 'checkpoint_0001.pth.tar')
    assert a['method'] == method
    assert_identical(a['state_dict'], b['state_dict'])
    assert_identical(a['optimizer'], b['optimizer'])
    if method == 'm2t':
        key = 'module.momentum_encoder.bn1.running_mean'
        assert not torch.equal(load(tmp_path / 'full' / 'checkpoint_0000.pth.tar')['state_dict'][key], a['state_dict'][key])

    if method == 'byol':  # resuming with another --method is a one-line error (once is enough)
        cmd = _command(tiny_folder, tmp_path / 'cut', 'mocov3', epochs=3) + ['--resume', 'auto']
        rc, out = wait_output(start(cmd))
        assert rc == 2 and 'Traceback' not in out and 'was trained with --method byol' in out, out


def _m2t_ddp_worker(rank, port, result_path):
    import torch.distributed as tdist

    from moco import dist
    tdist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', world_size=2, rank=rank)
    try:
        torch.manual_seed(0)                       # the same initial model on both ranks
        model = _small('m2t').train()
        ddp = dist.ddp(model, torch.device('cpu'), sync_buffers=model.sync_bn)
        torch.manual_seed(100 + rank)              # different images on each rank
        for step in range(2):
            x = torch.randn(4, 3, 8, 8)
            ddp(x, x.flip(3), 0.99, mbn_alpha(0.5)).backward()
        teacher = model.momentum_encoder.bn1.running_mean.clone()
        student = model.base_encoder.bn1.running_mean.clone()
        gathered = [torch.empty_like(teacher) for _ in range(2)]
        tdist.all_gather(gathered, teacher)
        grads = [torch.empty_like(model.base_encoder.conv1.weight.grad) for _ in range(2)]
        tdist.all_gather(grads, model.base_encoder.conv1.weight.grad)
        if rank == 0:
            torch.save({'teacher': gathered, 'grads': grads, 'student': student}, result_path)
    finally:
        tdist.destroy_process_group()


def test_m2t_under_ddp_keeps_momentum_bn_statistics_per_process(tmp_path):
    """Two gloo processes, different data: gradients are averaged (equal on both ranks), but each
    rank keeps its own momentum-BN history (no buffer broadcast), as in the release under torch 1.5."""
    import torch.multiprocessing as mp

    from conftest import unassigned_port
    path = tmp_path / 'result.pt'
    mp.spawn(_m2t_ddp_worker, args=(unassigned_port(), str(path)), nprocs=2)
    r = torch.load(path, weights_only=True)
    assert torch.equal(r['grads'][0], r['grads'][1])
    assert not torch.allclose(r['teacher'][0], r['teacher'][1])
