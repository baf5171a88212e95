"""A damaged checkpoint is never trained from, and runs killed again and again end as if never stopped
(README "When things go wrong"), through the command line on CPU with a tiny ViT:

- bit flips at seeded offsets of a pretraining checkpoint: each refused, one line, by --resume FILE and
  by main_lincls.py --pretrained;
- --resume auto with a damaged newest checkpoint: passed over, moved aside (never deleted), the run goes
  on from the newest intact one and ends bit-identical to an uninterrupted run;
- the kill loop: a run killed -9 over and over (seeded: at random moments, while a checkpoint is being
  written, between writing it and renaming it into place) and restarted each time with --resume auto
  ends bit-identical to an uninterrupted run, with one process and with two (torchrun, gloo);
- a real full disk (a small tmpfs as --output-dir, where the machine lets the test mount one): one
  line, a non-zero exit, the previous checkpoint intact, and --resume auto finishes once there is room;
- two runs started at once on one --output-dir: the second is refused at once with one line.
"""
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

import main_lincls
import main_moco
from helpers import ROOT, assert_identical, cli_env, kill_group, load, run_in_process, start, wait_output

pytestmark = pytest.mark.slow   # launches the scripts or several processes (make test-fast leaves it out)

TIMEOUT = 300
KILL_EPOCHS = 5
LAST_OF_KILL_RUNS = f'checkpoint_{KILL_EPOCHS - 1:04d}.pth.tar'
TINY = ['-a', 'vit_tiny_patch4', '--image-size', '8', '--moco-dim', '16', '--moco-mlp-dim', '32', '-b', '8',
        '--warmup-epochs', '1', '--moco-m-cos', '-p', '100', '--seed', '5', '-j', '0',
        '--keep-checkpoints', '0']   # every epoch's file, as the original: the tests read older ones


def _argv(data, out, *extra, epochs=3):
    return [str(data), *TINY, '--epochs', str(epochs), '--output-dir', str(out), *extra]


def _command(data, out, *extra, epochs=3):
    return [sys.executable, os.path.join(ROOT, 'main_moco.py'), *_argv(data, out, *extra, epochs=epochs)]


def _same_final_state(a_dir, b_dir, name='checkpoint_0002.pth.tar'):
    a, b = load(a_dir / name), load(b_dir / name)
    assert a['epoch'] == b['epoch']
    assert_identical(a['state_dict'], b['state_dict'], 'state_dict')
    assert_identical(a['optimizer'], b['optimizer'], 'optimizer')


@pytest.fixture(scope='module')
def reference(tiny_folder, tmp_path_factory):
    """The uninterrupted 3-epoch run (checkpoints saved every iteration, as the kill loop's are)."""
    out = tmp_path_factory.mktemp('reference')
    rc, printed = wait_output(start(_command(tiny_folder, out, '--save-every-iters', '1')), TIMEOUT)
    assert rc == 0, printed
    return out


def _flip(path, offset, bit=3):
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(data)


def test_bit_flips_are_refused_by_resume_and_pretrained(reference, tiny_folder, tmp_path, capsys):
    good = (reference / 'checkpoint_0000.pth.tar').read_bytes()
    rng = random.Random(0)
    offsets = [rng.randrange(len(good)) for _ in range(8)] + [10, len(good) - 30]   # + a header, an end record
    damaged = tmp_path / 'damaged.pth.tar'
    for offset in offsets:
        damaged.write_bytes(good)
        _flip(damaged, offset, rng.randrange(8))
        code, errors = run_in_process(main_moco, _argv(tiny_folder, tmp_path / 'resumed', '--resume', damaged), capsys)
        assert code == 2 and len(errors) == 1 and errors[0].startswith(f'error: damaged checkpoint {damaged}'), \
            (offset, errors)
        code, errors = run_in_process(main_lincls, [tiny_folder, '--pretrained', damaged, '-b', '8', '--epochs', '1',
                                                 '-j', '0', '--output-dir', tmp_path / 'probe'], capsys)
        assert code == 2 and len(errors) == 1 and 'damaged checkpoint' in errors[0], (offset, errors)
    assert not (tmp_path / 'resumed').exists() and not (tmp_path / 'probe').exists()   # nothing left behind


