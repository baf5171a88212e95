"""python -m moco.tools.gpu_check: the budget and epoch arithmetic as pure functions, the GPU command lines
(parsed by the scripts that will run them, and the CIFAR recipe against CONFIG.md), a part that times out
(recorded, stopped, the next part runs), and the whole dry run on CPU (slow: a few minutes), whose
outputs are what the GPU run writes."""
import json
import os
import shutil
import subprocess
import sys
import tarfile

import pytest

from helpers import ROOT, start, wait_output
from moco.tools import gpu_check as gc

BUDGET = 9 * 60
CAL = {'startup_s': 20.0, 'first_epoch_extra_s': 5.0, 'epoch_s': 3.0, 'knn_s': 2.0, 'exit_s': 1.0}


# ---------------------------------------------------------------- the arithmetic

def test_each_part_gets_its_share_and_cifar_keeps_its_reserve():
    parts = list(gc.PARTS)
    assert gc.part_timeout('tests', BUDGET, 0, parts) == pytest.approx(0.18 * BUDGET)
    # every part before cifar using all it may: cifar still has 28% of the budget, then only the tail is left
    elapsed = 0.0
    for part, share in (('tests', .18), ('bench', .22), ('monitors', .04), ('pipeline', .07), ('profile', .06),
                        ('bench_compiled', .12)):
        t = gc.part_timeout(part, BUDGET, elapsed, parts)
        assert t == pytest.approx(share * BUDGET)
        elapsed += t
    cifar = gc.part_timeout('cifar', BUDGET, elapsed, parts)
    assert cifar == pytest.approx(0.28 * BUDGET) and cifar >= gc.RESERVE['cifar'] * BUDGET
    assert elapsed + cifar == pytest.approx(BUDGET * (1 - gc.TAIL))
    assert gc.part_timeout('cifar_ref', BUDGET, elapsed + cifar, parts) == 0
    # what earlier parts leave goes to the later ones; cifar takes all but the tail
    assert gc.part_timeout('cifar', BUDGET, 100, parts) == pytest.approx(BUDGET * 0.97 - 100)
    assert gc.part_timeout('cifar_ref', BUDGET, BUDGET * 0.97 - 30, parts) == pytest.approx(30)
    # a late start shrinks a part so that cifar's reserve stays; never below 0
    assert gc.part_timeout('bench_compiled', BUDGET, 340, parts) == pytest.approx(BUDGET * (0.97 - 0.25) - 340)
    assert gc.part_timeout('bench', BUDGET, 500, parts) == 0
    # no cifar in the parts: no reserve; an override replaces the share
    assert gc.part_timeout('bench_compiled', BUDGET, 300, ['bench_compiled']) == pytest.approx(0.12 * BUDGET)
    assert gc.part_timeout('tests', BUDGET, 0, parts, override=5) == 5


def test_knn_evaluations_as_main_moco_makes_them():
    """Every knn_freq epochs and after the last epoch (main_moco.py); the one before training is start-up."""
    assert gc.knn_evaluations(200, 20) == 10
    assert gc.knn_evaluations(50, 20) == 3          # 20, 40, 50
    assert gc.knn_evaluations(1, 20) == 1
    assert gc.knn_evaluations(0, 20) == 0 and gc.knn_evaluations(7, 0) == 0


def test_run_seconds_and_fitting_epochs():
    assert gc.run_seconds(200, CAL, 20) == 20 + 5 + 200 * 3 + 10 * 2 + 1
    assert gc.fit_epochs(gc.run_seconds(200, CAL, 20) / 0.95 + 1e-6, CAL, 20, 200) == 200
    assert gc.fit_epochs(10_000, CAL, 20, 200) == 200            # never more than asked
    # 350 s, 95% of it usable (332.5 s): 98 epochs take 26 + 294 + 5 x 2 = 330 s, 99 take 333 s
    assert gc.run_seconds(98, CAL, 20) == 330 and gc.run_seconds(99, CAL, 20) == 333
    assert gc.fit_epochs(350, CAL, 20, 200) == 98
    assert gc.fit_epochs(20, CAL, 20, 200) == 0                  # not even the start-up fits


def test_calibration_from_when_the_log_lines_appear():
    # launched at 100; kNN before training written at 120; epochs end at 128 (first: 5 s of warm-up),
    # 131, 134, and 139 (with the final kNN: 2 s); the process exits at 140
    cal = gc.calibrate(100.0, [120.0, 128.0, 131.0, 134.0, 139.0], 140.0)
    assert cal == pytest.approx({'startup_s': 20, 'epoch_s': 3, 'first_epoch_extra_s': 5, 'knn_s': 2, 'exit_s': 1})
    assert gc.calibrate(0.0, [10.0, 12.0, 14.0, 16.0], 16.0)['epoch_s'] == 2        # 3 epochs: the middle one
    with pytest.raises(ValueError):
        gc.calibrate(0.0, [10.0, 12.0, 14.0], 15.0)


