"""PNG figures of pretraining runs (main_moco.py's log.txt and tensorboard/):

    python -m moco.tools.plot output/run --out run.png                     # loss (and kNN) per epoch
    python -m moco.tools.plot output/run1 output/run2 --out curves.png     # the same, one line per run
    python -m moco.tools.plot output/run --kind gradients --out grads.png  # one run: the paper's figure

The training curves (default, ``--kind curves``): the training loss per epoch and, where a run
evaluated them (``--knn-freq``), the kNN top-1 (or RankMe, in a folder without labels); a panel
without data is left out. ``--kind gradients``, one run that logged gradient magnitudes (every run
since they were added): on one iteration axis, the kNN top-1 (or RankMe) above when there is one,
the first layer's and the last block's largest absolute gradient below, log scale, with the spikes
the run found marked: MoCo v3's Figure 4 (paper, section 4).
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


def gradients_figure(run, title=None):
    """The paper's figure of one run (see the module's docstring), as a matplotlib figure."""
    plt = _pyplot()
    scalars = read_scalars(run, GRADIENT_TAGS + ('val/knn_top1', 'val/rankme'))
    if not any(tag in scalars for tag in GRADIENT_TAGS):
        raise SystemExit(f'error: {run} has no gradient magnitudes in tensorboard/ '
                         '(a run from before they were logged?)')
    monitor = next((tag for tag in ('val/knn_top1', 'val/rankme') if tag in scalars), None)
    title = title or os.path.basename(os.path.normpath(run))
    if monitor is None:   # no kNN or RankMe evaluated (no --knn-freq): the gradients alone
        fig, ax_grad = plt.subplots(1, 1, figsize=(9, 3.6))
        axes = [ax_grad]
        ax_grad.set_title(title)
    else:
        fig, (ax_eval, ax_grad) = plt.subplots(2, 1, figsize=(9, 6), sharex=True, height_ratios=(1, 1.3))
        axes = [ax_eval, ax_grad]
        ax_eval.plot(*scalars[monitor], marker='o', markersize=3, color='tab:green')
        ax_eval.set(ylabel='kNN top-1 (%)' if monitor == 'val/knn_top1' else 'RankMe of the features', title=title)
    for tag, color, label in ((GRADIENT_TAGS[0], 'tab:blue', 'first layer'),
                              (GRADIENT_TAGS[1], 'tab:orange', 'last block')):
        if tag in scalars:
            ax_grad.plot(*scalars[tag], color=color, linewidth=0.8, label=label)
    for k, spike in enumerate(read_spikes(run)):
        for ax in axes:
            ax.axvline(spike['iteration'], color='tab:red', alpha=0.35, linewidth=0.8,
                       label='first-layer spike' if k == 0 and ax is ax_grad else None)
    ax_grad.set(xlabel='iteration', ylabel='max |gradient| of the layer', yscale='log')
    for ax in axes:
        ax.grid(alpha=0.3)
    ax_grad.legend()
    fig.tight_layout()
    return fig


def plot_gradients(run, out, title=None):
    """Write the paper's figure of one run to ``out``; returns ``out``."""
    return _save(gradients_figure(run, title), out)


def has_gradients(run):
    return os.path.isdir(run) and any(tag in read_scalars(run, GRADIENT_TAGS) for tag in GRADIENT_TAGS)


def read_rankme(run_dir):
    """(epochs, RankMe) of a run's log.txt (a run without labels evaluates RankMe, not kNN)."""
    path = run_dir if run_dir.endswith('.txt') else os.path.join(run_dir, 'log.txt')
    epochs, values = [], []
    with open(path) as f:
        for line in f:
            record = json.loads(line) if line.strip() else {}
            if 'rankme' in record:
                epochs.append(record['epoch'])
                values.append(record['rankme'])
    return epochs, values


def curves_figure(runs, labels=None, title=None):
    """The training curves of ``runs`` (see the module's docstring), as a matplotlib figure: one panel
    per quantity some run logged (a panel without data would be empty), one labelled line per run."""
    plt = _pyplot()
    labels = labels or [os.path.basename(os.path.normpath(r)) for r in runs]
    logs = [read_log(run) for run in runs]
    knn = any(log[3] for log in logs)
    rankme = [read_rankme(run) for run in runs] if not knn else [([], [])] * len(runs)
    panels = [('loss', 'training loss', [(log[0], log[1]) for log in logs]),
              ('kNN monitor (held-out split)', 'kNN top-1 (%)', [(log[2], log[3]) for log in logs]),
              ('RankMe (no labels: no kNN)', 'RankMe of the features', rankme)]
    panels = [(name, ylabel, series) for name, ylabel, series in panels if any(y for _, y in series)]
    if not panels:
        raise SystemExit(f'error: nothing to draw: no training loss in the log of {", ".join(runs)} '
                         '(has a first epoch finished?)')
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (name, ylabel, series) in zip(axes[0], panels):
        for (x, y), label in zip(series, labels):
            if y:
                ax.plot(x, y, label=label, **({} if name == 'loss' else dict(marker='o', markersize=3)))
        ax.set(xlabel='epoch', ylabel=ylabel, title=name)
        ax.grid(alpha=0.3)
        ax.legend()      # every panel kept has a labelled line
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot(runs, out, labels=None, title=None):
    """Write the training curves of ``runs`` to ``out``; returns ``out``."""
    return _save(curves_figure(runs, labels, title), out)


def _save(fig, out):
    import matplotlib.pyplot as plt
    try:
        cli.make_parent_folder(out, '--out')
        fig.savefig(out, dpi=120)
    finally:
        plt.close(fig)
    return out


def main(argv=None):
    p = cli.parser(__doc__.splitlines()[0], prog='python -m moco.tools.plot')
    p.add_argument('runs', nargs='+', type=cli.path, help='run folders (with log.txt) or log.txt files')
    p.add_argument('--out', default='curves.png', type=cli.path, help='PNG to write')
    p.add_argument('--labels', nargs='+', default=None, help='one label per run (default: folder names)')
    p.add_argument('--title', default=None)
    p.add_argument('--kind', default='curves', choices=('curves', 'gradients'),
                   help='curves: training loss and kNN top-1 (or RankMe) per epoch of the runs; gradients: one '
                        'run\'s first- and last-layer gradient magnitudes per iteration, spikes marked, kNN above '
                        '(the paper\'s Figure 4)')
    args = p.parse_args(argv)
    if args.labels and len(args.labels) != len(args.runs):
        raise SystemExit('error: give one --labels entry per run')
    try:
        _draw(args)
    except UserError as e:
        raise SystemExit(f'error: {e}') from None


def _draw(args):
    if args.kind == 'gradients':
        if len(args.runs) != 1:
            raise SystemExit('error: --kind gradients draws one run')
        print(f'wrote {plot_gradients(args.runs[0], args.out, args.title)}')
    else:
        print(f'wrote {plot(args.runs, args.out, args.labels, args.title)}')


if __name__ == '__main__':
    sys.exit(main())
