"""End-to-end command-line tests of ``main_moco.py`` on the tiny CIFAR-10 folder, in every launch mode
of README "Pretraining" on CPU, and its one-line error paths (exit code 2).

Launch modes: (a) one plain process, (b) ``--multiprocessing-distributed --world-size 1 --rank 0``
(one spawned CPU process, gloo), (c) torchrun with 2 processes, (d) two "nodes" started by hand
(``--world-size 2 --rank 0/1 --dist-url tcp://127.0.0.1:PORT``). Each must exit 0 and leave
checkpoint_0000/0001.pth.tar in the original's format and one log.txt JSON line per epoch.

All commands are started at once by a module-scoped fixture and run two at a time (each process uses
one thread: OMP_NUM_THREADS=1), so the whole file takes about as long as its slowest commands; each
test then waits for the command(s) it checks. CUDA_VISIBLE_DEVICES is emptied so that every mode runs
on CPU with gloo whatever the machine.

Model: vit_tiny_patch4 at 8 px (2x2 patches of 4 px) with --moco-dim 16 --moco-mlp-dim 32, -b 8, 2 epochs of
5 iterations (40 training images), which keeps a run to seconds on 2 shared cores.
"""
import concurrent.futures
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from helpers import ROOT, cli_env, unassigned_port

pytestmark = pytest.mark.slow   # launches the scripts or several processes (make test-fast leaves it out)

ARCH, IMG = 'vit_tiny_patch4', 8
SMALL = ['-a', ARCH, '--image-size', str(IMG), '--moco-dim', '16', '--moco-mlp-dim', '32',
         '--epochs', '2', '--warmup-epochs', '1', '-j', '0', '-p', '2', '--seed', '0', '--keep-checkpoints', '0']
ORIGINAL_KEYS = {'epoch', 'arch', 'state_dict', 'optimizer', 'scaler'}
PREFIXES = ('module.base_encoder.', 'module.momentum_encoder.', 'module.predictor.')
TIMEOUT = 300


class Run:
    def __init__(self, proc, out, err, output_dir):
        self.rc, self.out, self.err, self.output_dir = proc.returncode, out, err, output_dir

    def __repr__(self):
        return f'<rc {self.rc}\n--- stdout\n{self.out[-3000:]}\n--- stderr\n{self.err[-3000:]}>'


def _popen(args):
    return subprocess.Popen(args, cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _finish(procs, output_dir):
    """Wait for all processes (killing them all if one hangs); return one Run per process."""
    runs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=TIMEOUT)
            runs.append(Run(p, out, err, output_dir))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return runs


def main_moco(data, output_dir, *extra):
    return [sys.executable, 'main_moco.py', str(data), *SMALL, '--output-dir', str(output_dir), *extra]


def torchrun(nproc, port, data, output_dir, *extra):
    return [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', str(nproc),
            '--master_addr', '127.0.0.1', '--master_port', str(port),
            'main_moco.py', str(data), *SMALL, '--output-dir', str(output_dir), *extra]


@pytest.fixture(scope='module')
def tiny_state_keys():
    """The original's checkpoint keys: the model's state_dict under DDP's ``module.``."""
    from moco.models import build_moco
    return {'module.' + k for k in build_moco(ARCH, 16, 32, image_size=IMG).state_dict()}