def test_missed_targets():
    def row(model, batch, inp, rate, peak=None, config='ours'):
        return {'model': model, 'batch': batch, 'input': inp, 'config': config, 'images_per_s': rate, 'peak_gib': peak}
    rows = [row('vit_small', 256, 'synthetic', 3500, 18.0), row('vit_small', 256, 'synthetic', 900, config='reference'),
            row('resnet50', 256, 'synthetic', 2300, 20.0), row('resnet50', 256, 'files', 2000),
            row('vit_base', 128, 'synthetic', 1500), row('vit_base', 128, 'files', 1400)]
    missed = gc.missed_targets(rows)
    assert set(missed) == {'vit_small:256', 'resnet50:256'}
    assert 'GiB' in missed['vit_small:256'][0] and 'files' in missed['resnet50:256'][0]
    assert gc.missed_targets([row('vit_small', 256, 'synthetic', 3000)]) == {'vit_small:256': ['3000 < 3300 img/s']}
    tiny = [row('resnet18_cifar', 4, 'synthetic', 5)]
    assert gc.missed_targets(tiny) == {} and list(gc.missed_targets(tiny, dry_run=True)) == ['resnet18_cifar:4']


def test_with_flags_replaces_or_appends():
    assert gc.with_flags(['-a', 'x', '--fast'], {'-a': 'y', '-b': '4'}) == ['-a', 'y', '--fast', '-b', '4']


def _tarball(tmp_path, top='cifar10'):
    src = tmp_path / 'src'
    for split in ('train', 'val'):
        (src / split / 'cat').mkdir(parents=True)
        (src / split / 'cat' / '0.jpg').write_bytes(b'x')
    path = tmp_path / 'c.tar.xz'
    with tarfile.open(path, 'w:xz') as tar:
        tar.add(src, arcname=top)
    return str(path)


@pytest.mark.parametrize('use_tar', [True, False])
def test_unpack_command_is_complete_or_absent(tmp_path, use_tar):
    if use_tar and not (shutil.which('tar') and shutil.which('xz')):
        pytest.skip('no tar or xz here')
    tar, partial, dest = _tarball(tmp_path), str(tmp_path / 'data.partial'), str(tmp_path / 'data')
    os.makedirs(partial)
    subprocess.run(gc.unpack_command(tar, partial, dest, use_tar), check=True, timeout=60)
    assert os.path.isfile(os.path.join(dest, 'cifar10', 'val', 'cat', '0.jpg')) and not os.path.exists(partial)


def test_find_split_folder(tmp_path):
    (tmp_path / 'data' / 'cifar10-jpeg' / 'train').mkdir(parents=True)
    (tmp_path / 'data' / 'cifar10-jpeg' / 'val').mkdir()
    assert gc.find_split_folder(str(tmp_path / 'data' / 'cifar10')) == str(tmp_path / 'data' / 'cifar10-jpeg')


# ---------------------------------------------------------------- the GPU command lines, without a GPU

def test_gpu_cifar_commands_parse_as_main_moco_reads_them():
    import main_moco
    parser = main_moco.get_args_parser()
    fast = gc.cifar_cmd(gc.FAST, 200, 20, '/tmp/run', '/data/cifar10')
    assert fast[1] == 'main_moco.py' and fast[-1] == '/data/cifar10'
    args = parser.parse_args(fast[2:])
    assert (args.arch, args.batch_size, args.epochs, args.knn_freq, args.gpu) == ('resnet18_cifar', 512, 200, 20, 0)
    assert args.fast and args.data_pipeline == 'memory' and args.lr == 0.6 and args.moco_m_cos
    original = parser.parse_args(gc.cifar_cmd(gc.ORIGINAL, 50, 20, '/tmp/run', '/data/cifar10')[2:])
    assert not original.fast and original.amp == 'fp16' and original.data_pipeline == 'reference'


def test_cifar_recipe_is_config_md():
    """The flags of the CIFAR-10 ResNet-18 command of CONFIG.md, with their values, in the same order."""
    text = open(os.path.join(ROOT, 'CONFIG.md')).read()
    start_at = text.index('python main_moco.py -a resnet18_cifar')
    command = text[start_at:text.index('data/cifar10', start_at)].replace('\\\n', ' ').split()
    recipe, tokens = [], iter(command[2:])
    for t in tokens:
        if t in ('--epochs', '--knn-freq', '--gpu', '--output-dir'):   # set by the check
            next(tokens)
        elif t != '--fast':
            recipe.append(t)
    assert recipe == gc.CIFAR_RECIPE and '--fast' in command


