#!/usr/bin/env python
"""End-to-end fine-tuning of a MoCo v3 ViT, as the paper did it with the DeiT code base: on
ImageNet with DeiT's defaults, and on CIFAR-10/100, Flowers-102 and Pets with the original transfer
recipes (see transfer/README.md). Built on timm: Mixup/CutMix, label smoothing, drop-path, AdamW
(no weight decay on biases, norms, pos_embed, cls_token), per-epoch warmup + cosine.

--pretrained takes a file of convert_to_deit.py ({'model': ...}) or a MoCo pretraining checkpoint
(ours or the original release's) directly. Launch modes (-b is the TOTAL batch; the lr is scaled by
batch / 512 as in DeiT):
  one process (CPU or GPU):  python -m transfer.finetune -a vit_base --pretrained P DIR        [--gpu 0]
  one process per GPU:       python -m transfer.finetune ... --multiprocessing-distributed --world-size 1 --rank 0 DIR
  several nodes:             ... --multiprocessing-distributed --world-size N --rank R --dist-url tcp://HOST:PORT DIR
  torchrun:                  torchrun --nproc_per_node=8 -m transfer.finetune ... DIR
  evaluate:                  python -m transfer.finetune -a vit_base -e --resume OUT/best_checkpoint.pth DIR
"""
import os

import torch
from timm.data import Mixup
from timm.data.distributed_sampler import RepeatAugSampler
from timm.layers import trunc_normal_
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler

import vits
from moco import cli, dist, launch
from moco.amp import Amp, NonFiniteSteps, add_training_precision_args
from moco.checkpoint import (
    check_recorded,
    load_backbone,
    read_backbone,
    restore,
    save_last_and_best,
    single_file_resume,
)
from moco.data import is_unlabelled, make_loader, start_epoch
from moco.data.sampler import ignore_stop_signals
from moco.engine_lincls import evaluate, sharded_eval_loader
from moco.errors import UserError
from moco.metrics import RunLog
from moco.models import check_patch_size
from transfer.datasets import DATA_SETS, build_dataset, deit_transform, transfer_transform
from transfer.engine_finetune import train_one_epoch

CHECKPOINT, BEST = 'checkpoint.pth', 'best_checkpoint.pth'


