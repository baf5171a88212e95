"""The README's first command: MoCo v3 on the small CIFAR-10 set the repository ships, on a laptop CPU.

    python -m moco.tools.demo            (or: make demo)

Unpacks the shipped CIFAR-10 JPEGs (32x32, 10 classes; train/ and held-out val/), pretrains a small
ResNet with MoCo v3 through main_moco.py (the same code as a full run; loss, momentum encoder and
predictor of the paper), and prints, side by side on the held-out images (every row reads the same view:
the whole image resized to the training size, as the kNN monitor of main_moco.py reads it), the weighted
kNN top-1 of
  - raw pixels (mean-centred): what a representation has to beat;
  - the network at initialisation, as MoCo v3 initialises it (zero-initialised residual branches)
    and with torchvision's default initialisation;
  - the learned features, every few epochs (the curve is also drawn into curves.png);
and a linear probe (logistic regression) on the frozen learned features. The recipe and what else was
tried are in CONFIG.md ("Embedded demo").
"""
import argparse
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from moco import cli, demo_data
from moco.tools import plot

ARCH = 'resnet10_w16'
# The recipe of CONFIG.md's "Embedded demo": MoCo v3 (LARS, predictor, momentum encoder, InfoNCE at T 0.2,
# no blur, LARS trust coefficient 0.02: solo-learn's CIFAR settings) on a narrow ResNet-10 (widths
# 16-32-64-128), trained on 24 px crops (crop scale 0.2-1) of the 32 px images and evaluated on the whole
# images resized to 24 px. On a CPU the number of steps decides: 24 px costs two thirds of the multiply-adds
# of 32 px, and this network a quarter of the one twice as wide (2.7 M an image instead of 10.6 M): 64 epochs
# take less time than 34 of the wider one and end higher. Base lr 1.0: 1.5 was too high for so short a run.
# The in-memory pipeline (images decoded once; no loader workers to restart every epoch), channels_last
# convolutions (same math) and a projector and predictor with 512 hidden units buy steps. For so short a
# run the target moves faster than in the paper (momentum 0.9 -> 1 instead of 0.99 -> 1). Only the two
# newest checkpoints are kept.
IMAGE_SIZE = 24
DEMO_ARGS = ['-a', ARCH, '--image-size', str(IMAGE_SIZE), '--no-blur', '--crop-min', '0.2',
             '--data-pipeline', 'memory', '--channels-last',
             '-b', '128', '--lr', '1.0', '--lars-trust', '0.02', '--wd', '1e-6', '--optimizer', 'lars',
             '--warmup-epochs', '1',
             '--moco-t', '0.2', '--moco-m', '0.9', '--moco-m-cos', '--moco-dim', '256', '--moco-mlp-dim', '512',
             '--knn-k', '20', '--knn-t', '0.1', '--keep-checkpoints', '2', '-p', '13', '-j', '0']
KNN_K, KNN_T = 20, 0.1


def get_args_parser():
    p = cli.parser('MoCo v3 demo on the shipped CIFAR-10 subset (CPU friendly)', prog='python -m moco.tools.demo')
    p.add_argument('--epochs', default=64, type=int, help='pretraining epochs')
    p.add_argument('--knn-freq', default=8, type=int, help='kNN of the learned features every N epochs')
    p.add_argument('--seed', default=0, type=int, help='seed of the pretraining and of the baselines (default: 0)')
    p.add_argument('--output-dir', default='output/demo', type=cli.path, help='parent folder of this demo run')
    p.add_argument('--probe', action=argparse.BooleanOptionalAction, default=True,
                   help='a linear probe (logistic regression, its L2 chosen by cross-validation on the training '
                        'images) on the frozen features of the last checkpoint')
    p.add_argument('--per-class', default=None, type=int, nargs=2, metavar=('TRAIN', 'VAL'),
                   help='use only the first TRAIN / VAL images of each class (quick checks)')
    return p


def knn_history(run_dir):
    _, _, epochs, top1 = plot.read_log(run_dir)
    return list(zip(epochs, top1))


def normalised(images_uint8):
    from moco.data import tensor_views
    return tensor_views.normalize(images_uint8.float() / 255)


