"""LARS and AdamW as the paper and the original release use them, checked against updates computed by hand."""
import numpy as np
import pytest
import torch
import torch.nn as nn

from helpers import lars_loop_and_foreach
from moco.models import build_moco
from moco.optim import LARS, build_optimizer

LR, WD, MOM, ETA = 0.5, 0.1, 0.9, 0.001


def _lars_reference(w, grads, lr=LR, wd=WD, momentum=MOM, eta=ETA):
    """The MoCo v3 LARS update, written out in numpy float64 for a list of successive gradients."""
    w = np.array(w, dtype=np.float64)
    mu = np.zeros_like(w)
    for g in grads:
        g = np.array(g.numpy() if torch.is_tensor(g) else g, dtype=np.float64)
        if w.ndim > 1:
            d = g + wd * w
            pn, un = np.sqrt((w ** 2).sum()), np.sqrt((d ** 2).sum())
            trust = eta * pn / un if (pn > 0 and un > 0) else 1.0
            d = d * trust
        else:
            d = g
        mu = momentum * mu + d
        w = w - lr * mu
    return w


def _step(opt, params, grads):
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()
    opt.step()


def test_lars_two_steps_match_hand_computed_update():
    gen = torch.Generator().manual_seed(0)
    W = nn.Parameter(torch.randn(4, 3, generator=gen, dtype=torch.float64))
    b = nn.Parameter(torch.randn(4, generator=gen, dtype=torch.float64))
    W0, b0 = W.detach().clone(), b.detach().clone()
    gW = [torch.randn(4, 3, generator=gen, dtype=torch.float64) for _ in range(2)]
    gb = [torch.randn(4, generator=gen, dtype=torch.float64) for _ in range(2)]
    opt = LARS([W, b], lr=LR, weight_decay=WD, momentum=MOM)
    assert opt.param_groups[0]['trust_coefficient'] == ETA

    _step(opt, [W, b], [gW[0], gb[0]])
    np.testing.assert_allclose(W.detach().numpy(), _lars_reference(W0.numpy(), gW[:1]), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(b.detach().numpy(), _lars_reference(b0.numpy(), gb[:1]), rtol=1e-12, atol=1e-14)

    _step(opt, [W, b], [gW[1], gb[1]])   # second step: the momentum buffer carries the first update
    np.testing.assert_allclose(W.detach().numpy(), _lars_reference(W0.numpy(), gW), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(b.detach().numpy(), _lars_reference(b0.numpy(), gb), rtol=1e-12, atol=1e-14)
    assert set(opt.state[W]) == {'mu'}   # state key of the original (checkpoints load)


def test_lars_first_step_closed_form():
    """Independent of the reference helper: W' = W - lr * eta * |W| / |g + wd W| * (g + wd W); b' = b - lr g."""
    W = nn.Parameter(torch.tensor([[3.0, 0.0], [0.0, 4.0]], dtype=torch.float64))  # |W| = 5
    b = nn.Parameter(torch.tensor([1.0, -1.0], dtype=torch.float64))
    gW = torch.tensor([[0.0, 0.6], [0.8, 0.0]], dtype=torch.float64) - 0.1 * W.detach()  # g + wd W = [[0,.6],[.8,0]]
    gb = torch.tensor([2.0, 3.0], dtype=torch.float64)
    opt = LARS([W, b], lr=0.5, weight_decay=0.1, momentum=0.9)
    _step(opt, [W, b], [gW, gb])
    # |g + wd W| = 1, trust = 0.001 * 5 / 1 = 0.005, update = 0.005 * [[0,.6],[.8,0]]
    expected_W = torch.tensor([[3.0, -0.5 * 0.005 * 0.6], [-0.5 * 0.005 * 0.8, 4.0]], dtype=torch.float64)
    torch.testing.assert_close(W.detach(), expected_W, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(b.detach(), torch.tensor([0.0, -2.5], dtype=torch.float64), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize('shape', [(5,), ()])
def test_lars_no_weight_decay_nor_trust_for_ndim_le_1(shape):
    p = nn.Parameter(torch.full(shape, 2.0, dtype=torch.float64))
    g = torch.full(shape, 0.25, dtype=torch.float64)
    opt = LARS([p], lr=0.1, weight_decay=10.0, momentum=0.9)   # a huge wd that would show
    _step(opt, [p], [g])
    torch.testing.assert_close(p.detach(), torch.full(shape, 2.0 - 0.1 * 0.25, dtype=torch.float64))
    _step(opt, [p], [g])   # mu = 0.9 * 0.25 + 0.25
    torch.testing.assert_close(p.detach(), torch.full(shape, 2.0 - 0.1 * 0.25 - 0.1 * 0.475, dtype=torch.float64))


def test_lars_trust_scaling_for_2d_and_4d():
    for shape in [(3, 2), (2, 2, 1, 3)]:
        gen = torch.Generator().manual_seed(1)
        p = nn.Parameter(torch.randn(*shape, generator=gen, dtype=torch.float64))
        p0 = p.detach().clone()
        g = torch.randn(*shape, generator=gen, dtype=torch.float64) * 100   # trust ratio makes the step tiny
        opt = LARS([p], lr=1.0, weight_decay=0.0, momentum=0.9)
        _step(opt, [p], [g])
        step = (p0 - p.detach())
        # |step| = eta * |p|, whatever the gradient scale
        assert step.norm().item() == pytest.approx(ETA * p0.norm().item(), rel=1e-10)
        np.testing.assert_allclose(p.detach().numpy(), _lars_reference(p0.numpy(), [g.numpy()], lr=1.0, wd=0.0),
                                   rtol=1e-12)


def test_lars_zero_norm_parameter_gets_trust_one():
    p = nn.Parameter(torch.zeros(2, 3, dtype=torch.float64))
    g = torch.arange(6, dtype=torch.float64).view(2, 3)
    opt = LARS([p], lr=0.1, weight_decay=0.5, momentum=0.9)
    _step(opt, [p], [g])
    torch.testing.assert_close(p.detach(), -0.1 * g)   # no trust scaling (would give 0 or nan)
    assert torch.isfinite(p).all()


def test_lars_zero_update_norm_gets_trust_one():
    p = nn.Parameter(torch.ones(2, 2, dtype=torch.float64))
    opt = LARS([p], lr=0.1, weight_decay=0.0, momentum=0.9)
    _step(opt, [p], [torch.zeros(2, 2, dtype=torch.float64)])
    torch.testing.assert_close(p.detach(), torch.ones(2, 2, dtype=torch.float64))   # no nan from 0/0


def test_lars_skips_params_without_grad():
    a = nn.Parameter(torch.randn(3, 3))
    frozen = nn.Parameter(torch.randn(3, 3), requires_grad=False)
    nograd = nn.Parameter(torch.randn(3))
    before_frozen, before_nograd = frozen.detach().clone(), nograd.detach().clone()
    opt = LARS([a, frozen, nograd], lr=1.0, weight_decay=0.1, momentum=0.9)
    for _ in range(2):
        _step(opt, [a, frozen, nograd], [torch.randn(3, 3), None, None])
    assert torch.equal(frozen.detach(), before_frozen)
    assert torch.equal(nograd.detach(), before_nograd)
    assert frozen not in opt.state and nograd not in opt.state
    assert a in opt.state


def test_build_optimizer_adamw_is_torch_adamw_over_all_params():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2, bias=False))
    model[2].weight.requires_grad = False
    opt = build_optimizer('adamw', model, lr=1.5e-4, weight_decay=0.1)
    assert type(opt) is torch.optim.AdamW
    assert len(opt.param_groups) == 1
    group = opt.param_groups[0]
    assert group['weight_decay'] == 0.1 and group['lr'] == 1.5e-4
    assert [id(p) for p in group['params']] == [id(p) for p in model.parameters()]

    # the weight decay applies to 1-D tensors too (no exclusion): a zero gradient still shrinks a bias
    bias = model[0].bias
    bias.data.fill_(1.0)
    frozen_before = model[2].weight.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    opt.step()
    assert torch.allclose(bias.detach(), torch.full_like(bias, 1.0 - 1.5e-4 * 0.1))
    assert torch.equal(model[2].weight.detach(), frozen_before)   # frozen: not decayed either


def test_build_optimizer_lars():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    opt = build_optimizer('lars', model, lr=2.4, weight_decay=1e-6)
    assert isinstance(opt, LARS)
    group = opt.param_groups[0]
    got = (group['lr'], group['weight_decay'], group['momentum'], group['trust_coefficient'])
    assert got == (2.4, 1e-6, 0.9, 0.001)
    assert [id(p) for p in group['params']] == [id(p) for p in model.parameters()]
    assert build_optimizer('lars', model, 0.3, 1e-6, lars_trust=0.02).param_groups[0]['trust_coefficient'] == 0.02
    with pytest.raises(ValueError):
        build_optimizer('adam', model, lr=0.1, weight_decay=0.)
    sgd = build_optimizer('sgd', model, lr=0.2, weight_decay=1e-4)   # Momentum² Teacher, small batch
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]['momentum'] == 0.9
    assert sgd.param_groups[0]['weight_decay'] == 1e-4 and len(sgd.param_groups) == 1   # on every tensor


def test_lars_foreach_step_is_bit_identical_to_the_loop():
    """The multi-tensor step (default) against the original's per-tensor loop on CPU (on CUDA:
    tests/test_gpu.py), compared exactly."""
    (sd_loop, opt_loop), (sd_fe, opt_fe) = lars_loop_and_foreach(torch.device('cpu'))
    for k in sd_loop:
        assert torch.equal(sd_loop[k], sd_fe[k]), k
    assert opt_loop['state'].keys() == opt_fe['state'].keys()
    for i in opt_loop['state']:
        assert torch.equal(opt_loop['state'][i]['mu'], opt_fe['state'][i]['mu']), i


@pytest.mark.parametrize('method, adapted, excluded', [('mocov3', 57, 110), ('byol', 57, 112), ('m2t', 57, 114)])
def test_lars_partition_resnet50(method, adapted, excluded):
    """Tensors LARS adapts (ndim > 1: 53 convs + 4 Linear weights) and excludes (BN and biases). The
    reference's 171 = 57 + 114 is for heads with a bias on every Linear (the BYOL-PyTorch and M2 heads);
    official BYOL heads have no bias on the last Linear, hence 112."""
    with torch.device('meta'):   # only the structure is checked
        model = build_moco('resnet50', method=method)
    trained = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.ndim > 1 for p in trained) == adapted
    assert sum(p.ndim <= 1 for p in trained) == excluded
