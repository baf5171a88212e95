"""One epoch of MoCo v3 pretraining."""
import math
import os
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Optional

from moco import dist, launch, schedules
from moco.amp import Amp, NonFiniteSteps, read_step
from moco.checkpoint import LAST_CHECKPOINT
from moco.metrics import MetricLogger, SmoothedValue
from moco.microbatch import micro_batch_step
from moco.monitors import TrainingMonitors


@dataclass
class Pretraining:
    """What a pretraining run trains with, the same every epoch. ``nonfinite`` (None: a new one) counts
    the skipped non-finite steps across epochs; ``stop`` (a launch.StopRequest) ends the run after a step
    when a process received a stop signal; ``save(epochs_done, iters_done)`` writes a resumable checkpoint
    (every ``args.save_every_iters`` iterations and at a stop; None: none mid-epoch)."""
    model: Any
    optimizer: Any
    amp: Amp
    args: Any
    run_log: Any
    iters_per_epoch: int
    nonfinite: Optional[NonFiniteSteps] = None
    monitors: Optional[TrainingMonitors] = None
    stop: Optional[launch.StopRequest] = None
    save: Optional[Callable] = None

    def __post_init__(self):
        if self.nonfinite is None:
            self.nonfinite = NonFiniteSteps(self.args.max_nonfinite_steps, self.args.output_dir)


def train_one_epoch(run, loader, epoch, start_iter=0):
    """Algorithm 1 of the paper, from iteration ``start_iter`` (a mid-epoch resume) of ``run``'s epoch
    ``epoch``: lr and momentum schedules, the forward of both views, the backward, then the step, unless
    the loss is not finite (``run.nonfinite``) or --skip-spikes skips it. The step's one host read
    (``amp.read_step``) carries all it must know: the finiteness, fp16's found-inf, the guard's values and
    the stop flag (tests/test_syncs.py counts the reads). Returns the epoch's averages."""
    model, optimizer, amp, args, monitors = run.model, run.optimizer, run.amp, run.args, run.monitors
    nonfinite, stop, iters_per_epoch = run.nonfinite, run.stop, run.iters_per_epoch
    model.train()
    method = dist.unwrap(model)   # the MoCo/BYOL/M2T model under DDP and compile wrappers
    micro = micro_batch_step(model, args)   # --micro-batch N: the step by pieces of N images, else None
    logger = MetricLogger()
    logger.add_meter('lr', SmoothedValue(window_size=1, fmt='{value:.4g}'))
    logger.add_meter('m', SmoothedValue(window_size=1, fmt='{value:.5f}'))
    if monitors is not None:   # the first layer's max |gradient| of the logged step (paper, Fig. 4)
        logger.add_meter('grad_first', SmoothedValue(window_size=1, fmt='{value:.3g}'))
    device = args.device
    header = f'Epoch {epoch + 1}/{args.epochs}'
    tic = time.time()
    skipped_images, skipped_before = 0, nonfinite.skipped
    guard = monitors.guard if monitors is not None else None
    if monitors is not None:
        monitors.start_epoch(epoch)

    batches = logger.log_every(loader, args.print_freq, header, total=len(loader), start=start_iter,
                               images_per_step=args.batch_size * args.world_size,
                               steps_after=(args.epochs - epoch - 1) * iters_per_epoch)
    for i, (images, _, skipped) in enumerate(batches, start=start_iter):
        t = epoch + i / iters_per_epoch
        lr = schedules.pretrain_lr(t, args.lr, args.warmup_epochs, args.epochs)
        schedules.set_lr(optimizer, lr)
        m = schedules.moco_momentum(t, args.moco_m, args.epochs) if args.moco_m_cos else args.moco_m
        method.before_step(t / args.epochs)   # e.g. Momentum² Teacher's momentum-BN coefficient

        x1 = images[0].to(device, non_blocking=True, memory_format=args.memory_format)
        x2 = images[1].to(device, non_blocking=True, memory_format=args.memory_format)
        with amp.autocast():
            loss = model(x1, x2, m) if micro is None else micro(x1, x2, m)
        logged = (i - start_iter) % args.print_freq == 0 or i == iters_per_epoch - 1

        optimizer.zero_grad(set_to_none=True)
        amp.backward(loss, micro and micro.backward)   # --micro-batch: the backward by pieces
        inspected = monitors is not None and (logged or guard is not None)
        amp.unscale(optimizer, gradients_read=inspected)   # fp16: the gradients as the step will see them
        measured = monitors.measure() if inspected and logged else None   # gradient magnitudes, on the device
        shared = monitors.guard_values(loss, measured) if inspected else None
        read = read_step(loss, nonfinite.check, amp.found_inf(optimizer, wanted=shared is not None), shared,
                         stop)   # the step's one host sync
        take = monitors.take_step(read.finite, read.overflow, read.shared) if inspected else True
        amp.step(optimizer, take, read.finite, read.overflow)
        if nonfinite.record(read.finite, loss, epoch, i):
            logger.update(loss=loss.detach(), lr=lr, m=m)
        skipped_images += int(skipped.sum())  # a CPU tensor: no device sync

        step = epoch * iters_per_epoch + i
        if logged:
            done = i - start_iter + 1
            images_per_s = done * x1.shape[0] * args.world_size / (time.time() - tic)
            scalars = dict(lr=lr, moco_momentum=m, images_per_s=images_per_s)
            if 'loss' in logger.meters:
                scalars['loss'] = logger.meters['loss'].value
            run.run_log.scalars(step, **scalars)
            if monitors is not None:
                grads = monitors.log_step(step, run.run_log, scalars.get('loss'))
                if math.isfinite(grads.get('first_layer', math.nan)):
                    logger.meters['grad_first'].update(grads['first_layer'])   # shown on this progress line
        if run.save is not None and args.save_every_iters > 0 and (i + 1) % args.save_every_iters == 0 \
                and i + 1 < iters_per_epoch:
            run.save(epoch, i + 1)
        if i + 1 < iters_per_epoch:   # at the epoch's last step the caller saves the epoch, then stops
            launch.stop_after_step(stop, f'at epoch {epoch + 1}, step {i + 1} of {iters_per_epoch}: saved '
                                       f'{os.path.join(args.output_dir, LAST_CHECKPOINT)}',
                                   save=run.save and partial(run.save, epoch, i + 1), deferred=True)

    stats = logger.global_averages()
    stats.pop('grad_first', None)   # per-step values: log.txt gets the epoch's maximum and median instead
    skipped_steps = nonfinite.skipped - skipped_before
    skipped_images = round(dist.all_reduce_mean(skipped_images) * dist.world_size())
    spike_steps = guard.epoch_skipped if guard is not None else 0   # the whole epoch's, across a resume
    if skipped_images or skipped_steps or spike_steps:
        print(f'epoch {epoch + 1}: {skipped_images} unreadable image(s) replaced, {skipped_steps} step(s) skipped '
              f'for a non-finite loss' + (f', {spike_steps} by --skip-spikes' if spike_steps else ''), flush=True)
    stats.update(skipped_images=skipped_images, skipped_steps=skipped_steps)
    return stats
