#!/usr/bin/env python
"""Linear classification on frozen MoCo v3 features (ResNet or ViT), the protocol of the original
``main_lincls.py``: SGD on a linear classifier only, backbone frozen and kept in eval mode.

Launch modes (-b is the TOTAL batch over all processes; --lr is the base lr for batch 256):
  CPU or one GPU, no process group:   python main_lincls.py -a resnet50 --pretrained PRE.pth.tar DIR   [--gpu 0]
  one process per GPU of this node:   python main_lincls.py -a vit_small --lr 3 --pretrained PRE.pth.tar \\
                                          --multiprocessing-distributed --world-size 1 --rank 0 DIR
  several nodes (R = 0..N-1):         ... --multiprocessing-distributed --world-size N --rank R \\
                                          --dist-url tcp://HOST:PORT DIR
  torchrun:                           torchrun --nproc_per_node=8 main_lincls.py --pretrained PRE.pth.tar DIR
  evaluate a trained probe:           python main_lincls.py -e --resume OUT/model_best.pth.tar DIR
-a and --image-size default to the ones the checkpoint was made with.
DIR holds train/<class>/<image> and val/<class>/<image>. PRE.pth.tar is a pretraining checkpoint of
main_moco.py or of the original release (e.g. vit-s-300ep.pth.tar). See CONFIG.md for recipes.
"""

import torch
import torch.nn as nn

from moco import cli, dist, launch
from moco.amp import PRECISIONS, Amp
from moco.checkpoint import (
    check_recorded,
    ddp_state_dict,
    load_backbone,
    load_checkpoint,
    read_backbone,
    restore,
    save_last_and_best,
    single_file_resume,
)
from moco.data import eval_transform, image_folder, is_unlabelled, lincls_train_transform, make_loader, start_epoch
from moco.engine_lincls import (
    LinearProbe,
    distributed_probe,
    evaluate,
    sanity_check,
    sharded_eval_loader,
    train_one_epoch,
)
from moco.errors import UserError
from moco.metrics import RunLog
from moco.models import arch_names, encoder_factory, head_name

CHECKPOINT, BEST = 'checkpoint.pth.tar', 'model_best.pth.tar'


def get_args_parser():
    parser = cli.parser('MoCo v3 linear classification')
    parser.add_argument('data', metavar='DIR', type=cli.path, help='dataset folder with train/ and val/')

    g = parser.add_argument_group('model')
    g.add_argument('-a', '--arch', metavar='ARCH', default=None, type=cli.choice_type(arch_names()),
                   help='model architecture, the one used for pretraining: ' + cli.compact_names(arch_names())
                        + ' (default: the one recorded in the checkpoint, else resnet50)')
    g.add_argument('--pretrained', default='', type=cli.path, metavar='PATH',
                   help='MoCo pretraining checkpoint (ours or the original release); without it the '
                        'probe trains on a randomly initialised backbone')
    g.add_argument('--image-size', default=None, type=int,
                   help='crop size (default: the pretraining\'s, recorded in the checkpoint, else 224); at <= 64 px '
                        'the evaluation resizes to it')

    g = parser.add_argument_group('optimization')
    g.add_argument('--epochs', default=90, type=int, metavar='N', help='number of total epochs to run')
    g.add_argument('--start-epoch', default=0, type=int, metavar='N',
                   help='manual epoch number (useful on restarts)')
    g.add_argument('-b', '--batch-size', default=1024, type=int, metavar='N',
                   help='mini-batch size (default: 1024), the total batch size of all processes')
    g.add_argument('--lr', '--learning-rate', default=0.1, type=float, metavar='LR', dest='lr',
                   help='initial (base) learning rate; the actual lr is base x batch / 256 (default: 0.1; '
                        'the original recipes use 0.1 for ResNet-50 and 3 for ViTs)')
    g.add_argument('--momentum', default=0.9, type=float, metavar='M', help='momentum of SGD')
    g.add_argument('--wd', '--weight-decay', default=0., type=float, metavar='W', dest='weight_decay',
                   help='weight decay (default: 0.)')
    g.add_argument('--amp', default='fp32', choices=PRECISIONS,
                   help='precision of the frozen backbone (default: fp32, as the original probe); '
                        'bf16/fp16/auto run it under autocast for speed, the classifier and loss stay fp32')

    g = parser.add_argument_group('data')
    g.add_argument('-j', '--workers', default=32, type=int, metavar='N',
                   help='number of data loading workers (default: 32), divided among the processes of a node')

    g = launch.add_run_args(parser, './output/lincls', f'folder for {CHECKPOINT}, {BEST}, log.txt and tensorboard/',
                            f"linear-probe checkpoint to resume from, or 'auto' for --output-dir/{CHECKPOINT}",
                            "keeping the last epoch's checkpoint (the epoch in progress is redone)")
    g.add_argument('-e', '--evaluate', dest='evaluate', action='store_true',
                   help='only evaluate the model (give the probe with --resume) on the validation set')
    return parser


