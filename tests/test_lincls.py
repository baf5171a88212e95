"""Linear probe (main_lincls.py): loading pretraining checkpoints, the frozen-backbone protocol,
checkpoints, resume, evaluation and the one-line errors."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import main_lincls
import main_moco
from helpers import ROOT
from moco.amp import Amp
from moco.builder import MoCo_ResNet, MoCo_ViT
from moco.checkpoint import ddp_state_dict, load_backbone, read_backbone, save_checkpoint
from moco.engine_lincls import LinearProbe, sanity_check
from moco.errors import UserError
from moco.models import BackboneFeatures, encoder_factory

CLASSES = ('airplane', 'cat', 'ship')


@pytest.fixture(scope='module')
def probe_data(tiny_folder, tmp_path_factory):
    """3 classes of the demo data: 12 train and 6 val images."""
    root = tmp_path_factory.mktemp('probe') / 'data'
    for split in ('train', 'val'):
        for cls in CLASSES:
            shutil.copytree(os.path.join(tiny_folder, split, cls), root / split / cls)
    return str(root)


def run(script, *argv):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, argv)], cwd=ROOT,
                          env={**os.environ, 'OMP_NUM_THREADS': '1'}, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope='module')
def moco_ckpt(probe_data, tmp_path_factory):
    """A real pretraining checkpoint written by main_moco.py (1 epoch, resnet18_cifar; in this process)."""
    out = tmp_path_factory.mktemp('pretrain')
    argv = [probe_data, '-a', 'resnet18_cifar', '--image-size', 16, '-b', 4, '--epochs', 1, '--warmup-epochs', 0,
            '--moco-dim', 16, '--moco-mlp-dim', 32, '-j', 0, '--output-dir', out]
    main_moco.main(main_moco.get_args_parser().parse_args([str(a) for a in argv]))
    return str(out / 'checkpoint_0000.pth.tar')


def probe_args(data, out, *extra):
    return ['-a', 'resnet18_cifar', '--image-size', 16, '-b', 4, '-j', 0, '-p', 100, '--output-dir', out,
            *extra, data]


@pytest.fixture(scope='module')
def probe_run(probe_data, moco_ckpt, tmp_path_factory):
    """One epoch of linear probing from the command line."""
    out = tmp_path_factory.mktemp('lincls') / 'run'
    r = run('main_lincls.py', *probe_args(probe_data, out, '--epochs', 1, '--seed', 0, '--pretrained', moco_ckpt))
    assert r.returncode == 0, r.stderr
    return out, r.stdout


def call_main(*argv):
    """main_lincls.main in this process (faster than a subprocess); returns the exit code."""
    args = main_lincls.get_args_parser().parse_args([str(a) for a in argv])
    try:
        main_lincls.main(args)
    except SystemExit as e:
        return e.code
    return 0


def load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


@pytest.mark.slow   # pretrains, then runs the script
def test_probe_end_to_end(probe_run, moco_ckpt):
    out, stdout = probe_run
    ckpt = load(out / 'checkpoint.pth.tar')  # plain types only: loads with weights_only=True
    assert set(ckpt) >= {'epoch', 'arch', 'state_dict', 'best_acc1', 'optimizer'}
    assert ckpt['epoch'] == 1 and ckpt['arch'] == 'resnet18_cifar'
    assert all(k.startswith('module.') for k in ckpt['state_dict'])
    assert ckpt['state_dict']['module.fc.weight'].shape == (len(CLASSES), 512)

    # every backbone tensor is the pretrained base encoder's (the momentum encoder is ignored) ...
    pre = load(moco_ckpt)['state_dict']
    backbone = {k: v for k, v in ckpt['state_dict'].items() if not k.startswith('module.fc.')}
    assert len(backbone) == sum(k.startswith('module.base_encoder.') and '.fc.' not in k for k in pre)
    for k, v in backbone.items():
        assert torch.equal(v, pre['module.base_encoder.' + k[len('module.'):]]), k
    # ... and only the classifier is in the optimizer
    assert len(ckpt['optimizer']['param_groups'][0]['params']) == 2

    log = [json.loads(line) for line in open(out / 'log.txt')]
    assert len(log) == 1 and log[0]['val_acc1'] == ckpt['best_acc1']
    assert log[0]['train_lr'] == pytest.approx(0.1 * 4 / 256)  # base lr x batch / 256, cos(0) = 1
    assert os.path.isfile(out / 'model_best.pth.tar') and os.listdir(out / 'tensorboard')
    assert 'sanity check passed' in stdout
    assert f'last top-1 {log[0]["val_acc1"]:.2f}' in stdout and f'best top-1 {ckpt["best_acc1"]:.2f}' in stdout


@pytest.mark.slow   # pretrains, then runs the script
def test_resume_equals_uninterrupted(probe_run, probe_data, moco_ckpt, tmp_path):
    """1 epoch, then --resume to 2 == 2 epochs in one go (the per-epoch cosine has the same lr at epoch 0)."""
    first, _ = probe_run
    resumed, straight = tmp_path / 'resumed', tmp_path / 'straight'
    assert call_main(*probe_args(probe_data, resumed, '--epochs', 2, '--seed', 0, '--pretrained', moco_ckpt,
                                 '--resume', first / 'checkpoint.pth.tar')) == 0
    assert call_main(*probe_args(probe_data, straight, '--epochs', 2, '--seed', 0, '--pretrained', moco_ckpt)) == 0
    a, b = load(resumed / 'checkpoint.pth.tar'), load(straight / 'checkpoint.pth.tar')
    assert a['epoch'] == b['epoch'] == 2 and a['best_acc1'] == b['best_acc1']
    for k in a['state_dict']:
        assert torch.equal(a['state_dict'][k], b['state_dict'][k]), k
    momentum = [s['momentum_buffer'] for s in (a['optimizer']['state'][0], b['optimizer']['state'][0])]
    assert torch.equal(*momentum)
    assert not torch.equal(a['state_dict']['module.fc.weight'],
                           load(first / 'checkpoint.pth.tar')['state_dict']['module.fc.weight'])
    # --resume auto in a finished run's folder has nothing left to do
    assert call_main(*probe_args(probe_data, straight, '--epochs', 2, '--resume', 'auto')) == 0


@pytest.mark.slow   # pretrains, then runs the script
def test_evaluate_only(probe_run, probe_data, tmp_path, capsys):
    out, _ = probe_run
    log = json.loads(open(out / 'log.txt').readline())
    capsys.readouterr()
    argv = probe_args(probe_data, tmp_path / 'eval', '-e', '--resume', out / 'model_best.pth.tar')
    stats = main_lincls.main(main_lincls.get_args_parser().parse_args([str(a) for a in argv]))
    assert stats['acc1'] == log['val_acc1'] and stats['acc5'] == log['val_acc5']
    assert f'* Acc@1 {log["val_acc1"]:.3f} Acc@5 {log["val_acc5"]:.3f}' in capsys.readouterr().out
    assert not os.path.exists(tmp_path / 'eval' / 'checkpoint.pth.tar')


@pytest.mark.slow   # pretrains, then runs the script
def test_wrong_arch_is_one_line_error(probe_data, moco_ckpt, tmp_path, capsys):
    capsys.readouterr()
    assert call_main(*probe_args(probe_data, tmp_path, '--pretrained', moco_ckpt)[2:], '-a', 'resnet50') == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f'error: {moco_ckpt} was pretrained with -a resnet18_cifar, not -a resnet50 (leave -a out to use its own)']


@pytest.mark.slow   # pretrains, then runs the script
def test_bad_pretrained_files_are_one_line_errors(probe_run, probe_data, moco_ckpt, tmp_path, capsys):
    out, _ = probe_run
    text = tmp_path / 'notes.txt'
    text.write_text('not a checkpoint\n')
    deit = tmp_path / 'deit.pth'
    torch.save({'model': {'cls_token': torch.zeros(1, 1, 8)}}, deit)
    truncated = tmp_path / 'truncated.pth.tar'
    truncated.write_bytes(open(moco_ckpt, 'rb').read()[:100_000])
    cases = {text: 'is not a PyTorch checkpoint', deit: 'is not a MoCo pretraining checkpoint: no state_dict',
             out / 'checkpoint.pth.tar': 'holds no module.base_encoder.* weights',
             truncated: 'damaged checkpoint', tmp_path / 'missing.pth': 'checkpoint not found'}
    for path, message in cases.items():
        capsys.readouterr()
        code = call_main(*probe_args(probe_data, tmp_path / 'out', '--pretrained', path))
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0] and str(path) in err[0], (path, err)
    assert not os.path.exists(tmp_path / 'out' / 'checkpoint.pth.tar')


@pytest.mark.parametrize('arch', ['resnet18_cifar', 'vit_tiny_patch4'])
def test_loads_original_format(arch, tmp_path):
    """A checkpoint in the layout of the original release (README, "What is exactly the original"): only
    the base encoder's backbone is loaded (not the momentum encoder, not the projector), features are the
    base encoder's."""
    torch.manual_seed(0)
    small = {'depth': 2} if arch.startswith('vit') else {}  # a 2-block ViT keeps the test fast
    moco = (MoCo_ViT if small else MoCo_ResNet)(encoder_factory(arch, image_size=32, **small), 16, 32)
    with torch.no_grad():  # make every tensor distinctive, and the momentum encoder differ from the base
        for name, t in moco.state_dict().items():
            if t.is_floating_point():
                t.add_(torch.randn_like(t) * (0.5 if 'momentum' in name else 0.05))
    head = 'head' if arch.startswith('vit') else 'fc'
    state = {'epoch': 300, 'arch': arch, 'state_dict': ddp_state_dict(moco),
             'optimizer': {'state': {}, 'param_groups': []}, 'scaler': {}}
    for key in (f'module.base_encoder.{head}.0.weight', f'module.momentum_encoder.{head}.0.weight',
                'module.predictor.0.weight'):
        assert key in state['state_dict']
    path = str(tmp_path / 'pretrained.pth.tar')
    save_checkpoint(state, path)

    model, head_attr = main_lincls.build_model(arch, 32, num_classes=7, **small)
    assert head_attr == head
    encoder_state, recorded_arch, _ = read_backbone(path)
    assert recorded_arch == arch
    loaded = load_backbone(model, encoder_state, head, path)
    expected = {k: v for k, v in moco.base_encoder.state_dict().items() if not k.startswith(head + '.')}
    assert loaded.keys() == expected.keys()
    got = model.state_dict()
    for k, v in expected.items():
        assert torch.equal(got[k], v), k
    classifier = getattr(model, head)
    assert classifier.weight.shape[0] == 7 and torch.all(classifier.bias == 0)
    assert 0.005 < classifier.weight.std().item() < 0.02
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [f'{head}.weight', f'{head}.bias']

    x = torch.randn(2, 3, 32, 32)
    model.eval(), moco.eval()
    with torch.no_grad():
        assert torch.allclose(BackboneFeatures(model, head)(x), BackboneFeatures(moco.base_encoder, head)(x),
                              atol=1e-5)

    # the same file does not fit another architecture: a one-line error, whatever the 'arch' entry says
    other = 'resnet18' if arch == 'resnet18_cifar' else 'vit_small_patch4'
    del state['arch']
    save_checkpoint(state, path)
    wrong, _ = main_lincls.build_model(other, 32, num_classes=7, **small)
    with pytest.raises(UserError, match='does not fit this model'):
        load_backbone(wrong, read_backbone(path).state, head, path)