def test_gpu_bench_commands_parse(capsys):
    from moco.tools import bench
    commands = [gc.bench_cmd('/tmp/b.json', ['reference', 'ours']) + ['--fullsize-jpegs', '/tmp/fs'],
                gc.bench_cmd('/tmp/b.json', ['ours'], ['synthetic']) + ['--profile', '/tmp/p.txt'],
                gc.bench_cmd('/tmp/b.json', ['ours_compiled'], ['synthetic']) + ['--compile-backend', 'inductor']]
    for cmd in commands:
        assert cmd[1:3] == ['-m', 'moco.tools.bench'] and '--tiny' not in cmd
        assert cmd[cmd.index('--models') + 1:cmd.index('--configs')] == list(gc.GPU_MODELS)
        with pytest.raises(SystemExit) as e:      # every flag before --help is parsed (and checked) first
            bench.main(cmd[3:] + ['--help'])
        assert e.value.code == 0
    assert '--peak-tflops' in commands[0] and commands[0][commands[0].index('--peak-tflops') + 1] == '790'


def test_bench_rows_without_a_reference_and_the_profile(tmp_path):
    """What the profile part asks of moco.tools.bench: only ours, no 'vs ref', the profiler's table appended."""
    from moco.tools import bench
    out, profile = tmp_path / 'b.json', tmp_path / 'profile.txt'
    rows = bench.main(['--tiny', '--models', 'resnet18_cifar:2', '--image-size', '16', '--steps', '1', '--warmup', '0',
                       '--configs', 'ours', '--inputs', 'synthetic', '--profile', str(profile), '--out', str(out)])
    assert [(r['config'], r['vs_reference']) for r in rows] == [('ours', None)]
    assert json.loads(out.read_text())['rows'] == rows
    text = profile.read_text()
    assert text.startswith('== resnet18_cifar batch 2, 16 px, ours') and 'aten::' in text


# ---------------------------------------------------------------- a part that times out

def test_a_part_that_times_out_is_recorded_and_the_next_runs(tmp_path, monkeypatch, capsys):
    sleeper = [sys.executable, '-c', 'import os, time; print(os.getpid(), flush=True); time.sleep(120)']

    def prepare(check):   # no data: check.fullsize and check.cifar_data stay None
        pass

    def slow_part(check, timeout, record):
        job = check.runner.run(sleeper, 'tests', timeout)
        record['pid'] = int(job.read_output().split()[0])
        return job.status

    def next_part(check, timeout, record):
        job = check.runner.run([sys.executable, '-c', 'print("next part ran")'], 'bench', timeout)
        record['result'] = job.read_output().strip()
        return job.status

    monkeypatch.setattr(gc.data, 'prepare', prepare)
    monkeypatch.setitem(gc.PARTS, 'tests', slow_part)
    monkeypatch.setitem(gc.PARTS, 'bench', next_part)
    out = tmp_path / 'out'
    rc = gc.main(['--dry-run', '--parts', 'tests,bench', '--part-timeout', 'tests=3', '--out', str(out),
                  '--work-dir', str(tmp_path / 'work')])
    assert rc == 1                                   # a part did not succeed
    results = json.loads((out / 'results.json').read_text())
    tests, bench = results['parts']['tests'], results['parts']['bench']
    assert tests['status'] == 'timeout' and 3 <= tests['seconds'] < 3 + gc.KILL_GRACE_S
    with pytest.raises(ProcessLookupError):         # stopped, not left running
        os.kill(tests['pid'], 0)
    assert bench['status'] == 'ok' and bench['result'] == 'next part ran'
    summary = (out / 'summary.md').read_text()
    assert '| tests | timeout |' in summary and '| bench | ok |' in summary
    assert capsys.readouterr().out.rstrip().endswith(summary.rstrip().splitlines()[-1])   # printed last
    assert 'next part ran' in (out / 'parts.log').read_text()


# ---------------------------------------------------------------- the dry run

@pytest.fixture(scope='module')
def dry_run(tmp_path_factory):
    base = tmp_path_factory.mktemp('gpu_check')
    out, work = base / 'out', base / 'work'
    rc, printed = wait_output(start([sys.executable, '-m', 'moco.tools.gpu_check', '--dry-run', '--out', str(out),
                                     '--work-dir', str(work)]), timeout=2400)
    return rc, printed, out


