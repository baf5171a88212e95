"""Runs a researcher can follow (README "Runs you can follow"), on tiny data on CPU:

- the run folder records its settings (args.json, and 'args' in each checkpoint); a resume compares
  them with the command line (shape flags: a one-line error naming the flag; other changes of the
  mathematics: listed, refused without --accept-changes; --epochs: allowed, said);
- the probe takes -a and --image-size from the checkpoint;
- pretraining reads train/ of images without class folders; moco.tools.split_folder makes train/ and val/;
- one line and a non-zero exit instead of a traceback (Ctrl-C: 130; a file as --output-dir; an
  impossible --image-size, which leaves no folder behind; plotting without matplotlib);
- progress lines with the run's ETA and img/s, 1-based epochs and steps (also after a mid-epoch
  resume), labelled meters, train/ and val/ TensorBoard tags, a closing summary;
- a finished run is not resumed; short schedules and probe batches larger than the data are warned;
- --help shows defaults, a mistyped -a gets a suggestion, usage lines name the python -m form.
"""
import builtins
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

import main_lincls
import main_moco
from helpers import ROOT, cli_env, run_script, wait_output
from moco.tools import plot, split_folder

pytestmark = pytest.mark.slow   # launches the scripts or several processes (make test-fast leaves it out)

TINY = ['-a', 'resnet18_cifar', '--image-size', '16', '--moco-dim', '8', '--moco-mlp-dim', '16', '-b', '8',
        '--epochs', '2', '--warmup-epochs', '1', '-j', '0', '-p', '1', '--seed', '0']


def pretrain(capsys, *argv):
    """main_moco in this process: (exit code, stdout, stderr)."""
    return run_script(main_moco, argv, capsys)


def one_error_line(err):
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith('error: ') and 'Traceback' not in err, err
    return lines[0]


@pytest.fixture(scope='module')
def first_run(tiny_folder, tmp_path_factory):
    """Two epochs with the kNN monitor, run once for the tests that read a finished run."""
    out = tmp_path_factory.mktemp('first') / 'run'
    args = main_moco.get_args_parser().parse_args(TINY + ['--knn-freq', '1', '--knn-k', '3', '--output-dir', str(out),
                                                          tiny_folder])
    import io
    from contextlib import redirect_stdout
    buf = io.StringIO()
    with redirect_stdout(buf):
        main_moco.main(args)
    return out, buf.getvalue()


def test_run_records_settings_and_reports_progress(first_run, tiny_folder):
    out, printed = first_run
    with open(out / 'args.json') as f:
        record = json.load(f)
    assert record['args']['lr'] == 0.6 and record['args']['batch_size'] == 8 and record['args']['moco_mlp_dim'] == 16
    assert {'command', 'python', 'torch', 'torchvision', 'timm', 'git_commit'} <= set(record)
    assert record['torch'] == torch.__version__
    ckpt = torch.load(out / 'checkpoint_0001.pth.tar', map_location='cpu', weights_only=True)
    assert ckpt['args'] == record['args']
    assert f'run folder: {out}' in printed
    assert 'Epoch 1/2 [1/5]' in printed and 'Epoch 2/2 [5/5]' in printed and 'Epoch: [' not in printed
    assert '(run: ' in printed and ' img/s' in printed and 'median of the last' in printed
    assert 'done: 2 epochs of mocov3' in printed and f'last checkpoint: {out}/checkpoint_0001.pth.tar' in printed
    assert 'best kNN top-1:' in printed and 'python main_lincls.py --pretrained' in printed
    log = [json.loads(line) for line in open(out / 'log.txt')]
    assert [r['epoch'] for r in log] == [0, 1, 2]      # 0: the kNN at initialisation; then epochs done
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    (events,) = os.listdir(out / 'tensorboard')
    tags = EventAccumulator(str(out / 'tensorboard' / events)).Reload().Tags()['scalars']
    assert {'train/loss', 'train/lr', 'train/images_per_s', 'val/knn_top1', 'val/rankme', 'val/feature_std',
            'grad/first_layer', 'grad/last_block', 'grad/projector', 'grad/predictor', 'grad/total_norm'} <= set(tags)
    assert all(t.startswith(('train/', 'val/', 'grad/')) for t in tags)
    assert set(log[1]['grad_max']) == set(log[1]['grad_median']) == {'first_layer', 'first_block', 'last_block',
                                                                    'projector', 'predictor', 'total_norm'}
    assert all(log[1]['grad_max'][k] >= log[1]['grad_median'][k] > 0 for k in log[1]['grad_max'])
    assert 1 < log[0]['rankme'] <= 40 and 0 < log[0]['feature_std'] < 1   # 40 training images, 512 features
    assert 'grad_first: ' in printed and 'gradient spikes (first layer' in printed and 'kNN dips:' in printed


