"""convert_to_deit.py: MoCo ViT checkpoints become timm/DeiT ViTs with the same features."""
import pytest
import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

import convert_to_deit
import vits
from moco.checkpoint import ddp_state_dict, save_checkpoint
from moco.models import build_moco


def convert(inp, out):
    """convert_to_deit.main in this process; returns the exit code."""
    try:
        convert_to_deit.main(convert_to_deit.get_args_parser().parse_args(['--input', str(inp), '--output', str(out)]))
    except SystemExit as e:
        return e.code
    return 0


def moco_vit_checkpoint(arch, path):
    """A pretraining checkpoint in the original layout holding a ViT base encoder (with its 3-layer
    projector as ``head``) plus momentum-encoder and predictor entries; every tensor is random, so a
    mix-up of any two keys would change the features."""
    torch.manual_seed(0)
    encoder = vits.VIT_ARCHS[arch](num_classes=32)
    encoder.head = nn.Sequential(nn.Linear(encoder.embed_dim, 32, bias=False), nn.BatchNorm1d(32), nn.ReLU(),
                                 nn.Linear(32, 16, bias=False), nn.BatchNorm1d(16, affine=False))
    with torch.no_grad():
        for t in encoder.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.randn_like(t) * 0.02)
    state_dict = {'module.base_encoder.' + k: v for k, v in encoder.state_dict().items()}
    state_dict.update({'module.momentum_encoder.cls_token': torch.randn(1, 1, encoder.embed_dim),
                       'module.momentum_encoder.head.0.weight': torch.randn(32, encoder.embed_dim),
                       'module.predictor.0.weight': torch.randn(32, 16)})
    torch.save({"epoch": 300, "arch": arch, "state_dict": state_dict, "optimizer": {}, "scaler": {}}, path)
    return encoder.eval()


@pytest.mark.parametrize('arch,dim', [('vit_small', 384), pytest.param('vit_base', 768, marks=pytest.mark.slow)])
def test_round_trip_to_timm(arch, dim, tmp_path):
    src, dst = tmp_path / 'moco.pth.tar', tmp_path / 'deit' / 'converted.pth'
    ours = moco_vit_checkpoint(arch, src)
    assert convert(src, dst) == 0

    converted = torch.load(dst, map_location='cpu', weights_only=True)
    assert list(converted) == ['model']
    keys = set(converted['model'])
    assert keys == {k for k in ours.state_dict() if not k.startswith('head.')}
    assert 'pos_embed' in keys and not any(k.startswith(('module.', 'head.')) for k in keys)

    timm_vit = VisionTransformer(embed_dim=dim, depth=12, num_heads=12, num_classes=10)  # 12 heads, also ViT-S
    msg = timm_vit.load_state_dict(converted['model'], strict=False)
    assert sorted(msg.missing_keys) == ['head.bias', 'head.weight'] and msg.unexpected_keys == []

    x = torch.randn(2, 3, 224, 224)
    timm_vit.eval()
    with torch.no_grad():
        theirs = timm_vit.forward_head(timm_vit.forward_features(x), pre_logits=True)
        mine = ours.forward_head(ours.forward_features(x), pre_logits=True)
    assert theirs.shape == (2, dim)
    torch.testing.assert_close(theirs, mine, rtol=1e-5, atol=1e-5)


def test_rejects_resnet_and_non_moco_files(tmp_path, capsys):
    resnet = tmp_path / 'r18.pth.tar'
    save_checkpoint({'epoch': 1, 'arch': 'resnet18_cifar', 'optimizer': {}, 'scaler': {},
                     'state_dict': ddp_state_dict(build_moco('resnet18_cifar', 16, 32))}, resnet)
    deit = tmp_path / 'deit.pth'
    torch.save({'model': {'cls_token': torch.zeros(1, 1, 8)}}, deit)
    cases = {resnet: 'holds a resnet18_cifar encoder, not a ViT', deit: 'no state_dict'}
    for path, message in cases.items():
        capsys.readouterr()
        assert convert(path, tmp_path / 'out.pth') == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / 'out.pth').exists()


def test_an_output_that_cannot_be_written_and_a_damaged_input_are_one_line(tmp_path, capsys):
    moco_vit_checkpoint('vit_tiny_patch4', tmp_path / 'moco.pth.tar')
    (tmp_path / 'a_file').write_text('x')
    for bad in ('/proc/moco/deit.pth', str(tmp_path / 'a_file' / 'deit.pth')):
        assert convert(tmp_path / 'moco.pth.tar', bad) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith('error: cannot create the folder of'), err
    data = bytearray((tmp_path / 'moco.pth.tar').read_bytes())
    data[len(data) // 2] ^= 1
    (tmp_path / 'damaged.pth.tar').write_bytes(data)
    assert convert(tmp_path / 'damaged.pth.tar', tmp_path / 'deit.pth') == 2
    assert 'error: damaged checkpoint' in capsys.readouterr().err and not (tmp_path / 'deit.pth').exists()
