#!/usr/bin/env python
"""MoCo v3 self-supervised pretraining (ResNet and ViT); also BYOL and Momentum² Teacher (--method).

Launch modes (-b is always the TOTAL batch over all processes; --lr is the base lr for batch 256):
  CPU or one GPU, no process group:   python main_moco.py -a resnet50 DIR            [--gpu 0]
  one process per GPU of this node:   python main_moco.py --multiprocessing-distributed --world-size 1 --rank 0 DIR
  several nodes (run on each, R=0..N-1):
      python main_moco.py --multiprocessing-distributed --world-size N --rank R --dist-url tcp://HOST:PORT DIR
  torchrun:                           torchrun --nproc_per_node=8 main_moco.py DIR
Without a GPU the same commands run on CPU processes with the gloo backend.
DIR holds train/<class>/<image> or train/<image> (no labels needed; val/<class>/<image> for the optional
kNN monitor). See CONFIG.md for recipes, README "Runs you can follow" for what a run writes.
"""
import argparse
import os

import torch

from moco import cli, dist, launch, microbatch, run_record
from moco.amp import Amp, NonFiniteSteps, add_training_precision_args
from moco.builder import METHODS
from moco.checkpoint import (
    ddp_state_dict,
    describe_keeping,
    pretrain_checkpoint_name,
    resume_pretraining,
    save_pretraining,
)
from moco.data import is_unlabelled_folder, pipelines, start_epoch
from moco.data.eval_sets import knn_sets, train_eval_set
from moco.engine_pretrain import Pretraining, train_one_epoch
from moco.errors import UserError
from moco.knn import feature_monitors
from moco.methods import apply_method_defaults
from moco.metrics import RunLog
from moco.models import BackboneFeatures, arch_names, build_moco, compile_networks, head_name, is_vit
from moco.monitors import TrainingMonitors, dips, rankme_indices
from moco.norm import convert_sync_batchnorm
from moco.optim import build_optimizer
from moco.recompute import enable_grad_checkpointing