def test_plot_draws_the_papers_figure_of_a_run(first_run, tmp_path):
    out, _ = first_run
    assert plot.has_gradients(str(out))
    scalars = plot.read_scalars(str(out), ['grad/first_layer', 'val/knn_top1'])
    assert scalars['grad/first_layer'][0] == list(range(10))   # -p 1: every one of the 2 x 5 steps
    assert scalars['val/knn_top1'][0] == [0, 5, 10]
    png = tmp_path / 'fig.png'
    plot.main([str(out), '--out', str(png)])                    # one run: --kind auto draws the figure
    assert png.read_bytes()[:4] == b'\x89PNG'
    curves = tmp_path / 'curves.png'
    plot.main([str(out), str(out), '--out', str(curves)])      # two runs: loss and kNN per epoch
    assert curves.read_bytes()[:4] == b'\x89PNG'
    with pytest.raises(SystemExit, match='one run'):
        plot.main([str(out), str(out), '--kind', 'gradients', '--out', str(png)])


def test_resume_compares_settings(first_run, tiny_folder, tmp_path, capsys):
    import shutil
    src, _ = first_run
    out = tmp_path / 'run'
    shutil.copytree(src, out)
    base = TINY + ['--output-dir', out, '--resume', 'auto']    # later flags win over TINY's
    data = tiny_folder

    code, stdout, err = pretrain(capsys, *base, '--moco-mlp-dim', '64', data)
    assert code == 2 and 'pass --moco-mlp-dim 16 to resume it' in one_error_line(err)

    changed = [*base, '-b', '16', '--lr', '5', '--moco-t', '0.2', '--epochs', '3', data]
    code, stdout, err = pretrain(capsys, *changed)
    assert code == 2 and '3 setting(s) differ' in one_error_line(err) and '--accept-changes' in err
    assert '  --lr: 0.6 when the run started, 5.0 now' in stdout and '  --moco-t: 1.0 when the run started' in stdout
    assert '--epochs 2 -> 3' in stdout
    assert sorted(os.listdir(out / 'tensorboard')) == sorted(os.listdir(src / 'tensorboard'))   # nothing written

    code, stdout, err = pretrain(capsys, *changed, '--accept-changes')
    assert code == 0, err
    assert 'resuming with changed settings' in stdout and 'Epoch 3/3' in stdout
    assert json.load(open(out / 'args.json'))['args']['lr'] == 5.0

    code, stdout, err = pretrain(capsys, *base, '--epochs', '3', '-b', '16', '--lr', '5', '--moco-t', '0.2', data)
    assert code == 0 and 'is finished (3 of 3 epochs): nothing to do' in stdout
    assert len(os.listdir(out / 'tensorboard')) == 2     # the first run's and the --accept-changes one's