@pytest.fixture(scope='module')
def runs(tiny_folder, tmp_path_factory):
    """Start every command of this file (two at a time); name -> Future of a list of Runs."""
    tmp = tmp_path_factory.mktemp('cli')

    def single(name, args_fn):
        out = tmp / name
        return lambda: _finish([_popen(args_fn(out))], out)

    def two_nodes(name, data0, data1):
        out, port = tmp / name, unassigned_port()  # chosen here, in the main thread
        common = ['-b', '8', '--world-size', '2', '--dist-url', f'tcp://127.0.0.1:{port}']
        return lambda: _finish([_popen(main_moco(data0, out, *common, '--rank', '0')),
                                _popen(main_moco(data1, out, *common, '--rank', '1'))], out)

    def existing_run():
        out = tmp / 'existing'
        out.mkdir()
        (out / 'checkpoint_0000.pth.tar').write_bytes(b'an older run')
        return _finish([_popen(main_moco(tiny_folder, out, '-b', '8'))], out)

    def truncated_resume():
        out = tmp / 'truncated'
        out.mkdir()
        good = tmp / 'good.pth.tar'
        torch.save({'epoch': 1, 'arch': ARCH, 'state_dict': {'module.base_encoder.x': torch.randn(100000)},
                    'optimizer': {}, 'scaler': {}}, good)
        bad = tmp / 'truncated.pth.tar'
        bad.write_bytes(good.read_bytes()[:good.stat().st_size // 2])
        return _finish([_popen(main_moco(tiny_folder, out, '-b', '8', '--resume', str(bad)))], out)

    ports = {name: unassigned_port() for name in ('torchrun', 'mp', 'torchrun_b7')}
    jobs = {  # longest first
        'torchrun': single('torchrun', lambda o: torchrun(2, ports['torchrun'], tiny_folder, o, '-b', '8',
                                                          '--knn-freq', '1')),
        'two_nodes': two_nodes('two_nodes', tiny_folder, tiny_folder),
        'mp': single('mp', lambda o: main_moco(tiny_folder, o, '-b', '8', '--multiprocessing-distributed',
                                               '--world-size', '1', '--rank', '0',
                                               '--dist-url', f'tcp://127.0.0.1:{ports["mp"]}')),
        'plain': single('plain', lambda o: main_moco(tiny_folder, o, '-b', '8', '--knn-freq', '1')),
        'torchrun_b7': single('torchrun_b7', lambda o: torchrun(2, ports['torchrun_b7'], tiny_folder, o, '-b', '7')),
        'rank1_missing_data': two_nodes('rank1_missing_data', tiny_folder, tmp / 'no_such_folder'),
        'missing_data': single('missing_data', lambda o: main_moco(tmp / 'no_such_folder', o, '-b', '8')),
        'existing': existing_run,
        'resume_missing': single('resume_missing', lambda o: main_moco(tiny_folder, o, '-b', '8', '--resume',
                                                                       str(tmp / 'nothing.pth.tar'))),
        'resume_truncated': truncated_resume,
        'gpu': single('gpu', lambda o: main_moco(tiny_folder, o, '-b', '8', '--gpu', '0')),
    }
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=2)
    futures = {name: pool.submit(job) for name, job in jobs.items()}
    yield {name: f for name, f in futures.items()}
    pool.shutdown(wait=True, cancel_futures=True)


def _checkpoints(output_dir):
    return sorted(f for f in os.listdir(output_dir) if 'checkpoint' in f)


def _plain(value):
    if isinstance(value, dict):
        return all(isinstance(k, (int, str)) and _plain(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (int, float, str, bool))


def _check_run_folder(run, state_keys, knn=False):
    """Checkpoints in the original's format after each epoch and one log.txt JSON line per epoch."""
    out = run.output_dir
    assert _checkpoints(out) == ['checkpoint_0000.pth.tar', 'checkpoint_0001.pth.tar']  # no temporary files
    states = []
    for epoch, name in ((1, 'checkpoint_0000.pth.tar'), (2, 'checkpoint_0001.pth.tar')):
        ckpt = torch.load(os.path.join(out, name), map_location='cpu', weights_only=True)
        assert ORIGINAL_KEYS <= set(ckpt)
        for extra in set(ckpt) - ORIGINAL_KEYS - {'args', 'monitors', 'line'}:
            assert isinstance(ckpt[extra], (int, float, str, bool)), extra
        assert _plain(ckpt['monitors'])   # the monitors' windows: plain values only, no tensors or objects
        # the line of training (README "Runs you can follow"): one for the whole run, begun from scratch
        assert _plain(ckpt['line']) and ckpt['line']['parent'] is None and ckpt['line']['branched_at'] is None
        with open(os.path.join(out, 'args.json')) as f:
            assert json.load(f)['line'] == ckpt['line']
        assert all(v is None or isinstance(v, (int, float, str, bool)) for v in ckpt['args'].values())
        assert ckpt['args']['arch'] == ARCH and ckpt['args']['batch_size'] == 8   # the total batch, as given
        assert ckpt['epoch'] == epoch and ckpt['arch'] == ARCH
        assert set(ckpt['state_dict']) == state_keys
        assert all(k.startswith(PREFIXES) for k in ckpt['state_dict'])
        assert all(torch.is_tensor(v) for v in ckpt['state_dict'].values())
        assert {'state', 'param_groups'} <= set(ckpt['optimizer']) and len(ckpt['optimizer']['state']) > 0
        assert isinstance(ckpt['scaler'], dict)
        if knn:
            assert 0. <= ckpt['knn_top1'] <= 100.
        states.append(ckpt['state_dict'])
    # training happened: the base encoder moved between the two epochs
    assert not torch.equal(states[0]['module.base_encoder.blocks.0.attn.qkv.weight'],
                           states[1]['module.base_encoder.blocks.0.attn.qkv.weight'])

    with open(os.path.join(out, 'log.txt')) as f:
        records = [json.loads(line) for line in f.read().splitlines()]
    train = [r for r in records if 'train_loss' in r]
    assert [r['epoch'] for r in train] == [1, 2]
    assert all(math.isfinite(r['train_loss']) and r['train_loss'] > 0 for r in train)
    others = [r for r in records if 'train_loss' not in r]
    # the only other line is the feature monitors at initialisation (epoch 0), only with --knn-freq
    assert [sorted(r) for r in others] == ([['epoch', 'feature_std', 'knn_top1', 'rankme']] if knn else [])
    return states[1]


def _one_error_line(run):
    lines = run.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), run
    assert 'Traceback' not in run.err
    return lines[0]


# ----------------------------------------------------------------------------------------------------
# launch modes
def test_plain_cpu_process(runs, tiny_state_keys):
    [run] = runs['plain'].result()
    assert run.rc == 0, run
    assert '1 process(es) on cpu | total batch 8 (8 per process)' in run.out
    assert 'gloo' not in run.out  # no process group in this mode
    _check_run_folder(run, tiny_state_keys, knn=True)


def test_plain_cpu_process_reports_knn(runs):
    [run] = runs['plain'].result()
    assert run.rc == 0, run
    init = re.findall(r'kNN top-1 at initialisation: (\d+\.\d+)', run.out)
    after = re.findall(r'kNN top-1 after epoch (\d+): (\d+\.\d+)', run.out)
    assert len(init) == 1 and [e for e, _ in after] == ['1', '2'], run
    assert all(0. <= float(v) <= 100. for v in init + [v for _, v in after])
    with open(os.path.join(run.output_dir, 'log.txt')) as f:
        logged = [json.loads(line).get('knn_top1') for line in f]
    assert logged == pytest.approx([float(init[0])] + [float(v) for _, v in after], abs=0.01)


def test_multiprocessing_distributed_one_cpu_process(runs, tiny_state_keys):
    [run] = runs['mp'].result()
    assert run.rc == 0, run
    assert '[rank 0] no CUDA device: using the gloo backend instead of nccl' in run.out
    assert '1 process(es) on cpu | total batch 8 (8 per process)' in run.out
    _check_run_folder(run, tiny_state_keys)


def test_multiprocessing_distributed_trains_like_the_plain_process(runs):
    """One spawned process under DDP with all-reduce BN is the plain process's mathematics: the same
    seed gives the same model after 2 epochs (up to float error: the spawned process uses 2 threads)."""
    [plain], [mp_run] = runs['plain'].result(), runs['mp'].result()
    assert plain.rc == 0 and mp_run.rc == 0
    a = torch.load(os.path.join(plain.output_dir, 'checkpoint_0001.pth.tar'), weights_only=True)['state_dict']
    b = torch.load(os.path.join(mp_run.output_dir, 'checkpoint_0001.pth.tar'), weights_only=True)['state_dict']
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)


