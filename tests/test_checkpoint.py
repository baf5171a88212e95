"""moco/checkpoint.py: atomic saves, the newest readable checkpoint (damaged ones moved aside), thinning
that never removes the file just written, lines of training (resume and thinning follow the run's own),
damaged files refused, stale temporaries, loads that cannot run code, and which encoder of a pretraining
checkpoint is evaluated."""
import json
import os
import subprocess

import pytest
import torch

from helpers import small_moco
from moco import checkpoint
from moco.checkpoint import (
    LAST_CHECKPOINT,
    Line,
    latest_checkpoint,
    load_backbone,
    load_checkpoint,
    pretraining_resume,
    read_backbone,
    remove_stale_temporaries,
    save_checkpoint,
    save_pretraining,
    single_file_resume,
    thin_checkpoints,
)
from moco.errors import UserError
from moco.momentum_bn import mbn_alpha


def test_failed_save_keeps_previous_file(tmp_path, monkeypatch):
    """Disk full in the middle of a save: one-line UserError, the previous file is byte-identical, no
    temporary file is left."""
    path = tmp_path / 'checkpoint_0000.pth.tar'
    save_checkpoint({'epoch': 1, 'w': torch.ones(3)}, str(path))
    before = path.read_bytes()

    def disk_full(obj, f):
        f.write(b'PK\x03\x04 partial')
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(torch, 'save', disk_full)
    with pytest.raises(UserError, match='No space left on device'):
        save_checkpoint({'epoch': 2, 'w': torch.zeros(3)}, str(path))
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ['checkpoint_0000.pth.tar']


