"""Vision Transformers of MoCo v3, built on timm 1.x.

The architectures of the paper (ViT-S/16 with 12 heads, ViT-B/16, their convolutional-stem variants,
ViT-L/16 and ViT-H/14), plus small variants for low-resolution images. Every model is a timm
``VisionTransformer`` subclass, so state_dict keys are timm's and checkpoints move between this
project, the original release and DeiT/timm.

What differs from a plain timm ViT (paper §4, "Implementation details"):
  * fixed 2-D sin-cos position embedding (a non-trainable ``pos_embed``; the [cls] slot is zero);
  * MoCo initialisation: Xavier-uniform Linear weights with Q, K, V treated as separate matrices,
    zero biases, cls_token ~ N(0, 1e-6), and a Xavier-uniform patch projection;
  * ``stop_grad_conv1=True`` freezes the random patch projection ("random patch projection", §5).

References: facebookresearch/moco-v3 vits.py (CC-BY-NC 4.0; re-written here on timm 1.x).
"""
import math
from functools import partial

import torch
import torch.nn as nn
from timm.layers import PatchEmbed, to_2tuple
from timm.models.vision_transformer import VisionTransformer

__all__ = [
    'VisionTransformerMoCo', 'ConvStem', 'sincos_pos_embed_2d', 'VIT_ARCHS',
    'vit_small', 'vit_base', 'vit_conv_small', 'vit_conv_base', 'vit_large', 'vit_huge',
    'vit_tiny', 'vit_tiny_patch4', 'vit_small_patch4', 'vit_mini_patch4',
]