def get_args_parser():
    parser = cli.parser('MoCo v3 pretraining')
    parser.add_argument('data', metavar='DIR', type=cli.path, help='dataset folder with train/ (and optionally val/)')

    g = parser.add_argument_group('model')
    g.add_argument('--method', default='mocov3', choices=list(METHODS),
                   help='mocov3 (default), byol (no negatives) or m2t (Momentum² Teacher: momentum BN in the '
                        'teacher, no synchronised BN); --lr, --wd, --moco-m and --optimizer default to the '
                        "method's recipe (CONFIG.md)")
    g.add_argument('-a', '--arch', metavar='ARCH', default='resnet50', type=cli.choice_type(arch_names()),
                   help='model architecture: ' + cli.compact_names(arch_names()) + ' (default: resnet50)')
    g.add_argument('--moco-dim', default=256, type=int, help='feature dimension (default: 256)')
    g.add_argument('--moco-mlp-dim', default=4096, type=int, help='hidden dimension in MLPs (default: 4096)')
    g.add_argument('--moco-m', default=None, type=float,
                   help='moco momentum of updating momentum encoder (default: 0.99; byol: its preset)')
    g.add_argument('--moco-m-cos', action='store_true',
                   help='gradually increase moco momentum to 1 with a half-cycle cosine schedule')
    g.add_argument('--moco-t', default=1.0, type=float, help='softmax temperature (default: 1.0)')
    g.add_argument('--stop-grad-conv1', action='store_true',
                   help='stop-grad after first conv, or patch embedding (the "random patch projection" that '
                        'stabilises ViT training)')
    g.add_argument('--image-size', default=224, type=int, help='crop size of both views (default: 224)')

    g = parser.add_argument_group('optimization')
    g.add_argument('--epochs', default=100, type=int, metavar='N', help='number of total epochs to run')
    g.add_argument('--accept-changes', action='store_true',
                   help='resume although flags that change the mathematics (lr, batch, temperature, ...) differ '
                        'from the ones the run was started with (each is listed; --epochs may always change)')
    g.add_argument('--start-epoch', default=0, type=int, metavar='N',
                   help='epoch a new run starts at (the original\'s flag; --resume takes it from the checkpoint); '
                        'on an --output-dir that holds checkpoints it needs --overwrite')
    g.add_argument('-b', '--batch-size', default=4096, type=int, metavar='N',
                   help='mini-batch size (default: 4096), this is the total batch size of all processes')
    g.add_argument('--lr', '--learning-rate', default=None, type=float, metavar='LR', dest='lr',
                   help='initial (base) learning rate; the actual lr is base x batch / 256 (default: 0.6; '
                        'byol and m2t: their recipe)')
    g.add_argument('--momentum', default=0.9, type=float, metavar='M', help='momentum of SGD solver')
    g.add_argument('--wd', '--weight-decay', default=None, type=float, metavar='W', dest='weight_decay',
                   help='weight decay (default: 1e-6; byol and m2t: their recipe)')
    g.add_argument('--optimizer', default=None, type=str, choices=['lars', 'adamw', 'sgd'],
                   help='optimizer used (default: lars; the paper uses adamw for ViTs; m2t at batch <= 1024: sgd)')
    g.add_argument('--lars-trust', default=0.001, type=float, metavar='ETA',
                   help='trust coefficient of LARS (default: 0.001, as MoCo v3; solo-learn\'s CIFAR recipes: 0.02)')
    g.add_argument('--warmup-epochs', default=10, type=int, metavar='N', help='number of warmup epochs')
    g.add_argument('--channels-last', action=argparse.BooleanOptionalAction, default=None,
                   help='channels_last memory format for convolutional models (same math, only the order of '
                        'float operations differs; faster on GPUs; default: on with CUDA)')
    g.add_argument('--compile', action='store_true',
                   help='torch.compile the encoders and the predictor (same math; slow first steps, faster after)')
    g.add_argument('--grad-checkpointing', action='store_true',
                   help='recompute the activations of each residual block of the online encoder in the backward '
                        'instead of keeping them: the same numbers bit for bit, far less activation memory, about '
                        '10-20%% more compute (ResNets and RegNets: not with --compile)')
    g.add_argument('--micro-batch', default=0, type=int, metavar='N',
                   help='ViTs: compute each step\'s loss and gradients of the whole per-process batch while holding '
                        'the backbone activations of N images at a time (the backbones run over pieces of N, the '
                        'heads and the loss over the batch; the online backbone runs twice): the same training up '
                        'to float rounding, e.g. the paper\'s -b 4096 on one GPU (README "Pretraining"; default: '
                        '0 = off)')
    add_training_precision_args(g, reference="the original's",
                                fast_help='bf16 autocast on GPUs that have it, and the in-memory data pipeline '
                                          'for folders of small images of one size or the GPU one otherwise '
                                          '(with CUDA)')

    g = parser.add_argument_group('data')
    g.add_argument('-j', '--workers', default=32, type=int, metavar='N',
                   help='number of data loading workers (default: 32), divided among the processes of a node')
    g.add_argument('--crop-min', default=0.08, type=float, help='minimum scale for random cropping (default: 0.08)')
    g.add_argument('--no-blur', action='store_true', help='no Gaussian blur in either view (small images)')
    g.add_argument('--data-pipeline', default='auto', choices=pipelines.PIPELINES,
                   help="auto (default): reference, or with --fast memory for folders of small images of one "
                        "size, else gpu with CUDA | reference: PIL/torchvision ops in loader workers, the "
                        "original's pixels | gpu: workers read JPEG files, the batch is decoded (nvJPEG) and both "
                        'views made on the GPU | memory: decode DIR/train once into (GPU) memory, views made '
                        'batch-wise on the device (small images such as CIFAR). gpu and memory: same ops, order '
                        "and ranges as reference, pixels within PIL's 8-bit rounding (README)")
    g.add_argument('--strict-data', action='store_true',
                   help='stop at the first unreadable image (default: skip it, warn once and count it in the log)')

    g = launch.add_run_args(parser, './output', 'folder for checkpoints, log.txt and tensorboard/',
                            "checkpoint to resume from, or 'auto' for the newest readable one in --output-dir",
                            'after saving a resumable checkpoint (mid-epoch: checkpoint_last.pth.tar)')
    g.add_argument('--keep-checkpoints', default=1, type=int, metavar='N',
                   help='keep the N newest checkpoint_*.pth.tar of the run\'s line of training (README "Runs you can '
                        'follow") and those of --keep-every; 0: keep every epoch\'s, as the original (default: 1)')
    g.add_argument('--keep-every', default=20, type=int, metavar='E',
                   help='also keep the checkpoint after every E-th epoch (default: 20, as MAE; 0: none)')
    g.add_argument('--overwrite', action='store_true',
                   help='let a new run (no --resume) start in an --output-dir that holds checkpoints, overwriting '
                        'the ones whose names it writes (with --start-epoch N: checkpoint_NNNN on); the others are '
                        'kept, as another line of training')
    g.add_argument('--save-every-iters', default=0, type=int, metavar='N',
                   help='also save checkpoint_last.pth.tar every N iterations inside an epoch, for long epochs '
                        '(--resume auto continues from it mid-epoch; default: 0 = only at epoch ends)')
    g.add_argument('--knn-freq', '--monitor-freq', default=0, type=int, metavar='N', dest='knn_freq',
                   help='every N epochs (and before training) report weighted kNN top-1 on DIR/val with '
                        'DIR/train as memory (when DIR/train has class folders), and RankMe and the std of the '
                        'normalised backbone features of up to 25,000 training images (README "Monitoring"); '
                        '0 = off')
    g.add_argument('--skip-spikes', action='store_true',
                   help='skip, on every process, a step whose loss or gradient norm exceeds the mean + 6 std of '
                        'the recent steps (off by default: the original takes every finite step)')
    g.add_argument('--knn-k', default=200, type=int, help='neighbours of the kNN monitor (default: 200)')
    g.add_argument('--knn-t', default=0.1, type=float, help='temperature of the kNN monitor (default: 0.1)')
    return parser


