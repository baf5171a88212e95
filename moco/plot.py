"""PNG curves of runs from their log.txt (one JSON line per epoch, written by main_moco.py):

    python -m moco.plot output/run1 [output/run2 ...] --out curves.png [--labels a b]

Left: training loss per epoch; right: kNN top-1 (the --knn-freq monitor) per epoch. One line per run.
"""
import json
import os
import sys

from moco import cli


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


def plot(runs, out, labels=None, title=None):
    try:
        import matplotlib
    except ImportError:
        raise SystemExit('error: drawing curves needs matplotlib (pip install matplotlib); the numbers are in '
                         'each run\'s log.txt') from None
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
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
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv=None):
    p = cli.parser(__doc__.splitlines()[0], prog='python -m moco.plot')
    p.add_argument('runs', nargs='+', help='run folders (with log.txt) or log.txt files')
    p.add_argument('--out', default='curves.png', help='PNG to write')
    p.add_argument('--labels', nargs='+', default=None, help='one label per run (default: folder names)')
    p.add_argument('--title', default=None)
    args = p.parse_args(argv)
    if args.labels and len(args.labels) != len(args.runs):
        raise SystemExit('error: give one --labels entry per run')
    print(f'wrote {plot(args.runs, args.out, args.labels, args.title)}')


if __name__ == '__main__':
    sys.exit(main())
