"""Fault injection through the command line: kills (also during a save), foreign checkpoints, a corrupt
JPEG, a non-finite loss, dying, out-of-memory or silent processes, busy ports, the run folder. Each test
names the fault it injects; tests/README.md "Faults" has the table, each row naming its tests (the
unit checks of a fault sit in the test file of its module). Everything runs on CPU with tiny models
(ViT-Tiny/4 at 8 px)."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from helpers import (
    ROOT,
    assert_identical,
    cli_env,
    kill_group,
    load,
    run_in_process,
    start,
    unassigned_port,
    wait_output,
)
from moco.checkpoint import LAST_CHECKPOINT, load_checkpoint
from moco.data.folder import image_folder
from moco.data.sampler import EpochSampler
from moco.errors import UserError

pytestmark = pytest.mark.slow   # launches the scripts or several processes (make test-fast leaves it out)

TIMEOUT = 300


def _command(data, output_dir, *extra, epochs=3):
    return [sys.executable, 'main_moco.py', str(data), '-a', 'vit_tiny_patch4', '--image-size', '8',
            '--moco-dim', '16', '--moco-mlp-dim', '32', '-b', '8', '--epochs', str(epochs), '--warmup-epochs', '1',
            '--moco-m-cos', '-p', '100', '--seed', '5', '--output-dir', str(output_dir), *extra]


def _run(args, timeout=TIMEOUT):
    return wait_output(start(args), timeout)


def _wait_for(predicate, proc, what):
    deadline = time.time() + TIMEOUT
    while not predicate():
        assert proc.poll() is None, f'run ended before {what}:\n{proc.communicate()[0]}'
        assert time.time() < deadline, f'no {what} after {TIMEOUT} s'
        time.sleep(0.01)


def _is_progress_line(line):
    """A training progress line (the first step of a run prints one with -p 1)."""
    return re.match(r'Epoch \d+/\d+ \[\d+/\d+\]', line) is not None


def _trained_epoch(out, epoch):
    """Whether the output shows a step of ``epoch`` (counted from 1, as the progress lines count)."""
    return re.search(rf'^Epoch {epoch}/\d+ \[', out, re.MULTILINE) is not None


def _error_lines(out):
    return [line for line in out.splitlines() if line.startswith('error:')]


def _assert_one_line_error(rc, out, *needles, code=2):
    assert rc == code, out
    assert 'Traceback' not in out, out
    errors = _error_lines(out)
    assert len(errors) == 1, out
    for needle in needles:
        assert needle in errors[0], errors[0]


@pytest.fixture(scope='module')
def uninterrupted(tiny_folder, tmp_path_factory):
    """The reference: 3 epochs without any fault (-j 0; the views do not depend on the worker count)."""
    out_dir = tmp_path_factory.mktemp('uninterrupted')
    rc, out = _run(_command(tiny_folder, out_dir, '-j', '0'))
    assert rc == 0, out
    return out_dir


# ---------------------------------------------------------------- kill -9 and resume
def _epochs_done(path, _seen={}):  # noqa: B006 (a cache of the files read, on purpose)
    """The 'epoch' field of a checkpoint, or None when there is none (saves rename whole files into
    place); each version of the file is read once."""
    try:
        stat = os.stat(path)
        key = (str(path), stat.st_ino, stat.st_mtime_ns)
        if key not in _seen:
            _seen[key] = load(path)['epoch']
        return _seen[key]
    except Exception:   # removed meanwhile
        return None


def test_kill_mid_epoch_then_resume_auto_equals_uninterrupted(tiny_folder, tmp_path, uninterrupted):
    """kill -9 in the middle of epoch 2 (after a --save-every-iters checkpoint), then --resume auto:
    the resumed run starts at that iteration and ends bit-identical to the uninterrupted run."""
    cmd = _command(tiny_folder, tmp_path, '-j', '2', '--save-every-iters', '2')
    cut = start(cmd)
    last = tmp_path / LAST_CHECKPOINT
    try:
        # checkpoint_last of epoch 1 may still be there for a moment after checkpoint_0000 is written
        _wait_for(lambda: _epochs_done(last) == 1, cut, 'a mid-epoch checkpoint in epoch 2')
    finally:
        kill_group(cut)
        cut.communicate()
    assert cut.returncode == -signal.SIGKILL
    saved = load(last)
    assert saved['epoch'] == 1 and saved['iter'] in (2, 4) and 'data_seed' in saved

    rc, out = _run(cmd + ['--resume', 'auto'])
    assert rc == 0, out
    assert f"=> resumed from '{last}': 1 epoch(s) done, continuing epoch 2 at step {saved['iter'] + 1}" in out
    assert not _trained_epoch(out, 1)
    a, b = load(uninterrupted / 'checkpoint_0002.pth.tar'), load(tmp_path / 'checkpoint_0002.pth.tar')
    assert_identical(a['state_dict'], b['state_dict'], 'state_dict')
    assert_identical(a['optimizer'], b['optimizer'], 'optimizer')
    # the run folder holds exactly the newest epoch's file (the default keeps it and every 20th) and the logs
    assert sorted(os.listdir(tmp_path)) == ['args.json', 'checkpoint_0002.pth.tar', 'log.txt', 'tensorboard']


_KILL_DURING_SAVE = r'''
import io, os, runpy, signal, sys
import torch
real_save = torch.save


def save(obj, f, *args, **kwargs):
    if '.checkpoint_0001.pth.tar.tmp.' in os.path.basename(getattr(f, 'name', '')):
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        f.write(buf.getvalue()[:len(buf.getvalue()) // 2])  # half of the file is on disk ...
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)                 # ... when the process is killed
    return real_save(obj, f, *args, **kwargs)
torch.save = save
sys.argv = sys.argv[1:]
runpy.run_path('main_moco.py', run_name='__main__')
'''


def test_kill_during_save_keeps_previous_checkpoint_and_resumes(tiny_folder, tmp_path, uninterrupted):
    """kill -9 while checkpoint_0001 is half written: checkpoint_0000 is intact, no checkpoint_0001
    exists, --resume auto restarts from epoch 2, removes the partial file and ends bit-identical."""
    cmd = _command(tiny_folder, tmp_path, '-j', '0')
    rc, out = _run([sys.executable, '-c', _KILL_DURING_SAVE] + cmd[1:])
    assert rc == -signal.SIGKILL, out
    names = sorted(os.listdir(tmp_path))
    partial = [n for n in names if n.startswith('.checkpoint_0001.pth.tar.tmp.')]
    assert 'checkpoint_0000.pth.tar' in names and 'checkpoint_0001.pth.tar' not in names and partial, names
    with pytest.raises(UserError):
        load_checkpoint(str(tmp_path / partial[0]))
    assert load(tmp_path / 'checkpoint_0000.pth.tar')['epoch'] == 1

    rc, out = _run(cmd + ['--resume', 'auto'])
    assert rc == 0, out
    assert "=> resumed from" in out and ': 1 epoch(s) done' in out and not _trained_epoch(out, 1)
    assert not any(n.startswith('.') for n in os.listdir(tmp_path)), 'partial file left behind'
    assert_identical(load(uninterrupted / 'checkpoint_0002.pth.tar')['state_dict'],
                     load(tmp_path / 'checkpoint_0002.pth.tar')['state_dict'])


# ---------------------------------------------------------------- checkpoint files
def _pretrain_argv(data, output_dir, *extra):
    return _command(data, output_dir, '-j', '0', *extra, epochs=1)[2:]


def test_foreign_and_wrong_arch_checkpoints_are_one_line_errors(tiny_folder, tmp_path, capsys):
    """--resume with a torchvision or timm state_dict, with a checkpoint of timm's training script, of
    another -a or another --optimizer; --pretrained (linear probe) with the same foreign files: one line,
    exit 2, nothing written. (In this process: a UserError is what the command line turns into its one
    line and exit code 2, tests/test_cli_pretrain.py.)"""
    import timm
    import torchvision

    import main_lincls
    import main_moco
    timm_sd = timm.create_model('vit_tiny_patch16_224', img_size=32, depth=1, num_classes=10).state_dict()
    foreign = {'torchvision': torchvision.models.resnet18(num_classes=10).state_dict(), 'timm': timm_sd,
               # timm's train.py layout, claiming our architecture
               'timm_train': {'epoch': 3, 'arch': 'vit_tiny_patch4', 'state_dict': timm_sd,
                              'optimizer': {'state': {}, 'param_groups': []}, 'version': 2}}
    messages = {'torchvision': 'not a MoCo pretraining checkpoint', 'timm': 'not a MoCo pretraining checkpoint',
                'timm_train': 'does not match this model'}
    for name, content in foreign.items():
        path = tmp_path / f'{name}.pth'
        torch.save(content, path)
        out = tmp_path / f'resume_{name}'
        code, errors = run_in_process(main_moco, _pretrain_argv(tiny_folder, out, '--resume', path), capsys)
        assert code == 2 and len(errors) == 1 and str(path) in errors[0], (name, errors)
        if name in messages:
            assert messages[name] in errors[0], (name, errors)
        assert not any(f.endswith('.pth.tar') for f in os.listdir(out)) if out.exists() else True
        probe = ['-a', 'resnet18_cifar', '--image-size', 16, '-b', 4, '-j', 0,
                 '--output-dir', tmp_path / f'probe_{name}', '--pretrained', path, tiny_folder]
        code, errors = run_in_process(main_lincls, probe, capsys)
        assert code == 2 and len(errors) == 1 and str(path) in errors[0], (name, errors)
        assert ('no state_dict' if name != 'timm_train' else 'holds no module.base_encoder') in errors[0], errors

    code, errors = run_in_process(main_moco, _pretrain_argv(tiny_folder, tmp_path / 'b'), capsys)
    assert code == 0 and errors == []
    other_arch = _pretrain_argv(tiny_folder, tmp_path / 'c', '--resume', tmp_path / 'b' / 'checkpoint_0000.pth.tar')
    other_arch[other_arch.index('vit_tiny_patch4')] = 'vit_small_patch4'
    code, errors = run_in_process(main_moco, other_arch, capsys)
    assert code == 2 and len(errors) == 1 and 'vit_tiny_patch4' in errors[0] and 'vit_small_patch4' in errors[0], errors
    other_optimizer = _command(tiny_folder, tmp_path / 'b', '-j', '0', '--resume', 'auto', '--optimizer', 'adamw',
                               epochs=2)[2:]
    code, errors = run_in_process(main_moco, other_optimizer, capsys)       # the recorded settings differ
    assert code == 2 and len(errors) == 1 and '--accept-changes' in errors[0], errors
    code, errors = run_in_process(main_moco, other_optimizer + ['--accept-changes'], capsys)  # the state does not fit
    assert code == 2 and len(errors) == 1 and 'optimizer state does not fit --optimizer adamw' in errors[0], errors
    assert sorted(f for f in os.listdir(tmp_path / 'b') if f.endswith('.pth.tar')) == ['checkpoint_0000.pth.tar']


# ---------------------------------------------------------------- bad images
def test_corrupt_jpeg_in_training_folder_does_not_stop_the_run(tiny_folder, tmp_path):
    """Real run: a truncated and a fake JPEG among the training images are skipped, warned about and
    counted in log.txt; with --strict-data the same folder is a one-line error."""
    import shutil
    data = tmp_path / 'data'
    shutil.copytree(tiny_folder, data)
    cls = sorted((data / 'train').iterdir())[0]
    good = sorted(cls.iterdir())[0].read_bytes()
    (cls / 'zz_truncated.jpg').write_bytes(good[:len(good) // 3])
    (cls / 'zz_fake.jpg').write_text('this is text')
    rc, out = _run(_command(data, tmp_path / 'run', '-j', '2', epochs=1))
    assert rc == 0, out
    assert 'zz_truncated.jpg' in out and 'zz_fake.jpg' in out
    with open(tmp_path / 'run' / 'log.txt') as f:
        record = [json.loads(line) for line in f][-1]
    # the count is what the run saw: the bad files among the 40 drawn of 42
    ds = image_folder(str(data), 'train', None)
    expected = sum(ds.load(i)[2] for i, _ in EpochSampler(len(ds), 8, True, True, seed=5))
    assert record['train_skipped_images'] == expected >= 1

    rc, out = _run(_command(data, tmp_path / 'strict', '-j', '2', '--strict-data', epochs=1))
    _assert_one_line_error(rc, out, 'unreadable image', 'zz_')
    assert not (tmp_path / 'strict').exists()   # nothing left behind: no args.json, no tensorboard/


# ---------------------------------------------------------------- data order and views


# ---------------------------------------------------------------- non-finite loss
def test_nonfinite_loss_in_a_real_run_stops_it_and_keeps_the_checkpoint(tiny_folder, tmp_path):
    rc, out = _run(_command(tiny_folder, tmp_path, '-j', '0', '--optimizer', 'adamw', epochs=1))
    assert rc == 0, out
    good = (tmp_path / 'checkpoint_0000.pth.tar').read_bytes()
    # the same run continued with an absurd lr: the weights overflow, every loss is NaN
    rc, out = _run(_command(tiny_folder, tmp_path, '-j', '0', '--resume', 'auto', '--optimizer', 'adamw',
                            '--lr', '1e36', '--warmup-epochs', '0', '--max-nonfinite-steps', '2', '--accept-changes'))
    _assert_one_line_error(rc, out, '2 consecutive steps')
    assert 'step skipped (1 in a row)' in out
    assert sorted(os.listdir(tmp_path)) == ['args.json', 'checkpoint_0000.pth.tar', 'log.txt', 'tensorboard']
    assert (tmp_path / 'checkpoint_0000.pth.tar').read_bytes() == good


# ---------------------------------------------------------------- distributed faults

_OOM_AT_STEP_3 = r'''
import runpy, sys
import torch
import moco.amp
real, calls = moco.amp.Amp.backward, []


def backward(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == 3:   # as a GPU that runs out of memory in the backward of the third step
        raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 20.00 GiB (injected by the test)')
    return real(self, *args, **kwargs)
moco.amp.Amp.backward = backward
sys.argv = sys.argv[1:]
runpy.run_path('main_moco.py', run_name='__main__')
'''


def _two_nodes(data, tmp_path, *extra, rank1_prefix=()):
    """Two 'nodes' started by hand; ``rank1_prefix``: how to start rank 1 instead of ``python``."""
    url = f'tcp://127.0.0.1:{unassigned_port()}'
    procs = []
    for r in (0, 1):
        cmd = _command(data, tmp_path / f'node{r}', '-j', '0', '--epochs', '100', '-p', '1', *extra,
                       '--world-size', '2', '--rank', str(r), '--dist-url', url)
        procs.append(start(list(rank1_prefix) + cmd[1:] if r == 1 and rank1_prefix else cmd))
    return procs


def _wait_training(proc):
    """Read the output until the first training line (the group is formed and training)."""
    lines = []
    deadline = time.time() + TIMEOUT
    for line in proc.stdout:
        lines.append(line)
        if _is_progress_line(line) or time.time() > deadline:
            break
    assert any(map(_is_progress_line, lines)), ''.join(lines)
    return ''.join(lines)


@pytest.mark.parametrize('fault', ['kill', 'oom', 'stop'])
def test_a_dying_or_silent_process_ends_the_whole_job(tiny_folder, tmp_path, fault):
    """Two 'nodes' by hand; rank 1 is killed (kill -9, as the kernel's OOM killer ends a process), runs
    out of GPU memory (a torch.OutOfMemoryError raised in its third step: it exits with that error), or
    is frozen (SIGSTOP): rank 0 exits 1 with one line, within seconds for a dead peer, after
    --dist-timeout (6 s here) for a silent one."""
    prefix = (sys.executable, '-c', _OOM_AT_STEP_3) if fault == 'oom' else ()
    rank0, rank1 = _two_nodes(tiny_folder, tmp_path, '--dist-timeout', '0.1', rank1_prefix=prefix)
    try:
        head = _wait_training(rank0)
        if fault == 'oom':
            rc1, out1 = wait_output(rank1, timeout=TIMEOUT)
            assert rc1 == 1 and 'OutOfMemoryError: CUDA out of memory' in out1, out1
        else:
            os.kill(rank1.pid, signal.SIGKILL if fault == 'kill' else signal.SIGSTOP)
        t0 = time.time()
        rc, out = wait_output(rank0, timeout=120)
        waited = time.time() - t0
    finally:
        kill_group(rank1)
        rank1.communicate()
    _assert_one_line_error(rc, head + out, 'died or became unreachable', code=1)
    assert waited < (30 if fault != 'stop' else 60), waited


def _training_children(pid):
    """Child processes of pid that run main_moco.py (torchrun's workers)."""
    with open(f'/proc/{pid}/task/{pid}/children') as f:
        children = [int(p) for p in f.read().split()]
    found = []
    for child in children:
        try:
            with open(f'/proc/{child}/cmdline', 'rb') as f:
                if b'main_moco.py' in f.read():
                    found.append(child)
        except OSError:
            pass
    return found


def test_torchrun_job_ends_when_a_worker_dies(tiny_folder, tmp_path):
    """torchrun, two workers; one is killed (kill -9). The other stops by itself with one line and exit
    code 1, as with nodes started by hand; torchrun then exits 1 with its own failure report, which names
    the killed worker. (torchrun is asked to look at its workers every 3 s instead of every 0.1 s, so that
    the surviving worker notices its dead peer before torchrun would end it: what is tested is our
    worker's behaviour, not torchrun's.)"""
    port = unassigned_port()
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={port}',
           '--monitor-interval', '3', *_command(tiny_folder, tmp_path, '-j', '0', '--epochs', '100', '-p', '1')[1:]]
    job = start(cmd)
    try:
        head = _wait_training(job)
        workers = _training_children(job.pid)
        assert len(workers) == 2, workers
        os.kill(workers[1], signal.SIGKILL)
        t0 = time.time()
        rc, out = wait_output(job, timeout=120)
        waited = time.time() - t0
    finally:
        kill_group(job)
    out = head + out
    assert rc == 1 and waited < 30, (waited, out)
    errors = _error_lines(out)
    assert len(errors) == 1 and 'died or became unreachable' in errors[0], out       # from the surviving worker
    report = out[out.index('Failures:'):]
    assert re.search(rf'exitcode\s*: 1 \(pid: {workers[0]}\)', report), report      # it exited by itself, with 1
    assert re.search(rf'exitcode\s*: -9 \(pid: {workers[1]}\)', report), report     # the root cause: the kill
    assert not any(os.path.exists(f'/proc/{w}') for w in workers)


def test_address_already_in_use_is_a_one_line_error(tiny_folder, tmp_path):
    with socket.socket() as busy:
        busy.bind(('127.0.0.1', 0))
        busy.listen()
        port = busy.getsockname()[1]
        rc, out = _run(_command(tiny_folder, tmp_path, '-j', '0', '--multiprocessing-distributed',
                                '--dist-url', f'tcp://127.0.0.1:{port}', epochs=1), timeout=120)
    _assert_one_line_error(rc, out, 'already in use')


def test_run_folder_is_only_what_the_user_gave(tiny_folder, tmp_path):
    """Everything a run writes is inside --output-dir, even when it is given with '..' in it."""
    (tmp_path / 'cwd').mkdir()
    out_dir = tmp_path / 'cwd' / '..' / 'runs' / 'r1'
    cmd = _command(os.path.abspath(tiny_folder), out_dir, '-j', '0', epochs=1)
    cmd[1] = os.path.join(ROOT, 'main_moco.py')
    proc = subprocess.run(cmd, cwd=tmp_path / 'cwd', env=cli_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert os.listdir(tmp_path / 'cwd') == []
    assert sorted(os.listdir(tmp_path)) == ['cwd', 'runs']
    assert sorted(os.listdir(tmp_path / 'runs' / 'r1')) == ['args.json', 'checkpoint_0000.pth.tar', 'log.txt',
                                                            'tensorboard']