def get_args_parser():
    parser = cli.parser('MoCo v3 ViT fine-tuning (DeiT recipe)', prog='python -m transfer.finetune')
    parser.add_argument('data', metavar='DIR', type=cli.path,
                        help='data set folder (layouts: see transfer/datasets.py)')

    g = parser.add_argument_group('data')
    g.add_argument('--data-set', default='imagenet', choices=DATA_SETS,
                   help='imagenet = any DIR/train, DIR/val class folders (default: imagenet)')
    g.add_argument('--download', action='store_true', help='download CIFAR with torchvision if it is not in DIR')
    g.add_argument('--input-size', '--image-size', default=224, type=int, dest='input_size',
                   help='images input size (default: 224; CIFAR images are upsampled to it, as in the paper)')
    g.add_argument('--aug', default='auto', choices=['auto', 'deit', 'transfer'],
                   help="training augmentation: 'deit' (RandAugment, random erasing; ImageNet) or 'transfer' "
                        "(the original transfer recipe: random-resized crop from 5%% + flip); auto = deit on "
                        "imagenet, transfer on the others")
    g.add_argument('-j', '--workers', default=32, type=int, metavar='N',
                   help='data loading workers (default: 32), divided among the processes of a node')

    g = parser.add_argument_group('model')
    g.add_argument('-a', '--arch', default='vit_base', choices=sorted(vits.VIT_ARCHS),
                   help='ViT of the pretraining (default: vit_base)')
    g.add_argument('--pretrained', default='', type=cli.path, metavar='PATH',
                   help='convert_to_deit.py output or MoCo pretraining checkpoint; without it: random init')
    g.add_argument('--drop-path', default=0.1, type=float, metavar='PCT', help='drop path rate (default: 0.1)')

    g = parser.add_argument_group('optimization (DeiT defaults)')
    g.add_argument('--epochs', default=300, type=int, metavar='N', help='epochs of fine-tuning (DeiT: 300)')
    g.add_argument('-b', '--batch-size', default=1024, type=int,
                   help='TOTAL batch of all processes (default: 1024 = DeiT\'s 16 GPUs x 64)')
    g.add_argument('--lr', default=5e-4, type=float, metavar='LR',
                   help='base lr for batch 512: the actual lr is lr x batch / 512 (default: 5e-4)')
    g.add_argument('--weight-decay', '--wd', default=0.05, type=float, dest='weight_decay',
                   help='AdamW weight decay (default: 0.05), not on biases, norms, pos_embed, cls_token')
    g.add_argument('--min-lr', default=1e-5, type=float, help='lr at the end of the cosine (default: 1e-5)')
    g.add_argument('--warmup-lr', default=1e-6, type=float, help='lr at the start of warmup (default: 1e-6)')
    g.add_argument('--warmup-epochs', default=5, type=int, help='epochs of linear warmup (default: 5)')
    g.add_argument('--smoothing', default=0.1, type=float, help='label smoothing (default: 0.1)')
    add_training_precision_args(g, reference='as DeiT', fast_help='bf16 autocast on GPUs that have it')

    g = parser.add_argument_group('augmentation (DeiT defaults)')
    g.add_argument('--mixup', default=0.8, type=float, help='mixup alpha, on if > 0 (default: 0.8)')
    g.add_argument('--cutmix', default=1.0, type=float, help='cutmix alpha, on if > 0 (default: 1.0)')
    g.add_argument('--mixup-prob', default=1.0, type=float, help='probability of mixup or cutmix per batch')
    g.add_argument('--mixup-switch-prob', default=0.5, type=float,
                   help='probability of cutmix instead of mixup when both are on')
    g.add_argument('--mixup-mode', default='batch', choices=['batch', 'pair', 'elem'])
    g.add_argument('--aa', default='rand-m9-mstd0.5-inc1', type=str, help='RandAugment policy (--aug deit)')
    g.add_argument('--color-jitter', default=0.4, type=float, help='(--aug deit; unused while --aa is set)')
    g.add_argument('--train-interpolation', default='bicubic', type=str, help='(--aug deit)')
    g.add_argument('--reprob', default=0.25, type=float,
                   help='random erasing probability (--aug deit only: the original transfer augmentation has none)')
    g.add_argument('--remode', default='pixel', type=str, help='random erasing mode (--aug deit)')
    g.add_argument('--recount', default=1, type=int, help='random erasing count (--aug deit)')
    g.add_argument('--repeated-aug', action='store_true', default=True,
                   help='repeated augmentation: 3 augmented copies of each image per epoch (DeiT default)')
    g.add_argument('--no-repeated-aug', action='store_false', dest='repeated_aug')

    g = launch.add_run_args(parser, './output/finetune', f'folder for {CHECKPOINT}, {BEST}, log.txt and tensorboard/',
                            f"fine-tuning checkpoint to resume from, or 'auto' for --output-dir/{CHECKPOINT}",
                            "keeping the last epoch's checkpoint (the epoch in progress is redone)",
                            seed=0, seed_help='seed (default: 0, as DeiT)')
    g.add_argument('-e', '--evaluate', action='store_true', help='only evaluate (the model given by --resume)')
    g.add_argument('--eval-freq', default=1, type=int, metavar='N',
                   help='evaluate every N epochs and after the last (default: 1)')
    return parser


def build_model(arch, num_classes, input_size, drop_path):
    """The ViT as DeiT fine-tunes it: drop-path, a learnable position embedding (starting from the
    pretrained sin-cos table) and a fresh head with timm's init (trunc-normal std 0.02, bias 0)."""
    model = vits.VIT_ARCHS[arch](num_classes=num_classes, img_size=input_size, drop_path_rate=drop_path)
    model.pos_embed.requires_grad = True
    trunc_normal_(model.head.weight, std=.02)
    torch.nn.init.zeros_(model.head.bias)
    return model


