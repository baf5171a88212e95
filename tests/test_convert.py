"""convert_to_deit.py and moco/export.py: MoCo checkpoints become DeiT/timm ViTs, torchvision ResNets and timm
folders that compute the same features as ours."""
import contextlib
import io
import json
import os
import shutil

import pytest
import timm
import torch
import torch.nn as nn
import torchvision
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer

import convert_to_deit
import vits
from moco import export
from moco.checkpoint import ddp_state_dict, save_checkpoint
from moco.models import BackboneFeatures, build_moco

needs_local_dir = pytest.mark.skipif(not export.timm_reads_local_dir(),
                                     reason=f"timm {timm.__version__} cannot read 'local-dir:' folders")


@pytest.fixture(scope='module', autouse=True)
def offline():
    """Nothing here may reach the Hugging Face Hub (timm would if a pretrained model were asked for by name)."""
    import huggingface_hub.constants
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv('HF_HUB_OFFLINE', '1')
        patch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
        yield


def convert(inp, out, *flags):
    """convert_to_deit.main in this process; returns the exit code."""
    try:
        convert_to_deit.main(convert_to_deit.get_args_parser().parse_args(
            ['--input', str(inp), '--output', str(out), *map(str, flags)]))
    except SystemExit as e:
        return e.code
    return 0


def randomised(model):
    """Every float tensor moved off its initial value (BatchNorm variances kept positive), so that a mix-up
    of any two keys, or statistics left out, would change the features."""
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.add_(torch.randn_like(t).abs() * 0.02 if name.endswith('running_var') else torch.randn_like(t) * 0.02)
    return model


def moco_vit_checkpoint(arch, path):
    """A pretraining checkpoint in the original layout holding a ViT base encoder (with its 3-layer
    projector as ``head``) plus momentum-encoder and predictor entries; every tensor is random, so a
    mix-up of any two keys would change the features."""
    torch.manual_seed(0)
    encoder = vits.VIT_ARCHS[arch](num_classes=32)
    encoder.head = nn.Sequential(nn.Linear(encoder.embed_dim, 32, bias=False), nn.BatchNorm1d(32), nn.ReLU(),
                                 nn.Linear(32, 16, bias=False), nn.BatchNorm1d(16, affine=False))
    randomised(encoder)
    state_dict = {'module.base_encoder.' + k: v for k, v in encoder.state_dict().items()}
    state_dict.update({'module.momentum_encoder.cls_token': torch.randn(1, 1, encoder.embed_dim),
                       'module.momentum_encoder.head.0.weight': torch.randn(32, encoder.embed_dim),
                       'module.predictor.0.weight': torch.randn(32, 16)})
    torch.save({"epoch": 300, "arch": arch, "state_dict": state_dict, "optimizer": {}, "scaler": {}}, path)
    return encoder.eval()


def moco_resnet_checkpoint(arch, path, method='mocov3'):
    """A pretraining checkpoint of ``method`` (small heads) with random weights and BatchNorm statistics;
    returns the encoder the method evaluates (M2T: the teacher), in eval mode."""
    torch.manual_seed(0)
    model = randomised(build_moco(arch, 16, 32, method=method))
    save_checkpoint({'epoch': 1, 'arch': arch, 'method': method, 'optimizer': {}, 'scaler': {},
                     'state_dict': ddp_state_dict(model)}, path)
    return (model.momentum_encoder if method == 'm2t' else model.base_encoder).eval()


def features(ours, x):
    """Our features: the pooled ResNet feature or the ViT [cls] token after the final norm."""
    with torch.no_grad():
        return BackboneFeatures(ours, 'head' if isinstance(ours, vits.VisionTransformerMoCo) else 'fc')(x)


def load_folder(folder, num_classes):
    """What a user types: timm.create_model('local-dir:FOLDER', pretrained=True, num_classes=N)."""
    return timm.create_model(f'local-dir:{folder}', pretrained=True, num_classes=num_classes).eval()


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
    """arch -> (our encoder, --input, --output, the timm folder, stdout): each checkpoint made and converted
    once."""
    cache = {}

    def get(arch):
        if arch not in cache:
            tmp = tmp_path_factory.mktemp(arch)
            src, dst = tmp / 'moco.pth.tar', tmp / 'deit' / 'converted.pth'
            ours = moco_vit_checkpoint(arch, src)
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                assert convert(src, dst) == 0
            cache[arch] = ours, src, dst, tmp / 'deit' / 'converted_timm', out.getvalue()
        return cache[arch]
    return get


