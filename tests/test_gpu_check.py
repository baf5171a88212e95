"""tests/gpu_check.py: the budget arithmetic, the GPU command lines (parsed by the programs that will run them,
the CIFAR-10 recipe against CONFIG.md), a part that fails or runs out of time (recorded, stopped, the next part
runs), and the whole dry run on CPU (slow: a few minutes), whose results folder is what the GPU run writes."""
import json
import os
import sys
import time
from types import SimpleNamespace

import gpu_check as gc
import pytest

from helpers import ROOT, start, wait_output


def test_part_limits():
    budget, left = 540, 540 * (1 - gc.TAIL)
    assert gc.part_limit('bench', budget, left - 10) == pytest.approx(10)       # never past the budget
    assert gc.part_limit('bench', budget, budget) == 0
    assert gc.part_limit('cifar', budget, 100) == pytest.approx(left - 100)     # cifar: all that is left
    # the parts before cifar, each using all it may, leave it the rest
    assert gc.part_limit('cifar', budget, sum(gc.SHARE.values()) * budget) >= 0.3 * budget


def _commands(monkeypatch, part, tmp_path, **args):
    """The command lines ``part`` runs on a GPU machine, from a check whose commands are recorded, not run."""
    ran = []
    check = SimpleNamespace(dry=False, out=str(tmp_path), work=str(tmp_path), workers=16, results={'parts': {}},
                            args=SimpleNamespace(peak_tflops=790, cifar_epochs=200, **args),
                            run=lambda name, cmd, *a, **k: ran.append(cmd) or ('ok', ''))
    gc.PARTS[part](check, 100, {})
    return ran


def test_gpu_bench_command_parses(monkeypatch, tmp_path):
    from moco.tools import bench
    (cmd,) = _commands(monkeypatch, 'bench', tmp_path)
    assert cmd[1:3] == ['-m', 'moco.tools.bench'] and '--tiny' not in cmd
    assert cmd[cmd.index('--models') + 1:cmd.index('--configs')] == gc.BENCH_MODELS[0]
    assert cmd[cmd.index('--peak-tflops') + 1] == '790'
    with pytest.raises(SystemExit) as e:      # every flag before --help is parsed (and checked) first
        bench.main(cmd[3:] + ['--help'])
    assert e.value.code == 0


def test_gpu_cifar_command_is_config_md_recipe(monkeypatch, tmp_path):
    import main_moco
    for split in ('train', 'val'):
        (tmp_path / 'data' / 'cifar10' / split).mkdir(parents=True)
    cmd = _commands(monkeypatch, 'cifar', tmp_path, cifar_tar=str(tmp_path / 'data'))[0]
    assert cmd[1] == 'main_moco.py' and cmd[-1] == str(tmp_path / 'data' / 'cifar10')
    args = main_moco.get_args_parser().parse_args(cmd[2:])
    assert (args.arch, args.batch_size, args.epochs, args.knn_freq, args.gpu) == ('resnet18_cifar', 512, 200, 10, 0)
    assert args.fast and args.data_pipeline == 'memory'
    # the flags of CONFIG.md's CIFAR-10 ResNet-18 command, with their values, in the same order
    text = open(os.path.join(ROOT, 'CONFIG.md')).read()
    at = text.index('python main_moco.py -a resnet18_cifar')
    tokens, recipe = iter(text[at:text.index('data/cifar10', at)].replace('\\\n', ' ').split()[2:]), []
    for t in tokens:
        if t in ('--epochs', '--knn-freq', '--output-dir'):   # set by the check
            next(tokens)
        else:
            recipe.append(t)
    assert recipe + ['--data-pipeline', 'memory'] == gc.CIFAR_RECIPE


def test_a_part_that_fails_or_times_out_is_reported_and_the_next_runs(tmp_path, monkeypatch, capsys):
    def slow(check, limit, record):
        status, output = check.run('slow', [sys.executable, '-c', 'import os, time; print(os.getpid(), flush=True); '
                                            'time.sleep(120)'], limit)
        record['pid'] = int(output.split()[0])
        return status

    def broken(check, limit, record):
        raise RuntimeError('broken part')

    def fine(check, limit, record):
        record['result'] = check.run('fine', [sys.executable, '-c', 'print("fine ran")'], limit)[1].strip()
        return 'ok'
    monkeypatch.setattr(gc, 'PARTS', {'slow': slow, 'broken': broken, 'fine': fine})
    monkeypatch.setattr(gc, 'SHARE', {'slow': 0.22, 'broken': 0.22})
    out = tmp_path / 'out'
    tic = time.time()
    rc = gc.main(['--dry-run', '--budget-min', '0.4', '--out', str(out), '--work-dir', str(tmp_path / 'work')])
    assert rc == 1 and time.time() - tic < 5.3 + gc.KILL_GRACE_S + 5
    parts = json.loads((out / 'results.json').read_text())['parts']
    assert parts['slow']['status'] == 'timeout' and parts['slow']['limit_s'] == 5
    with pytest.raises(ProcessLookupError):          # stopped, not left running
        os.kill(parts['slow']['pid'], 0)
    assert parts['broken']['status'] == 'error: RuntimeError: broken part'
    assert parts['fine'] == {**parts['fine'], 'status': 'ok', 'result': 'fine ran'}
    summary = (out / 'summary.md').read_text()
    assert '| slow | timeout |' in summary and '| broken | error' in summary and '| fine | ok |' in summary
    assert capsys.readouterr().out.rstrip().endswith(summary.rstrip().splitlines()[-1])   # printed last
    assert 'fine ran' in (out / 'check.log').read_text()


@pytest.mark.slow
def test_dry_run_writes_the_results_folder(tmp_path):
    out = tmp_path / 'out'
    rc, printed = wait_output(start([sys.executable, 'tests/gpu_check.py', '--dry-run', '--out', str(out),
                                     '--work-dir', str(tmp_path / 'work')]), timeout=1800)
    assert rc == 0, printed
    assert sorted(os.listdir(out)) == sorted(gc.RESULT_FILES)
    results = json.loads((out / 'results.json').read_text())
    assert list(results['parts']) == list(gc.PARTS)
    assert all(p['status'] == 'ok' for p in results['parts'].values()), results['parts']
    summary = (out / 'summary.md').read_text()
    assert all(f'| {name} | ok |' in summary for name in gc.PARTS)
    assert printed.rstrip().endswith(summary.rstrip().splitlines()[-1])
    parts = results['parts']
    assert 'passed' in parts['tests']['tests']
    bench = json.loads((out / 'bench.json').read_text())['rows']
    assert {(r['input'], r['config']) for r in bench} == {(i, c) for i in ('synthetic', 'files')
                                                          for c in ('reference', 'ours')}
    assert [(r['model'], r['mode']) for r in parts['steps']['rows']] == [
        ('vit_tiny_patch4', 'plain'), ('vit_tiny_patch4', 'grad_checkpointing'), ('vit_tiny_patch4', 'micro_batch'),
        ('resnet18_cifar', 'plain'), ('resnet18_cifar', 'grad_checkpointing')]
    assert all(r['seconds_per_step'] > 0 and r['estimate_gib'] > 0 for r in parts['steps']['rows'])
    cifar = parts['cifar']
    assert cifar['epochs_done'] == 2 and [e for e, _ in cifar['knn']] == [0, 1, 2] and cifar['epoch_s'] > 0
    assert [json.loads(line)['epoch'] for line in (out / 'cifar_log.txt').read_text().splitlines()] == [0, 1, 2]
    assert (out / 'curves.png').read_bytes()[:4] == b'\x89PNG'
