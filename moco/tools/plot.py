"""PNG figures of pretraining runs (main_moco.py's log.txt and tensorboard/):

    python -m moco.tools.plot output/run --out run.png                  # one run: the paper's figure
    python -m moco.tools.plot output/run1 output/run2 --out curves.png  # several: loss and kNN per epoch

One run with gradient magnitudes logged (every run since they were added; ``--kind gradients``): on
one iteration axis, the kNN top-1 (or RankMe, in a folder without labels) above, the first layer's
and the last block's largest absolute gradient below, log scale, with the spikes the run found
marked: MoCo v3's Figure 4 (paper, section 4). Otherwise (``--kind curves``): training loss and kNN
top-1 per epoch, one line per run.
"""
import json
import os
import sys

from moco import cli
from moco.errors import UserError


def read_log(run_dir):
    """(epochs, losses, knn_epochs, knn_top1) of a run folder (or a log.txt path)."""
    path = run_dir if run_dir.endswith('.txt') else os.path.join(run_dir, 'log.txt')
    if not os.path.isfile(path):
        raise SystemExit(f'error: no log at {path}')
    epochs, losses, knn_epochs, knn = [], [], [], []
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            r = json.loads(line)
            if 'train_loss' in r:
                epochs.append(r['epoch'])
                losses.append(r['train_loss'])
            if 'knn_top1' in r:
                knn_epochs.append(r['epoch'])
                knn.append(r['knn_top1'])
    return epochs, losses, knn_epochs, knn


def read_scalars(run_dir, tags):
    """{tag: ([steps], [values])} of the run's TensorBoard scalars (those of ``tags`` it has)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    folder = os.path.join(run_dir, 'tensorboard')
    out = {}
    if not os.path.isdir(folder):
        return out
    for name in sorted(os.listdir(folder)):   # one file per launch (a resumed run has several)
        acc = EventAccumulator(os.path.join(folder, name), size_guidance={'scalars': 0}).Reload()
        for tag in set(tags) & set(acc.Tags()['scalars']):
            steps, values = out.setdefault(tag, ([], []))
            for event in acc.Scalars(tag):
                steps.append(event.step)
                values.append(event.value)
    return {tag: tuple(map(list, zip(*sorted(zip(*sv))))) for tag, sv in out.items()}


def read_spikes(run_dir):
    """The gradient spikes log.txt recorded: [{'iteration', 'ratio', 'later'}]."""
    path = os.path.join(run_dir, 'log.txt')
    spikes = []
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                if line.strip():
                    spikes += json.loads(line).get('grad_spikes', [])
    return spikes


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise SystemExit('error: drawing curves needs matplotlib (pip install matplotlib); the numbers are in '
                         'each run\'s log.txt') from None
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


GRADIENT_TAGS = ('grad/first_layer', 'grad/last_block')


def plot_gradients(run, out, title=None):
    """The paper's figure of one run (see the module's docstring)."""
    plt = _pyplot()
    scalars = read_scalars(run, GRADIENT_TAGS + ('val/knn_top1', 'val/rankme'))
    if not any(tag in scalars for tag in GRADIENT_TAGS):
        raise SystemExit(f'error: {run} has no gradient magnitudes in tensorboard/ '
                         '(a run from before they were logged?)')
    fig, (ax_eval, ax_grad) = plt.subplots(2, 1, figsize=(9, 6), sharex=True, height_ratios=(1, 1.3))
    monitor = 'val/knn_top1' if 'val/knn_top1' in scalars else 'val/rankme'
    if monitor in scalars:
        steps, values = scalars[monitor]
        ax_eval.plot(steps, values, marker='o', markersize=3, color='tab:green')
    ax_eval.set(ylabel='kNN top-1 (%)' if monitor == 'val/knn_top1' else 'RankMe of the features',
                title=title or os.path.basename(os.path.normpath(run)))
    for tag, color, label in ((GRADIENT_TAGS[0], 'tab:blue', 'first layer'),
                              (GRADIENT_TAGS[1], 'tab:orange', 'last block')):
        if tag in scalars:
            ax_grad.plot(*scalars[tag], color=color, linewidth=0.8, label=label)
    spikes = read_spikes(run)
    for k, spike in enumerate(spikes):
        for ax in (ax_eval, ax_grad):
            ax.axvline(spike['iteration'], color='tab:red', alpha=0.35, linewidth=0.8,
                       label='first-layer spike' if k == 0 and ax is ax_grad else None)
    ax_grad.set(xlabel='iteration', ylabel='max |gradient| of the layer', yscale='log')
    for ax in (ax_eval, ax_grad):
        ax.grid(alpha=0.3)
    ax_grad.legend()
    fig.tight_layout()
    cli.make_parent_folder(out, '--out')
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def has_gradients(run):
    return os.path.isdir(run) and any(tag in read_scalars(run, GRADIENT_TAGS) for tag in GRADIENT_TAGS)


def plot(runs, out, labels=None, title=None):
    plt = _pyplot()
    labels = labels or [os.path.basename(os.path.normpath(r)) for r in runs]
    fig, (ax_loss, ax_knn) = plt.subplots(1, 2, figsize=(10, 4))
    for run, label in zip(runs, labels):
        epochs, losses, knn_epochs, knn = read_log(run)
        ax_loss.plot(epochs, losses, label=label)
        if knn:
            ax_knn.plot(knn_epochs, knn, marker='o', markersize=3, label=label)
    ax_loss.set(xlabel='epoch', ylabel='training loss', title='loss')
    ax_knn.set(xlabel='epoch', ylabel='kNN top-1 (%)', title='kNN monitor (held-out split)')
    for ax in (ax_loss, ax_knn):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    cli.make_parent_folder(out, '--out')
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv=None):
    p = cli.parser(__doc__.splitlines()[0], prog='python -m moco.tools.plot')
    p.add_argument('runs', nargs='+', type=cli.path, help='run folders (with log.txt) or log.txt files')
    p.add_argument('--out', default='curves.png', type=cli.path, help='PNG to write')
    p.add_argument('--labels', nargs='+', default=None, help='one label per run (default: folder names)')
    p.add_argument('--title', default=None)
    p.add_argument('--kind', default='auto', choices=('auto', 'gradients', 'curves'),
                   help='gradients: the paper\'s figure of one run; curves: loss and kNN per epoch of the runs; '
                        'auto (default): gradients for one run that logged them, else curves')
    args = p.parse_args(argv)
    if args.labels and len(args.labels) != len(args.runs):
        raise SystemExit('error: give one --labels entry per run')
    try:
        _draw(args)
    except UserError as e:
        raise SystemExit(f'error: {e}') from None


def _draw(args):
    kind = args.kind
    if kind == 'auto':
        kind = 'gradients' if len(args.runs) == 1 and has_gradients(args.runs[0]) else 'curves'
    if kind == 'gradients':
        if len(args.runs) != 1:
            raise SystemExit('error: --kind gradients draws one run')
        print(f'wrote {plot_gradients(args.runs[0], args.out, args.title)}')
    else:
        print(f'wrote {plot(args.runs, args.out, args.labels, args.title)}')


if __name__ == '__main__':
    sys.exit(main())