def check_args(args):
    """Impossible values are one-line errors before anything is created."""
    cli.require_positive(args, 'batch_size', 'epochs', 'print_freq', 'image_size', 'moco_dim', 'moco_mlp_dim',
                         'moco_t', 'knn_k')
    cli.require_not_negative(args, 'workers', 'save_every_iters', 'keep_checkpoints', 'keep_every', 'knn_freq',
                             'warmup_epochs', 'max_nonfinite_steps', 'micro_batch')
    if args.micro_batch and microbatch.refusal(args.arch):
        raise UserError(microbatch.refusal(args.arch))
    if not 0 < args.crop_min <= 1:
        raise UserError(f'--crop-min must be in (0, 1] (got {args.crop_min})')


def main_worker(args):
    check_args(args)
    apply_method_defaults(args)
    settings = run_record.settings(args, get_args_parser())   # as given (total batch, base lr), for args.json
    device, stop, base_lr, total_batch = launch.start_run(args, 'pretraining')
    print(f'arch {args.arch} | {args.world_size} process(es) on {device.type} | total batch {total_batch} '
          f'({args.batch_size} per process) | base lr {base_lr:.4g} -> actual lr {args.lr:.4g} | '
          f'{args.workers} data workers per process')
    model = build_model(args, device)
    sync_bn, eval_encoder = model.sync_bn, model.eval_encoder
    optimizer = build_optimizer(args.optimizer, model, args.lr, args.weight_decay, args.momentum, args.lars_trust)
    amp = Amp(args.amp, device, fast=args.fast)
    print(f'precision: {amp.precision}')

    shape_flags = run_record.SHAPE_FLAGS + (('image_size', 'stop_grad_conv1') if is_vit(args.arch) else ())
    resume, ckpt, line = resume_pretraining(args, settings, model, optimizer, amp, shape_flags)
    start_iter, data_seed = 0, args.seed
    if resume:
        args.start_epoch, start_iter = ckpt['epoch'], ckpt.get('iter', 0)
        data_seed = ckpt.get('data_seed', data_seed)  # the same data order and views as before the stop
        if args.start_epoch >= args.epochs and not start_iter:
            print(f'the run in {args.output_dir} is finished ({args.start_epoch} of {args.epochs} epochs): nothing to '
                  'do. To train it longer, pass a larger --epochs (the schedules then stretch)')
            dist.cleanup()
            return {'finished': True}
    model = wrap_model(model, args, device, sync_bn)
    loader = build_loader(args, device, data_seed, total_batch)
    iters_per_epoch = len(loader)

    unwrapped = dist.unwrap(model)
    monitors = TrainingMonitors(unwrapped, unwrapped.collapsed_loss(total_batch), skip_spikes=args.skip_spikes)
    if resume:
        monitors.load_state_dict(ckpt.get('monitors'))
    features = FeatureReport(args, loader, getattr(unwrapped, eval_encoder), device, amp) if args.knn_freq > 0 \
        else None
    checkpoints = Checkpoints(args, settings, line, model, optimizer, amp, loader, monitors, eval_encoder)
    # a new run that fails before its first checkpoint (--strict-data at a broken image, say) leaves nothing
    with run_record.undone_on_error(args.output_dir, resume is None and dist.is_main_process(), checkpoints.saved):
        if dist.is_main_process():
            written = run_record.write(args.output_dir, settings, line.record())
            print(f'run folder: {os.path.abspath(args.output_dir)} (checkpoints, log.txt, tensorboard/; settings in '
                  f'{os.path.basename(written)})')
            print(describe_keeping(model, args.optimizer, args.epochs, args.keep_checkpoints, args.keep_every))
        run = Pretraining(model, optimizer, amp, args, RunLog(args.output_dir), iters_per_epoch,
                          NonFiniteSteps(args.max_nonfinite_steps, args.output_dir), monitors, stop,
                          save=checkpoints.save)
        if features is not None and args.start_epoch == 0 and start_iter == 0:
            first = {'epoch': 0}
            checkpoints.knn_top1 = features.report(0, first, monitors, run.run_log, iters_per_epoch)
            run.run_log.epoch(first)
        train(run, loader, start_iter, checkpoints, features)
    run.run_log.close()
    last = os.path.join(args.output_dir, pretrain_checkpoint_name(args.epochs - 1))
    best_knn = best_knn_top1(monitors.evaluations)
    print(closing_summary(args, last, best_knn, monitors))
    dist.cleanup()
    return {'checkpoint': last, 'best_knn_top1': best_knn, 'spikes': monitors.spikes.events}