def test_torchrun_two_processes(runs, tiny_state_keys):
    [run] = runs['torchrun'].result()
    assert run.rc == 0, run
    assert '2 process(es) on cpu | total batch 8 (4 per process)' in run.out
    assert 'using the gloo backend' in run.out
    assert '40 training images, 5 iterations per epoch' in run.out
    _check_run_folder(run, tiny_state_keys, knn=True)
    # the distributed kNN monitor (features gathered from both processes) ran before and after training
    assert re.search(r'kNN top-1 at initialisation: \d+\.\d+', run.out)
    assert re.search(r'kNN top-1 after epoch 2: \d+\.\d+', run.out)


def test_torchrun_knn_at_initialisation_equals_single_process(runs):
    """Same seed, same initial model: the kNN accuracy computed by 2 processes (each extracting half
    of the features, then gathering) equals the single process's."""
    [plain], [tr] = runs['plain'].result(), runs['torchrun'].result()
    assert plain.rc == 0 and tr.rc == 0
    pattern = r'kNN top-1 at initialisation: (\d+\.\d+)'
    assert re.search(pattern, tr.out).group(1) == re.search(pattern, plain.out).group(1)


def test_two_nodes_by_hand(runs, tiny_state_keys):
    rank0, rank1 = runs['two_nodes'].result()
    assert rank0.rc == 0, rank0
    assert rank1.rc == 0, rank1
    assert '2 process(es) on cpu | total batch 8 (4 per process)' in rank0.out
    assert '[rank 0] no CUDA device: using the gloo backend' in rank0.out
    assert '[rank 1] no CUDA device: using the gloo backend' in rank1.out
    assert 'Epoch:' not in rank1.out  # only rank 0 prints progress ...
    _check_run_folder(rank0, tiny_state_keys)  # ... and writes the (shared) run folder


