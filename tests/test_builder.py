"""moco/builder.py: MoCo / MoCo_ResNet / MoCo_ViT as in the paper (Alg. 1) and the original release (heads,
momentum encoder, momentum update, gradients); BYOL and Momentum² Teacher (heads, initialisation, initial
loss, EMA step) and what each method class declares for the scripts."""
import math
from functools import partial

import pytest
import torch
import torch.nn as nn
import torchvision

import vits
from helpers import TinyNet, small_moco
from moco.builder import MoCo_ResNet, MoCo_ViT
from moco.models import build_moco
from moco.momentum_bn import MomentumBatchNorm, mbn_alpha
from moco.optim import build_optimizer

DIM, MLP_DIM = 16, 32


def tiny_resnet_moco():
    return MoCo_ResNet(TinyNet, dim=DIM, mlp_dim=MLP_DIM)


def tiny_vit_moco():
    return MoCo_ViT(partial(vits.vit_tiny_patch4, depth=1), dim=DIM, mlp_dim=MLP_DIM)


@pytest.fixture(scope='module')
def vit_moco():
    torch.manual_seed(0)
    return tiny_vit_moco()


def _perturb_base(model, seed=1):
    """Make base and momentum encoders differ (parameters and BN buffers)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.base_encoder.parameters():
            p.add_(torch.randn(p.shape, generator=gen))
        for name, buf in model.base_encoder.named_buffers():
            if 'running_mean' in name:
                buf.fill_(3.0)
            elif 'running_var' in name:
                buf.fill_(5.0)
        for name, buf in model.momentum_encoder.named_buffers():
            if 'running_mean' in name:
                buf.fill_(-1.0)
            elif 'running_var' in name:
                buf.fill_(0.5)


# ---------------------------------------------------------------- structure
def _layers(seq):
    return [type(m) for m in seq]


def _check_mlp(seq, num_layers, in_dim, last_bn):
    L, B, R = nn.Linear, nn.BatchNorm1d, nn.ReLU
    expected = []
    for i in range(num_layers):
        expected.append(L)
        if i < num_layers - 1:
            expected += [B, R]
    if last_bn:
        expected.append(B)
    assert _layers(seq) == expected
    linears = [m for m in seq if isinstance(m, nn.Linear)]
    dims = [(lin.in_features, lin.out_features) for lin in linears]
    assert dims == [(in_dim, MLP_DIM)] + [(MLP_DIM, MLP_DIM)] * (num_layers - 2) + [(MLP_DIM, DIM)]
    assert all(lin.bias is None for lin in linears)
    bns = [m for m in seq if isinstance(m, nn.BatchNorm1d)]
    hidden_bns = bns[:-1] if last_bn else bns
    assert all(bn.affine and bn.num_features == MLP_DIM for bn in hidden_bns)
    if last_bn:
        assert not bns[-1].affine and bns[-1].weight is None and bns[-1].num_features == DIM


def test_resnet_heads():
    model = tiny_resnet_moco()
    _check_mlp(model.base_encoder.fc, 2, 8, last_bn=True)
    _check_mlp(model.momentum_encoder.fc, 2, 8, last_bn=True)
    _check_mlp(model.predictor, 2, DIM, last_bn=False)


def test_vit_heads(vit_moco):
    _check_mlp(vit_moco.base_encoder.head, 3, 192, last_bn=True)
    _check_mlp(vit_moco.momentum_encoder.head, 3, 192, last_bn=True)
    _check_mlp(vit_moco.predictor, 2, DIM, last_bn=True)


def test_encoders_built_with_mlp_dim_classes():
    seen = []

    def factory(num_classes):
        seen.append(num_classes)
        return TinyNet(num_classes)

    MoCo_ResNet(factory, dim=DIM, mlp_dim=MLP_DIM)
    assert seen == [MLP_DIM, MLP_DIM]


def test_predictor_has_no_momentum_copy():
    model = tiny_resnet_moco()
    assert {name for name, _ in model.named_children()} == {'base_encoder', 'momentum_encoder', 'predictor'}
    assert list(model.momentum_encoder.state_dict()) == list(model.base_encoder.state_dict())
    n_pred = sum(p.numel() for p in model.predictor.parameters())
    n_base = sum(p.numel() for p in model.base_encoder.parameters())
    assert n_pred > 0
    assert sum(p.numel() for p in model.momentum_encoder.parameters()) == n_base
    pred_ids = {id(p) for p in model.predictor.parameters()}
    assert not pred_ids & {id(p) for p in model.momentum_encoder.parameters()}


def test_state_dict_prefixes(vit_moco):
    for model in (tiny_resnet_moco(), vit_moco):
        keys = list(model.state_dict())
        prefixes = {k.split('.', 1)[0] for k in keys}
        assert prefixes == {'base_encoder', 'momentum_encoder', 'predictor'}


def test_momentum_encoder_starts_as_exact_frozen_copy(vit_moco):
    for model in (tiny_resnet_moco(), vit_moco):
        pairs = list(zip(model.base_encoder.named_parameters(), model.momentum_encoder.named_parameters()))
        assert len(pairs) == len(list(model.base_encoder.parameters()))
        for (nb, pb), (nm, pm) in pairs:
            assert nb == nm
            assert torch.equal(pb, pm), nb
            assert pb.data_ptr() != pm.data_ptr()   # a copy, not shared storage
            assert pm.requires_grad is False
        # the base encoder stays trainable (pos_embed is a fixed buffer-like parameter)
        assert all(p.requires_grad for n, p in model.base_encoder.named_parameters() if n != 'pos_embed')


@pytest.mark.parametrize('arch,block_attr', [('resnet18', 'bn2'), ('resnet50', 'bn3')])
def test_resnets_zero_init_residual(arch, block_attr):
    model = build_moco(arch, dim=DIM, mlp_dim=MLP_DIM)
    assert isinstance(model, MoCo_ResNet)
    for enc in (model.base_encoder, model.momentum_encoder):
        blocks = [m for m in enc.modules()
                  if isinstance(m, (torchvision.models.resnet.BasicBlock, torchvision.models.resnet.Bottleneck))]
        assert len(blocks) == (8 if arch == 'resnet18' else 16)
        for blk in blocks:
            assert torch.count_nonzero(getattr(blk, block_attr).weight) == 0
        assert torch.count_nonzero(enc.bn1.weight) == enc.bn1.weight.numel()   # only the last BN of a block
    # projector input is the pooled feature
    assert model.base_encoder.fc[0].in_features == (512 if arch == 'resnet18' else 2048)


# ---------------------------------------------------------------- momentum update
def _expected_update(model, m):
    base = [p.detach().clone() for p in model.base_encoder.parameters()]
    mom = [p.detach().clone() for p in model.momentum_encoder.parameters()]
    return [pm * m + pb * (1 - m) for pm, pb in zip(mom, base)]


@pytest.mark.parametrize('m', [0.99, 0.5, 0.0])
def test_momentum_update_exact_and_parameters_only(m):
    torch.manual_seed(0)
    model = tiny_resnet_moco()
    _perturb_base(model)
    expected = _expected_update(model, m)
    buffers_before = {n: b.clone() for n, b in model.momentum_encoder.named_buffers()}
    base_before = [p.detach().clone() for p in model.base_encoder.parameters()]

    model._update_momentum_encoder(m)

    for e, p in zip(expected, model.momentum_encoder.parameters()):
        assert torch.equal(p, e)
    for n, b in model.momentum_encoder.named_buffers():   # BN running stats are not averaged
        assert torch.equal(b, buffers_before[n]), n
    for b0, p in zip(base_before, model.base_encoder.parameters()):
        assert torch.equal(p, b0)                          # the base encoder is not touched


def test_momentum_update_in_forward_happens_before_keys():
    torch.manual_seed(0)
    model = tiny_resnet_moco()
    _perturb_base(model)
    m = 0.75
    expected = _expected_update(model, m)
    buffers_before = {n: b.clone() for n, b in model.momentum_encoder.named_buffers()}
    seen = []

    def pre_hook(module, inputs):
        seen.append(([p.detach().clone() for p in module.parameters()],
                     {n: b.clone() for n, b in module.named_buffers()},
                     torch.is_grad_enabled()))

    handle = model.momentum_encoder.register_forward_pre_hook(pre_hook)
    x1, x2 = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    model(x1, x2, m)
    handle.remove()

    assert len(seen) == 2                         # k1 and k2, one call per view
    params0, buffers0, grad_enabled = seen[0]
    for e, p in zip(expected, params0):           # already updated when the first key is computed
        assert torch.equal(p, e)
    for e, p in zip(expected, seen[1][0]):        # and updated only once
        assert torch.equal(p, e)
    for n, b in buffers0.items():                 # buffers were not averaged with the base encoder's
        assert torch.equal(b, buffers_before[n]), n
    assert grad_enabled is False                  # keys (and the update) under no_grad
    for e, p in zip(expected, model.momentum_encoder.parameters()):
        assert torch.equal(p, e)


def test_momentum_one_keeps_momentum_encoder():
    torch.manual_seed(0)
    model = tiny_resnet_moco()
    _perturb_base(model)
    before = [p.detach().clone() for p in model.momentum_encoder.parameters()]
    model(torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8), 1.0)
    assert all(torch.equal(a, p) for a, p in zip(before, model.momentum_encoder.parameters()))


# ---------------------------------------------------------------- gradients
def _check_gradients(model, x1, x2):
    loss = model(x1, x2, 0.99)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert all(n.startswith(('base_encoder.', 'predictor.')) for n, _ in trainable)
    for n, p in trainable:
        assert p.grad is not None, n
        assert torch.isfinite(p.grad).all(), n
        assert p.grad.abs().sum() > 0, n
    for n, p in model.momentum_encoder.named_parameters():
        assert p.grad is None, n
    assert {n.split('.', 1)[0] for n, _ in trainable} == {'base_encoder', 'predictor'}


def test_forward_backward_resnet():
    torch.manual_seed(0)
    model = tiny_resnet_moco()
    _check_gradients(model, torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8))


@pytest.mark.parametrize('optimizer', ['lars', 'adamw'])
def test_forward_backward_vit_and_frozen_params_not_updated(optimizer):
    torch.manual_seed(0)
    model = MoCo_ViT(partial(vits.vit_tiny_patch4, depth=1, stop_grad_conv1=True), dim=DIM, mlp_dim=MLP_DIM)
    frozen = {'base_encoder.pos_embed', 'base_encoder.patch_embed.proj.weight', 'base_encoder.patch_embed.proj.bias'}
    assert {n for n, p in model.named_parameters() if not p.requires_grad and n.startswith('base_encoder.')} == frozen
    _check_gradients(model, torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32))
    params = dict(model.named_parameters())
    assert all(params[n].grad is None for n in frozen)
    before = {n: p.detach().clone() for n, p in params.items()}
    build_optimizer(optimizer, model, lr=0.1, weight_decay=0.1).step()
    for n in frozen:
        assert torch.equal(params[n], before[n]), n
    for n, p in model.momentum_encoder.named_parameters():
        assert torch.equal(p, before['momentum_encoder.' + n]), n
    assert not torch.equal(params['base_encoder.cls_token'], before['base_encoder.cls_token'])
    assert not torch.equal(params['predictor.0.weight'], before['predictor.0.weight'])


def test_heads_of_each_method():
    def layers(seq):
        return [(type(m).__name__, getattr(m, 'bias', None) is not None) for m in seq]
    moco, byol, m2t = (small_moco(m) for m in ('mocov3', 'byol', 'm2t'))
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
    vit = small_moco('byol', 'vit_tiny_patch4')
    assert [type(m).__name__ for m in vit.base_encoder.head] == ['Linear', 'BatchNorm1d', 'ReLU', 'Linear',
                                                                  'BatchNorm1d', 'ReLU', 'Linear']


def test_only_mocov3_zero_initialises_residual_branches():
    gammas = {m: small_moco(m).base_encoder.layer1[0].bn2.weight for m in ('mocov3', 'byol', 'm2t')}
    assert torch.all(gammas['mocov3'] == 0)
    assert torch.all(gammas['byol'] == 1) and torch.all(gammas['m2t'] == 1)


@pytest.mark.slow   # full-size ResNet-50 with 4096-d heads
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


@pytest.mark.slow   # full-size ResNet-50 with 4096-d heads
def test_mocov3_initial_loss_is_about_4_log_batch():
    torch.manual_seed(0)
    model = build_moco('resnet50').train()
    with torch.no_grad():
        loss = model(torch.randn(32, 3, 64, 64), torch.randn(32, 3, 64, 64), 0.99).item()
    assert abs(loss - 4 * math.log(32)) < 0.1, loss


@pytest.mark.parametrize('method', ['byol', 'm2t'])
def test_one_ema_step_is_exact_and_leaves_buffers(method):
    torch.manual_seed(0)
    model = small_moco(method)
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


def test_teacher_passes_update_each_momentum_bn_once_per_step():
    model = small_moco('m2t').train()
    x = torch.randn(4, 3, 8, 8)
    model(x, x.flip(3), 0.99, mbn_alpha(0.25))
    counts = {m.num_batches_tracked.item() for m in model.momentum_encoder.modules()
              if isinstance(m, MomentumBatchNorm)}
    alphas = {m.alpha for m in model.momentum_encoder.modules() if isinstance(m, MomentumBatchNorm)}
    assert counts == {1} and alphas == {mbn_alpha(0.25)}


def test_old_checkpoints_read_the_encoder_each_method_evaluates_and_per_step_hooks():
    """A file that does not record ``eval_encoder`` is read through the encoder its method's class
    evaluates (moco/checkpoint.py's table of older files agrees with the classes); the per-step hook."""
    from moco.builder import METHODS
    from moco.checkpoint import evaluated_encoder
    for method, classes in METHODS.items():
        assert {cls.eval_encoder for cls in classes} == {evaluated_encoder(method)}, method
    assert evaluated_encoder(None) == 'base_encoder'      # a file of the original release records no method
    m2t = small_moco('m2t')
    m2t.before_step(0.25)                                 # Momentum² Teacher: alpha from the fraction done
    alphas = {m.alpha for m in m2t.momentum_encoder.modules() if isinstance(m, MomentumBatchNorm)}
    assert alphas == {mbn_alpha(0.25)}
    moco = small_moco('mocov3')
    before = {k: v.clone() for k, v in moco.state_dict().items()}
    moco.before_step(0.25)                                # MoCo v3 and BYOL: nothing to do
    assert all(torch.equal(v, before[k]) for k, v in moco.state_dict().items())
