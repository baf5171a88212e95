"""A pretraining checkpoint's backbone in the formats other code bases load (``convert_to_deit.py``).

* ViTs: ``{'model': state_dict}``, the original convert_to_deit.py's DeiT/timm file, unchanged.
* ResNets: the plain state_dict without ``fc.*``, torchvision's weight-file format
  (``torchvision.models.resnet50().load_state_dict(sd, strict=False)`` misses only ``fc.*``; detectron2's
  ``tools/convert-torchvision-to-d2.py`` reads it).
* A timm folder, ``config.json`` + ``model.safetensors`` written by ``timm.models.save_for_hf`` (what
  ``push_to_hf_hub`` uploads): ``timm.create_model('local-dir:DIR', pretrained=True, num_classes=N)`` builds
  our network with our weights. Its ``model_args`` record what timm's model of that name would get wrong
  (the paper's ViT-S has 12 heads, timm's ``vit_small_patch16_224`` 6, and the weights load silently into
  either), and the rest of what defines a ViT: image size, patch, width, depth, MLP ratio, qkv bias, class
  token, token pooling, no register tokens, no pre-norm. Its ``pretrained_cfg``: the input size, ImageNet
  mean and std, our evaluation's bilinear Resize(256/224 x S) + CenterCrop(S) (whole-image resize up to
  64 px), ``num_classes`` 0. The fixed sin-cos position embedding is a stored weight (a learned parameter in
  timm, as in DeiT's fine-tuning). LayerNorm eps 1e-6 and BatchNorm eps 1e-5 are timm's defaults; no field
  sets them, so the check below compares them.

A folder is checked before it is moved into place: timm builds it as a user would (``local-dir:``; a timm
older than 1.0.16, which cannot read such folders, the same architecture and arguments) and every norm's
eps, every attention's head count and the features of a random batch must equal ours. Networks timm has
no model for (the conv-stem ViTs, the CIFAR-stem and small ResNets, torchvision's RegNets) get no folder,
with one line saying why (``NoTimmModel``).
"""
import itertools
import math
import os
import pathlib
import shutil
from typing import NamedTuple

import torch
import torch.nn as nn
import torchvision.models as tvm

import vits
from moco.data.views import IMAGENET_MEAN, IMAGENET_STD, SMALL_EVAL_SIDE
from moco.errors import UserError, first_line
from moco.models import CIFAR_ARCHS, BackboneFeatures, encoder_factory, head_name, is_vit

LOCAL_DIR_TIMM = '1.0.16'   # the first timm whose create_model reads 'local-dir:' folders
FOLDER_FILES = ('config.json', 'model.safetensors', 'pytorch_model.bin', 'README.md')   # what save_for_hf writes
TIMM_VITS = {'vit_tiny': 'vit_tiny_patch16_224', 'vit_small': 'vit_small_patch16_224',
             'vit_base': 'vit_base_patch16_224', 'vit_large': 'vit_large_patch16_224',
             'vit_huge': 'vit_huge_patch14_224', 'vit_mini': 'vit_tiny_patch16_224'}   # by our name's stem
TIMM_RESNETS = ('resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152', 'resnext50_32x4d',
                'resnext101_32x8d', 'resnext101_64x4d', 'wide_resnet50_2', 'wide_resnet101_2')   # torchvision's keys
CHECKED_ATTRIBUTES = ('eps', 'num_heads', 'kernel_size', 'stride', 'padding', 'dilation', 'groups')


class NoTimmModel(UserError):
    """timm has no model of this network: the one line says why."""


class TimmPlan(NamedTuple):
    architecture: str      # the timm model name
    model_args: dict       # config.json's model_args: what differs from, or pins, that model's defaults
    pretrained_cfg: dict   # config.json's pretrained_cfg: input size, normalisation, crop, classes
    image_size: int


def is_vit_state(state):
    return any(k.startswith('patch_embed.') for k in state) and any(k.startswith('blocks.') for k in state)


def backbone_file(state):
    """What ``--output`` holds: a ViT's ``{'model': state}`` (DeiT), a ResNet's plain state_dict
    (torchvision); neither has the classifier."""
    return {'model': state} if is_vit_state(state) else state