def train(run, loader, start_iter, checkpoints, features=None):
    """The epochs from ``args.start_epoch`` (from iteration ``start_iter`` of the first): each one's
    log.txt record (with the feature monitors every --knn-freq epochs) and checkpoint, then a stop if a
    process received a stop signal."""
    args, monitors = run.args, run.monitors
    for epoch in range(args.start_epoch, args.epochs):
        start_epoch(loader, epoch, args.seed, skip_batches=start_iter)
        stats = train_one_epoch(run, loader, epoch, start_iter=start_iter)
        start_iter = 0
        record = {'epoch': epoch + 1, **{f'train_{k}': v for k, v in stats.items()}, **monitors.epoch_record(epoch)}
        if features is not None and ((epoch + 1) % args.knn_freq == 0 or epoch + 1 == args.epochs):
            checkpoints.knn_top1 = features.report(epoch + 1, record, monitors, run.run_log, run.iters_per_epoch)
        checkpoints.save(epoch + 1)
        run.run_log.epoch(record)
        if epoch + 1 < args.epochs:
            launch.stop_after_step(run.stop, f'at the end of epoch {epoch + 1}: saved '
                                             f'{os.path.join(args.output_dir, pretrain_checkpoint_name(epoch))}')


def build_model(args, device):
    """The method's model (--grad-checkpointing, synchronised BN with several processes), on ``device``
    in ``args.memory_format`` (set here: channels_last for convolutional models with --channels-last)."""
    model = build_moco(args.arch, args.moco_dim, args.moco_mlp_dim, args.moco_t,
                       image_size=args.image_size, stop_grad_conv1=args.stop_grad_conv1, method=args.method)
    if args.grad_checkpointing:
        n = enable_grad_checkpointing(model, compile=args.compile)
        print(f'gradient checkpointing: {n} residual blocks of the online encoder recomputed in the backward')
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f'{args.method} model: {n_params:,} parameters ({n_trainable:,} trainable) | optimizer {args.optimizer} | '
          f'base momentum {args.moco_m}{" (cosine to 1)" if args.moco_m_cos else ""} | '
          f'weight decay {args.weight_decay}')
    if args.distributed and model.sync_bn:
        model = convert_sync_batchnorm(model, device)
    if args.channels_last is None:
        args.channels_last = device.type == 'cuda'
    channels_last = args.channels_last and not is_vit(args.arch)
    args.memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model.to(device, memory_format=args.memory_format)
    return model