def test_probe_takes_arch_and_size_from_the_checkpoint(first_run, tiny_folder, tmp_path, capsys):
    out, _ = first_run
    args = main_lincls.get_args_parser().parse_args(
        ['--pretrained', str(out / 'checkpoint_0001.pth.tar'), '-b', '4', '--epochs', '1', '-j', '0', '-p', '100',
         '--output-dir', str(tmp_path / 'probe'), tiny_folder])
    main_lincls.main(args)
    printed = capsys.readouterr().out
    assert args.arch == 'resnet18_cifar' and args.image_size == 16
    assert 'image size 16 (as in' in printed and 'arch resnet18_cifar' in printed
    # and -e --resume of the probe's own file without -a
    args = main_lincls.get_args_parser().parse_args(
        ['-e', '--resume', str(tmp_path / 'probe' / 'model_best.pth.tar'), '-j', '0', '-p', '100',
         '--output-dir', str(tmp_path / 'probe'), tiny_folder])
    stats = main_lincls.main(args)
    assert args.arch == 'resnet18_cifar' and args.image_size == 16 and 0 <= stats['acc1'] <= 100


def test_probe_warns_when_the_batch_is_larger_than_the_data(first_run, tiny_folder, tmp_path, capsys):
    out, _ = first_run
    args = main_lincls.get_args_parser().parse_args(
        ['--pretrained', str(out / 'checkpoint_0001.pth.tar'), '--epochs', '1', '-j', '0', '-p', '100',
         '--output-dir', str(tmp_path / 'probe'), tiny_folder])     # default -b 1024 on 40 images
    main_lincls.main(args)
    assert 'warning: the 40 training images are fewer than one batch (-b 1024)' in capsys.readouterr().out


def _images(folder, n, size=(20, 20)):
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        Image.new('RGB', size, (i * 15 % 256, 80, 200 - i)).save(os.path.join(folder, f'{i:03d}.jpg'))


def test_unlabelled_images_pretrain_and_split(tmp_path, capsys):
    _images(tmp_path / 'flat' / 'train', 16)
    code, stdout, err = pretrain(capsys, *TINY, '--epochs', '1', '--knn-freq', '1',
                                 '--output-dir', tmp_path / 'run', tmp_path / 'flat')
    assert code == 0, err
    assert 'kNN monitor off: it needs labels' in stdout and '16 training images' in stdout
    assert 'RankMe and the feature std only' in stdout
    assert re.search(r'^at initialisation: RankMe \d+\.\d, feature std 0\.\d{4} \(16 training images\)$', stdout, re.M)
    log = [json.loads(line) for line in open(tmp_path / 'run' / 'log.txt')]
    assert 'knn_top1' not in log[0] and log[0]['rankme'] > 1 and log[0]['feature_std'] > 0
    assert 'a linear probe needs labelled train/ and val/' in stdout

    code, stdout, err = pretrain(capsys, *TINY, '--output-dir', tmp_path / 'run2', tmp_path / 'flat' / 'train')
    line = one_error_line(err)
    assert code == 2 and 'holds images itself' in line and 'python -m moco.tools.split_folder' in line

    for cls in ('cat', 'dog'):
        _images(tmp_path / 'labelled' / cls, 10)
    counts = split_folder.split(str(tmp_path / 'labelled'), str(tmp_path / 'split'), val_fraction=0.2)
    assert counts == {'train': 16, 'val': 4}
    assert sorted(os.listdir(tmp_path / 'split' / 'val')) == ['cat', 'dog']
    assert len(os.listdir(tmp_path / 'split' / 'val' / 'cat')) == 2
    assert os.path.islink(tmp_path / 'split' / 'train' / 'cat' / os.listdir(tmp_path / 'split' / 'train' / 'cat')[0])
    flat = split_folder.split(str(tmp_path / 'flat' / 'train'), str(tmp_path / 'split_flat'), val_fraction=0.25,
                              copy=True)
    assert flat == {'train': 12, 'val': 4} and len(os.listdir(tmp_path / 'split_flat' / 'val')) == 4
    with pytest.raises(SystemExit, match='already exists'):
        split_folder.split(str(tmp_path / 'labelled'), str(tmp_path / 'split'))