def image_size(backbone):
    """The pretraining's crop size: a ViT's from its position embedding (1 + grid^2 rows); a ResNet's as the
    checkpoint records it (--image-size), else 32 for the CIFAR ResNets and 224."""
    state, arch, settings = backbone
    if is_vit_state(state) and 'pos_embed' in state and arch in vits.PATCH_SIZE:
        grid = math.isqrt(state['pos_embed'].shape[1] - 1)
        return grid * vits.PATCH_SIZE[arch]
    recorded = (settings or {}).get('image_size')
    return int(recorded) if recorded else (32 if arch in CIFAR_ARCHS else 224)


def with_weights(build, state, head=None):
    """``build()`` holding ``state``, and (missing, unexpected) keys; ``head`` (absent from ``state``)
    becomes an Identity. Built on the meta device, so without the random initialisation the weights would
    overwrite (most of the time of a conversion), then given the weights' own tensors; built and loaded
    the ordinary way where that leaves a tensor without a value."""
    try:
        with torch.device('meta'):
            model = build()
        if head:
            setattr(model, head, nn.Identity())
        result = model.load_state_dict(state, strict=False, assign=True)
        if not any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers())):
            return model, result
    except RuntimeError:
        pass   # a shape mismatch is reported by the ordinary load below
    model = build()
    if head:
        setattr(model, head, nn.Identity())
    return model, model.load_state_dict(state, strict=False)


def our_network(backbone, size):
    """The evaluated encoder as this repository builds it, with the checkpoint's weights, returning the
    features before its head (``BackboneFeatures``); weights that do not fit ``-a`` are a UserError."""
    state, arch, _ = backbone
    head = head_name(arch)
    try:
        factory = encoder_factory(arch, image_size=size if is_vit(arch) else None)
        encoder, (missing, unexpected) = with_weights(factory, state, head)
    except RuntimeError as e:
        raise UserError(f'the weights do not fit -a {arch}: {first_line(str(e).splitlines()[-1])}') from None
    except (TypeError, AssertionError, ValueError) as e:
        raise UserError(f'cannot build -a {arch} at {size} px: {first_line(e)}') from None
    if missing or unexpected:
        raise UserError(f'the weights do not fit -a {arch}: {"missing" if missing else "unexpected"} '
                        f'{(missing or unexpected)[0]}')
    return BackboneFeatures(encoder, head).eval()


