"""moco/models.py: every advertised architecture has the layout the paper's gradient study reads (first
layer, first and last block, head), and a pretraining step with the monitors on runs for each family."""
import math
from contextlib import contextmanager

import pytest
import torch
import torch.nn as nn

import main_moco
from helpers import run_in_process, small_moco
from moco import monitors as mon
from moco.models import arch_names, build_moco, encoder_factory, encoder_layout, head_name, is_vit

# the smallest member of each family README names for -a, at a size that runs on a CPU in a second
FAMILIES = {'resnet18': 64, 'resnext50_32x4d': 64, 'wide_resnet50_2': 64, 'regnet_x_400mf': 64,
            'regnet_y_400mf': 64, 'resnet18_cifar': 16, 'resnet10_w16': 16, 'vit_tiny_patch4': 8,
            'vit_conv_small': 32}


@contextmanager
def parameters_on_meta():
    """Every parameter moved to the meta device as it is registered, so that initialising even RegNetY-128GF
    costs neither memory nor time (torch.device('meta') itself fails: RegNets compute their widths)."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None:
            param = nn.Parameter(param.to('meta'), requires_grad=param.requires_grad)
        register(module, name, param)
    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


@pytest.mark.parametrize('arch', arch_names())
def test_every_arch_has_the_layout_the_monitors_read(arch):
    with parameters_on_meta():
        encoder = encoder_factory(arch, image_size=224 if is_vit(arch) else None)()
    layout = encoder_layout(encoder)
    modules = list(encoder.modules())
    first_param = next(m for m in modules if any(True for _ in m.parameters(recurse=False))
                       and m is not encoder)   # ViTs hold the cls token and embedding themselves
    assert layout.head is getattr(encoder, head_name(arch))
    assert any(p is next(first_param.parameters()) for p in layout.first_layer.parameters())
    assert modules.index(layout.first_block) < modules.index(layout.last_block)
    blocks = {id(p) for b in (layout.first_block, layout.last_block) for p in b.parameters()}
    assert not blocks & {id(p) for p in layout.first_layer.parameters()}
    assert not blocks & {id(p) for p in layout.head.parameters()}


@pytest.mark.parametrize('arch, size', FAMILIES.items())
def test_a_step_with_the_monitors_measures_every_layer_of_each_family(arch, size):
    torch.manual_seed(0)
    model = small_moco('mocov3', arch) if 'vit_tiny' in arch else \
        build_moco(arch, dim=16, mlp_dim=32, image_size=size if is_vit(arch) else None)
    x = torch.randn(4, 3, size, size)
    model(x, x.flip(-1), 0.99).backward()
    values = dict(zip(*[mon.GradientMonitor(model).names, mon.GradientMonitor(model).measure().tolist()]))
    assert all(math.isfinite(v) and v > 0 for v in values.values()), values


def test_a_regnet_pretrains_with_the_monitors(tiny_folder, tmp_path, capsys):
    """RegNets have no conv1/layer1/layer4: the monitors once looked those up by name and crashed."""
    code, errors = run_in_process(main_moco, ['-a', 'regnet_x_400mf', '--image-size', '32', '--moco-dim', '8',
                                              '--moco-mlp-dim', '16', '-b', '8', '--epochs', '1', '-j', '0',
                                              '-p', '1', '--seed', '0', '--output-dir', tmp_path / 'out',
                                              tiny_folder], capsys)
    assert code == 0 and not errors, errors
    assert (tmp_path / 'out' / 'checkpoint_0000.pth.tar').is_file()
