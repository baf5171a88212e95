"""One epoch of MoCo v3 pretraining."""
import math
import os
import time
from functools import partial

from moco import dist, launch, schedules
from moco.amp import NonFiniteSteps
from moco.checkpoint import LAST_CHECKPOINT
from moco.metrics import MetricLogger, SmoothedValue
from moco.microbatch import micro_batch_step


def train_one_epoch(model, loader, optimizer, amp, epoch, args, run_log, iters_per_epoch, start_iter=0,
                    save_progress=None, nonfinite=None, stop=None, monitors=None):
    """Per iteration: set lr (warmup + cosine) and the momentum coefficient, forward both views,
    backward, step.

    Starts at iteration ``start_iter`` of the epoch (a mid-epoch resume); ``save_progress(epoch, iters_done)``
    is called every ``args.save_every_iters`` iterations. A step whose loss is not finite is skipped;
    ``nonfinite`` (a NonFiniteSteps, kept across epochs by the caller) stops the run after
    ``args.max_nonfinite_steps`` of them in a row. ``stop`` (a launch.StopRequest): after each step, if any
    process received a stop signal, the progress is saved (``save_progress``) and ``launch.Stopped`` raised;
    at the epoch's last step the epoch just ends (the caller saves it and stops). ``monitors`` (a
    monitors.TrainingMonitors): the gradient magnitudes of the logged steps and, with --skip-spikes,
    the spike guard. Returns the epoch's averages (and the monitors' per-epoch fields).

    Host syncs (reads of a device value, each draining the GPU's queue) of a step that is not logged: the
    one read of ``amp.backward_step``, which carries everything the step must know (whether the loss is
    finite, under fp16 whether the GradScaler found inf, --skip-spikes' loss and gradient norm and, with
    several processes, the stop flag: one all-reduce); the stop check then costs nothing. Per step, with
    1 process or several alike:
      * the finiteness check on (the default): 1, in fp32, bf16 and fp16, with or without --skip-spikes;
      * ``--max-nonfinite-steps 0``: 0 in fp32/bf16 and in fp16 with fused AdamW (which reads the
        GradScaler's flag on the device); 1 in fp16 with LARS/SGD (the GradScaler's flag); 1 in any
        precision with --skip-spikes.
    With several processes and no read in the step (the 0s above), the stop flag is all-reduced
    asynchronously and read one step later (a wait for the step before, not a drain; a signal stops every
    process one step later, all after the same step). A logged step adds 2 reads (the losses since the last
    progress line, the gradient magnitudes), a skipped step 1 (its loss, for the warning), the epoch's end
    1 with several processes (the count of unreadable images).
    """
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
    if nonfinite is None:
        nonfinite = NonFiniteSteps(args.max_nonfinite_steps, args.output_dir)
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
        inspect = monitors.after_backward(logged, loss) if monitors is not None else None
        if nonfinite.record(amp.backward_step(loss, optimizer, nonfinite.check, inspect, stop,
                                              backward=micro and micro.backward), loss, epoch, i):
            logger.update(loss=loss.detach(), lr=lr, m=m)
        skipped_images += int(skipped.sum())  # a CPU tensor: no device sync

        step = epoch * iters_per_epoch + i
        if logged:
            done = i - start_iter + 1
            images_per_s = done * x1.shape[0] * args.world_size / (time.time() - tic)
            scalars = dict(lr=lr, moco_momentum=m, images_per_s=images_per_s)
            if 'loss' in logger.meters:
                scalars['loss'] = logger.meters['loss'].value
            run_log.scalars(step, **scalars)
            if monitors is not None:
                grads = monitors.log_step(step, run_log, scalars.get('loss'))
                if math.isfinite(grads.get('first_layer', math.nan)):
                    logger.meters['grad_first'].update(grads['first_layer'])   # shown on this progress line
        if save_progress is not None and args.save_every_iters > 0 and (i + 1) % args.save_every_iters == 0 \
                and i + 1 < iters_per_epoch:
            save_progress(epoch, i + 1)
        if i + 1 < iters_per_epoch:   # at the epoch's last step the caller saves the epoch, then stops
            launch.stop_after_step(stop, f'at epoch {epoch + 1}, step {i + 1} of {iters_per_epoch}: saved '
                                       f'{os.path.join(args.output_dir, LAST_CHECKPOINT)}',
                                 save=save_progress and partial(save_progress, epoch, i + 1), deferred=True)

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