VIT_DIMS = {'vit_tiny_patch4': dict(embed_dim=192, num_heads=3, patch_size=4, img_size=32),
            'vit_small': dict(embed_dim=384, num_heads=12), 'vit_base': dict(embed_dim=768, num_heads=12)}


@pytest.mark.parametrize('arch', ['vit_tiny_patch4', pytest.param('vit_small', marks=pytest.mark.slow),
                                  pytest.param('vit_base', marks=pytest.mark.slow)])
def test_round_trip_to_timm(arch, converted):
    ours, _, dst, folder, out = converted(arch)
    dim, size = VIT_DIMS[arch]['embed_dim'], VIT_DIMS[arch].get('img_size', 224)

    # the DeiT file, as the original writes it
    deit = torch.load(dst, map_location='cpu', weights_only=True)
    assert list(deit) == ['model']
    keys = set(deit['model'])
    assert keys == {k for k in ours.state_dict() if not k.startswith('head.')}
    assert 'pos_embed' in keys and not any(k.startswith(('module.', 'head.')) for k in keys)
    timm_vit = VisionTransformer(depth=12, num_classes=10, **VIT_DIMS[arch])  # 12 heads, also ViT-S
    msg = timm_vit.load_state_dict(deit['model'], strict=False)
    assert sorted(msg.missing_keys) == ['head.bias', 'head.weight'] and msg.unexpected_keys == []

    # the timm folder: timm alone builds the same network, a new 10-way head on our features
    assert sorted(os.listdir(folder)) == ['config.json', 'model.safetensors']
    config = json.load(open(folder / 'config.json'))
    assert config['model_args']['num_heads'] == VIT_DIMS[arch]['num_heads']
    assert config['pretrained_cfg']['mean'] == [0.485, 0.456, 0.406] and config['pretrained_cfg']['num_classes'] == 0
    assert config['pretrained_cfg']['input_size'] == [3, size, size]
    if not export.timm_reads_local_dir():   # the line printed instead: test_a_timm_without_local_dir_...
        pytest.skip(f"timm {timm.__version__} cannot read 'local-dir:' folders")
    line = f"import timm; model = timm.create_model('local-dir:{folder}', pretrained=True, num_classes=1000)"
    assert out.splitlines()[-1] == line
    theirs = load_folder(folder, 10)
    assert theirs.blocks[0].attn.num_heads == VIT_DIMS[arch]['num_heads'] and theirs.head.out_features == 10

    x = torch.randn(2, 3, size, size)
    timm_vit.eval()
    with torch.no_grad():
        via_deit = timm_vit.forward_head(timm_vit.forward_features(x), pre_logits=True)
        tokens, mine_tokens = theirs.forward_features(x), ours.forward_features(x)
        pooled = theirs.forward_head(tokens, pre_logits=True)
        assert theirs(x).shape == (2, 10)
    mine = features(ours, x)
    assert via_deit.shape == (2, dim)
    torch.testing.assert_close(via_deit, mine, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tokens, mine_tokens, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pooled, mine, rtol=1e-5, atol=1e-5)


@pytest.mark.slow   # ViT-S at 224 px
@needs_local_dir
def test_the_folder_records_the_12_heads_timm_s_vit_small_lacks(converted, tmp_path):
    """timm's vit_small_patch16_224 has 6 heads and takes our weights without a word; the folder's config is
    what makes timm build 12: without its num_heads, the features differ."""
    ours, _, _, folder, _ = converted('vit_small')
    x = torch.randn(1, 3, 224, 224)
    mine = features(ours, x)

    default = timm.create_model('vit_small_patch16_224', pretrained=False, num_classes=0).eval()
    default.load_state_dict(load_file(folder / 'model.safetensors'))   # strict, and silent
    assert default.blocks[0].attn.num_heads == 6

    unrecorded = tmp_path / 'unrecorded'
    shutil.copytree(folder, unrecorded)
    config = json.load(open(unrecorded / 'config.json'))
    del config['model_args']['num_heads']
    (unrecorded / 'config.json').write_text(json.dumps(config))

    theirs = load_folder(folder, 0)
    assert theirs.blocks[0].attn.num_heads == 12
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), mine, rtol=1e-5, atol=1e-5)
        for wrong in (default, load_folder(unrecorded, 0)):
            assert wrong.blocks[0].attn.num_heads == 6
            assert (wrong(x) - mine).abs().max() > 0.1


