"""Lines of training (README "Runs you can follow"), through main_moco in this process on tiny data on CPU:
a run restarted from an older checkpoint (after a divergence, say) branches a new line, which
``--resume auto`` continues and ``--keep-checkpoints`` thins, leaving the abandoned line's files alone
(its mid-epoch checkpoint_last included); ``--start-epoch`` on a folder with checkpoints needs
``--overwrite``. The unit checks (damaged files, several lines, a folder that cannot tell) are in
tests/test_checkpoint.py."""
import os

import pytest
import torch

import main_moco
from helpers import load, run_script

pytestmark = pytest.mark.slow   # trains for a while (make test-fast leaves it out)

# 40 training images, -b 20: 2 steps an epoch
TINY = ['-a', 'resnet18_cifar', '--image-size', '16', '--moco-dim', '8', '--moco-mlp-dim', '16', '-b', '20',
        '--warmup-epochs', '1', '-j', '0', '-p', '100', '--seed', '0']


def pretrain(capsys, *argv):
    """main_moco in this process: (exit code, stdout, stderr)."""
    return run_script(main_moco, argv, capsys)


def line_of(path):
    return load(path)['line']['id']


def checkpoints(folder):
    return sorted(n for n in os.listdir(folder) if n.endswith('.pth.tar'))


def test_resume_auto_continues_a_branch_and_thinning_keeps_its_files(tiny_folder, tmp_path, capsys):
    out = tmp_path / 'run'

    def ckpt(n):
        return out / f'checkpoint_{n:04d}.pth.tar'

    code, _, err = pretrain(capsys, *TINY, '--epochs', '10', '--keep-checkpoints', '0', '--output-dir', out,
                            tiny_folder)
    assert code == 0, err

    # the run diverged: restart from the end of epoch 5, keeping 2 checkpoints; this job ends after epoch 7
    code, stdout, err = pretrain(capsys, *TINY, '--epochs', '7', '--keep-checkpoints', '2', '--resume', ckpt(4),
                                 '--output-dir', out, tiny_folder)
    assert code == 0, err
    # thinning took the branch's history (0000 ... 0004 of the old line, then its own), never the abandoned files
    assert checkpoints(out) == [f'checkpoint_{n:04d}.pth.tar' for n in (5, 6, 7, 8, 9)]
    assert 'branches a new line from it' in stdout and '5 checkpoint(s) in' in stdout   # 0005 ... 0009 of the old
    old, branch = line_of(ckpt(9)), line_of(ckpt(6))
    assert branch != old and line_of(ckpt(5)) == branch and [line_of(ckpt(n)) for n in (7, 8, 9)] == [old] * 3
    # and a mid-epoch file of the old line, further in training than the branch, is passed over too
    torch.save({**load(ckpt(8)), 'iter': 1}, out / 'checkpoint_last.pth.tar')

    code, stdout, err = pretrain(capsys, *TINY, '--epochs', '10', '--keep-checkpoints', '2', '--resume', 'auto',
                                 '--output-dir', out, tiny_folder)
    assert code == 0, err
    assert f"=> resumed from '{ckpt(6)}': 7 epoch(s) done" in stdout and 'Epoch 8/10' in stdout
    assert checkpoints(out) == ['checkpoint_0008.pth.tar', 'checkpoint_0009.pth.tar', 'checkpoint_last.pth.tar']
    assert [line_of(ckpt(n)) for n in (8, 9)] == [branch] * 2 and line_of(out / 'checkpoint_last.pth.tar') == old
    assert load(ckpt(9))['line']['parent'] == old and load(ckpt(9))['line']['branched_at'] == [5, 0]


def test_start_epoch_on_a_folder_with_checkpoints_needs_overwrite(tiny_folder, tmp_path, capsys):
    out = tmp_path / 'run'
    code, _, err = pretrain(capsys, *TINY, '--epochs', '2', '--keep-checkpoints', '0', '--output-dir', out, tiny_folder)
    assert code == 0, err
    before = {n: (out / n).read_bytes() for n in checkpoints(out)}

    code, _, err = pretrain(capsys, *TINY, '--epochs', '2', '--start-epoch', '1', '--output-dir', out, tiny_folder)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and 'Traceback' not in err, err
    assert lines[0].startswith('error: --start-epoch 1 begins a new run in')
    assert 'would overwrite checkpoint_0001.pth.tar; pass --overwrite to allow it' in err
    assert {n: (out / n).read_bytes() for n in checkpoints(out)} == before   # nothing touched

    code, stdout, err = pretrain(capsys, *TINY, '--epochs', '2', '--start-epoch', '1', '--overwrite', '--output-dir',
                                 out, tiny_folder)
    assert code == 0, err
    assert 'Epoch 2/2' in stdout and 'Epoch 1/2' not in stdout
    assert (out / 'checkpoint_0000.pth.tar').read_bytes() == before['checkpoint_0000.pth.tar']
    assert line_of(out / 'checkpoint_0001.pth.tar') != line_of(out / 'checkpoint_0000.pth.tar')   # a new line
    assert '--overwrite' in main_moco.get_args_parser().format_help()
