"""Resuming is exact on CPU with a fixed --seed: a run of 3 epochs, and the same command killed (SIGKILL)
once it has written checkpoint_0001.pth.tar (epoch 2) and then resumed to epoch 3 in the same
--output-dir, end with IDENTICAL model and optimizer states (torch.equal on every tensor).

``--epochs`` is 3 in both runs (the lr and momentum schedules depend on it). Variants: -j 0 with LARS
and ``--resume auto``; -j 2 (data-loading worker processes) with AdamW and ``--resume PATH``. Both
use ``--moco-m-cos``, so the momentum schedule also has to pick up at the right point. BYOL and
Momentum² Teacher resume exactly too (their schedules and momentum-BN statistics). The monitors'
windows (``--skip-spikes``, gradient spikes) are in the checkpoint and resume identical too.
"""
import concurrent.futures
import json
import os
import shutil
import signal
import sys
import time

import pytest
import torch

from helpers import assert_identical, kill_group, load, start, wait_output

pytestmark = pytest.mark.slow   # launches the scripts or several processes (make test-fast leaves it out)

ARCH, IMG = 'vit_tiny_patch4', 8
TIMEOUT = 300  # seconds a CLI run may take


def _command(data, output_dir, workers, optimizer, *extra):
    return [sys.executable, 'main_moco.py', str(data), '-a', ARCH, '--image-size', str(IMG),
            '--moco-dim', '16', '--moco-mlp-dim', '32', '-b', '8', '--epochs', '3', '--warmup-epochs', '1',
            '--moco-m-cos', '--optimizer', optimizer, '-j', str(workers), '-p', '2', '--seed', '3', '--skip-spikes',
            '--keep-checkpoints', '0', '--output-dir', str(output_dir), *extra]


def _last_train_record(output_dir):
    with open(os.path.join(output_dir, 'log.txt')) as f:
        records = [json.loads(line) for line in f if 'train_loss' in line]
    return records[-1]


VARIANTS = {'j0-lars-auto': (0, 'lars', 'auto'), 'j2-adamw-path': (2, 'adamw', 'path')}


def _uninterrupted(data, output_dir, workers, optimizer):
    rc, out = wait_output(start(_command(data, output_dir, workers, optimizer)))
    assert rc == 0, out
    return out


def _killed_then_resumed(data, output_dir, workers, optimizer, resume):
    """Start the 3-epoch run, SIGKILL it as soon as its epoch-2 checkpoint is on disk (saves are atomic
    renames), then resume it. Returns the resumed run's output."""
    cut = start(_command(data, output_dir, workers, optimizer))
    ckpt1 = output_dir / 'checkpoint_0001.pth.tar'
    try:
        deadline = time.time() + TIMEOUT
        while not ckpt1.exists():
            assert cut.poll() is None, f'run ended before its second checkpoint:\n{cut.communicate()[0]}'
            assert time.time() < deadline
            time.sleep(0.02)
    finally:
        kill_group(cut)
        cut.communicate()
    assert cut.returncode == -signal.SIGKILL
    # should the kill have come after the third epoch was saved, drop that file: the resume must then
    # start from the epoch-2 checkpoint all the same
    late = output_dir / 'checkpoint_0002.pth.tar'
    if late.exists():
        late.unlink()
    extra = ['--resume', 'auto'] if resume == 'auto' else ['--resume', str(ckpt1)]
    rc, out = wait_output(start(_command(data, output_dir, workers, optimizer, *extra)))
    assert rc == 0, out
    return out


@pytest.fixture(scope='module')
def resume_runs(tiny_folder, tmp_path_factory):
    """All runs of both variants, two processes at a time: variant -> (full dir, cut dir, futures)."""
    tmp = tmp_path_factory.mktemp('resume')
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=2)
    runs = {}
    for name, (workers, optimizer, resume) in VARIANTS.items():
        full_dir, cut_dir = tmp / name / 'full', tmp / name / 'cut'
        cut = pool.submit(_killed_then_resumed, tiny_folder, cut_dir, workers, optimizer, resume)
        full = pool.submit(_uninterrupted, tiny_folder, full_dir, workers, optimizer)
        runs[name] = (full_dir, cut_dir, full, cut)
    yield runs
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.parametrize('variant', list(VARIANTS))
def test_killed_and_resumed_run_equals_uninterrupted_run(resume_runs, variant):
    full_dir, cut_dir, full, cut = resume_runs[variant]
    full.result()
    resumed_out = cut.result()
    ckpt1 = cut_dir / 'checkpoint_0001.pth.tar'
    assert f"=> resumed from '{ckpt1}': 2 epoch(s) done" in resumed_out
    assert 'Epoch 3/' in resumed_out and 'Epoch 1/' not in resumed_out and 'Epoch 2/' not in resumed_out

    a, b = load(full_dir / 'checkpoint_0002.pth.tar'), load(cut_dir / 'checkpoint_0002.pth.tar')
    assert a['epoch'] == b['epoch'] == 3
    # non-trivial: the third epoch changed the model and the optimizer state
    before = load(ckpt1)
    for enc in ('base_encoder', 'momentum_encoder'):
        key = f'module.{enc}.blocks.0.attn.qkv.weight'
        assert not torch.equal(before['state_dict'][key], a['state_dict'][key])
    assert len(a['optimizer']['state']) > 0
    assert_identical(a['state_dict'], b['state_dict'], 'state_dict')
    assert_identical(a['optimizer'], b['optimizer'], 'optimizer')
    assert_identical(a['scaler'], b['scaler'], 'scaler')
    # the monitors' windows (--skip-spikes' guard, the spike detector's medians) carried over the resume
    assert len(a['monitors']['guard']['loss']) == 15 and a['monitors']['spikes']['medians']['first_layer']
    assert_identical(a['monitors'], b['monitors'], 'monitors')
    # and the third epoch saw the same batches and augmentations: the same mean loss, bit for bit
    assert _last_train_record(full_dir) == _last_train_record(cut_dir)