def test_sanity_check_catches_a_changed_backbone():
    model, head = main_lincls.build_model('resnet18_cifar', 32, num_classes=3)
    pretrained = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.fc.weight.add_(1.)  # the classifier may change
    sanity_check(model, pretrained, head)
    model.layer1[0].bn1.running_mean.add_(1e-3)  # BN statistics updated in train mode: caught
    with pytest.raises(RuntimeError, match='layer1.0.bn1.running_mean changed'):
        sanity_check(model, pretrained, head)
    model.layer1[0].bn1.running_mean.copy_(pretrained['layer1.0.bn1.running_mean'])
    with torch.no_grad():
        model.layer4[1].conv2.weight[0, 0, 0, 0] += 1e-6  # one weight, barely: caught
    with pytest.raises(RuntimeError, match='layer4.1.conv2.weight changed'):
        sanity_check(model, pretrained, head)


def test_probe_precision_and_gradients():
    """The frozen backbone may run under autocast; the classifier and its gradients stay fp32, and
    only the classifier gets gradients. In fp32 the probe computes exactly model(x)."""
    torch.manual_seed(0)
    model, head = main_lincls.build_model('resnet18_cifar', 16, num_classes=5)
    model.eval()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        reference = model(x)
    cpu = torch.device('cpu')
    exact = LinearProbe(model, head, Amp('fp32', cpu))(x)
    assert torch.equal(exact, reference)
    out = LinearProbe(model, head, Amp('bf16', cpu))(x)
    assert out.dtype == torch.float32 and out.requires_grad
    torch.testing.assert_close(out, reference, rtol=0.05, atol=0.02)
    out.sum().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == {'fc.weight', 'fc.bias'} and model.fc.weight.grad.dtype == torch.float32


