"""vits.py against the paper and the original vits.py: position embedding, initialisation, frozen patch
projection, conv stem, parameter counts and timm key compatibility."""
import math

import pytest
import timm
import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

import vits
from moco.errors import UserError
from moco.models import build_moco, check_patch_size


@pytest.fixture(scope='module')
def small1():
    """vit_small with one block: the same layer shapes as the full model, built quickly."""
    torch.manual_seed(0)
    return vits.vit_small(depth=1)


def _pos_embed_by_hand(grid_h, grid_w, dim):
    quarter = dim // 4
    rows = [[0.0] * dim]                       # [cls]
    for k in range(grid_h * grid_w):
        r, c = k // grid_w, k % grid_w
        row = []
        for fn, pos in ((math.sin, r), (math.cos, r), (math.sin, c), (math.cos, c)):
            row += [fn(pos * 10000 ** (-d / quarter)) for d in range(quarter)]
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float64)[None]


@pytest.mark.parametrize('img_size,grid', [(32, (8, 8)), ((32, 16), (8, 4))])
def test_pos_embed_formula(img_size, grid):
    model = vits.vit_tiny_patch4(depth=1, img_size=img_size)
    pe = model.pos_embed
    assert tuple(model.patch_embed.grid_size) == grid
    assert pe.shape == (1, 1 + grid[0] * grid[1], 192)
    expected = _pos_embed_by_hand(grid[0], grid[1], 192)
    torch.testing.assert_close(pe.detach().double(), expected, atol=1e-5, rtol=0)
    assert torch.count_nonzero(pe[0, 0]) == 0            # cls row zeros
    assert isinstance(pe, nn.Parameter) and pe.requires_grad is False
    assert 'pos_embed' in model.state_dict()
    torch.testing.assert_close(model.state_dict()['pos_embed'], pe.detach())


def test_pos_embed_vit_small_224(small1):
    pe = small1.pos_embed
    assert pe.shape == (1, 197, 384) and not pe.requires_grad
    torch.testing.assert_close(pe.detach().double(), _pos_embed_by_hand(14, 14, 384), atol=1e-5, rtol=0)
    assert 'pos_embed' in [n for n, _ in small1.named_parameters()]   # a parameter, as in the original


def test_vit_small_has_12_heads(small1):
    for blk in small1.blocks:
        assert blk.attn.num_heads == 12 and blk.attn.head_dim == 32
    assert small1.embed_dim == 384 and small1.patch_embed.patch_size == (16, 16)
    assert small1.blocks[0].attn.qkv.bias is not None                     # qkv bias
    assert small1.blocks[0].mlp.fc1.out_features == 4 * 384               # mlp ratio 4
    assert small1.norm.eps == 1e-6 and small1.blocks[0].norm1.eps == 1e-6
    with torch.device('meta'):
        full = vits.vit_base(depth=1)
    assert full.embed_dim == 768 and full.blocks[0].attn.num_heads == 12


