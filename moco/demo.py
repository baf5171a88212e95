"""The README's first command: MoCo v3 on the small CIFAR-10 set the repository ships, on a laptop CPU.

    python -m moco.demo            (or: make demo)

Unpacks 3,000 training and 1,000 held-out CIFAR-10 JPEGs (32x32, 10 classes), measures the weighted
kNN top-1 of a randomly initialised network's features on the held-out images, pretrains it with
MoCo v3 (main_moco.py, the same code as a full run), prints the loss falling, then measures the kNN
top-1 of the learned features again and linear-probes them (main_lincls.py).
"""
import argparse
import json
import os
import sys
import time

from moco import demo_data, plot

# The recipe of CONFIG.md's "embedded demo": a ResNet-18 at 32 px with the CIFAR recipe of
# solo-learn (LARS, T 0.2, no blur, crop scale 0.08-1), shortened to fit a 2-core CPU: 13 epochs of 11
# steps. For so few steps a faster-moving target (momentum 0.9 -> 1 instead of 0.99 -> 1) and a higher
# lr learn much more (kNN +13.5 points; 0.99 with lr 0.6 for 10 epochs gave +6.3, see README); long
# runs keep 0.99.
DEMO_ARGS = ['-a', 'resnet18', '--image-size', '32', '--no-blur', '--crop-min', '0.08', '--channels-last',
             '-b', '256', '--lr', '1.5', '--wd', '1e-6', '--optimizer', 'lars', '--warmup-epochs', '1',
             '--moco-t', '0.2', '--moco-m', '0.9', '--moco-m-cos', '--moco-dim', '256', '--moco-mlp-dim', '1024',
             '--knn-k', '20', '--knn-t', '0.1', '-p', '4', '--seed', '0']


def get_args_parser():
    p = argparse.ArgumentParser(description='MoCo v3 demo on the shipped CIFAR-10 subset (CPU friendly)')
    p.add_argument('--epochs', default=13, type=int, help='pretraining epochs (default: 13)')
    p.add_argument('--output-dir', default='output/demo', help='parent folder of this demo run')
    p.add_argument('-j', '--workers', default=2, type=int, help='data loading workers')
    p.add_argument('--probe-epochs', default=5, type=int, help='linear-probe epochs (default: 5; 0 = skip)')
    return p


def knn_history(run_dir):
    with open(os.path.join(run_dir, 'log.txt')) as f:
        records = [json.loads(line) for line in f]
    return [(r['epoch'], r['knn_top1']) for r in records if 'knn_top1' in r]


def main(args):
    import main_moco

    run_dir = os.path.join(args.output_dir, time.strftime('run-%Y%m%d-%H%M%S'))
    data = demo_data.extract(os.path.join(args.output_dir, 'data'))
    print(f'demo data: {data} (3,000 train / 1,000 held-out CIFAR-10 images)\nrun folder: {run_dir}\n')

    tic = time.time()
    moco_args = main_moco.get_args_parser().parse_args(
        DEMO_ARGS + ['--epochs', str(args.epochs), '--knn-freq', str(args.epochs),  # at init and at the end
                     '-j', str(args.workers), '--output-dir', run_dir, data])
    main_moco.main(moco_args)
    pretrain_min = (time.time() - tic) / 60

    history = knn_history(run_dir)
    (_, knn_init), (last_epoch, knn_final) = history[0], history[-1]
    lines = ['', f'MoCo v3 demo: ResNet-18, {args.epochs} epochs on 3,000 CIFAR-10 images, '
                 f'{pretrain_min:.1f} min of pretraining',
             '  weighted kNN top-1 on 1,000 held-out images (k=20, T=0.1):',
             f'    random initialisation : {knn_init:5.1f}%',
             f'    after {last_epoch:2d} epochs       : {knn_final:5.1f}%   ({knn_final - knn_init:+.1f} points)']

    if args.probe_epochs > 0:
        import main_lincls
        ckpt = os.path.join(run_dir, f'checkpoint_{args.epochs - 1:04d}.pth.tar')
        probe_args = main_lincls.get_args_parser().parse_args(
            ['-a', 'resnet18', '--image-size', '32', '-b', '256', '--lr', '0.5', '--epochs', str(args.probe_epochs),
             '-j', str(args.workers), '--pretrained', ckpt, '--output-dir', os.path.join(run_dir, 'lincls'),
             '-p', '100', '--seed', '0', data])
        result = main_lincls.main(probe_args)
        if isinstance(result, dict) and 'acc1' in result:
            lines.append(f'  linear probe ({args.probe_epochs} epochs, frozen features): top-1 {result["acc1"]:.1f}% '
                         f'(best {result.get("best_acc1", result["acc1"]):.1f}%)')
    curves = plot.plot([run_dir], os.path.join(run_dir, 'curves.png'), labels=['MoCo v3, ResNet-18'],
                       title='demo: 3,000 CIFAR-10 images, CPU')
    lines.append(f'  loss and kNN curves: {curves}')
    print('\n'.join(lines))
    print(f'\ntotal time {(time.time() - tic) / 60:.1f} min; TensorBoard: tensorboard --logdir {run_dir}')


if __name__ == '__main__':
    sys.exit(main(get_args_parser().parse_args()))