def build_model(arch, image_size, num_classes, **encoder_kwargs):
    """A fresh backbone with a ``num_classes`` classifier, frozen but for that classifier (init
    N(0, 0.01), bias 0). Returns (model, head attribute name)."""
    factory = encoder_factory(arch, image_size=image_size, **encoder_kwargs)
    kwargs = {}
    if 'zero_init_residual' in getattr(factory, 'keywords', {}):
        kwargs['zero_init_residual'] = False  # the original probe builds torchvision's default model
    model = factory(num_classes=num_classes, **kwargs)
    head = head_name(arch)
    for name, param in model.named_parameters():
        param.requires_grad = name in (f'{head}.weight', f'{head}.bias')
    classifier = getattr(model, head)
    nn.init.normal_(classifier.weight, mean=0.0, std=0.01)
    nn.init.zeros_(classifier.bias)
    return model, head


def settle_arch_and_size(args, recorded_arch, recorded_size, path):
    """-a and --image-size: as given, else as the checkpoint records them, else resnet50 / 224; an -a
    other than the checkpoint's is a one-line error."""
    if args.arch is not None and recorded_arch is not None and args.arch != recorded_arch:
        raise UserError(f'{path} was pretrained with -a {recorded_arch}, not -a {args.arch} '
                             '(leave -a out to use its own)')
    args.arch = args.arch or recorded_arch or 'resnet50'
    if args.image_size is None:
        args.image_size = recorded_size or 224
        if recorded_size:
            print(f'image size {args.image_size} (as in {path})')


