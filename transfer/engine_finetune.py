"""One epoch of end-to-end fine-tuning (DeiT's ``train_one_epoch``): mixup/cutmix, the whole
forward and loss under autocast, one scaled AdamW step per batch. Evaluation is
``moco.engine_lincls.evaluate``.
References: facebookresearch/deit engine.py.
"""
from moco import launch
from moco.metrics import MetricLogger, SmoothedValue


def train_one_epoch(model, loader, criterion, optimizer, amp, mixup_fn, epoch, args, run_log, nonfinite, stop=None):
    """``stop``: a launch.StopRequest; on a stop signal the epoch ends after the current step (the
    checkpoint of the previous epoch is the one to resume from)."""
    model.train()
    logger = MetricLogger()
    logger.add_meter('lr', SmoothedValue(window_size=1, fmt='{value:.4g}'))
    lr = optimizer.param_groups[0]['lr']  # set per epoch by the scheduler
    iters = len(loader)
    steps = logger.log_every(loader, args.print_freq, f'Epoch {epoch + 1}/{args.epochs}')
    for i, (samples, targets, *_) in enumerate(steps):
        samples = samples.to(args.device, non_blocking=True)
        targets = targets.to(args.device, non_blocking=True)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)   # targets become (N, classes) soft labels
        with amp.autocast():
            outputs = model(samples)
            loss = criterion(outputs, targets)
        if nonfinite.record(amp.backward_step(loss, optimizer, nonfinite.check), loss, epoch, i):
            logger.update(loss=loss.detach(), lr=lr)
        if (i % args.print_freq == 0 or i == iters - 1) and 'loss' in logger.meters:
            run_log.scalars(epoch * iters + i, loss=logger.meters['loss'].value, lr=lr)
        launch.stop_after_step(stop, f'at epoch {epoch + 1}, step {i + 1}: the checkpoint of epoch {epoch} in '
                                   f'{args.output_dir} is kept (epoch {epoch + 1} is redone)')
    return logger.global_averages()