def test_bad_flags_are_one_line_errors_that_create_nothing(tiny_folder, tmp_path, capsys):
    (tmp_path / 'a_file').write_text('x')
    code, _, err = pretrain(capsys, *TINY, '--output-dir', tmp_path / 'a_file', tiny_folder)
    assert code == 2 and 'is a file, not a folder' in one_error_line(err)
    code, _, err = pretrain(capsys, *TINY, '--image-size', '0', '--output-dir', tmp_path / 'new', tiny_folder)
    assert code == 2 and '--image-size must be positive' in one_error_line(err)
    assert not (tmp_path / 'new').exists()


def test_unusable_output_folders_tildes_and_patch_sizes(tiny_folder, tmp_path, capsys, monkeypatch):
    """An --output-dir that cannot be made is one line (pretraining, the probe, moco.tools.plot --out; conversion:
    tests/test_convert.py; fine-tuning: tests/test_transfer.py); ~ is expanded; a ViT --image-size its patch
    does not divide is refused with the sizes that work."""
    (tmp_path / 'a_file').write_text('x')
    for bad in ('/proc/moco_run', str(tmp_path / 'a_file' / 'run')):
        code, _, err = pretrain(capsys, *TINY, '--output-dir', bad, tiny_folder)
        assert code == 2 and 'cannot create --output-dir' in one_error_line(err), err
        capsys.readouterr()
        try:
            args = main_lincls.get_args_parser().parse_args(['--output-dir', bad, '-j', '0', str(tiny_folder)])
            main_lincls.main(args)
            code = 0
        except SystemExit as e:
            code = e.code
        assert code == 2 and 'cannot create --output-dir' in one_error_line(capsys.readouterr().err)
    monkeypatch.setenv('HOME', str(tmp_path / 'home'))
    code, _, err = pretrain(capsys, *TINY, '--epochs', '1', '--output-dir=~/runs/r1', tiny_folder)
    assert code == 0, err
    assert (tmp_path / 'home' / 'runs' / 'r1' / 'checkpoint_0000.pth.tar').is_file() and not os.path.exists('~')
    for bad in ('/proc/moco_plot', str(tmp_path / 'a_file' / 'plots')):
        with pytest.raises(SystemExit) as e:
            plot.main(['~/runs/r1', '--out', os.path.join(bad, 'curves.png')])
        assert str(e.value).startswith('error: cannot create the folder of --out')
    vit = ['-a', 'vit_tiny_patch4', '--image-size', '30', '-b', '8', '--epochs', '1', '-j', '0']
    code, _, err = pretrain(capsys, *vit, '--output-dir', tmp_path / 'vit', tiny_folder)
    assert code == 2 and "is not a multiple of vit_tiny_patch4's patch size 4" in one_error_line(err)
    assert 'use 28 or 32' in err and not (tmp_path / 'vit').exists()


def test_short_schedule_is_warned(tiny_folder, tmp_path, capsys):
    code, stdout, _ = pretrain(capsys, *TINY, '--epochs', '1', '--warmup-epochs', '4', '--output-dir', tmp_path,
                               tiny_folder)
    assert code == 0 and 'warning: --epochs 1 is shorter than --warmup-epochs 4' in stdout


def test_mid_epoch_resume_numbers_steps_from_the_epoch_start(tiny_folder, tmp_path, capsys):
    code, _, err = pretrain(capsys, *TINY, '--epochs', '1', '--save-every-iters', '3', '--output-dir', tmp_path,
                            tiny_folder)
    assert code == 0, err
    ckpt = torch.load(tmp_path / 'checkpoint_0000.pth.tar', map_location='cpu', weights_only=True)
    last = {**ckpt, 'epoch': 0, 'iter': 3}
    torch.save(last, tmp_path / 'checkpoint_last.pth.tar')
    os.remove(tmp_path / 'checkpoint_0000.pth.tar')
    code, stdout, err = pretrain(capsys, *TINY, '--epochs', '1', '--output-dir', tmp_path, '--resume', 'auto',
                                 tiny_folder)
    assert code == 0, err
    assert 'continuing epoch 1 at step 4' in stdout and 'Epoch 1/1 [4/5]' in stdout and '[1/' not in stdout