def test_two_nodes_by_hand_equals_torchrun(runs):
    """Both launchers make the same 2-process run (ranks, shards, seeds, one thread each): same model.
    The kNN monitor of the torchrun run does not touch the training randomness."""
    [tr], (rank0, _) = runs['torchrun'].result(), runs['two_nodes'].result()
    assert tr.rc == 0 and rank0.rc == 0
    a = torch.load(os.path.join(tr.output_dir, 'checkpoint_0001.pth.tar'), weights_only=True)
    b = torch.load(os.path.join(rank0.output_dir, 'checkpoint_0001.pth.tar'), weights_only=True)
    for k in a['state_dict']:
        torch.testing.assert_close(b['state_dict'][k], a['state_dict'][k], rtol=1e-5, atol=1e-6, msg=k)


# ----------------------------------------------------------------------------------------------------
# error paths: exit code 2 and one line on stderr that starts with 'error:'; nothing written
def test_missing_data_folder(runs):
    [run] = runs['missing_data'].result()
    assert run.rc == 2, run
    assert 'data folder not found' in _one_error_line(run)
    assert not os.path.exists(run.output_dir) or _checkpoints(run.output_dir) == []


def test_batch_not_divisible_by_processes_under_torchrun(runs):
    [run] = runs['torchrun_b7'].result()
    assert run.rc != 0, run
    assert 'error: -b 7 is not divisible by the 2 processes' in run.err, run
    assert re.search(r'exitcode\s*: 2', run.err), run  # the workers' own exit code, as torchrun reports it
    assert 'main_moco.py", line' not in run.err       # no traceback from the script itself
    assert not os.path.exists(run.output_dir) or _checkpoints(run.output_dir) == []


def test_output_dir_with_checkpoints_needs_resume(runs):
    [run] = runs['existing'].result()
    assert run.rc == 2, run
    assert '--resume auto' in _one_error_line(run)
    assert _checkpoints(run.output_dir) == ['checkpoint_0000.pth.tar']
    with open(os.path.join(run.output_dir, 'checkpoint_0000.pth.tar'), 'rb') as f:
        assert f.read() == b'an older run'  # untouched


def test_resume_missing_file(runs):
    [run] = runs['resume_missing'].result()
    assert run.rc == 2, run
    assert 'checkpoint not found' in _one_error_line(run)


def test_resume_truncated_file(runs):
    [run] = runs['resume_truncated'].result()
    assert run.rc == 2, run
    assert 'damaged checkpoint' in _one_error_line(run) and 'cut short' in _one_error_line(run)
    assert _checkpoints(run.output_dir) == []


def test_gpu_flag_without_gpu(runs):
    [run] = runs['gpu'].result()
    assert run.rc == 2, run
    assert 'GPU' in _one_error_line(run)


def test_error_on_rank_1_is_reported(runs):
    """Two nodes by hand; only node 1 lacks the data folder. Node 1 must say why it stops."""
    rank0, rank1 = runs['rank1_missing_data'].result()
    assert rank0.rc != 0, rank0  # its peer is gone
    assert rank1.rc == 2, rank1
    assert 'error: data folder not found' in rank1.err, rank1