def timm_plan(backbone, ours, size):
    """The TimmPlan of a backbone, or NoTimmModel saying why timm cannot build it."""
    state, arch, _ = backbone
    if arch is None:
        raise NoTimmModel('the checkpoint records no -a, so the network (a ViT\'s heads are not in its weights) is '
                          'unknown: no timm folder')
    encoder = ours.encoder
    cfg = dict(custom_load=False, input_size=(3, size, size), interpolation='bilinear',
               crop_pct=1.0 if size <= SMALL_EVAL_SIDE else 0.875, crop_mode='center', mean=tuple(IMAGENET_MEAN),
               std=tuple(IMAGENET_STD), num_classes=0)
    if is_vit(arch):
        if isinstance(encoder.patch_embed, vits.ConvStem):
            raise NoTimmModel(f'{arch}: timm has no ViT with MoCo v3\'s convolutional stem (four 3x3 stride-2 '
                              'convolutions with BatchNorm and ReLU, then a 1x1) and model_args cannot describe '
                              f'one: no timm folder (the DeiT file loads into vits.{arch}())')
        block = encoder.blocks[0]
        args = dict(img_size=size, patch_size=encoder.patch_embed.patch_size[0], embed_dim=encoder.embed_dim,
                    depth=len(encoder.blocks), num_heads=block.attn.num_heads,
                    mlp_ratio=block.mlp.fc1.out_features / encoder.embed_dim, qkv_bias=block.attn.qkv.bias is not None,
                    class_token=encoder.cls_token is not None, global_pool=encoder.global_pool,
                    no_embed_class=encoder.no_embed_class, reg_tokens=encoder.num_reg_tokens,
                    pre_norm=not isinstance(encoder.norm_pre, nn.Identity))
        name = TIMM_VITS.get(arch.split('_patch')[0], 'vit_base_patch16_224')   # model_args say the rest
        cfg.update(architecture=name, fixed_input_size=True, pool_size=None, first_conv='patch_embed.proj',
                   classifier='head')
        return TimmPlan(name, args, cfg, size)
    if arch in TIMM_RESNETS:
        cfg.update(architecture=arch, fixed_input_size=False, pool_size=(math.ceil(size / 32),) * 2,
                   first_conv='conv1', classifier='fc')
        return TimmPlan(arch, {}, cfg, size)
    if arch.endswith('_cifar'):
        base = arch[:-len('_cifar')]
        raise NoTimmModel(f'{arch}: timm and torchvision have no ResNet with a 3x3 stride-1 first convolution and no '
                          'max-pool (timm\'s stem_type cannot describe it): no timm folder; the torchvision-format '
                          f'file loads into torchvision.models.{base}() after m.conv1 = nn.Conv2d(3, 64, 3, 1, 1, '
                          'bias=False); m.maxpool = nn.Identity()')
    if arch in CIFAR_ARCHS:
        raise NoTimmModel(f'{arch}: timm and torchvision have no ResNet of these widths with a 3x3 stride-2 stem and '
                          f'no max-pool: no timm folder; the file (torchvision\'s key names) loads into '
                          f'moco.models.CIFAR_ARCHS[{arch!r}]()')
    raise NoTimmModel(f'{arch}: timm\'s model of this family names its modules otherwise than torchvision\'s: no '
                      f'timm folder; the torchvision-format file loads into torchvision.models.{arch}()')


def describe_backbone_file(backbone, path):
    """The line that says what --output holds."""
    state, arch, _ = backbone
    n = sum(v.numel() for v in state.values())
    if is_vit_state(state):
        return f'=> wrote {path}: {len(state)} tensors, {n:,} values (no head)'
    line = f"=> wrote {path}: {len(state)} tensors, {n:,} values (no fc), torchvision's format"
    if arch in tvm.list_models(module=tvm):
        line += (f': torchvision.models.{arch}().load_state_dict(torch.load(PATH, weights_only=True), strict=False) '
                 'misses only fc.*')
    return line


def timm_version():
    import timm
    return timm.__version__


def timm_reads_local_dir():
    try:
        from timm.models._hub import load_model_config_from_path  # noqa: F401  (timm >= 1.0.16)
    except ImportError:
        return False
    return True