def test_help_shows_defaults_and_arch_typos_get_suggestions(capsys):
    help_text = main_moco.get_args_parser().format_help()
    for flag, default in (('--epochs', '100'), ('--warmup-epochs', '10'), ('--momentum', '0.9'),
                          ('--world-size', '-1'), ('--dist-url', 'tcp://localhost:10001')):
        block = help_text.split('\n  ' + flag, 1)[1].split('\n  -', 1)[0]
        assert f'(default: {default})' in ' '.join(block.split()), flag
    with pytest.raises(SystemExit):
        main_moco.get_args_parser().parse_args(['-a', 'resnet5', 'DIR'])
    err = capsys.readouterr().err
    assert "unknown architecture 'resnet5'; did you mean resnet50" in err and 'resnext' not in err
    with pytest.raises(SystemExit):
        plot.main(['--help'])
    assert capsys.readouterr().out.startswith('usage: python -m moco.tools.plot')


def test_plot_without_matplotlib_is_one_line(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith('matplotlib'):
            raise ImportError('No module named matplotlib')
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, '__import__', no_matplotlib)
    (tmp_path / 'log.txt').write_text(json.dumps({'epoch': 1, 'train_loss': 3.0}) + '\n')
    with pytest.raises(SystemExit, match='needs matplotlib') as e:
        plot.plot([str(tmp_path)], str(tmp_path / 'c.png'))
    assert '\n' not in str(e.value)


def test_ctrl_c_is_one_line_and_exit_130(tiny_folder, tmp_path):
    # SIGINT back to its default in the child: a shell that starts a job in the background (as CI may)
    # leaves it ignored, and Python then installs no KeyboardInterrupt handler
    proc = subprocess.Popen([sys.executable, 'main_moco.py', *TINY, '--epochs', '50', '-j', '2', '--output-dir',
                             str(tmp_path), tiny_folder], cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    lines = []
    for line in proc.stdout:          # wait until training is under way
        lines.append(line)
        if line.startswith('Epoch 1/50') or time.time() > deadline:
            break
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole foreground group
    rc, out = wait_output(proc, timeout=60)
    out = ''.join(lines) + out
    assert rc == 130, out
    assert 'Traceback' not in out and 'KeyboardInterrupt' not in out, out
    assert 'interrupted: the checkpoints already written' in out and '--resume auto' in out


def test_tools_find_the_repository_root():
    """The tools that start the programs as scripts find them (the study from moco/tools/, the GPU check
    from tests/)."""
    import gpu_check

    from moco.tools import study
    for root in (study.ROOT, gpu_check.ROOT):
        assert os.path.isfile(os.path.join(root, 'main_moco.py')), root


def test_a_default_run_keeps_few_checkpoints_says_so_and_resumes(tiny_folder, tmp_path, capsys):
    """By default a run keeps the newest checkpoint and every 20th epoch's (README "Runs you can follow"),
    not every epoch's, and says at the start what a checkpoint weighs and what it keeps."""
    out_dir = tmp_path / 'run'
    code, out, err = pretrain(capsys, *TINY, '--epochs', '3', '--output-dir', out_dir, tiny_folder)
    assert code == 0, err
    assert re.search(r'checkpoints: about \d+ MiB each; keeping the newest 1 and every 20th epoch', out), out
    assert sorted(p.name for p in out_dir.glob('checkpoint_*')) == ['checkpoint_0002.pth.tar']
    code, out, err = pretrain(capsys, *TINY, '--epochs', '4', '--output-dir', out_dir, '--resume', 'auto',
                              tiny_folder)
    assert code == 0 and "resumed from" in out, err
    assert sorted(p.name for p in out_dir.glob('checkpoint_*')) == ['checkpoint_0003.pth.tar']