def fit_position_embedding(state, model):
    """The pretrained weights with a ``pos_embed`` for this model's grid of patches. MoCo v3's is the
    fixed 2-D sin-cos table of its grid, so at another --input-size it is computed again for the new
    grid (the model's own, exactly what MoCo v3 would use there); a learned one (not sin-cos) is
    resampled bicubically, as DeiT's recipe does."""
    pretrained = state.get('pos_embed')
    if pretrained is None or pretrained.shape == model.pos_embed.shape:
        return state
    tokens, dim = pretrained.shape[1] - 1, pretrained.shape[2]
    side = int(round(tokens ** 0.5))
    if side * side == tokens and torch.allclose(pretrained, vits.sincos_pos_embed_2d(side, side, dim), atol=1e-6):
        new = model.pos_embed.detach().clone()
        how = 'its fixed 2-D sin-cos table computed again'
    else:
        from timm.layers import resample_abs_pos_embed
        new = resample_abs_pos_embed(pretrained, list(model.patch_embed.grid_size), num_prefix_tokens=1)
        how = 'resampled bicubically (a learned table)'
    grid = 'x'.join(map(str, model.patch_embed.grid_size))
    print(f'note: the pretrained position embedding is for a {side}x{side} grid of patches, this --input-size gives '
          f'{grid}: {how}')
    return {**state, 'pos_embed': new}


def build_scheduler(optimizer, args):
    """timm's per-epoch cosine with linear warmup, as DeiT builds it (``create_scheduler``)."""
    return CosineLRScheduler(optimizer, t_initial=args.epochs, lr_min=args.min_lr,
                             warmup_lr_init=args.warmup_lr, warmup_t=args.warmup_epochs)


def set_epoch_lr(scheduler, epoch):
    """Set the lr of ``epoch`` as DeiT's loop does: it steps the scheduler after each epoch with that
    epoch's index, so epoch e >= 1 runs at the schedule's value at e - 1 and epoch 0 at its value at 0
    (warmup thus starts one epoch late). Stateless, so a resumed run gets the same lr."""
    scheduler.step(max(epoch - 1, 0))


