"""One epoch of MoCo v3 pretraining."""
import math
import time


from moco import schedules
from moco.metrics import MetricLogger, SmoothedValue


def train_one_epoch(model, loader, optimizer, amp, epoch, args, run_log):
    """Per iteration: set lr (warmup + cosine) and the momentum coefficient, forward both views,
    backward, step. No host synchronisation except when a progress line is printed."""
    model.train()
    logger = MetricLogger()
    logger.add_meter('lr', SmoothedValue(window_size=1, fmt='{value:.4g}'))
    logger.add_meter('m', SmoothedValue(window_size=1, fmt='{value:.5f}'))
    iters_per_epoch = len(loader)
    device = args.device
    header = f'Epoch: [{epoch}]'
    tic = time.time()

    for i, (images, _) in enumerate(logger.log_every(loader, args.print_freq, header)):
        t = epoch + i / iters_per_epoch
        lr = schedules.pretrain_lr(t, args.lr, args.warmup_epochs, args.epochs)
        schedules.set_lr(optimizer, lr)
        m = schedules.moco_momentum(t, args.moco_m, args.epochs) if args.moco_m_cos else args.moco_m

        x1 = images[0].to(device, non_blocking=True, memory_format=args.memory_format)
        x2 = images[1].to(device, non_blocking=True, memory_format=args.memory_format)
        with amp.autocast():
            loss = model(x1, x2, m)
        amp.backward_step(loss, optimizer)

        logger.update(loss=loss.detach(), lr=lr, m=m)
        step = epoch * iters_per_epoch + i
        if i % args.print_freq == 0 or i == iters_per_epoch - 1:
            loss_value = logger.meters['loss'].value
            if not math.isfinite(loss_value) and amp.precision != 'fp16':
                raise FloatingPointError(f'loss is {loss_value} at epoch {epoch}, iteration {i}: stopping')
            images_per_s = (i + 1) * x1.shape[0] * args.world_size / (time.time() - tic)
            run_log.scalars(step, loss=loss_value, lr=lr, moco_momentum=m, images_per_s=images_per_s)

    return logger.global_averages()