def test_latest_checkpoint_takes_the_furthest_readable_one(tmp_path, capsys):
    def put(name, **fields):
        save_checkpoint({'state_dict': {}, **fields}, str(tmp_path / name))
    put('checkpoint_0000.pth.tar', epoch=1)
    put('checkpoint_0001.pth.tar', epoch=2)
    put(LAST_CHECKPOINT, epoch=2, iter=3)
    path, ckpt = latest_checkpoint(str(tmp_path))
    assert path == str(tmp_path / LAST_CHECKPOINT) and ckpt['iter'] == 3   # mid-epoch 3 beats end of 2
    put(LAST_CHECKPOINT, epoch=1, iter=3)                                        # stale: older than 0001
    assert latest_checkpoint(str(tmp_path))[0] == str(tmp_path / 'checkpoint_0001.pth.tar')
    (tmp_path / LAST_CHECKPOINT).write_bytes(b'garbage')                         # unreadable: skipped
    data = (tmp_path / 'checkpoint_0001.pth.tar').read_bytes()
    (tmp_path / 'checkpoint_0001.pth.tar').write_bytes(data[:len(data) // 2])    # truncated: skipped
    assert latest_checkpoint(str(tmp_path))[0] == str(tmp_path / 'checkpoint_0000.pth.tar')
    out = capsys.readouterr().out
    assert out.count('warning: skipping') == 1 and out.count('warning: --resume auto passes over damaged') == 1
    assert (tmp_path / 'checkpoint_0001.pth.tar.corrupt').read_bytes() == data[:len(data) // 2]   # kept, aside
    torch.save({'some': 'dict'}, tmp_path / 'checkpoint_0002.pth.tar')           # not a pretraining file
    assert latest_checkpoint(str(tmp_path))[0] == str(tmp_path / 'checkpoint_0000.pth.tar')


def test_thinning_keeps_the_newest_numbered_files_and_checkpoint_last(tmp_path):
    for name in ['checkpoint_0000.pth.tar', 'checkpoint_0001.pth.tar', 'checkpoint_0002.pth.tar', LAST_CHECKPOINT,
                 'model_best.pth.tar']:
        (tmp_path / name).write_bytes(b'x')
    thin_checkpoints(str(tmp_path), 2)
    assert sorted(os.listdir(tmp_path)) == ['checkpoint_0001.pth.tar', 'checkpoint_0002.pth.tar',
                                            LAST_CHECKPOINT, 'model_best.pth.tar']
    # a file with a higher number than the run's (copied in from elsewhere) never costs the file just written
    (tmp_path / 'checkpoint_0099.pth.tar').write_bytes(b'x')
    thin_checkpoints(str(tmp_path), 1, protect=str(tmp_path / 'checkpoint_0002.pth.tar'))
    assert sorted(os.listdir(tmp_path)) == ['checkpoint_0002.pth.tar', 'checkpoint_0099.pth.tar', LAST_CHECKPOINT,
                                            'model_best.pth.tar']


def _two_lines(folder):
    """A run of 10 epochs (line A; checkpoint_last: mid-epoch 10), restarted from the end of epoch 5 (line
    B, recorded in args.json) and stopped after epoch 7: B's 0005 and 0006 replaced A's."""
    a = Line.new()
    b = Line.new(a.id, (5, 0))
    for epoch, line in [(e, a) for e in range(1, 11)] + [(6, b), (7, b)]:
        save_checkpoint({'state_dict': {}, 'optimizer': {}, 'epoch': epoch, 'line': line.record()},
                        str(folder / f'checkpoint_{epoch - 1:04d}.pth.tar'))
    save_checkpoint({'state_dict': {}, 'optimizer': {}, 'epoch': 9, 'iter': 1, 'line': a.record()},
                    str(folder / LAST_CHECKPOINT))
    (folder / 'args.json').write_text(json.dumps({'args': {}, 'line': b.record()}))
    return a, b


def test_resume_auto_follows_the_line_of_the_latest_start(tmp_path, capsys):
    a, b = _two_lines(tmp_path)
    path, ckpt, line = pretraining_resume('auto', str(tmp_path))
    assert path == str(tmp_path / 'checkpoint_0006.pth.tar') and ckpt['epoch'] == 7 and line == b
    assert latest_checkpoint(str(tmp_path))[0] == str(tmp_path / 'checkpoint_0009.pth.tar')   # the rule without lines
    # the branch's newest file damaged: moved aside, the one before it taken; then the branch point (A's 0004)
    data = bytearray((tmp_path / 'checkpoint_0006.pth.tar').read_bytes())
    data[len(data) // 2] ^= 1
    (tmp_path / 'checkpoint_0006.pth.tar').write_bytes(data)
    assert pretraining_resume('auto', str(tmp_path))[0] == str(tmp_path / 'checkpoint_0005.pth.tar')
    assert (tmp_path / 'checkpoint_0006.pth.tar.corrupt').exists()
    os.remove(tmp_path / 'checkpoint_0005.pth.tar')
    assert pretraining_resume('auto', str(tmp_path))[0] == str(tmp_path / 'checkpoint_0004.pth.tar')
    # a line that has no readable file while the folder holds another's: refused, naming both
    (tmp_path / 'args.json').write_text(json.dumps({'args': {}, 'line': Line.new().record()}))
    with pytest.raises(UserError, match=r'^--resume auto cannot tell which run of .* the latest start \(args.json\) '
                                        r'began from scratch .*checkpoint_0009.pth.tar is of another line'):
        pretraining_resume('auto', str(tmp_path))


def test_resume_from_a_file_continues_its_line_or_branches(tmp_path, capsys):
    a, b = _two_lines(tmp_path)
    assert pretraining_resume(str(tmp_path / 'checkpoint_0006.pth.tar'), str(tmp_path))[2] == b   # B's newest
    assert pretraining_resume(str(tmp_path / 'checkpoint_0009.pth.tar'), str(tmp_path))[2] == a   # A's newest
    line = pretraining_resume(str(tmp_path / 'checkpoint_0003.pth.tar'), str(tmp_path))[2]    # older than A's 0009
    assert line.id not in (a.id, b.id) and (line.parent, line.branched_at) == (a.id, (4, 0))
    assert 'branches a new line from it' in capsys.readouterr().out
    # a file that records no line (written before lines were): its older files are the new line's history
    save_checkpoint({'state_dict': {}, 'optimizer': {}, 'epoch': 1}, str(tmp_path / 'old' / 'checkpoint_0000.pth.tar'))
    line = pretraining_resume('auto', str(tmp_path / 'old'))[2]
    assert (line.parent, line.branched_at) == (None, (1, 0)) and line.holds(None, (1, 0))


def test_thinning_and_epoch_ends_leave_other_lines_alone(tmp_path, capsys):
    a, b = _two_lines(tmp_path)
    thin_checkpoints(str(tmp_path), 2, line=b)   # B's history: A's 0000 ... 0004, then its own 0005, 0006
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith('checkpoint_')) == [
        'checkpoint_0005.pth.tar', 'checkpoint_0006.pth.tar', 'checkpoint_0007.pth.tar', 'checkpoint_0008.pth.tar',
        'checkpoint_0009.pth.tar', LAST_CHECKPOINT]
    save_pretraining({'state_dict': {}, 'epoch': 8, 'line': b.record()}, str(tmp_path), 8, keep=2)
    assert sorted(os.listdir(tmp_path)) == ['args.json', 'checkpoint_0006.pth.tar', 'checkpoint_0007.pth.tar',
                                            'checkpoint_0008.pth.tar', 'checkpoint_0009.pth.tar', LAST_CHECKPOINT]
    assert load_checkpoint(str(tmp_path / LAST_CHECKPOINT))['line'] == a.record()   # A's mid-epoch file stays
    save_pretraining({'state_dict': {}, 'epoch': 9, 'iter': 1, 'line': b.record()}, str(tmp_path), 8, iters_done=1)
    save_pretraining({'state_dict': {}, 'epoch': 9, 'line': b.record()}, str(tmp_path), 9, keep=2)
    assert not (tmp_path / LAST_CHECKPOINT).exists()   # the line's own mid-epoch file is obsolete at the epoch end


def test_a_damaged_new_checkpoint_does_not_thin_the_older_ones(tmp_path, monkeypatch, capsys):
    from moco import checkpoint
    for epoch in (1, 2):
        checkpoint.save_pretraining({'epoch': epoch, 'w': torch.ones(4)}, str(tmp_path), epoch, keep=1)
    assert sorted(os.listdir(tmp_path)) == ['checkpoint_0001.pth.tar']
    real = checkpoint.save_checkpoint

    def save_then_flip(state, path):   # as a disk that does not keep what it was given
        real(state, path)
        data = bytearray(open(path, 'rb').read())
        data[len(data) // 2] ^= 4
        open(path, 'wb').write(data)
    monkeypatch.setattr(checkpoint, 'save_checkpoint', save_then_flip)
    checkpoint.save_pretraining({'epoch': 3, 'w': torch.ones(4)}, str(tmp_path), 3, keep=1)
    assert sorted(os.listdir(tmp_path)) == ['checkpoint_0001.pth.tar', 'checkpoint_0002.pth.tar']
    assert 'the checkpoint just written is damaged' in capsys.readouterr().out


def test_a_damaged_checkpoint_is_refused_with_one_line(tmp_path):
    path = tmp_path / 'checkpoint_0000.pth.tar'
    save_checkpoint({'epoch': 1, 'state_dict': {'w': torch.arange(1000.)}}, str(path))
    data = bytearray(path.read_bytes())
    data[data.index(torch.arange(1000.)[500:501].numpy().tobytes())] ^= 1
    path.write_bytes(data)
    with pytest.raises(UserError, match=r'^damaged checkpoint .*checkpoint_0000.pth.tar: entry '
                                        r'archive/data/0: its bytes do not match their CRC-32'):
        load_checkpoint(str(path))


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.Popen(['true'])
    dead.wait()
    (tmp_path / f'.checkpoint_0003.pth.tar.tmp.{dead.pid}').write_bytes(b'partial')
    (tmp_path / f'.checkpoint_0004.pth.tar.tmp.{os.getpid()}').write_bytes(b'being written')
    (tmp_path / 'notes.tmp.1').write_bytes(b'not ours')
    remove_stale_temporaries(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == [f'.checkpoint_0004.pth.tar.tmp.{os.getpid()}', 'notes.tmp.1']


class _RunsCode:
    def __reduce__(self):
        return (os.system, ('touch PWNED',))


def test_a_checkpoint_cannot_run_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / 'evil.pth.tar'
    torch.save({'state_dict': {}, 'epoch': 1, 'payload': _RunsCode()}, path)
    with pytest.raises(UserError, match='could run code when loaded: refused'):
        load_checkpoint(str(path))
    assert not (tmp_path / 'PWNED').exists()


def test_linear_probe_reads_the_m2t_teacher_with_its_statistics(tmp_path):
    model = small_moco('m2t').train()
    x = torch.randn(8, 3, 8, 8)
    for step in range(3):
        model(x, x.flip(3), 0.99, mbn_alpha(step / 3))
    state = {'module.' + k: v for k, v in model.state_dict().items()}
    path = tmp_path / 'm2t.pth.tar'
    torch.save({'state_dict': state, 'epoch': 1, 'arch': 'resnet18_cifar', 'method': 'm2t'}, path)
    encoder, arch, _ = read_backbone(str(path))
    assert arch == 'resnet18_cifar'
    teacher_mean = model.momentum_encoder.bn1.running_mean
    assert torch.equal(encoder['bn1.running_mean'], teacher_mean)
    assert not torch.equal(teacher_mean, model.base_encoder.bn1.running_mean)
    from moco.models import CIFAR_ARCHS
    backbone = CIFAR_ARCHS['resnet18_cifar'](num_classes=10)
    load_backbone(backbone, encoder, 'fc', str(path))     # everything but the classifier, MBN stats included
    assert torch.equal(backbone.layer1[0].bn1.running_var, model.momentum_encoder.layer1[0].bn1.running_var)


def test_single_file_resume_takes_the_run_file_and_refuses_another_kind(tmp_path):
    """The probe's and fine-tuning's resume: 'auto' finds output_dir/name or starts from scratch; a file
    without the kind's keys (a pretraining checkpoint given to the probe) is a one-line error."""
    needs = ('state_dict', 'epoch', 'optimizer', 'best_acc1')
    found = single_file_resume('auto', str(tmp_path), 'checkpoint.pth.tar', 'linear-probe', needs, 'hint')
    assert found == (None, None)
    torch.save({'state_dict': {}, 'epoch': 3, 'optimizer': {}, 'best_acc1': 1.0}, tmp_path / 'checkpoint.pth.tar')
    path, ckpt = single_file_resume('auto', str(tmp_path), 'checkpoint.pth.tar', 'linear-probe', needs, 'hint')
    assert path == str(tmp_path / 'checkpoint.pth.tar') and ckpt['epoch'] == 3
    torch.save({'state_dict': {}, 'epoch': 3}, tmp_path / 'pretrained.pth.tar')
    with pytest.raises(UserError, match=r'pretrained.pth.tar is not a linear-probe checkpoint \(it needs state_dict, '
                                        r'epoch, optimizer and best_acc1\); a pretraining checkpoint goes to'):
        single_file_resume(str(tmp_path / 'pretrained.pth.tar'), str(tmp_path), 'checkpoint.pth.tar', 'linear-probe',
                           needs, 'a pretraining checkpoint goes to --pretrained')


def test_thinning_keeps_the_newest_and_every_eth_epoch(tmp_path):
    """The default keeps what resuming needs (the newest) and a periodic one (--keep-every), as MAE and
    DINO do; --keep-checkpoints 0 keeps all, as the original."""
    for epochs_done in range(1, 46):
        checkpoint.save_pretraining({'epoch': epochs_done, 'w': torch.ones(2)}, str(tmp_path), epochs_done, keep=1,
                                    every=20)
    kept = sorted(p.name for p in tmp_path.iterdir())
    assert kept == ['checkpoint_0019.pth.tar', 'checkpoint_0039.pth.tar', 'checkpoint_0044.pth.tar']
    assert checkpoint.kept_checkpoints(45, 1, 20) == [20, 40, 45]
    assert checkpoint.kept_checkpoints(3, 1, 20) == [3] and checkpoint.kept_checkpoints(3, 0, 20) == [1, 2, 3]


def test_the_start_line_says_what_a_checkpoint_weighs_and_what_is_kept():
    model = torch.nn.Linear(256, 256)   # 65,792 parameters: 257 KiB, and as much again of LARS momentum
    line = checkpoint.describe_keeping(model, 'lars', 100, 1, 20)
    assert 'about 1 MiB each' in line and 'the newest 1 and every 20th epoch' in line and '5 file(s)' in line
    assert checkpoint.checkpoint_bytes(model, 'adamw') == 3 * 65_792 * 4


def test_a_file_that_is_not_a_checkpoint_says_so_and_never_advises_unsafe_loading(tmp_path, monkeypatch):
    """Random bytes, and a pickle that would run code: one line each, neither torch's weights_only advice."""
    random_bytes = tmp_path / 'random.pth.tar'
    random_bytes.write_bytes(torch.randint(0, 256, (5000,), generator=torch.Generator().manual_seed(0),
                                           dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(UserError) as refused:
        load_checkpoint(str(random_bytes))
    assert 'is not a PyTorch checkpoint' in str(refused.value) and 'weights_only' not in str(refused.value)
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / 'evil.pth.tar'
    torch.save({'state_dict': {}, 'epoch': 1, 'payload': _RunsCode()}, evil)
    with pytest.raises(UserError) as refused:
        load_checkpoint(str(evil))
    message = str(refused.value)
    assert 'could run code when loaded: refused' in message and 'weights_only' not in message
    assert len(message.splitlines()) == 1 and not (tmp_path / 'PWNED').exists()


def _meta_run_state(arch):
    """A MoCo model of ``arch`` on the meta device, its AdamW, and a checkpoint of the shapes a run of it
    writes: every value of its state_dict and of AdamW's two moments, uninitialised (no time spent on them)."""
    from moco.checkpoint import ddp_state_dict
    from moco.models import build_moco
    from moco.optim import build_optimizer
    with torch.device('meta'):
        model = build_moco(arch, image_size=224, T=0.2, stop_grad_conv1=True)
    optimizer = build_optimizer('adamw', model, 1.5e-4, 0.1)
    state = optimizer.state_dict()
    trainable = [p for group in optimizer.param_groups for p in group['params']]
    state['state'] = {i: {'step': torch.tensor(1.), 'exp_avg': torch.empty(p.shape), 'exp_avg_sq': torch.empty(p.shape)}
                      for i, p in enumerate(trainable)}
    weights = {k: torch.empty(v.shape, dtype=v.dtype) for k, v in ddp_state_dict(model).items()}
    return model, optimizer, {'epoch': 1, 'arch': arch, 'state_dict': weights, 'optimizer': state, 'scaler': {}}


@pytest.mark.slow
@pytest.mark.filterwarnings('ignore:for .* copying from a non-meta parameter')   # the model is on the meta device
def test_a_vit_huge_checkpoint_with_adamw_state_saves_checks_and_resumes(tmp_path):
    """ViT-H's MoCo model (1.31 G values) with AdamW's two moments: a 10.5 GB file, past 4 GiB where torch's
    zip writer adds zip64 fields. It is written atomically, found intact, and its model and optimizer state
    load into the model (on the meta device: its shapes and keys, not its values)."""
    import shutil
    if shutil.disk_usage(tmp_path).free < 12e9 or os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') < 20e9:
        pytest.skip('needs 12 GB of free disk and 20 GB of memory')
    from moco.checkpoint import check_intact, restore
    model, optimizer, state = _meta_run_state('vit_huge')
    path = str(tmp_path / 'checkpoint_0000.pth.tar')
    try:
        save_checkpoint(state, path)
        del state
        assert os.path.getsize(path) > 10e9
        check_intact(path)
        ckpt = load_checkpoint(path)
        restore(ckpt, path, model, optimizer)
        assert len(optimizer.state) == len(ckpt['optimizer']['state']) > 0
    finally:
        os.remove(path) if os.path.exists(path) else None
