"""moco/norm.py: the CPU all-reduce BatchNorm at world size 1 equals BatchNorm; conversion keeps keys."""

import pytest
import torch
import torch.nn as nn

import moco.dist
import moco.errors
from moco.norm import AllReduceBatchNorm, convert_sync_batchnorm


@pytest.mark.parametrize('bn_cls,shape', [(nn.BatchNorm2d, (4, 3, 5, 5)), (nn.BatchNorm1d, (6, 3))])
def test_allreduce_bn_world_size_1_equals_batchnorm(bn_cls, shape):
    assert not moco.dist.is_initialized() and moco.dist.world_size() == 1
    torch.manual_seed(0)
    ref = bn_cls(3, momentum=0.2)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-0.5, 0.5)
    ours = AllReduceBatchNorm(3, momentum=0.2)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(*shape) * 2 + 1
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ref(xa), ours(xb)
    assert torch.equal(ya, yb)
    g = torch.randn(*shape)
    ya.backward(g)
    yb.backward(g)
    assert torch.equal(xa.grad, xb.grad)
    assert torch.equal(ref.weight.grad, ours.weight.grad) and torch.equal(ref.bias.grad, ours.bias.grad)
    for k, v in ref.state_dict().items():
        assert torch.equal(v, ours.state_dict()[k]), k
    assert ours.num_batches_tracked.item() == 1
    ref.eval()
    ours.eval()
    assert torch.equal(ref(x), ours(x))


def test_convert_sync_batchnorm_cpu_keeps_parameters_and_keys():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(36, 5),
                          nn.BatchNorm1d(5, affine=False))
    keys = list(model.state_dict())
    bn_weight = model[1].weight
    converted = convert_sync_batchnorm(model, torch.device('cpu'))
    assert list(converted.state_dict()) == keys
    assert isinstance(converted[1], AllReduceBatchNorm) and isinstance(converted[4], AllReduceBatchNorm)
    assert converted[1].weight is bn_weight and converted[4].weight is None
    assert not any(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d) for m in converted.modules())