def main_worker(args):
    cli.require_positive(args, 'epochs', 'batch_size', 'print_freq')
    device, stop, base_lr, total_batch = launch.start_run(args, 'linear-probe', hold_output=not args.evaluate)

    encoder_state = None
    if args.pretrained:
        encoder_state, recorded_arch, recorded = read_backbone(args.pretrained)
        settle_arch_and_size(args, recorded_arch, (recorded or {}).get('image_size'), args.pretrained)
    elif args.resume and args.resume != 'auto' and (args.arch is None or args.image_size is None):
        probe = load_checkpoint(args.resume)
        settle_arch_and_size(args, probe.get('arch'), probe.get('image_size'), args.resume)
    else:
        settle_arch_and_size(args, None, None, None)

    train_set = image_folder(args.data, 'train', lincls_train_transform(args.image_size))
    val_set = image_folder(args.data, 'val', eval_transform(args.image_size))
    if is_unlabelled(train_set) or is_unlabelled(val_set):
        raise UserError(f'a linear probe needs labels: {args.data}/train and {args.data}/val must hold class '
                             'folders (python -m moco.tools.split_folder makes them from a folder of class folders)')
    if val_set.classes != train_set.classes:
        raise UserError(f'{args.data}/val has other classes than {args.data}/train')
    num_classes = len(train_set.classes)
    if len(train_set) < total_batch:
        print(f'warning: the {len(train_set)} training images are fewer than one batch (-b {total_batch}): each epoch '
              f'is one step at lr {args.lr:.4g}, scaled for {total_batch} images; lower -b (and the lr follows)')

    model, head = build_model(args.arch, args.image_size, num_classes)
    pretrained = load_backbone(model, encoder_state, head, args.pretrained) if args.pretrained else None
    model.to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 2, 'only the classifier weight and bias are trained'
    optimizer = torch.optim.SGD(trainable, args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    amp = Amp(args.amp, device)

    best_acc1, best_epoch = None, None
    resume, ckpt = single_file_resume(args.resume, args.output_dir, CHECKPOINT, 'linear-probe',
                                      ('state_dict', 'epoch', 'optimizer', 'best_acc1'),
                                      'a pretraining checkpoint goes to --pretrained', allow_existing=args.evaluate)
    if resume:
        check_recorded(ckpt, resume, '-a', args.arch, what='is a probe of')
        restore(ckpt, resume, model, optimizer)
        args.start_epoch, best_acc1, best_epoch = ckpt['epoch'], float(ckpt['best_acc1']), ckpt.get('best_epoch')
        print(f"=> resumed from '{resume}' (epoch {ckpt['epoch']}, best top-1 {best_acc1:.2f})")

    probe = distributed_probe(model, head, amp, device, args.gpu) if args.distributed else \
        LinearProbe(model, head, amp)
    criterion = nn.CrossEntropyLoss()

    print(f'arch {args.arch} | {num_classes} classes | {args.world_size} process(es) on {device.type} | '
          f'total batch {total_batch} ({args.batch_size} per process) | base lr {base_lr:.4g} -> actual lr '
          f'{args.lr:.4g} | backbone precision {amp.precision} | {args.workers} data workers per process')

    pin = device.type == 'cuda'
    val_loader = sharded_eval_loader(val_set, args.batch_size, args.workers, pin_memory=pin)
    if args.evaluate:
        stats = evaluate(probe, val_loader, args)
        dist.cleanup()
        return stats

    train_loader = make_loader(train_set, args.batch_size, args.workers, shuffle=True, drop_last=False,
                               seed=args.seed, pin_memory=pin)
    print(f'{len(train_set)} training images, {len(train_loader)} iterations per epoch; '
          f'{len(val_set)} validation images')
    run_log = RunLog(args.output_dir)
    acc1 = None
    for epoch in range(args.start_epoch, args.epochs):
        start_epoch(train_loader, epoch, args.seed)
        train_stats = train_one_epoch(probe, train_loader, criterion, optimizer, epoch, args, run_log, stop)
        val_stats = evaluate(probe, val_loader, args)
        acc1 = val_stats['acc1']
        is_best = best_acc1 is None or acc1 > best_acc1
        if is_best:
            best_acc1, best_epoch = acc1, epoch + 1
        step = (epoch + 1) * len(train_loader)
        run_log.scalars(step, 'val', top1=acc1, top5=val_stats['acc5'], loss=val_stats['loss'])
        run_log.epoch({'epoch': epoch + 1, **{f'train_{k}': v for k, v in train_stats.items()},
                       **{f'val_{k}': v for k, v in val_stats.items()}, 'best_acc1': best_acc1})
        state = {'epoch': epoch + 1, 'arch': args.arch, 'image_size': args.image_size,
                 'state_dict': ddp_state_dict(model), 'best_acc1': best_acc1, 'best_epoch': best_epoch,
                 'optimizer': optimizer.state_dict()}
        save_last_and_best(state, args.output_dir, CHECKPOINT, BEST, is_best)
        if epoch == args.start_epoch and pretrained is not None:
            sanity_check(model, pretrained, head)
        print(f'epoch {epoch + 1}: top-1 {acc1:.2f}, best top-1 {best_acc1:.2f} (epoch {best_epoch or "?"})')
    run_log.close()
    if acc1 is None:
        print(f'nothing to train: the run is at epoch {args.start_epoch} of {args.epochs}')
    else:
        print(f'=> last top-1 {acc1:.2f} (epoch {args.epochs}) | best top-1 {best_acc1:.2f} '
              f'(epoch {best_epoch or "?"})')  # files of the original release do not record the epoch
    dist.cleanup()
    return {'acc1': acc1, 'best_acc1': best_acc1, 'best_epoch': best_epoch}


def main(args):
    """Run the probe; returns {'acc1' (last epoch), 'best_acc1', 'best_epoch'} (or the evaluation's
    {'acc1', 'acc5', 'loss'} with -e) when it ran in this process, None with spawned workers."""
    return launch.run(main_worker, args)


if __name__ == '__main__':
    main(get_args_parser().parse_args())