def sincos_pos_embed_2d(grid_h, grid_w, dim, temperature=10000.):
    """Fixed 2-D sin-cos embedding, shape (1, 1 + H*W, dim), with a zero row for [cls].

    For patch token k (row-major), r = k // W, c = k % W and w_d = temperature^(-d/(dim/4)):
    row k = [sin(r w), cos(r w), sin(c w), cos(c w)], four blocks of dim/4.
    """
    assert dim % 4 == 0, 'embed dim must be divisible by 4 for the 2-D sin-cos position embedding'
    quarter = dim // 4
    omega = 1. / temperature ** (torch.arange(quarter, dtype=torch.float32) / quarter)  # (D/4,)
    k = torch.arange(grid_h * grid_w)
    r = (k // grid_w).float()[:, None] * omega[None]                                     # (HW, D/4)
    c = (k % grid_w).float()[:, None] * omega[None]                                      # (HW, D/4)
    patch_rows = torch.cat([r.sin(), r.cos(), c.sin(), c.cos()], dim=1)                  # (HW, D)
    cls_row = torch.zeros(1, dim)
    return torch.cat([cls_row, patch_rows], dim=0)[None]                                 # (1, 1+HW, D)


class VisionTransformerMoCo(VisionTransformer):
    def __init__(self, stop_grad_conv1=False, **kwargs):
        super().__init__(**kwargs)
        assert self.num_prefix_tokens == 1 and self.has_class_token, 'MoCo ViTs have exactly one [cls] token'

        # fixed 2-D sin-cos position embedding, kept in the state_dict but never trained
        h, w = self.patch_embed.grid_size
        self.pos_embed = nn.Parameter(sincos_pos_embed_2d(h, w, self.embed_dim), requires_grad=False)

        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                if 'qkv' in name:  # treat the weights of Q, K, V as three separate matrices
                    val = math.sqrt(6. / float(m.weight.shape[0] // 3 + m.weight.shape[1]))
                    nn.init.uniform_(m.weight, -val, val)
                else:
                    nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.cls_token, std=1e-6)

        if isinstance(self.patch_embed, PatchEmbed):
            # Xavier-uniform over the flattened patch: fan_in = 3 p^2, fan_out = D
            p_h, p_w = self.patch_embed.patch_size
            val = math.sqrt(6. / float(3 * p_h * p_w + self.embed_dim))
            nn.init.uniform_(self.patch_embed.proj.weight, -val, val)
            nn.init.zeros_(self.patch_embed.proj.bias)
            if stop_grad_conv1:
                self.patch_embed.proj.weight.requires_grad = False
                self.patch_embed.proj.bias.requires_grad = False


class ConvStem(nn.Module):
    """Convolutional stem replacing the patch projection (Xiao et al. 2021; paper appendix).

    Four 3x3 stride-2 convs (no bias) with BatchNorm + ReLU, channels D/8, D/4, D/2, D, then a 1x1
    conv to D. Same call signature as timm's PatchEmbed, so VisionTransformer can build it.
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, norm_layer=None,
                 flatten=True, **unused_timm_kwargs):
        super().__init__()
        assert patch_size == 16, 'ConvStem only supports patch size 16'
        assert embed_dim % 8 == 0, 'embed dim must be divisible by 8 for ConvStem'
        self.img_size = to_2tuple(img_size)
        self.patch_size = to_2tuple(patch_size)
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.flatten = flatten

        stem = []
        in_dim, out_dim = in_chans, embed_dim // 8
        for _ in range(4):
            stem += [nn.Conv2d(in_dim, out_dim, kernel_size=3, stride=2, padding=1, bias=False),
                     nn.BatchNorm2d(out_dim), nn.ReLU(inplace=True)]
            in_dim, out_dim = out_dim, out_dim * 2
        stem.append(nn.Conv2d(in_dim, embed_dim, kernel_size=1))
        self.proj = nn.Sequential(*stem)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x):
        B, C, H, W = x.shape
        assert (H, W) == self.img_size, f"input size ({H}*{W}) doesn't match model ({self.img_size})"
        x = self.proj(x)                          # (B, D, H/16, W/16)
        if self.flatten:
            x = x.flatten(2).transpose(1, 2)      # (B, HW, D)
        return self.norm(x)


def _vit(arch, overrides, conv_stem=False):
    """Build a VisionTransformerMoCo from the arch's dims; keyword arguments of the caller win."""
    cfg = dict(patch_size=16, mlp_ratio=4, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))
    if conv_stem:
        cfg['embed_layer'] = ConvStem
    cfg.update(arch)
    cfg.update(overrides)
    return VisionTransformerMoCo(**cfg)


# The paper's ViT-S/B and conv-stem models. ViT-S uses 12 heads (DeiT-S uses 6); the conv-stem models drop one block
# so that the stem's extra compute keeps the total the same.
def vit_small(**kwargs):
    return _vit(dict(embed_dim=384, depth=12, num_heads=12), kwargs)


def vit_base(**kwargs):
    return _vit(dict(embed_dim=768, depth=12, num_heads=12), kwargs)


def vit_conv_small(**kwargs):
    return _vit(dict(embed_dim=384, depth=11, num_heads=12), kwargs, conv_stem=True)


def vit_conv_base(**kwargs):
    return _vit(dict(embed_dim=768, depth=11, num_heads=12), kwargs, conv_stem=True)


# The paper's larger models (Table 1), with ViT-S/B's flags: qkv bias, MLP ratio 4, LayerNorm eps 1e-6.
def vit_large(**kwargs):
    """ViT-L/16 (paper Table 1: 304 M parameters, counted as ViT's with a 1000-way classifier; the
    backbone without ``head`` holds 303,301,632). State_dict as timm's ``vit_large_patch16_224``."""
    return _vit(dict(embed_dim=1024, depth=24, num_heads=16), kwargs)


def vit_huge(**kwargs):
    """ViT-H/14 (paper Table 1: 632 M parameters with a 1000-way classifier; 630,764,800 without
    ``head``): 16x16 patches at 224 px. State_dict as timm's ``vit_huge_patch14_224`` (whose default
    pretrained config has no classifier: pass ``num_classes=1000`` to timm for the head too)."""
    return _vit(dict(embed_dim=1280, depth=32, num_heads=16, patch_size=14), kwargs)


# Small variants for low-resolution images (not in the paper). ViT-Tiny follows DeiT-Ti (3 heads).
def vit_tiny(**kwargs):
    return _vit(dict(embed_dim=192, depth=12, num_heads=3), kwargs)


def vit_tiny_patch4(**kwargs):
    """ViT-Tiny on 4x4 patches of 32x32 images (64 tokens): a CIFAR-sized ViT."""
    return _vit(dict(embed_dim=192, depth=12, num_heads=3, patch_size=4, img_size=32), kwargs)


def vit_small_patch4(**kwargs):
    """ViT-S (12 heads) on 4x4 patches of 32x32 images (64 tokens)."""
    return _vit(dict(embed_dim=384, depth=12, num_heads=12, patch_size=4, img_size=32), kwargs)


def vit_mini_patch4(**kwargs):
    """A 6-block, 96-wide ViT (3 heads) on 4x4 patches of 16x16 images (16 tokens): small enough for the
    CPU study of training stability (README "Monitoring")."""
    return _vit(dict(embed_dim=96, depth=6, num_heads=3, patch_size=4, img_size=16), kwargs)


VIT_ARCHS = {name: globals()[name] for name in __all__ if name.startswith('vit_')}
# pixels per token along a side: the patch, or the conv stem's four stride-2 convolutions
PATCH_SIZE = {name: 4 if name.endswith('_patch4') else 14 if name == 'vit_huge' else 16 for name in VIT_ARCHS}
