"""Preemption and elastic restarts (README "When things go wrong", CONFIG.md "Preemptible clusters"), on
CPU with gloo and a tiny ViT:

- SIGTERM in the middle of an epoch, to one process and to one rank of two: every process finishes
  the same step, a resumable mid-epoch checkpoint is written, the run exits with code 75 within
  seconds, and a resume ends bit-identical to an uninterrupted run;
- torchrun --max-restarts 1 with a worker killed -9 in the second epoch: the group restarts, resumes
  by itself (--resume auto) and ends bit-identical to an uninterrupted run;
- stop signals arriving while a checkpoint is written: the file is complete, the previous ones
  intact, and the run resumes.
"""
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

import main_moco
from helpers import ROOT, assert_identical, cli_env, kill_group, load, unassigned_port
from moco import launch

pytestmark = pytest.mark.slow   # launches the scripts or several processes (make test-fast leaves it out)

SMALL = ['-a', 'vit_tiny_patch4', '--image-size', '8', '--moco-dim', '16', '--moco-mlp-dim', '32', '-b', '8',
         '--epochs', '2', '--warmup-epochs', '1', '-j', '0', '-p', '1', '--seed', '0']
FINAL = 'checkpoint_0001.pth.tar'


def _start(args):
    return subprocess.Popen(args, cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _torchrun(nproc, data, out, *extra, restarts=0):
    # the c10d rendezvous (as --standalone): a restart is a new round, with new addresses (the static one
    # would hand the restarted workers the dead ones' addresses)
    return [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', str(nproc), '--max-restarts',
            str(restarts), '--rdzv-backend', 'c10d', '--rdzv-endpoint', f'127.0.0.1:{unassigned_port()}',
            'main_moco.py', str(data), *SMALL, '--output-dir', str(out), *extra]


def _single(data, out, *extra):
    return [sys.executable, 'main_moco.py', str(data), *SMALL, '--output-dir', str(out), *extra]


def _finish(proc, timeout=300):
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return proc.returncode, out


def _wait_for(proc, text, lines, timeout=280):
    """Collects the output of ``proc`` into ``lines`` until a line holds ``text``; fails after ``timeout``
    seconds even when the process prints nothing (a hung start-up fails the test instead of hanging it).
    The rest of the output stays readable by ``_finish``: the reader thread stops at the matching line."""
    found = threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if text in line:
                found.set()
                return
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    if not found.is_set():
        raise AssertionError(f'no "{text}" within {timeout} s:\n' + ''.join(lines))


def _worker_pids(proc):
    """Children of a torchrun agent running main_moco.py (its workers), by local rank order of start."""
    out = subprocess.run(['pgrep', '-P', str(proc.pid), '-f', 'main_moco.py'], capture_output=True, text=True)
    return sorted(int(p) for p in out.stdout.split())


def _same_final(run_dir, reference_dir):
    a, b = load(os.path.join(run_dir, FINAL)), load(os.path.join(reference_dir, FINAL))
    for key in ('state_dict', 'optimizer', 'epoch', 'data_seed'):
        assert_identical(a[key], b[key], key)


@pytest.fixture(scope='module')
def reference(tiny_folder, tmp_path_factory):
    """Uninterrupted runs: one process, and two processes under torchrun."""
    tmp = tmp_path_factory.mktemp('uninterrupted')
    runs = {'one': _start(_single(tiny_folder, tmp / 'one')), 'two': _start(_torchrun(2, tiny_folder, tmp / 'two'))}
    for proc in runs.values():
        rc, out = _finish(proc)
        assert rc == 0, out
    return {name: tmp / name for name in runs}


def _sigterm_mid_epoch_then_resume(cmd, resume_cmd, signal_target, tmp_path):
    proc = _start(cmd)
    lines = []
    try:
        _wait_for(proc, 'Epoch 2/2 [2/5]', lines)
    except BaseException:       # no process may outlive a failed test
        kill_group(proc)
        raise
    target = signal_target(proc)
    sent = time.time()
    os.kill(target, signal.SIGTERM)
    rc, out = _finish(proc, timeout=60)
    took = time.time() - sent
    out = ''.join(lines) + out
    assert 'stopped: SIGTERM' in out or 'stopped: a stop signal' in out, out
    assert 'Traceback' not in out.split('stopped:')[0], out
    assert os.path.exists(tmp_path / 'run' / 'checkpoint_last.pth.tar')
    saved = load(tmp_path / 'run' / 'checkpoint_last.pth.tar')
    assert saved['epoch'] == 1 and 2 <= saved['iter'] < 5
    rc2, out2 = _finish(_start(resume_cmd))
    assert rc2 == 0, out2
    assert f"continuing epoch 2 at step {saved['iter'] + 1}" in out2
    return rc, took


def test_sigterm_one_process_saves_and_resumes_exactly(tiny_folder, reference, tmp_path):
    cmd = _single(tiny_folder, tmp_path / 'run', '-j', '2')     # loader workers get the signal too
    rc, took = _sigterm_mid_epoch_then_resume(cmd, cmd + ['--resume', 'auto'], lambda proc: proc.pid, tmp_path)
    assert rc == 75 and took < 30
    _same_final(tmp_path / 'run', reference['one'])


def test_sigterm_to_one_rank_of_two_stops_both_at_the_same_step(tiny_folder, reference, tmp_path):
    cmd = _torchrun(2, tiny_folder, tmp_path / 'run')
    rc, took = _sigterm_mid_epoch_then_resume(cmd, _torchrun(2, tiny_folder, tmp_path / 'run', '--resume', 'auto'),
                                              lambda proc: _worker_pids(proc)[-1], tmp_path)
    assert rc != 0 and took < 30      # torchrun reports its workers' code 75 as a failure of its own
    _same_final(tmp_path / 'run', reference['two'])


def test_torchrun_restarts_a_killed_worker_and_resumes_by_itself(tiny_folder, reference, tmp_path):
    proc = _start(_torchrun(2, tiny_folder, tmp_path / 'run', '--resume', 'auto', restarts=1))
    lines = []
    try:
        _wait_for(proc, 'Epoch 2/2 [2/5]', lines)
        os.kill(_worker_pids(proc)[-1], signal.SIGKILL)
    except BaseException:
        kill_group(proc)
        raise
    rc, out = _finish(proc)
    out = ''.join(lines) + out
    assert rc == 0, out
    assert 'no pretraining checkpoint' in out                # the first start, on an empty folder
    assert "resumed from" in out and '1 epoch(s) done' in out  # the restart
    _same_final(tmp_path / 'run', reference['two'])


def test_stop_signals_during_a_checkpoint_write_leave_files_whole(tiny_folder, tmp_path, monkeypatch):
    """Two SIGTERMs while the first epoch's checkpoint is being written: the write completes, the run
    stops there with code 75, and it resumes to the end."""
    import moco.checkpoint as ckpt_module
    real_save, calls = torch.save, []

    def save_with_signals(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        return real_save(obj, f, *args, **kwargs)
    monkeypatch.setattr(ckpt_module.torch, 'save', save_with_signals)
    args = main_moco.get_args_parser().parse_args(_single(tiny_folder, tmp_path / 'run')[2:])
    with pytest.raises(SystemExit) as e:
        main_moco.main(args)
    assert e.value.code == 75
    first = load(tmp_path / 'run' / 'checkpoint_0000.pth.tar')
    assert first['epoch'] == 1 and not os.path.exists(tmp_path / 'run' / FINAL)
    assert [n for n in os.listdir(tmp_path / 'run') if '.tmp.' in n] == []
    monkeypatch.setattr(ckpt_module.torch, 'save', real_save)
    args = main_moco.get_args_parser().parse_args(_single(tiny_folder, tmp_path / 'run', '--resume', 'auto')[2:])
    main_moco.main(args)
    assert load(tmp_path / 'run' / FINAL)['epoch'] == 2
    assert not isinstance(getattr(signal.getsignal(signal.SIGTERM), '__self__', None), launch.StopRequest)


def test_probe_stops_on_a_signal_keeping_its_last_epoch(tiny_folder, reference, tmp_path, monkeypatch, capsys):
    """main_lincls: SIGTERM during the second epoch ends the run after that step (exit 75); the first
    epoch's checkpoint is intact and the probe resumes from it to the end."""
    import main_lincls
    import moco.engine_lincls as engine
    real_accuracy, calls = engine.accuracy, []

    def accuracy_then_signal(*args, **kwargs):   # once per step: 10 training, then 5 evaluation steps
        calls.append(1)
        if len(calls) == 18:                     # epoch 2, step 3
            os.kill(os.getpid(), signal.SIGTERM)
        return real_accuracy(*args, **kwargs)
    monkeypatch.setattr(engine, 'accuracy', accuracy_then_signal)
    argv = ['--pretrained', str(reference['one'] / FINAL), '-b', '4', '--epochs', '2', '-j', '0', '-p', '100',
            '--seed', '0', '--output-dir', str(tmp_path / 'probe'), str(tiny_folder)]
    with pytest.raises(SystemExit) as e:
        main_lincls.main(main_lincls.get_args_parser().parse_args(argv))
    assert e.value.code == 75
    assert 'stopped: SIGTERM at epoch 2, step 3' in capsys.readouterr().err
    assert load(tmp_path / 'probe' / 'checkpoint.pth.tar')['epoch'] == 1
    monkeypatch.setattr(engine, 'accuracy', real_accuracy)
    main_lincls.main(main_lincls.get_args_parser().parse_args(argv + ['--resume', 'auto']))
    assert load(tmp_path / 'probe' / 'checkpoint.pth.tar')['epoch'] == 2
