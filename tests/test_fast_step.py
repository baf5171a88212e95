"""The optimised training step against the straightforward one, on CPU: what is not bit-identical is
shown equivalent here (same loss and gradients within float tolerance).

- channels_last ResNets vs contiguous memory: 1e-5 relative on loss and gradients (float32 sums in
  another order);
- scaled-dot-product attention (timm's fused path, the default) vs the explicit softmax(QK^T)V:
  1e-4 of each gradient's largest entry (a ViT's gradients at initialisation reach ~100);
- torch.compile of the networks (``--compile``; traced here with the aot_eager backend, which checks
  the captured forward and backward graphs without the C++ compile of inductor) vs eager: 1e-5;
- bf16 autocast vs float32: the convolutions run in bf16 and move the loss (by 0.05% here), within
  5e-3 relative; gradients' cosine similarity above 0.99;
- fused AdamW (torch's fused kernel, on CPU here; on CUDA in tests/test_gpu.py) vs the per-tensor
  loop: 1e-6 of each tensor's scale.
The multi-tensor LARS is bit-identical to the loop (tests/test_optim.py)."""
import copy
from functools import partial

import pytest
import torch

import vits
from moco.amp import Amp
from moco.builder import MoCo_ViT
from moco.models import build_moco, compile_networks
from moco.optim import build_optimizer


def _tiny_vit():
    return MoCo_ViT(partial(vits.vit_tiny_patch4, depth=2, img_size=16), dim=16, mlp_dim=32, T=0.2)


def _tiny_resnet():
    return build_moco('resnet18_cifar', dim=16, mlp_dim=32, T=0.2)


def _step(model, x1, x2, amp=None, memory_format=torch.contiguous_format):
    """Loss and gradients of one step (the momentum update included, as in training)."""
    model.zero_grad(set_to_none=True)
    x1, x2 = (x.contiguous(memory_format=memory_format) for x in (x1, x2))
    amp = amp or Amp('fp32', torch.device('cpu'))
    with amp.autocast():
        loss = model(x1, x2, 0.99)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach().float(), grads


def _inputs(size, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randn(n, 3, size, size, generator=g)


def _assert_close(a, b, rtol):
    loss_a, grads_a = a
    loss_b, grads_b = b
    assert torch.allclose(loss_a, loss_b, rtol=rtol, atol=1e-6), (loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for n in grads_a:
        scale = grads_a[n].abs().max().clamp(min=1e-2)   # some gradients are ~0 at initialisation
        assert (grads_a[n] - grads_b[n]).abs().max() <= rtol * scale, n


def _pair(build):
    torch.manual_seed(0)
    model = build().train()
    return model, copy.deepcopy(model)


def test_channels_last_resnet_step_equals_contiguous():
    ref, fast = _pair(_tiny_resnet)
    fast.to(memory_format=torch.channels_last)
    x1, x2 = _inputs(16)
    _assert_close(_step(ref, x1, x2), _step(fast, x1, x2, memory_format=torch.channels_last), 1e-5)


def test_fused_attention_equals_explicit_softmax_attention():
    fused, explicit = _pair(_tiny_vit)
    for block in explicit.base_encoder.blocks + explicit.momentum_encoder.blocks:
        block.attn.fused_attn = False
    assert all(b.attn.fused_attn for b in fused.base_encoder.blocks)   # the default path is SDPA
    x1, x2 = _inputs(16)
    _assert_close(_step(explicit, x1, x2), _step(fused, x1, x2), 1e-4)


@pytest.mark.slow   # torch.compile takes a while
@pytest.mark.parametrize('build', [_tiny_resnet, _tiny_vit], ids=['resnet', 'vit'])
def test_compiled_networks_step_equals_eager(build):
    ref, fast = _pair(build)
    compile_networks(fast, backend='aot_eager')
    keys = list(ref.state_dict())
    assert list(fast.state_dict()) == keys                              # checkpoints are unchanged
    x1, x2 = _inputs(16)
    for _ in range(2):                                                  # the momentum update stays eager
        _assert_close(_step(ref, x1, x2), _step(fast, x1, x2), 1e-5)
    for a, b in zip(ref.momentum_encoder.parameters(), fast.momentum_encoder.parameters()):
        assert torch.equal(a, b)


@pytest.mark.slow   # several full steps
def test_bf16_autocast_step_is_close_to_float32():
    ref, fast = _pair(_tiny_resnet)
    x1, x2 = _inputs(8)                # (bf16 convolutions are slow on CPUs without bf16 units)
    dtypes = []
    fast.base_encoder.conv1.register_forward_hook(lambda module, inputs, out: dtypes.append(out.dtype))
    loss_ref, grads_ref = _step(ref, x1, x2)
    loss_bf16, grads_bf16 = _step(fast, x1, x2, Amp('bf16', torch.device('cpu')))
    assert dtypes and set(dtypes) == {torch.bfloat16}            # autocast is on: bf16 convolutions ...
    assert abs(loss_bf16 / loss_ref - 1) > 1e-5                 # ... which move the loss (here by 0.05%) ...
    assert torch.allclose(loss_ref, loss_bf16, rtol=5e-3)        # ... but little
    flat = lambda g: torch.cat([g[n].flatten() for n in sorted(g)])  # noqa: E731
    assert torch.nn.functional.cosine_similarity(flat(grads_ref), flat(grads_bf16), dim=0) > 0.99


def test_fused_adamw_step_equals_the_per_tensor_loop():
    """build_optimizer's AdamW with fused=True, as it is built on CUDA (torch has the fused kernel on CPU
    too), against torch's per-tensor loop: three steps, 1e-6 of each tensor's scale (measured 2e-7).
    The CUDA kernel itself: tests/test_gpu.py."""
    model, _ = _pair(_tiny_vit)
    _, grads = _step(model, *_inputs(16))
    params = {}
    for impl in ('loop', 'fused'):
        net = copy.deepcopy(model)
        opt = build_optimizer('adamw', net, 1e-3, 0.1)
        assert not opt.defaults['fused']                          # not on CPU tensors
        hyper = {k: opt.defaults[k] for k in ('lr', 'betas', 'eps', 'weight_decay', 'amsgrad', 'maximize')}
        opt = torch.optim.AdamW(net.parameters(), **hyper, fused=impl == 'fused', foreach=False)
        for s in range(3):
            for n, p in net.named_parameters():
                p.grad = grads[n] * (1 + s) if n in grads else None
            opt.step()
        params[impl] = dict(net.named_parameters())
    start = dict(model.named_parameters())
    moved = 0
    for n, p in params['loop'].items():
        scale = p.detach().abs().max().clamp(min=1e-3)
        assert (params['fused'][n] - p).abs().max() <= 1e-6 * scale, n
        moved += not torch.equal(p, start[n])
    assert moved == len(grads)                                    # every tensor with a gradient stepped


def test_unchecked_step_has_no_finiteness_check():
    """--max-nonfinite-steps 0: no host sync; a NaN loss then steps like any other (as the original)."""
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    amp = Amp('fp32', torch.device('cpu'))
    nan_loss = model(torch.full((1, 3), float('nan'))).sum()
    assert amp.backward_step(nan_loss, optimizer, check_finite=False)
    assert torch.isnan(model.weight).all()
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.weight.detach().clone()
    assert not amp.backward_step(model(torch.full((1, 3), float('nan'))).sum(), optimizer)
    assert torch.equal(model.weight, before)