def test_init_linear_biases_zero_and_weight_bounds(small1):
    linears = [(n, m) for n, m in small1.named_modules() if isinstance(m, nn.Linear)]
    assert len(linears) >= 5
    for name, m in linears:
        assert torch.count_nonzero(m.bias) == 0, name
        out, inp = m.weight.shape
        if 'qkv' in name:
            bound = math.sqrt(6. / (out // 3 + inp))        # Q, K, V as separate matrices
        else:
            bound = math.sqrt(6. / (out + inp))             # Xavier-uniform
        w = m.weight.detach()
        assert w.abs().max() <= bound, name
        assert w.abs().max() > 0.98 * bound, name          # fills the range (not a narrower init)
        assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05), name  # uniform std
        assert abs(w.mean().item()) < 0.02 * bound, name


def test_qkv_bound_is_not_full_matrix_xavier(small1):
    w = small1.blocks[0].attn.qkv.weight.detach()
    assert w.shape == (3 * 384, 384)
    # roughly uniform on [-b, b]: the fraction of |w| < b/2 is about 1/2
    b = math.sqrt(6. / (384 + 384))
    frac = (w.abs() < b / 2).float().mean().item()
    assert frac == pytest.approx(0.5, abs=0.02)
    assert w.abs().max() > math.sqrt(6. / (3 * 384 + 384)) * 1.3


def test_init_cls_token_and_patch_projection(small1):
    cls = small1.cls_token.detach()
    assert cls.abs().max() < 1e-5 and cls.std().item() == pytest.approx(1e-6, rel=0.3)
    w = small1.patch_embed.proj.weight.detach()
    bound = math.sqrt(6. / (3 * 16 * 16 + 384))
    assert w.abs().max() <= bound and w.abs().max() > 0.98 * bound
    assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert torch.count_nonzero(small1.patch_embed.proj.bias) == 0


def test_stop_grad_conv1_freezes_patch_projection_only():
    with torch.device('meta'):
        model = vits.vit_small(depth=1, stop_grad_conv1=True)
        default = vits.vit_small(depth=1)
    assert model.patch_embed.proj.weight.requires_grad is False
    assert model.patch_embed.proj.bias.requires_grad is False
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {'pos_embed', 'patch_embed.proj.weight', 'patch_embed.proj.bias'}
    # default: trainable
    assert default.patch_embed.proj.weight.requires_grad and default.patch_embed.proj.bias.requires_grad


def test_stop_grad_conv1_gives_no_gradient_to_patch_projection():
    model = vits.vit_tiny_patch4(depth=1, stop_grad_conv1=True, num_classes=5)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert model.patch_embed.proj.weight.grad is None and model.patch_embed.proj.bias.grad is None
    assert model.cls_token.grad is not None


def test_stop_grad_conv1_leaves_conv_stem_trainable():
    with torch.device('meta'):
        model = vits.vit_conv_small(depth=1, stop_grad_conv1=True)
    stem = list(model.patch_embed.parameters())
    assert len(stem) == 4 * 3 + 2   # 4 x (conv weight, bn weight, bn bias) + 1x1 conv weight, bias
    assert all(p.requires_grad for p in stem)
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == {'pos_embed'}


def test_conv_stem_structure():
    with torch.device('meta'):
        model = vits.vit_conv_small(depth=1)
        conv_base = vits.vit_conv_base(depth=1)
        conv_small_full = vits.vit_conv_small()
    assert isinstance(model.patch_embed, vits.ConvStem)
    layers = list(model.patch_embed.proj)
    assert len(layers) == 13
    D = 384
    channels = [3, D // 8, D // 4, D // 2, D]
    for i in range(4):
        conv, bn, relu = layers[3 * i:3 * i + 3]
        assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and isinstance(relu, nn.ReLU)
        assert (conv.in_channels, conv.out_channels) == (channels[i], channels[i + 1])
        assert conv.kernel_size == (3, 3) and conv.stride == (2, 2) and conv.padding == (1, 1)
        assert conv.bias is None
        assert bn.num_features == channels[i + 1] and bn.affine
    last = layers[12]
    assert isinstance(last, nn.Conv2d) and last.kernel_size == (1, 1) and last.stride == (1, 1)
    assert (last.in_channels, last.out_channels) == (D, D) and last.bias is not None
    assert model.pos_embed.shape == (1, 197, D)
    assert conv_base.patch_embed.proj[9].out_channels == 768 and conv_base.patch_embed.proj[12].out_channels == 768
    assert len(conv_small_full.blocks) == 11 and conv_small_full.patch_embed.patch_size == (16, 16)


def test_conv_stem_forward_small_image():
    model = vits.vit_conv_small(depth=1, img_size=32, num_classes=7)
    assert model.patch_embed.grid_size == (2, 2) and model.pos_embed.shape == (1, 5, 384)
    tokens = model.patch_embed(torch.randn(2, 3, 32, 32))
    assert tokens.shape == (2, 4, 384)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_vit_tiny_patch4_runs_on_32px():
    model = vits.vit_tiny_patch4(depth=2, num_classes=10)
    assert model.patch_embed.patch_size == (4, 4) and model.pos_embed.shape == (1, 65, 192)
    out = model(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, 10) and torch.isfinite(out).all()
    small = vits.vit_small_patch4(depth=1, num_classes=4)
    assert small.blocks[0].attn.num_heads == 12
    assert small(torch.randn(2, 3, 32, 32)).shape == (2, 4)


# ---- counts and keys (meta device: no memory, no init cost) ----

PARAM_COUNTS = {
    'vit_small': (84_266_752, 42_815_104),
    'vit_base': (215_678_464, 108_150_016),
    'vit_conv_small': (82_170_208, 42_062_128),
    'vit_conv_base': (208_480_960, 105_141_856),
    'vit_large': (652_781_568, 326_454_272),
    'vit_huge': (1_309_805_056, 654_872_320),
    'resnet50': (68_012_160, 35_058_752),
}


@pytest.mark.parametrize('arch', list(PARAM_COUNTS))
def test_moco_parameter_counts(arch):
    with torch.device('meta'):
        model = build_moco(arch, stop_grad_conv1=True)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert (total, trainable) == PARAM_COUNTS[arch]


def test_bare_vit_small_parameter_count():
    with torch.device('meta'):
        model = vits.vit_small()
    assert sum(p.numel() for p in model.parameters()) == 22_050_664
    assert len(model.blocks) == 12 and all(blk.attn.num_heads == 12 for blk in model.blocks)


@pytest.mark.parametrize('arch,dim', [('vit_small', 384), ('vit_base', 768)])
def test_timm_state_dict_compatibility(arch, dim):
    with torch.device('meta'):
        ours = getattr(vits, arch)().state_dict()
        theirs = VisionTransformer(embed_dim=dim, depth=12, num_heads=12).state_dict()
    assert list(ours) == list(theirs)
    for k in ours:
        assert ours[k].shape == theirs[k].shape, k


# ---- ViT-L/16 and ViT-H/14 (paper Table 1), on the meta device or with one block ----

# arch: (depth, width, heads, patch, tokens at 224 px, timm's model, backbone parameters without head)
BIG = {'vit_large': (24, 1024, 16, 16, 197, 'vit_large_patch16_224', 303_301_632),
       'vit_huge': (32, 1280, 16, 14, 257, 'vit_huge_patch14_224', 630_764_800)}


def _count(named_params, trainable_only=False, skip=('head.',)):
    return sum(p.numel() for n, p in named_params if not n.startswith(skip) and (p.requires_grad or not trainable_only))


def test_big_vits_are_registered():
    from moco.models import arch_names
    assert {'vit_large', 'vit_huge'} <= set(arch_names())
    assert vits.PATCH_SIZE['vit_large'] == 16 and vits.PATCH_SIZE['vit_huge'] == 14
    check_patch_size('vit_huge', 224)                        # 16 x 16 patches of 14 px
    with pytest.raises(UserError, match='use 252 or 266'):
        check_patch_size('vit_huge', 256)


def test_patch_size_table_matches_every_arch():
    for arch, build in vits.VIT_ARCHS.items():
        with torch.device('meta'):
            model = build(depth=1)
        pixels = model.patch_embed.img_size[0] // model.patch_embed.grid_size[0]
        assert pixels == vits.PATCH_SIZE[arch], arch


@pytest.mark.parametrize('arch', BIG)
def test_big_vit_architecture(arch):
    depth, dim, heads, patch, tokens, _, _ = BIG[arch]
    with torch.device('meta'):
        model = vits.VIT_ARCHS[arch]()
    assert len(model.blocks) == depth and model.embed_dim == dim
    assert model.patch_embed.patch_size == (patch, patch) and model.patch_embed.grid_size == (224 // patch,) * 2
    assert model.pos_embed.shape == (1, tokens, dim) and not model.pos_embed.requires_grad
    for blk in model.blocks:
        assert blk.attn.num_heads == heads and blk.attn.head_dim == dim // heads
        assert blk.attn.qkv.bias is not None and blk.mlp.fc1.out_features == 4 * dim
        assert blk.norm1.eps == 1e-6 and isinstance(blk.ls1, nn.Identity)
    assert model.norm.eps == 1e-6 and model.global_pool == 'token' and model.num_prefix_tokens == 1


@pytest.mark.parametrize('arch', BIG)
def test_big_vit_parameter_counts_match_the_paper(arch):
    """Paper Table 1: ViT-L 304 M, ViT-H 632 M: ViT's convention, with a 1000-way classifier. Without the
    head (what MoCo pretrains and the conversion exports): 303.3 M and 630.8 M."""
    backbone = BIG[arch][-1]
    with torch.device('meta'):
        model = vits.VIT_ARCHS[arch]()
        frozen = vits.VIT_ARCHS[arch](stop_grad_conv1=True)
    assert _count(model.named_parameters()) == backbone
    with_head = _count(model.named_parameters(), skip=())
    assert with_head == backbone + 1000 * model.embed_dim + 1000
    assert round(with_head / 1e6) == {'vit_large': 304, 'vit_huge': 632}[arch]
    dim, patch, tokens = model.embed_dim, BIG[arch][3], BIG[arch][4]
    pos, proj = tokens * dim, 3 * patch * patch * dim + dim
    assert _count(model.named_parameters(), trainable_only=True) == backbone - pos
    assert _count(frozen.named_parameters(), trainable_only=True) == backbone - pos - proj
    assert {n for n, p in frozen.named_parameters() if not p.requires_grad} == \
        {'pos_embed', 'patch_embed.proj.weight', 'patch_embed.proj.bias'}


@pytest.mark.parametrize('arch', BIG)
def test_big_moco_trainable_parameters_with_and_without_frozen_projection(arch):
    with torch.device('meta'):
        frozen = build_moco(arch, stop_grad_conv1=True)
        learned = build_moco(arch)
    total, trainable = PARAM_COUNTS[arch]
    depth, dim, heads, patch, tokens, _, backbone = BIG[arch]
    proj = 3 * patch * patch * dim + dim
    for model, expected in ((frozen, trainable), (learned, trainable + proj)):
        assert sum(p.numel() for p in model.parameters()) == total
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    # base encoder = backbone + 3-layer projector; total = 2 encoders + the 2-layer predictor
    projector = dim * 4096 + 2 * 4096 + 4096 * 4096 + 2 * 4096 + 4096 * 256
    predictor = 256 * 4096 + 2 * 4096 + 4096 * 256
    assert total == 2 * (backbone + projector) + predictor


@pytest.mark.parametrize('arch', BIG)
def test_big_vit_state_dict_is_timms(arch):
    """Converted weights load into timm's model missing only the head. timm's ``vit_huge_patch14_224``
    defaults to ``num_classes=0`` (its pretrained config is the headless in21k one): with
    ``num_classes=1000`` its head matches ours too; no other flag differs (qkv bias, class token, token pooling,
    LayerNorm eps 1e-6, no fc_norm, no layer scale)."""
    name = BIG[arch][5]
    with torch.device('meta'):
        ours = vits.VIT_ARCHS[arch]().state_dict()
        theirs = timm.create_model(name, pretrained=False).state_dict()
        theirs_1000 = timm.create_model(name, pretrained=False, num_classes=1000).state_dict()
    backbone = {k: v.shape for k, v in ours.items() if not k.startswith('head.')}
    assert {k: v.shape for k, v in theirs.items() if not k.startswith('head.')} == backbone
    assert list(backbone) == [k for k in theirs if not k.startswith('head.')]      # the same order too
    assert {k: v.shape for k, v in theirs_1000.items()} == {k: v.shape for k, v in ours.items()}
    assert ('head.weight' in theirs) == (arch == 'vit_large')


@pytest.mark.parametrize('arch', BIG)
def test_big_vit_computes_what_timm_computes(arch):
    """One block of each, with our weights in timm's model: the same features (layout, norms, pooling)."""
    name, patch = BIG[arch][5], BIG[arch][3]
    torch.manual_seed(0)
    ours = vits.VIT_ARCHS[arch](depth=1, img_size=4 * patch, num_classes=10).eval()
    theirs = timm.create_model(name, pretrained=False, depth=1, img_size=4 * patch, num_classes=10).eval()
    assert theirs.load_state_dict(ours.state_dict()).missing_keys == []
    x = torch.randn(2, 3, 4 * patch, 4 * patch)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours(x))


@pytest.mark.parametrize('arch', BIG)
def test_big_vit_moco_init(arch):
    """The same MoCo init as ViT-S/B (one block, real weights): Q, K, V Xavier bounds, Xavier patch projection
    over 3 p^2 inputs, zero biases, cls ~ N(0, 1e-6)."""
    torch.manual_seed(0)
    model = vits.VIT_ARCHS[arch](depth=1)
    dim, patch = model.embed_dim, BIG[arch][3]
    qkv = model.blocks[0].attn.qkv.weight.detach()
    bound = math.sqrt(6. / (dim + dim))
    assert qkv.abs().max() <= bound and qkv.abs().max() > 0.99 * bound
    fc1 = model.blocks[0].mlp.fc1.weight.detach()
    assert fc1.abs().max() <= math.sqrt(6. / (5 * dim)) and fc1.abs().max() > 0.99 * math.sqrt(6. / (5 * dim))
    proj = model.patch_embed.proj.weight.detach()
    bound = math.sqrt(6. / (3 * patch * patch + dim))
    assert proj.abs().max() <= bound and proj.abs().max() > 0.99 * bound
    assert all(torch.count_nonzero(m.bias) == 0 for m in model.modules() if isinstance(m, nn.Linear))
    assert model.cls_token.std().item() == pytest.approx(1e-6, rel=0.3)