def _method_command(data, out_dir, method, epochs=2):
    return [sys.executable, 'main_moco.py', str(data), '--method', method, '-a', 'resnet18_cifar', '--image-size', '8',
            '--moco-dim', '16', '--moco-mlp-dim', '32', '-b', '8', '--epochs', str(epochs), '--warmup-epochs', '1',
            '-j', '0', '-p', '100', '--seed', '2', '--data-pipeline', 'gpu', '--keep-checkpoints', '0',
            '--output-dir', str(out_dir)]


@pytest.mark.parametrize('method', ['byol', 'm2t'])
def test_resume_continues_the_schedules_exactly(tiny_folder, tmp_path, method):
    """A 2-epoch run, and the same run resumed from its epoch-1 checkpoint, end identical: the target
    momentum and (m2t) the momentum-BN alpha come from the global step, and the momentum-BN statistics
    are in the checkpoint. (Read through the GPU data pipeline, run on the CPU: its views resume too.)"""
    rc, out = wait_output(start(_method_command(tiny_folder, tmp_path / 'full', method)))
    assert rc == 0, out
    assert f'{method} model:' in out and '(cosine to 1)' in out and '(gpu data pipeline)' in out
    os.makedirs(tmp_path / 'cut')
    shutil.copy(tmp_path / 'full' / 'checkpoint_0000.pth.tar', tmp_path / 'cut')
    rc, out = wait_output(start(_method_command(tiny_folder, tmp_path / 'cut', method) + ['--resume', 'auto']))
    assert rc == 0, out
    a, b = load(tmp_path / 'full' / 'checkpoint_0001.pth.tar'), load(tmp_path / 'cut' / 'checkpoint_0001.pth.tar')
    assert a['method'] == method
    assert_identical(a['state_dict'], b['state_dict'])
    assert_identical(a['optimizer'], b['optimizer'])
    if method == 'm2t':
        key = 'module.momentum_encoder.bn1.running_mean'
        first_epoch = load(tmp_path / 'full' / 'checkpoint_0000.pth.tar')['state_dict'][key]
        assert not torch.equal(first_epoch, a['state_dict'][key])

    if method == 'byol':  # resuming with another --method is a one-line error (once is enough)
        cmd = _method_command(tiny_folder, tmp_path / 'cut', 'mocov3', epochs=3) + ['--resume', 'auto']
        rc, out = wait_output(start(cmd))
        assert rc == 2 and 'Traceback' not in out and 'was trained with --method byol' in out, out


def test_knn_results_before_a_resume_count(tiny_folder, tmp_path):
    """With --knn-freq 2 over 4 epochs, the run resumed from its epoch-2 checkpoint ends with the
    uninterrupted run's best kNN top-1 and knn_top1 in each checkpoint: the evaluations before the stop
    count, and epoch 3's checkpoint (no evaluation of its own) carries epoch 2's. An evaluation before
    the stop that is better than any after it stays the best."""
    import main_moco
    argv = ['-a', 'resnet18_cifar', '--image-size', '16', '--moco-dim', '8', '--moco-mlp-dim', '16', '-b', '20',
            '--epochs', '4', '--warmup-epochs', '1', '--knn-freq', '2', '--knn-k', '3', '-j', '0', '-p', '100',
            '--seed', '0', '--keep-checkpoints', '0', '--resume', 'auto', str(tiny_folder)]

    def run(output_dir):
        return main_moco.main(main_moco.get_args_parser().parse_args(argv + ['--output-dir', str(output_dir)]))

    def knn(folder):
        return [load(folder / f'checkpoint_{n:04d}.pth.tar').get('knn_top1') for n in range(1, 4)]

    full = run(tmp_path / 'full')
    stopped = load(tmp_path / 'full' / 'checkpoint_0001.pth.tar')
    for name, best_before in (('cut', None), ('better_before', 100.)):
        os.makedirs(tmp_path / name)
        if best_before is not None:   # as if epoch 2 had been evaluated at 100%
            stopped['monitors']['evaluations'][-1][1]['knn_top1'] = stopped['knn_top1'] = best_before
        torch.save(stopped, tmp_path / name / 'checkpoint_0001.pth.tar')
        resumed = run(tmp_path / name)
        if best_before is None:
            assert resumed['best_knn_top1'] == full['best_knn_top1'] is not None
            assert knn(tmp_path / name) == knn(tmp_path / 'full') and None not in knn(tmp_path / name)
        else:
            assert resumed['best_knn_top1'] == best_before and knn(tmp_path / name)[:2] == [best_before] * 2