def check_folder_target(folder, flag='--timm-dir'):
    """A folder the export may (re)place: new, or one holding only what save_for_hf writes, in a place
    where a folder can be made."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f'{flag} {folder} is a file, not a folder; choose another {flag}')
    if os.path.isdir(folder):
        others = sorted(set(os.listdir(folder)) - set(FOLDER_FILES))
        if others:
            raise UserError(f'{flag} {folder} holds other files than a timm export ({others[0]}, ...): it would be '
                            f'replaced; choose a new or empty {flag}')
    ancestor = os.path.abspath(folder)
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor) or not os.access(ancestor, os.W_OK | os.X_OK) or \
            ancestor.startswith(('/proc', '/sys')):
        raise UserError(f'cannot create {flag} {folder}: {ancestor} is not a writable folder')


def compare(ours, theirs, size, what):
    """Max |difference| of the features (ViTs: also the token map) of a random batch, after checking the
    eps of every norm, the heads of every attention and the geometry of every convolution that both networks
    name alike; a difference is a UserError naming it."""
    theirs_modules = dict(theirs.named_modules())
    for name, module in ours.encoder.named_modules():
        other = theirs_modules.get(name)
        for attr in CHECKED_ATTRIBUTES if name and other is not None else ():
            if hasattr(module, attr) and hasattr(other, attr) and getattr(module, attr) != getattr(other, attr):
                raise UserError(f'{what} differs from ours: {name}.{attr} is {getattr(other, attr)}, ours '
                                f'{getattr(module, attr)}')
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    theirs.eval()
    with torch.no_grad():
        pairs = [(ours(x), theirs(x))]
        if isinstance(ours.encoder, vits.VisionTransformerMoCo):
            pairs.append((ours.encoder.forward_features(x), theirs.forward_features(x)))
    worst = 0.
    for a, b in pairs:
        if a.shape != b.shape:
            raise UserError(f'{what} differs from ours: features of shape {tuple(b.shape)}, ours {tuple(a.shape)}')
        diff = (a - b).abs().max().item()
        if not diff <= 1e-5 * max(1., a.abs().max().item()):
            raise UserError(f'{what} differs from ours: features differ by up to {diff:.3g}')
        worst = max(worst, diff)
    return worst


def save_for_hf(model, folder, model_args):
    """timm's ``save_for_hf`` (safetensors), or where it cannot run (it asserts that huggingface_hub imports,
    which fails for a timm older than the installed huggingface_hub) the two writes it makes."""
    from timm.models import _hub
    if hasattr(_hub, 'save_for_hf') and _hub.has_hf_hub(necessary=False):
        _hub.save_for_hf(model, folder, model_args=model_args, safe_serialization=True)
        return
    import safetensors.torch
    os.makedirs(folder, exist_ok=True)
    safetensors.torch.save_file(model.state_dict(), os.path.join(folder, 'model.safetensors'))
    _hub.save_config_for_hf(model, pathlib.Path(folder) / 'config.json', model_args=model_args)


def write_timm_folder(backbone, ours, plan, folder):
    """Write the timm folder of ``plan`` (timm's save_for_hf), check that what timm loads from it computes
    our features, then put it at ``folder`` (replacing an earlier export). Returns the max |difference|."""
    import timm

    try:
        model, (missing, unexpected) = with_weights(
            lambda: timm.create_model(plan.architecture, pretrained=False, num_classes=0, **plan.model_args),
            {k: v.contiguous() for k, v in backbone.state.items()})   # safetensors: no channels_last weights
    except RuntimeError as e:
        raise UserError(f'timm\'s {plan.architecture} does not take these weights: '
                        f'{first_line(str(e).splitlines()[-1])}') from None
    if missing or unexpected:
        raise UserError(f'timm\'s {plan.architecture} does not take these weights: '
                        f'{"missing" if missing else "unexpected"} {(missing or unexpected)[0]}')
    model.pretrained_cfg = dict(plan.pretrained_cfg)
    folder = os.path.abspath(folder)
    parent, name = os.path.split(folder)
    tmp, old = os.path.join(parent, f'.{name}.tmp.{os.getpid()}'), os.path.join(parent, f'.{name}.old.{os.getpid()}')
    try:
        os.makedirs(parent, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        save_for_hf(model, tmp, plan.model_args)
        umask = os.umask(0)
        os.umask(umask)
        for entry in os.listdir(tmp):   # safetensors writes its file for the owner alone; the .pth is not
            os.chmod(os.path.join(tmp, entry), 0o666 & ~umask)
        if timm_reads_local_dir():
            model = timm.create_model(f'local-dir:{tmp}', pretrained=True, num_classes=0)
        diff = compare(ours, model, plan.image_size, f'the timm model of {folder}')
        if os.path.isdir(folder):
            os.replace(folder, old)
        os.replace(tmp, folder)
    except OSError as e:
        raise UserError(f'cannot write the timm folder {folder}: {e.strerror or e}') from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return diff


def load_line(folder, plan, num_classes=1000):
    """The one line of Python that builds the folder's network in timm."""
    if timm_reads_local_dir():
        return (f"import timm; model = timm.create_model({'local-dir:' + folder!r}, pretrained=True, "
                f"num_classes={num_classes})")
    overlay = {'file': os.path.join(folder, 'model.safetensors'),
               **{k: v for k, v in plan.pretrained_cfg.items() if k != 'architecture'}}
    args = ''.join(f', {k}={v!r}' for k, v in plan.model_args.items())
    return (f'import timm; model = timm.create_model({plan.architecture!r}, pretrained=True, '
            f'pretrained_cfg_overlay={overlay!r}, num_classes={num_classes}{args})')