def test_resume_auto_passes_over_a_damaged_newest_checkpoint(reference, tiny_folder, tmp_path):
    run = tmp_path / 'run'
    shutil.copytree(reference, run)
    newest = run / 'checkpoint_0002.pth.tar'
    data = newest.read_bytes()
    _flip(newest, len(data) // 2)
    rc, out = wait_output(start(_command(tiny_folder, run, '--save-every-iters', '1', '--resume', 'auto')), TIMEOUT)
    assert rc == 0, out
    assert f'passes over damaged checkpoint {newest}' in out and f'moved to {newest}.corrupt' in out, out
    assert "resumed from" in out and ': 2 epoch(s) done' in out and 'Epoch 3/3' in out
    assert (run / 'checkpoint_0002.pth.tar.corrupt').read_bytes() != data   # kept as it was found
    _same_final_state(reference, run)


# ---------------------------------------------------------------- the kill loop
_KILLABLE = r'''
import os, runpy, signal, sys
import torch
# KILL_AT = "writing:K" or "renaming:K": SIGKILL this process in its K-th checkpoint save, half-way through
# writing the temporary file, or after writing and fsync but before the rename
phase, k = os.environ.get('KILL_AT', 'none:0').split(':')
k, saves = int(k), [0]
real_save, real_replace = torch.save, os.replace


def save(obj, f, *args, **kwargs):
    name = os.path.basename(getattr(f, 'name', ''))
    if '.pth.tar.tmp.' in name:
        saves[0] += 1
        if phase == 'writing' and saves[0] == k:
            import io
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            f.write(buf.getvalue()[:len(buf.getvalue()) // 2])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)


def replace(src, dst, *args, **kwargs):
    if '.pth.tar.tmp.' in os.path.basename(str(src)) and phase == 'renaming' and saves[0] == k:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst, *args, **kwargs)
torch.save, os.replace = save, replace
sys.argv = [sys.argv[1]] + sys.argv[2:]
sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))   # as running the script itself would
runpy.run_path(sys.argv[0], run_name='__main__')
'''


def _kill_tree(proc):
    """SIGKILL the process and all its descendants, as a machine that dies does (torchrun's workers run in
    sessions of their own, so the process group alone would leave them training)."""
    pids, k = [proc.pid], 0
    while k < len(pids):
        for task in os.listdir(f'/proc/{pids[k]}/task') if os.path.isdir(f'/proc/{pids[k]}/task') else []:
            try:
                with open(f'/proc/{pids[k]}/task/{task}/children') as f:
                    pids += [int(c) for c in f.read().split()]
            except OSError:
                pass
        k += 1
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    kill_group(proc)


def _kill_loop(cmd_for, kills, seed):
    """Run ``cmd_for(resume flags)``, killed ``kills`` times by a seeded plan (each kill one of: at a random
    moment of training, while writing the K-th checkpoint of that start, between writing it and
    renaming it), each time started again with --resume auto; then let it finish. Returns the phases of
    the kills, in order."""
    rng = random.Random(seed)
    happened = []
    while True:
        resume = ['--resume', 'auto'] if happened else []
        phase = rng.choice(['time', 'writing', 'renaming']) if len(happened) < kills else None
        plan = f'{phase}:{rng.choice([1, 2])}' if phase in ('writing', 'renaming') else 'none:0'
        proc = subprocess.Popen(cmd_for(resume), cwd=ROOT, env=dict(cli_env(), KILL_AT=plan), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        printed = []
        try:
            if phase == 'time':   # some moment after the first training step of this start
                for line in proc.stdout:
                    printed.append(line)
                    if line.startswith('Epoch '):
                        time.sleep(rng.uniform(0, 0.5))
                        _kill_tree(proc)
                        break
            rest, _ = proc.communicate(timeout=TIMEOUT)
            printed.append(rest)
        finally:
            kill_group(proc)
        printed = ''.join(printed)
        if proc.returncode == 0:
            return happened, printed
        assert phase is not None, printed   # only a planned kill ends a run
        happened.append(phase)


@pytest.fixture(scope='module')
def reference_long(tiny_folder, tmp_path_factory):
    """The uninterrupted run of the kill loops: long enough (25 iterations) for ten kills."""
    out = tmp_path_factory.mktemp('reference_long')
    rc, printed = wait_output(start(_command(tiny_folder, out, '--save-every-iters', '1', epochs=KILL_EPOCHS)), TIMEOUT)
    assert rc == 0, printed
    return out


def test_a_run_killed_again_and_again_ends_identical_one_process(reference_long, tiny_folder, tmp_path):
    out = tmp_path / 'run'
    wrapper = _write_wrapper(tmp_path)

    def cmd(resume):
        return [sys.executable, str(wrapper), os.path.join(ROOT, 'main_moco.py'),
                *_argv(tiny_folder, out, '--save-every-iters', '1', *resume, epochs=KILL_EPOCHS)]
    happened, printed = _kill_loop(cmd, kills=10, seed=1)
    assert len(happened) >= 10 and {'time', 'writing', 'renaming'} <= set(happened), happened
    _same_final_state(reference_long, out, LAST_OF_KILL_RUNS)
    assert not [n for n in os.listdir(out) if n.startswith('.')], os.listdir(out)   # no partial file left


def _write_wrapper(tmp_path):
    wrapper = tmp_path / 'killable_main.py'
    wrapper.write_text(_KILLABLE)
    return wrapper


@pytest.fixture(scope='module')
def reference_two(tiny_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp('reference_two')
    rc, printed = wait_output(start(_torchrun(None, tiny_folder, out, [])), TIMEOUT)
    assert rc == 0, printed
    return out


def _torchrun(wrapper, data, out, resume):
    script = [str(wrapper), os.path.join(ROOT, 'main_moco.py')] if wrapper else [os.path.join(ROOT, 'main_moco.py')]
    return [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--max-restarts', '0',
            '--rdzv-backend', 'c10d', '--rdzv-endpoint', 'localhost:0', *script,
            *_argv(data, out, '--save-every-iters', '1', *resume, epochs=KILL_EPOCHS)]


def test_a_run_killed_again_and_again_ends_identical_two_processes(reference_two, tiny_folder, tmp_path):
    out = tmp_path / 'run'
    wrapper = _write_wrapper(tmp_path)
    happened, printed = _kill_loop(lambda resume: _torchrun(wrapper, tiny_folder, out, resume), kills=10, seed=2)
    assert len(happened) >= 10, happened
    _same_final_state(reference_two, out, LAST_OF_KILL_RUNS)


# ---------------------------------------------------------------- a full disk, two runs at once
def _mount_tmpfs(path, megabytes):
    path.mkdir(parents=True, exist_ok=True)
    rc = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={megabytes}m', 'tmpfs', str(path)],
                        capture_output=True).returncode
    return rc == 0


def test_a_full_disk_mid_run_keeps_the_previous_checkpoint_and_resumes(reference, tiny_folder, tmp_path):
    disk = tmp_path / 'small_disk'
    size = os.path.getsize(reference / 'checkpoint_0000.pth.tar') / 2 ** 20
    if not _mount_tmpfs(disk, int(size * 1.5) + 1):
        pytest.skip('cannot mount a small tmpfs here (needs root and mount permission)')
    try:
        rc, printed = wait_output(start(_command(tiny_folder, disk / 'run', '--keep-checkpoints', '1')), TIMEOUT)
        errors = [line for line in printed.splitlines() if line.startswith('error:')]
        assert rc == 2 and len(errors) == 1 and 'No space left on device' in errors[0], printed
        assert 'Traceback' not in printed, printed
        names = sorted(os.listdir(disk / 'run'))
        assert 'checkpoint_0000.pth.tar' in names and not [n for n in names if n.startswith('.')], names
        assert load(disk / 'run' / 'checkpoint_0000.pth.tar')['epoch'] == 1
        subprocess.run(['mount', '-o', f'remount,size={int(size * 4) + 1}m', str(disk)], check=True)   # room again
        rc, printed = wait_output(start(_command(tiny_folder, disk / 'run', '--keep-checkpoints', '1',
                                                 '--resume', 'auto')), TIMEOUT)
        assert rc == 0 and ': 1 epoch(s) done' in printed, printed
        assert sorted(n for n in os.listdir(disk / 'run') if n.endswith('.pth.tar')) == ['checkpoint_0002.pth.tar']
        _same_final_state(reference, disk / 'run')
    finally:
        subprocess.run(['umount', str(disk)], capture_output=True)


def test_a_second_run_on_the_same_folder_is_refused_at_once(tiny_folder, tmp_path):
    first = start(_command(tiny_folder, tmp_path / 'run', epochs=2))
    try:
        lines = []
        for line in first.stdout:   # the first run holds the folder once it says where it writes
            lines.append(line)
            if line.startswith('run folder:'):
                break
        assert any(line.startswith('run folder:') for line in lines), ''.join(lines)
        os.killpg(first.pid, signal.SIGSTOP)   # paused, so that it is surely still running (and locking)
        t0 = time.time()
        rc, printed = wait_output(start(_command(tiny_folder, tmp_path / 'run', epochs=2)), 120)
        errors = [line for line in printed.splitlines() if line.startswith('error:')]
        assert rc == 2 and len(errors) == 1 and 'another pretraining run is using' in errors[0], printed
        assert time.time() - t0 < 60 and 'Traceback' not in printed
    finally:
        os.killpg(first.pid, signal.SIGCONT)
        rc, rest = wait_output(first, TIMEOUT)
    assert rc == 0, ''.join(lines) + rest
    assert (tmp_path / 'run' / 'checkpoint_0001.pth.tar').is_file()