def _probe_worker(rank, port, result_path, broadcast):
    import torch.distributed as tdist

    from moco.engine_lincls import distributed_probe
    tdist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', world_size=2, rank=rank)
    try:
        torch.manual_seed(rank)   # no --seed: each process draws its own random backbone
        model, head = main_lincls.build_model('resnet18_cifar', 16, 3)
        if broadcast:
            distributed_probe(model, head, Amp('fp32', torch.device('cpu')), torch.device('cpu'))
        flat = torch.cat([t.detach().flatten().float() for t in [*model.parameters(), *model.buffers()]])
        gathered = [torch.empty_like(flat) for _ in range(2)]
        tdist.all_gather(gathered, flat)
        if rank == 0:
            torch.save(gathered, result_path)
    finally:
        tdist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize('broadcast', [True, False])
def test_every_process_probes_the_same_random_backbone(tmp_path, broadcast):
    """Without --pretrained (the random-initialisation baseline) and without --seed, the processes of a
    distributed probe must share rank 0's backbone, as the original's whole-model DDP makes them do;
    the control without the probe's set-up shows the processes would differ."""
    import torch.multiprocessing as mp

    from helpers import unassigned_port
    path = tmp_path / 'flat.pt'
    mp.spawn(_probe_worker, args=(unassigned_port(), str(path), broadcast), nprocs=2)
    rank0, rank1 = torch.load(path, weights_only=True)
    assert torch.equal(rank0, rank1) == broadcast