def wrap_model(model, args, device, sync_bn):
    """--compile, and with several processes DDP (--micro-batch: no DDP, the weights broadcast from rank 0)."""
    if args.compile:
        compile_networks(model)
    if args.distributed and args.micro_batch:
        dist.broadcast_from_rank0(model)   # no DDP: moco/microbatch.py averages the gradients itself
    elif args.distributed:
        # gradients live in DDP's all-reduce buckets (no second copy); buckets overlap the backward
        model = dist.ddp(model, device, args.gpu, sync_buffers=sync_bn, gradient_as_bucket_view=True)
    return model


def build_loader(args, device, data_seed, total_batch):
    """The training loader of the resolved --data-pipeline (set in ``args``)."""
    args.data_pipeline = pipelines.resolve(args.data_pipeline, device, args.data, fast=args.fast)
    loader = pipelines.pretrain_loader(args.data_pipeline, args.data, args.batch_size, device, args.image_size,
                                       args.crop_min, blur=not args.no_blur, seed=data_seed, workers=args.workers,
                                       strict=args.strict_data)
    n_train = loader.num_images
    if n_train < total_batch:
        raise UserError(f'{n_train} training images are fewer than one batch of {total_batch}; lower -b')
    print(f'{n_train} training images, {len(loader)} iterations per epoch ({args.data_pipeline} data pipeline)')
    return loader


class FeatureReport:
    """--knn-freq: kNN top-1 (with labelled class folders), RankMe and the feature std of ``encoder``'s
    backbone, evaluated and reported by ``report``."""

    def __init__(self, args, loader, encoder, device, amp):
        if not is_unlabelled_folder(os.path.join(args.data, 'train')):
            self.sets = knn_sets(loader, args.data, args.image_size, args.workers, args.strict_data)
        else:
            print(f'kNN monitor off: it needs labels, and {args.data}/train holds images without class folders; '
                  'RankMe and the feature std only')
            self.sets = (train_eval_set(loader, args.data, args.image_size, args.strict_data), None)
        self.backbone = BackboneFeatures(encoder, head_name(args.arch))
        self.args, self.device, self.amp = args, device, amp

    def report(self, epoch_done, record, monitors, run_log, iters_per_epoch):
        """Evaluate, print and log into ``record`` and ``monitors``; returns kNN top-1 (or None)."""
        args = self.args
        indices = rankme_indices(len(self.sets[0]))
        values = feature_monitors(self.backbone, *self.sets, self.device, indices, k=args.knn_k, T=args.knn_t,
                                  batch_size=max(args.batch_size, 64), workers=args.workers, amp=self.amp)
        record.update(values)
        monitors.evaluations.append((epoch_done, values))
        when = 'at initialisation' if epoch_done == 0 else f'after epoch {epoch_done}'
        label_free = (f"RankMe {values['rankme']:.1f}, feature std {values['feature_std']:.4f} "
                      f'({len(indices)} training images)')
        print(f"kNN top-1 {when}: {values['knn_top1']:.2f}; {label_free}" if 'knn_top1' in values
              else f'{when}: {label_free}')
        run_log.scalars(epoch_done * iters_per_epoch, 'val', **values)
        monitors.tripwire.rankme(values['rankme'])
        return values.get('knn_top1')


class Checkpoints:
    """``save(epochs_done, iters_done=0)``: the original's checkpoint (plus method, eval_encoder,
    data_seed, ``knn_top1``: the last kNN top-1 evaluated, the line of training and, mid-epoch, iter);
    rank 0 writes it. ``saved``: the epochs this start wrote."""

    def __init__(self, args, settings, line, model, optimizer, amp, loader, monitors, eval_encoder):
        self.args, self.settings, self.line, self.eval_encoder = args, settings, line, eval_encoder
        self.model, self.optimizer, self.amp, self.loader, self.monitors = model, optimizer, amp, loader, monitors
        self.knn_top1 = last_knn_top1(monitors.evaluations)   # after a resume, the last one before the stop
        self.saved = []

    def save(self, epochs_done, iters_done=0):
        if not dist.is_main_process():
            return
        args = self.args
        state = {'epoch': epochs_done, 'arch': args.arch, 'method': args.method, 'eval_encoder': self.eval_encoder,
                 'state_dict': ddp_state_dict(self.model),
                 'optimizer': self.optimizer.state_dict(), 'scaler': self.amp.state_dict(),
                 'data_seed': self.loader.sampler.seed, 'args': self.settings, 'monitors': self.monitors.state_dict(),
                 'line': self.line.record()}
        if self.knn_top1 is not None:
            state['knn_top1'] = self.knn_top1
        save_pretraining(state, args.output_dir, epochs_done, iters_done, args.keep_checkpoints, args.keep_every)
        self.saved.append(epochs_done)