@needs_local_dir
@pytest.mark.skipif(not hasattr(timm.models._hub, 'HfApi'), reason=f'timm {timm.__version__} uploads otherwise')
def test_push_to_hf_hub_uploads_the_folder_as_written(converted, tmp_path, monkeypatch):
    """timm.models.push_to_hf_hub of the loaded model (its own code path, the Hub replaced by a folder)
    uploads the same config.json and tensors."""
    import timm.models._hub as hub
    uploaded = tmp_path / 'hub'

    class Hub:   # the calls push_to_hf_hub makes, without a network
        def __init__(self, **kwargs):
            pass

        def create_repo(self, repo_id, **kwargs):
            return type('Repo', (), {'repo_id': repo_id})

        def file_exists(self, **kwargs):
            return False

        def upload_folder(self, folder_path, **kwargs):
            shutil.copytree(folder_path, uploaded)
            return 'uploaded'

    monkeypatch.setattr(hub, 'HfApi', Hub)
    folder = converted('vit_tiny_patch4')[3]
    assert timm.models.push_to_hf_hub(load_folder(folder, 0), 'someone/mocov3-vit') == 'uploaded'
    assert json.load(open(uploaded / 'config.json')) == json.load(open(folder / 'config.json'))
    ours, theirs = load_file(folder / 'model.safetensors'), load_file(uploaded / 'model.safetensors')
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_timm_without_local_dir_gets_a_line_that_loads_the_folder(converted, tmp_path, monkeypatch, capsys):
    """timm < 1.0.16 cannot read 'local-dir:': the folder is still written (checked against the model timm
    builds from the same arguments) and the line printed instead loads it."""
    ours, src = converted('vit_tiny_patch4')[:2]
    monkeypatch.setattr(export, 'timm_reads_local_dir', lambda: False)
    capsys.readouterr()
    assert convert(src, tmp_path / 'deit.pth') == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "cannot read 'local-dir:' folders (timm >= 1.0.16 can)" in lines[-2]
    scope = {}
    exec(lines[-1], scope)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(scope['model'].eval().forward_head(scope['model'].forward_features(x),
                                                                      pre_logits=True), features(ours, x))
    assert scope['model'].head.out_features == 1000 and scope['model'].blocks[0].attn.num_heads == 3


@pytest.mark.slow   # two ResNet-50s
@needs_local_dir
def test_resnet50_to_torchvision_and_timm(tmp_path, capsys):
    ours = moco_resnet_checkpoint('resnet50', tmp_path / 'moco.pth.tar')
    assert convert(tmp_path / 'moco.pth.tar', tmp_path / 'r50.pth') == 0
    out = capsys.readouterr().out
    assert ('torchvision.models.resnet50().load_state_dict(torch.load(PATH, weights_only=True), strict=False) '
            'misses only fc.*') in out

    state = torch.load(tmp_path / 'r50.pth', map_location='cpu', weights_only=True)
    tv = torchvision.models.resnet50()
    msg = tv.load_state_dict(state, strict=False)
    assert sorted(msg.missing_keys) == ['fc.bias', 'fc.weight'] and msg.unexpected_keys == []
    tv.fc = nn.Identity()

    config = json.load(open(tmp_path / 'r50_timm' / 'config.json'))
    assert config['architecture'] == 'resnet50' and config['pretrained_cfg']['std'] == [0.229, 0.224, 0.225]
    theirs = load_folder(tmp_path / 'r50_timm', 10)
    assert theirs.fc.out_features == 10
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        mine = features(ours, x)
        torch.testing.assert_close(tv.eval()(x), mine, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs.forward_head(theirs.forward_features(x), pre_logits=True), mine,
                                   rtol=1e-5, atol=1e-5)