@pytest.mark.slow
def test_dry_run_writes_every_result_file_and_a_summary_row_per_part(dry_run):
    rc, printed, out = dry_run
    assert rc == 0, printed
    assert sorted(os.listdir(out)) == sorted(gc.RESULT_FILES)        # 8 files, flat: what the device returns
    results = json.loads((out / 'results.json').read_text())
    assert list(results['parts']) == list(gc.PARTS)
    for name, part in results['parts'].items():
        assert part['status'] == 'ok', (name, part)
    summary = (out / 'summary.md').read_text()
    for name in gc.PARTS:
        assert f'| {name} | ok |' in summary
    assert printed.rstrip().endswith(summary.rstrip().splitlines()[-1])
    assert 'passed' in results['parts']['tests']['result']
    assert (out / 'curves.png').read_bytes()[:4] == b'\x89PNG'
    log = (out / 'parts.log').read_text()
    assert 'tests/test_gpu.py' in log and 'main_moco.py' in log and 'moco.tools.plot' in log


@pytest.mark.slow
def test_dry_run_bench_rows_and_profile(dry_run):
    rc, printed, out = dry_run
    bench = json.loads((out / 'bench.json').read_text())
    got = [(r['model'], r['input'], r['config']) for r in bench['rows']]
    models = [m.split(':')[0] for m in gc.DRY_MODELS]
    assert got == [(m, i, c) for m in models for i in ('synthetic', 'files') for c in ('reference', 'ours')] + \
        [(models[0], 'synthetic', 'ours_compiled')]
    assert all(r['images_per_s'] > 0 for r in bench['rows']) and bench['peak_tflops'] == gc.PEAK_TFLOPS
    profile = (out / 'profile.txt').read_text()
    assert profile.startswith(f'== {models[0]}') and 'Self CPU' in profile


@pytest.mark.slow
def test_dry_run_monitor_cost_row(dry_run):
    rc, printed, out = dry_run
    part = json.loads((out / 'results.json').read_text())['parts']['monitors']
    (row,) = part['rows']
    assert row['model'] == gc.DRY_MODELS[1].split(':')[0] and row['seconds_per_step_p1'] > 0
    assert 'at -p 10' in part['result']


@pytest.mark.slow
def test_dry_run_pipeline_rows(dry_run):
    rc, printed, out = dry_run
    part = json.loads((out / 'results.json').read_text())['parts']['pipeline']
    assert part['identical_views'] is True
    assert [(r['kind'], r['config']) for r in part['rows']] == [('transform', 'original'), ('transform', 'ours'),
                                                                ('loader', 'original'), ('loader', 'ours'),
                                                                ('to_float', 'ours')]
    assert all(r.get('images_per_s_per_core', r.get('images_per_s')) > 0 for r in part['rows'])
    assert 'Reference pipeline' in (out / 'summary.md').read_text()


@pytest.mark.slow
def test_dry_run_cifar_parts_fit_their_epochs(dry_run):
    rc, printed, out = dry_run
    results = json.loads((out / 'results.json').read_text())
    for name, log_name, epochs in (('cifar', 'cifar_log.txt', 4), ('cifar_ref', 'cifar_ref_log.txt', 2)):
        part = results['parts'][name]
        cal = part['calibration']
        assert cal['epoch_s'] > 0 and cal['startup_s'] > 0
        # the epochs chosen are what the arithmetic gives for the calibration and the time that was left
        assert part['epochs'] == gc.fit_epochs(part['available_s'], cal, 2, part['target_epochs']) == epochs
        assert part['projected_s'] == pytest.approx(gc.run_seconds(epochs, cal, 2), abs=0.2)
        assert part['projected_full_s'] == pytest.approx(gc.run_seconds(part['projected_full_epochs'], cal, 2), abs=0.2)
        records = [json.loads(line) for line in (out / log_name).read_text().splitlines()]
        assert [r['epoch'] for r in records] == list(range(epochs + 1))             # kNN at start, then each epoch
        assert part['epochs_done'] == epochs and [e for e, _ in part['knn']] == list(range(0, epochs + 1, 2))
        assert f'--epochs {epochs}' in part['command'] and '--knn-freq 2' in part['command']
    assert results['parts']['cifar']['numerics'] == '--fast --data-pipeline memory'
    assert results['parts']['cifar_ref']['numerics'] == '--amp fp16 --data-pipeline reference'
    assert '--amp auto' in results['parts']['cifar_ref']['command']                # fp16 needs CUDA
    assert 'fast vs original numerics' in (out / 'summary.md').read_text()
