"""MoCo v3's study of training stability (paper, section 4), small enough for a CPU (``make study``):

    python -m moco.tools.study --out output/study          # the grid below, then study.md, study.json, figures

A 6-block ViT on 4x4 patches (``vit_mini_patch4``) pretrained with MoCo v3 on the shipped CIFAR-10
(JPEG) demo images at 16 px (in-memory pipeline, AdamW, batch 128), for each base learning rate of
``--lrs``, with the patch projection learned and frozen at its random initialisation
(``--stop-grad-conv1``), ``--seeds`` seeds each. Every run logs the gradient magnitudes at every step
(``-p 1``) and kNN top-1 on the held-out images after every epoch. The table: kNN at the end and its
best, the largest kNN dip, the gradient spikes (first layer above 5x its running median) and how
many iterations later the last block spiked. The figure of each learned-projection run at the first
seed is ``python -m moco.tools.plot``'s (kNN above, first layer and last block below).

Runs already finished in ``--out`` are read, not run again (a stopped study continues where it was).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from moco import demo_data
from moco.monitors import dips

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository
RECIPE = ['-a', 'vit_mini_patch4', '--image-size', '16', '--data-pipeline', 'memory', '--optimizer', 'adamw',
          '--wd', '0.1', '-b', '128', '--moco-t', '0.2', '--moco-dim', '128', '--moco-mlp-dim', '512',
          '--crop-min', '0.2', '--no-blur', '--knn-freq', '1', '-p', '1', '-j', '0']


def run_name(lr, frozen, seed):
    return f"lr{lr:g}_{'frozen' if frozen else 'learned'}_seed{seed}"


def command(data, out_dir, lr, frozen, seed, epochs, warmup):
    cmd = [sys.executable, os.path.join(ROOT, 'main_moco.py'), data, *RECIPE, '--lr', f'{lr:g}', '--seed', str(seed),
           '--epochs', str(epochs), '--warmup-epochs', str(warmup), '--output-dir', out_dir]
    return cmd + (['--stop-grad-conv1'] if frozen else [])


def summarise(run_dir):
    """One row of the table from a finished run's log.txt."""
    records = [json.loads(line) for line in open(os.path.join(run_dir, 'log.txt')) if line.strip()]
    knn = [(r['epoch'], r['knn_top1']) for r in records if 'knn_top1' in r]
    spikes = [s for r in records for s in r.get('grad_spikes', [])]
    lags = [s['later']['last_block'] for s in spikes if 'last_block' in s.get('later', {})]
    found = dips(knn, points=0.0)
    rank = [r['rankme'] for r in records if 'rankme' in r]
    return {'rankme_start': rank[0], 'rankme_min': min(rank), 'rankme_final': rank[-1], 'knn_final': knn[-1][1],
            'knn_best': max(v for _, v in knn[1:]) if len(knn) > 1 else None,
            'knn_curve': knn, 'largest_dip': max((d for _, d in found), default=0.0),
            'dips_over_1_point': sum(d > 1.0 for _, d in found), 'spikes': len(spikes),
            'spikes_reaching_last_block': len(lags), 'median_lag': statistics.median(lags) if lags else None,
            'final_loss': next(r['train_loss'] for r in reversed(records) if 'train_loss' in r)}


def table(rows):
    lines = ['| base lr | patch projection | seed | kNN final | kNN best | largest kNN dip | dips > 1 pt | RankMe at '
             'init / lowest / final | spikes | reached the last block | median lag (it.) |',
             '|---|---|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        lines.append(f"| {r['lr']:g} | {'frozen' if r['frozen'] else 'learned'} | {r['seed']} | {r['knn_final']:.1f} | "
                     f"{r['knn_best']:.1f} | {r['largest_dip']:.1f} | {r['dips_over_1_point']} | "
                     f"{r['rankme_start']:.1f} / {r['rankme_min']:.1f} / {r['rankme_final']:.1f} | {r['spikes']} | "
                     f"{r['spikes_reaching_last_block']} | {'-' if r['median_lag'] is None else r['median_lag']} |")
    lines += ['', '| base lr | patch projection | kNN final (mean of seeds) | largest dip (mean) | final RankMe (mean) '
              '| spikes (mean) |', '|---|---|---|---|---|---|']
    for lr in sorted({r['lr'] for r in rows}):
        for frozen in (False, True):
            group = [r for r in rows if r['lr'] == lr and r['frozen'] == frozen]
            if group:
                lines.append(f"| {lr:g} | {'frozen' if frozen else 'learned'} | "
                             f"{statistics.mean(r['knn_final'] for r in group):.1f} | "
                             f"{statistics.mean(r['largest_dip'] for r in group):.1f} | "
                             f"{statistics.mean(r['rankme_final'] for r in group):.1f} | "
                             f"{statistics.mean(r['spikes'] for r in group):.1f} |")
    return '\n'.join(lines) + '\n'


def main(argv=None):
    p = argparse.ArgumentParser(prog='python -m moco.tools.study', description=__doc__.splitlines()[0])
    p.add_argument('--out', default=os.path.join(ROOT, 'output', 'study'), help='folder of the runs and results')
    p.add_argument('--lrs', type=float, nargs='+', default=[5e-4, 8e-3, 3e-2],
                   help='base learning rates (x batch / 256; default: 5e-4 8e-3 3e-2)')
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1])
    p.add_argument('--epochs', type=int, default=8)
    p.add_argument('--warmup-epochs', type=int, default=1)
    p.add_argument('--data', default=None, help='a folder with train/ and val/ (default: the shipped demo images)')
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    data = args.data or demo_data.extract(os.path.join(args.out, 'data'))
    rows = []
    grid = [(lr, frozen, seed) for lr in args.lrs for frozen in (False, True) for seed in args.seeds]
    for k, (lr, frozen, seed) in enumerate(grid, 1):
        run_dir = os.path.join(args.out, run_name(lr, frozen, seed))
        finished = os.path.join(run_dir, f'checkpoint_{args.epochs - 1:04d}.pth.tar')
        if not os.path.isfile(finished):
            tic = time.time()
            print(f'[{k}/{len(grid)}] {run_name(lr, frozen, seed)} ...', flush=True)
            with open(os.path.join(args.out, run_name(lr, frozen, seed) + '.out'), 'w') as log:
                rc = subprocess.call(command(data, run_dir, lr, frozen, seed, args.epochs, args.warmup_epochs),
                                     stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                     env=dict(os.environ, OMP_NUM_THREADS=os.environ.get('OMP_NUM_THREADS', '2')))
            if rc != 0:
                raise SystemExit(f'error: {run_name(lr, frozen, seed)} failed (rc {rc}); '
                                 f'see its .out file in {args.out}')
            print(f'    {time.time() - tic:.0f} s', flush=True)
        rows.append(dict(lr=lr, frozen=frozen, seed=seed, **summarise(run_dir)))
        with open(os.path.join(args.out, 'study.json'), 'w') as f:
            json.dump(rows, f, indent=1)
    from moco.tools.plot import plot_gradients
    for lr in args.lrs:
        run = run_name(lr, False, args.seeds[0])
        plot_gradients(os.path.join(args.out, run), os.path.join(args.out, f'{run}.png'),
                       title=f'vit_mini_patch4, base lr {lr:g}, learned patch projection, seed {args.seeds[0]}')
    text = table(rows)
    with open(os.path.join(args.out, 'study.md'), 'w') as f:
        f.write(text)
    print(text)
    return rows


if __name__ == '__main__':
    main()