def last_knn_top1(evaluations):
    """kNN top-1 of the latest evaluation of the feature monitors ([(epochs done, values)]), or None."""
    return evaluations[-1][1].get('knn_top1') if evaluations else None


def best_knn_top1(evaluations):
    """The best kNN top-1 evaluated after training began, over the whole run: a resumed run's monitors
    hold the evaluations made before the stop (they are in the checkpoint)."""
    return max((values['knn_top1'] for epoch, values in evaluations if epoch > 0 and 'knn_top1' in values),
               default=None)


def closing_summary(args, last, best_knn, monitors=None):
    """What the run wrote where, what its monitors saw, and what to run next."""
    lines = [f'done: {args.epochs} epochs of {args.method} ({args.arch}) in {args.output_dir}',
             f'  last checkpoint: {last}', f'  log: {os.path.join(args.output_dir, "log.txt")} (one line per epoch); '
             f'curves: python -m moco.tools.plot {args.output_dir} --out {os.path.join(args.output_dir, "curves.png")}']
    if best_knn is not None:
        lines.append(f'  best kNN top-1: {best_knn:.2f}')
    if monitors is not None:
        lines += monitor_summary(monitors)
    if is_unlabelled_folder(os.path.join(args.data, 'train')):
        lines.append('  next, a linear probe needs labelled train/ and val/ (class folders): '
                     'python -m moco.tools.split_folder '
                     'makes them from a folder of class folders')
    else:
        lines.append(f'  next, a linear probe: python main_lincls.py --pretrained {last} '
                     f'--output-dir {os.path.join(args.output_dir, "lincls")} {args.data}')
    if is_vit(args.arch):
        lines.append(f'  or fine-tuning: python convert_to_deit.py --input {last} --output '
                     f'{os.path.join(args.output_dir, "deit.pth")} (also a timm folder), '
                     'then python -m transfer.finetune (transfer/README.md)')
    else:
        lines.append(f'  or the backbone for torchvision, timm or detectron2: python convert_to_deit.py --input {last} '
                     f'--output {os.path.join(args.output_dir, "backbone.pth")}')
    return '\n'.join(lines)


def monitor_summary(monitors):
    """Lines of the closing summary: gradient spikes and kNN (or RankMe) dips, collapse, skipped steps."""
    events = monitors.spikes.events
    lines = [f'  gradient spikes (first layer > {monitors.spikes.factor:g}x its running median, logged steps): '
             + (', '.join(f"iteration {e['iteration']} ({e['ratio']}x"
                          + ''.join(f"; {name} +{lag}" for name, lag in sorted(e['later'].items(), key=lambda x: x[1]))
                          + ')' for e in events[:8]) + (f' and {len(events) - 8} more' if len(events) > 8 else '')
                if events else 'none')]
    for name, label in (('knn_top1', 'kNN'), ('rankme', 'RankMe')):
        series = [(e, v[name]) for e, v in monitors.evaluations if name in v]
        if len(series) > 1:
            found = dips(series, 1.0 if name == 'knn_top1' else 0.05 * max(v for _, v in series))
            lines.append(f'  {label} dips: ' + (', '.join(f'after epoch {e} (-{d:g})' for e, d in found)
                                               if found else 'none'))
            break
    if monitors.tripwire.warned:
        lines.append('  warning: the run looked collapsed (see the warning above)')
    if monitors.guard is not None:
        lines.append(f'  steps skipped by --skip-spikes: {monitors.guard.skipped}')
    return lines


def main(args):
    return launch.run(main_worker, args)


if __name__ == '__main__':
    main(get_args_parser().parse_args())