@torch.no_grad()
def features(encoder, images, batch_size=500):
    """Pooled features (the classifier skipped) of uint8 images, in eval mode."""
    from moco.models import BackboneFeatures
    backbone = BackboneFeatures(encoder, 'fc').eval()
    return torch.cat([backbone(normalised(images[i:i + batch_size])) for i in range(0, len(images), batch_size)])


def pretrained_encoder(path, arch=ARCH):
    """The evaluated encoder of a pretraining checkpoint, without the projector (as the probe reads it)."""
    from moco.checkpoint import load_backbone, read_backbone
    from moco.models import encoder_factory, head_name
    encoder = encoder_factory(arch, zero_init_residual=False)(num_classes=1)
    load_backbone(encoder, read_backbone(path).state, head_name(arch), path)
    return encoder


PROBE_WDS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)   # L2 of the mean loss; scikit-learn's C = 1 / (wd N)


def fit_logistic(x, y, wd, max_iter=500):
    """Multinomial logistic regression on ``x`` (N, D) by full-batch L-BFGS to convergence: the mean
    cross-entropy plus ``wd`` / 2 x the squared weights (the bias is not penalised, as in scikit-learn).
    Returns the linear layer."""
    head = nn.Linear(x.shape[1], int(y.max()) + 1)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), lr=1, max_iter=max_iter, history_size=20, tolerance_grad=1e-6,
                            tolerance_change=1e-9, line_search_fn='strong_wolfe')

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(head(x), y) + wd / 2 * head.weight.pow(2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    return head


@torch.no_grad()
def _top1(head, x, y):
    return (head(x).argmax(1) == y).float().mean().item() * 100


def linear_probe(train_f, train_y, val_f, val_y, wds=PROBE_WDS, folds=5, max_iter=500, log=print):
    """A well-tuned logistic regression on frozen features (standardised with the training mean and std;
    no augmentation): the L2 ``wd`` is chosen among ``wds`` by ``folds``-fold cross-validation on the
    training features (fixed folds), then the probe is fitted on all of them and read on the held-out
    set. Returns {'top1', 'wd', 'cv_top1': {wd: mean top-1 over the folds}}."""
    mean, std = train_f.mean(0), train_f.std(0) + 1e-6
    train_f, val_f = (train_f - mean) / std, (val_f - mean) / std
    fold_of = torch.randperm(len(train_f), generator=torch.Generator().manual_seed(0)) % folds
    scores = {}
    for wd in wds:
        tops = [_top1(fit_logistic(train_f[fold_of != k], train_y[fold_of != k], wd, max_iter),
                      train_f[fold_of == k], train_y[fold_of == k]) for k in range(folds)]
        scores[wd] = sum(tops) / folds
        log(f'  probe L2 {wd:g}: top-1 {scores[wd]:.2f} ({folds}-fold cross-validation on the training images)')
    best = max(wds, key=lambda wd: (scores[wd], wd))   # ties: the stronger penalty
    top1 = _top1(fit_logistic(train_f, train_y, best, max_iter), val_f, val_y)
    return {'top1': top1, 'wd': best, 'cv_top1': scores}


def main(args, moco_overrides=()):
    """Runs the demo; returns a dict of the figures it printed. ``moco_overrides``: main_moco.py flags
    appended to the demo's (tests make the run tiny with them)."""
    import main_moco
    from moco.data.eval_sets import eval_resize
    from moco.data.memory import decode_folder
    from moco.knn import knn_top1, raw_pixel_knn_accuracy
    from moco.models import encoder_factory

    tic = time.time()
    run_dir = os.path.join(args.output_dir, time.strftime('run-%Y%m%d-%H%M%S'))
    per_class = None if args.per_class is None else {'train': args.per_class[0], 'val': args.per_class[1]}
    data = demo_data.extract(os.path.join(args.output_dir, 'data'), per_class=per_class)
    moco_args = main_moco.get_args_parser().parse_args(
        DEMO_ARGS + ['--epochs', str(args.epochs), '--knn-freq', str(args.knn_freq), '--seed', str(args.seed),
                     '--output-dir', run_dir, *moco_overrides, data])
    # every row of the table reads the same view of the images: the kNN monitor's (resized whole to the
    # training size)
    size, arch = moco_args.image_size, moco_args.arch
    train_x, train_y, _ = decode_folder(data, 'train')
    val_x, val_y, _ = decode_folder(data, 'val')
    train_x, val_x = eval_resize(train_x, size), eval_resize(val_x, size)
    n_train, n_val = len(train_x), len(val_x)
    print(f'demo data: {data} ({n_train:,} train / {n_val:,} held-out CIFAR-10 images, read at {size} px)\n'
          f'run folder: {run_dir}\n')

    # baselines: raw pixels and the network at initialisation with torchvision's default init (the
    # MoCo v3 init, zero-initialised residual branches, is what main_moco.py measures before its first step)
    raw = raw_pixel_knn_accuracy(train_x, train_y, val_x, val_y, k=KNN_K, T=KNN_T)
    torch.manual_seed(args.seed)
    default_init = encoder_factory(arch, zero_init_residual=False)(num_classes=1)
    default_knn = knn_top1(features(default_init, train_x), train_y, features(default_init, val_x), val_y,
                           k=KNN_K, T=KNN_T)
    print(f'kNN top-1 of raw pixels: {raw:.2f}; of the network with the default initialisation: {default_knn:.2f}\n')

    pre_tic = time.time()
    main_moco.main(moco_args)
    pretrain_min = (time.time() - pre_tic) / 60

    history = knn_history(run_dir)
    (_, moco_init), (last_epoch, learned) = history[0], history[-1]
    best_baseline = max(raw, moco_init, default_knn)
    batch = int(moco_args.batch_size)
    steps = args.epochs * (n_train // batch)
    curve = '  '.join(f'{e}: {a:.1f}' for e, a in history[1:])
    lines = ['', f'MoCo v3 demo: {arch}, {args.epochs} epochs ({steps} steps of {batch}) on {n_train:,} CIFAR-10 '
                 f'images, {pretrain_min:.1f} min of pretraining (seed {args.seed})',
             f'  weighted kNN top-1 on {n_val:,} held-out images at {size} px (k {KNN_K}, T {KNN_T}, the {n_train:,} '
             'training images as memory):',
             f'    raw pixels (mean-centred)                     : {raw:5.1f}%',
             f'    network at initialisation, MoCo v3 init       : {moco_init:5.1f}%   (zero-init residual branches)',
             f'    network at initialisation, torchvision default: {default_knn:5.1f}%',
             f'    {f"learned features, after {last_epoch} epochs":<46s}: {learned:5.1f}%   '
             f'({learned - best_baseline:+.1f} points against the best of the three)',
             f'    kNN curve (epoch: top-1): {curve}']
    # image_size: the side of the images every row read
    result = {'image_size': train_x.shape[-1], 'raw_pixels': raw, 'init_moco': moco_init, 'init_default': default_knn,
              'learned': learned,
              'knn_curve': history, 'pretrain_min': pretrain_min, 'run_dir': run_dir}

    if args.probe:
        ckpt = os.path.join(run_dir, f'checkpoint_{args.epochs - 1:04d}.pth.tar')
        encoder = pretrained_encoder(ckpt, arch)
        train_f, val_f = features(encoder, train_x), features(encoder, val_x)
        print(f'\nlinear probe on the frozen features of {ckpt}:')
        probe = linear_probe(train_f, train_y, val_f, val_y)
        lines.append(f'  linear probe (logistic regression on the frozen features, L2 {probe["wd"]:g} chosen by 5-fold '
                     f'cross-validation on the training images): top-1 {probe["top1"]:.1f}%')
        result.update(probe=probe['top1'], probe_wd=probe['wd'])
    curves = plot.plot([run_dir], os.path.join(run_dir, 'curves.png'), labels=[f'MoCo v3, {arch}'],
                       title=f'demo: {n_train:,} CIFAR-10 images, CPU')
    lines.append(f'  loss and kNN curves: {curves}')
    total_min = (time.time() - tic) / 60
    lines.append(f'  total time {total_min:.1f} min (pretraining {pretrain_min:.1f}); '
                 f'TensorBoard: tensorboard --logdir {run_dir}')
    print('\n'.join(lines))
    result['total_min'] = total_min
    return result


if __name__ == '__main__':
    main(get_args_parser().parse_args())