def main_worker(args):
    cli.require_positive(args, 'epochs', 'batch_size', 'input_size', 'print_freq', 'eval_freq')
    device, stop, base_lr, total_batch = launch.start_run(args, 'fine-tuning', hold_output=not args.evaluate,
                                                          reference_batch=512)  # DeiT's recipe

    aug = args.aug if args.aug != 'auto' else ('deit' if args.data_set == 'imagenet' else 'transfer')
    if aug == 'deit':
        train_tf, val_tf = deit_transform(True, args.input_size, args), deit_transform(False, args.input_size, args)
    else:
        train_tf, val_tf = transfer_transform(True, args.input_size), transfer_transform(False, args.input_size)
        if args.reprob > 0:
            print(f'note: --reprob {args.reprob} has no effect with --aug transfer (nor had it in the original '
                  'transfer runs, whose augmentation has no random erasing)')
    train_set, num_classes = build_dataset(args.data_set, args.data, True, train_tf, args.download)
    val_set, _ = build_dataset(args.data_set, args.data, False, val_tf, args.download)
    if is_unlabelled(train_set) or is_unlabelled(val_set):
        raise UserError(f'fine-tuning needs labels: {args.data}/train and {args.data}/val must hold class folders '
                        '(python -m moco.tools.split_folder makes them from a folder of class folders)')
    mixup_active = args.mixup > 0 or args.cutmix > 0
    if mixup_active and args.batch_size % 2:
        raise UserError(f'mixup/cutmix needs an even batch per process, not {args.batch_size}')

    check_patch_size(args.arch, args.input_size, '--input-size')
    model = build_model(args.arch, num_classes, args.input_size, args.drop_path)
    if args.pretrained:
        pretrained = read_backbone(args.pretrained, allow_deit=True)
        check_recorded({'arch': pretrained.arch}, args.pretrained, '-a', args.arch, what='was pretrained with')
        load_backbone(model, fit_position_embedding(pretrained.state, model), 'head', args.pretrained)
    model.to(device)
    optimizer = create_optimizer_v2(model, 'adamw', lr=args.lr, weight_decay=args.weight_decay, eps=1e-8)
    scheduler = build_scheduler(optimizer, args)
    amp = Amp(args.amp, device, fast=args.fast)

    max_accuracy = 0.
    resume, ckpt = single_file_resume(args.resume, args.output_dir, CHECKPOINT, 'fine-tuning',
                                      ('model', 'epoch', 'optimizer'), 'pretrained weights go to --pretrained',
                                      allow_existing=args.evaluate)
    if resume:
        restore(ckpt, resume, model, optimizer, amp, model_key='model')
        args.start_epoch, max_accuracy = ckpt['epoch'], ckpt.get('max_accuracy', 0.)
        print(f"=> resumed from '{resume}' (epoch {ckpt['epoch']})")
    else:
        args.start_epoch = 0

    if args.distributed:
        model = dist.ddp(model, device, args.gpu)

    mixup_fn = None
    if mixup_active:  # label smoothing is part of the mixed targets
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                         switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=num_classes)
        criterion = SoftTargetCrossEntropy()
    elif args.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        criterion = torch.nn.CrossEntropyLoss()

    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f'arch {args.arch} | {args.data_set}: {num_classes} classes, {len(train_set)} train / {len(val_set)} test '
          f'images | {aug} augmentation | {args.world_size} process(es) on {device.type} | total batch '
          f'{total_batch} ({args.batch_size} per process) | base lr {base_lr:.4g} -> actual lr {args.lr:.4g} | '
          f'{n_train:,} trainable parameters | precision {amp.precision}')

    pin = device.type == 'cuda'
    val_loader = sharded_eval_loader(val_set, max(1, int(1.5 * args.batch_size)), args.workers, pin_memory=pin)
    if args.evaluate:
        evaluate(model, val_loader, args, amp)
        dist.cleanup()
        return

    if args.repeated_aug:
        generator = torch.Generator() if args.seed is not None else None
        train_loader = torch.utils.data.DataLoader(
            train_set, batch_size=args.batch_size, num_workers=args.workers, pin_memory=pin, drop_last=True,
            sampler=RepeatAugSampler(train_set, num_replicas=dist.world_size(), rank=dist.rank()),
            generator=generator, worker_init_fn=ignore_stop_signals)
    else:
        train_loader = make_loader(train_set, args.batch_size, args.workers, shuffle=True, drop_last=True,
                                   seed=args.seed, pin_memory=pin)
    if len(train_loader) == 0:
        raise UserError(f'{len(train_set)} training images give no full batch of {total_batch}; lower -b')

    run_log = RunLog(args.output_dir)
    nonfinite = NonFiniteSteps(args.max_nonfinite_steps, args.output_dir)
    for epoch in range(args.start_epoch, args.epochs):
        start_epoch(train_loader, epoch, args.seed)
        set_epoch_lr(scheduler, epoch)
        train_stats = train_one_epoch(model, train_loader, criterion, optimizer, amp, mixup_fn, epoch, args, run_log,
                                      nonfinite, stop)
        record = {'epoch': epoch + 1, **{f'train_{k}': v for k, v in train_stats.items()}}
        is_best = False
        state = {'model': dist.unwrap(model).state_dict(), 'optimizer': optimizer.state_dict(),
                 'scaler': amp.state_dict(), 'epoch': epoch + 1, 'arch': args.arch, 'max_accuracy': max_accuracy}
        if (epoch + 1) % args.eval_freq == 0 or epoch + 1 == args.epochs:
            test_stats = evaluate(model, val_loader, args, amp)
            record.update({f'test_{k}': v for k, v in test_stats.items()})
            run_log.scalars((epoch + 1) * len(train_loader), 'val', top1=test_stats['acc1'], top5=test_stats['acc5'])
            is_best = test_stats['acc1'] > max_accuracy or not os.path.isfile(os.path.join(args.output_dir, BEST))
            max_accuracy = state['max_accuracy'] = max(max_accuracy, test_stats['acc1'])
            print(f'epoch {epoch + 1}: top-1 {test_stats["acc1"]:.2f}, max top-1 {max_accuracy:.2f}')
        save_last_and_best(state, args.output_dir, CHECKPOINT, BEST, is_best)
        run_log.epoch({**record, 'max_accuracy': max_accuracy})
    run_log.close()
    dist.cleanup()


def main(args):
    return launch.run(main_worker, args)


if __name__ == '__main__':
    main(get_args_parser().parse_args())
