"""Architecture names -> encoder factories, the MoCo model for an arch, and backbone features.

Names: the ViTs of ``vits.py``; every torchvision classification model with an ``fc`` classifier
(ResNets, ResNeXts, Wide ResNets, RegNets), built with ``zero_init_residual=True`` where accepted
(as the original does); ``resnet18_cifar`` / ``resnet50_cifar``: the same ResNets with the usual
CIFAR stem (3x3 stride-1 first conv, no max-pool) for 32 px images; and ``resnet10_w16`` / ``_w24`` /
``_w32``, small ResNets for 32 px and smaller images on a CPU (``resnet10_w16`` is the embedded demo's,
CONFIG.md).
"""
import inspect
from functools import partial
from typing import NamedTuple

import torch.nn as nn
import torchvision.models as tvm
from torchvision.models.resnet import BasicBlock, ResNet

import vits
from moco.builder import METHODS
from moco.errors import UserError


def _cifar_resnet(name, **kwargs):
    model = tvm.get_model_builder(name)(**kwargs)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode='fan_out', nonlinearity='relu')  # as torchvision
    model.maxpool = nn.Identity()
    return model


class SmallResNet(ResNet):
    """torchvision's ResNet of BasicBlocks with other widths and a 3x3 stem for small images: the same
    modules, initialisation (kaiming fan_out, BN at 1/0, ``zero_init_residual``) and state_dict keys."""

    def __init__(self, widths=(32, 64, 128, 256), layers=(1, 1, 1, 1), stem_stride=2, num_classes=1000,
                 zero_init_residual=False):
        nn.Module.__init__(self)
        self._norm_layer, self.dilation, self.groups, self.base_width = nn.BatchNorm2d, 1, 1, 64
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=stem_stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity()
        self.layer1 = self._make_layer(BasicBlock, widths[0], layers[0])
        self.layer2 = self._make_layer(BasicBlock, widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(BasicBlock, widths[2], layers[2], stride=2)
        self.layer4 = self._make_layer(BasicBlock, widths[3], layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.constant_(m.bn2.weight, 0)


CIFAR_ARCHS = {f'{name}_cifar': partial(_cifar_resnet, name) for name in ('resnet18', 'resnet50')}
# ResNet-10 (one block per stage), widths w-2w-4w-8w, 3x3 stride-2 stem: 16x16 after the stem at 32 px.
# resnet10_w32: 16 M multiply-adds per 32 px image (ResNet-18 with its ImageNet stem: 38 M, of which most at
# 1-2 px); resnet10_w16, the embedded demo's (CONFIG.md): 4.0 M (2.7 M at 24 px).
CIFAR_ARCHS.update({f'resnet10_w{w}': partial(SmallResNet, widths=(w, 2 * w, 4 * w, 8 * w), layers=(1, 1, 1, 1),
                                               stem_stride=2) for w in (16, 24, 32)})


def _torchvision_archs():
    names = []
    for name in tvm.list_models(module=tvm):
        if name.startswith(('resnet', 'resnext', 'wide_resnet', 'regnet')):
            names.append(name)
    return sorted(names)


def arch_names():
    return sorted(vits.VIT_ARCHS) + sorted(CIFAR_ARCHS) + _torchvision_archs()


def is_vit(arch):
    return arch in vits.VIT_ARCHS


def head_name(arch):
    """Attribute holding the classifier (and, in MoCo, the projector)."""
    return 'head' if is_vit(arch) else 'fc'


def encoder_factory(arch, image_size=None, stop_grad_conv1=False, zero_init_residual=True, **kwargs):
    """A callable ``f(num_classes=...)`` building a fresh encoder of this arch (ResNets with the last BN
    of each residual block at zero when ``zero_init_residual``, as MoCo v3 does)."""
    if is_vit(arch):
        if image_size is not None:
            check_patch_size(arch, image_size)
            kwargs['img_size'] = image_size
        return partial(vits.VIT_ARCHS[arch], stop_grad_conv1=stop_grad_conv1, **kwargs)
    if arch in CIFAR_ARCHS:
        return partial(CIFAR_ARCHS[arch], zero_init_residual=zero_init_residual, **kwargs)
    if arch not in _torchvision_archs():
        raise UserError(f'unknown architecture {arch!r}; choose one of: {", ".join(arch_names())}')
    builder = tvm.get_model_builder(arch)
    if 'zero_init_residual' in inspect.signature(builder).parameters or arch.startswith(('resnet', 'resnext', 'wide')):
        kwargs.setdefault('zero_init_residual', zero_init_residual)
    return partial(builder, **kwargs)


def check_patch_size(arch, image_size, flag='--image-size'):
    """A ViT cuts images into patches: a size its patch does not divide would drop the pixels past the
    last whole patch, so it is a one-line error naming the nearest sizes that work."""
    patch = vits.PATCH_SIZE[arch]
    if image_size % patch:
        below, above = image_size - image_size % patch, image_size - image_size % patch + patch
        raise UserError(f'{flag} {image_size} is not a multiple of {arch}\'s patch size {patch}: the last '
                        f'{image_size % patch} pixel rows and columns would never be seen; use {below or above}'
                        + (f' or {above}' if below else ''))


def build_moco(arch, dim=256, mlp_dim=4096, T=1.0, image_size=None, stop_grad_conv1=False, method='mocov3'):
    """The model of ``method`` for an arch name; for mocov3 the one of the original ``main_moco.py``.
    The method's class says whether ResNets zero-initialise their residual branches (only MoCo v3's do)."""
    resnet_cls, vit_cls = METHODS[method]
    cls = vit_cls if is_vit(arch) else resnet_cls
    factory = encoder_factory(arch, image_size=image_size, stop_grad_conv1=stop_grad_conv1,
                              zero_init_residual=cls.zero_init_residual)
    return cls(factory, dim, mlp_dim, T)


class EncoderLayout(NamedTuple):
    """Where the paper's gradient study looks (section 4, Fig. 4): the first layer, the first and the last
    block (ResNets and RegNets: stage), and the head (the projector in MoCo)."""
    first_layer: nn.Module
    first_block: nn.Module
    last_block: nn.Module
    head: nn.Module


def encoder_layout(encoder):
    """The ``EncoderLayout`` of an encoder of any family ``arch_names()`` lists: the ViTs (patch
    projection, transformer blocks), torchvision's ResNets, ResNeXts and Wide ResNets and our small ones
    (first convolution, stages ``layer1``..``layer4``), and RegNets (the stem's convolution, the trunk's
    stages)."""
    if isinstance(encoder, vits.VisionTransformerMoCo):
        return EncoderLayout(encoder.patch_embed, encoder.blocks[0], encoder.blocks[-1], encoder.head)
    if isinstance(encoder, ResNet):
        return EncoderLayout(encoder.conv1, encoder.layer1, encoder.layer4, encoder.fc)
    if isinstance(encoder, tvm.RegNet):
        return EncoderLayout(encoder.stem[0], encoder.trunk_output[0], encoder.trunk_output[-1], encoder.fc)
    raise TypeError(f'no layout known for a {type(encoder).__name__} encoder')


def residual_blocks(encoder):
    """The residual blocks of an encoder of any family ``arch_names()`` lists, in forward order: the
    transformer blocks of a ViT; the blocks of each stage (``layer1``..``layer4``; RegNets: the trunk's
    stages) of a ResNet, ResNeXt, Wide ResNet or RegNet. The stems and heads are not blocks. What
    ``--grad-checkpointing`` recomputes (moco/recompute.py)."""
    if isinstance(encoder, vits.VisionTransformerMoCo):
        return list(encoder.blocks)
    if isinstance(encoder, ResNet):
        stages = [encoder.layer1, encoder.layer2, encoder.layer3, encoder.layer4]
    elif isinstance(encoder, tvm.RegNet):
        stages = list(encoder.trunk_output)
    else:
        raise TypeError(f'no residual blocks known for a {type(encoder).__name__} encoder')
    return [block for stage in stages for block in stage.children()]


class BackboneFeatures(nn.Module):
    """Features of an encoder just before its head (the pooled ResNet feature, the ViT [cls] token
    after the final norm): what linear probing and kNN read."""

    def __init__(self, encoder, head='fc'):
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, x):
        head = getattr(self.encoder, self.head)
        setattr(self.encoder, self.head, nn.Identity())  # skip the head for this call only
        try:
            return self.encoder(x)
        finally:
            setattr(self.encoder, self.head, head)


COMPILED_PARTS = ('base_encoder', 'momentum_encoder', 'predictor')


def compile_networks(model, backend='inductor'):
    """``torch.compile`` each network of a MoCo/BYOL/M2T model in place (``--compile``). The momentum
    update, the loss and the cross-process gathers stay eager, so the step's order is the paper's (Alg. 1);
    parameter names, hence checkpoints, do not change."""
    for name in COMPILED_PARTS:
        getattr(model, name).compile(backend=backend)
    return model
