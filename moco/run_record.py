"""A run's settings: written at start into its folder (``args.json``: every flag, the command line,
the versions of Python, torch, torchvision and timm, the git commit, the line of training) and into each checkpoint
(``'args'``), and compared with the command line when the run is resumed (README, "Runs you can
follow")."""
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager

from moco.errors import UserError

SETTINGS_FILE = 'args.json'

# Flags that change how a run is executed, stored or watched, not what it computes: a resume may change
# them freely. Every other flag changes the mathematics (or the pixels) of the steps still to come.
OPERATIONAL = frozenset({
    'data', 'workers', 'output_dir', 'resume', 'keep_checkpoints', 'keep_every', 'save_every_iters', 'print_freq',
    'knn_freq', 'knn_k', 'knn_t', 'seed', 'start_epoch', 'world_size', 'rank', 'dist_url', 'dist_backend',
    'gpu', 'dist_timeout', 'multiprocessing_distributed', 'strict_data', 'max_nonfinite_steps', 'compile',
    'channels_last', 'accept_changes', 'evaluate', 'stop_signals', 'overwrite', 'micro_batch',
    'grad_checkpointing'})
# Flags the shapes of the weights depend on: another value cannot load the checkpoint at all.
SHAPE_FLAGS = ('arch', 'method', 'moco_dim', 'moco_mlp_dim')


def flag(name):
    return '--' + name.replace('_', '-')


def settings(args, parser):
    """The values of ``parser``'s flags in ``args`` (what a checkpoint and args.json record; not what a
    launcher or the script added to ``args``)."""
    flags = {a.dest for a in parser._actions if a.dest != 'help'}
    return {k: v for k, v in sorted(vars(args).items())
            if k in flags and (v is None or isinstance(v, (bool, int, float, str)))}


def _git_commit():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.exists(os.path.join(root, '.git')):
        return None
    try:
        out = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=root, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment():
    import timm
    import torch
    import torchvision
    return {'command': shlex.join([os.path.basename(sys.executable)] + sys.argv),
            'started': time.strftime('%Y-%m-%d %H:%M:%S %z'), 'host': platform.node(),
            'python': platform.python_version(), 'torch': torch.__version__,
            'torchvision': torchvision.__version__, 'timm': timm.__version__, 'git_commit': _git_commit()}


def write(output_dir, recorded, line=None):
    """``output_dir/args.json``: the settings and the environment of this start, and the line of
    training it continues or begins (``line``: ``checkpoint.Line.record()``, which ``--resume auto``
    follows). A resume writes it again, so it always describes the latest start; each checkpoint keeps
    the settings it was made with."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, SETTINGS_FILE)
    extra = {'line': line} if line is not None else {}
    write_text_atomic(path, json.dumps({'args': recorded, **extra, **environment()}, indent=1) + '\n')
    return path


def recorded_line(output_dir):
    """The line of training args.json records (``write``); None in folders written before lines were."""
    try:
        with open(os.path.join(output_dir, SETTINGS_FILE)) as f:
            return json.load(f).get('line')
    except (OSError, ValueError, AttributeError):
        return None


def write_text_atomic(path, text):
    """Write ``text`` to ``path`` through a temporary file and a rename: a reader finds the old file or
    the new one, never a half-written one (args.json, the benchmark's and the GPU check's results)."""
    with open(path + '.tmp', 'w') as f:
        f.write(text)
    os.replace(path + '.tmp', path)


def recorded_settings(ckpt, output_dir):
    """The settings a checkpoint was made with (older checkpoints: the run folder's args.json), or None."""
    if isinstance(ckpt.get('args'), dict):
        return ckpt['args']
    try:
        with open(os.path.join(output_dir, SETTINGS_FILE)) as f:
            return json.load(f)['args']
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_resume(recorded, current, path, accept_changes, shape_flags=SHAPE_FLAGS):
    """Compare the settings of a resumed run with the command line.

    A flag the weights' shapes depend on must be the same (a one-line error names it); ``--epochs`` may
    grow or shrink (said, since the schedules stretch); any other change of the mathematics is listed,
    one line each, and needs ``--accept-changes``. Returns the lines printed."""
    if not recorded:
        return []
    changed = {k: (recorded[k], v) for k, v in current.items()
               if k in recorded and k not in OPERATIONAL and recorded[k] != v}
    unloadable = [k for k in shape_flags if k in changed]
    if unloadable:
        fix = ' '.join(f'{flag(k)} {recorded[k]}' for k in unloadable)
        raise UserError(f'{path} was trained with {fix} (now {" ".join(str(changed[k][1]) for k in unloadable)}): '
                        f'pass {fix} to resume it')
    lines = []
    if 'epochs' in changed:
        old, new = changed.pop('epochs')
        lines.append(f'note: --epochs {old} -> {new}: the lr and momentum schedules are stretched to {new} epochs '
                     'from here on (not the same run as one started with --epochs ' f'{new})')
    listed = [f'  {flag(k)}: {old} when the run started, {new} now' for k, (old, new) in sorted(changed.items())]
    if listed and not accept_changes:
        print('\n'.join(lines + [f'{path} was made with other settings:'] + listed))
        raise UserError(f'{len(listed)} setting(s) differ from the run being resumed (listed above): resume with the '
                        'recorded ones, or pass --accept-changes to continue with the new ones')
    if listed:
        lines += ['warning: resuming with changed settings (--accept-changes):'] + listed
    if lines:
        print('\n'.join(lines))
    return lines


@contextmanager
def undone_on_error(output_dir, new_run, saved):
    """What a ``new_run`` adds to ``output_dir`` (args.json, log.txt, tensorboard/) removed again when the
    block fails with a UserError (e.g. --strict-data at an unreadable image) while ``saved`` (the
    checkpoints it wrote) is still empty: a run that failed at once leaves the folder as it found it
    (README "When things go wrong")."""
    before = set(os.listdir(output_dir)) if os.path.isdir(output_dir) else set()
    try:
        yield
    except UserError:
        if new_run and not saved and os.path.isdir(output_dir):
            for name in set(os.listdir(output_dir)) - before:
                path = os.path.join(output_dir, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        raise