@needs_local_dir
def test_momentum2_teacher_exports_the_teacher(tmp_path, capsys):
    teacher = moco_resnet_checkpoint('resnet18', tmp_path / 'm2t.pth.tar', method='m2t')
    assert convert(tmp_path / 'm2t.pth.tar', tmp_path / 'r18.pth') == 0
    assert 'using its momentum_encoder' in capsys.readouterr().out
    state = torch.load(tmp_path / 'r18.pth', map_location='cpu', weights_only=True)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in state.items())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(load_folder(tmp_path / 'r18_timm', 0)(x), features(teacher, x))


@pytest.mark.parametrize('arch, why', [
    ('vit_conv_small', "timm has no ViT with MoCo v3's convolutional stem"),
    ('resnet18_cifar', 'no ResNet with a 3x3 stride-1 first convolution and no max-pool'),
    ('resnet10_w16', 'no ResNet of these widths with a 3x3 stride-2 stem')])
def test_networks_timm_lacks_get_one_line_and_their_file(arch, why, tmp_path, capsys):
    src = tmp_path / 'moco.pth.tar'
    ours = moco_vit_checkpoint(arch, src) if arch.startswith('vit') else moco_resnet_checkpoint(arch, src)
    capsys.readouterr()
    assert convert(src, tmp_path / 'out.pth', '--timm-dir', tmp_path / 'timm') == 2   # asked for: an error
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and why in err[0] and not (tmp_path / 'out.pth').exists()

    assert convert(src, tmp_path / 'out.pth') == 0                                     # by default: a note
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith('note:')]
    assert len(notes) == 1 and why in notes[0] and 'no timm folder' in notes[0], notes
    assert sorted(os.listdir(tmp_path)) == ['moco.pth.tar', 'out.pth']
    state = torch.load(tmp_path / 'out.pth', map_location='cpu', weights_only=True)
    if arch == 'resnet18_cifar':   # as the line says: torchvision's resnet18 with the CIFAR stem
        tv = torchvision.models.resnet18()
        tv.conv1, tv.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
        msg = tv.load_state_dict(state, strict=False)
        assert sorted(msg.missing_keys) == ['fc.bias', 'fc.weight'] and msg.unexpected_keys == []
        tv.fc = nn.Identity()
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(tv.eval()(x), features(ours, x))
    else:
        assert set(state if arch.startswith('resnet') else state['model']) == \
            {k for k in ours.state_dict() if not k.startswith(('fc.', 'head.'))}


def test_rejects_non_moco_files(tmp_path, capsys):
    deit = tmp_path / 'deit.pth'
    torch.save({'model': {'cls_token': torch.zeros(1, 1, 8)}}, deit)
    assert convert(deit, tmp_path / 'out.pth') == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'no state_dict' in err[0], err
    assert sorted(os.listdir(tmp_path)) == ['deit.pth']


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


def test_a_timm_dir_that_cannot_be_used_is_one_line_and_nothing_is_written(tmp_path, capsys):
    src = tmp_path / 'moco.pth.tar'
    moco_vit_checkpoint('vit_tiny_patch4', src)
    (tmp_path / 'a_file').write_text('x')
    (tmp_path / 'mine').mkdir()
    (tmp_path / 'mine' / 'notes.txt').write_text('x')
    for timm_dir, message in ((tmp_path / 'a_file', 'is a file, not a folder'),
                              (tmp_path / 'mine', 'holds other files than a timm export (notes.txt, ...)'),
                              ('/proc/moco_timm', 'cannot create --timm-dir /proc/moco_timm')):
        capsys.readouterr()
        assert convert(src, tmp_path / 'out' / 'deit.pth', '--timm-dir', timm_dir) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert not (tmp_path / 'out' / 'deit.pth').exists()

    assert convert(src, tmp_path / 'deit.pth', '--no-timm') == 0          # the original's output alone
    assert not (tmp_path / 'deit_timm').exists() and (tmp_path / 'deit.pth').exists()
    for _ in range(2):                                                      # an earlier export is replaced
        assert convert(src, tmp_path / 'deit.pth', '--timm-dir', tmp_path / 'exported') == 0
        assert sorted(os.listdir(tmp_path / 'exported')) == ['config.json', 'model.safetensors']
    assert not [name for name in os.listdir(tmp_path) if name.startswith('.')]   # no temporary left
    assert convert_to_deit.default_timm_dir('a/vit-b.pth.tar') == 'a/vit-b_timm'
