"""Linear classification on frozen features: the probe model, one training epoch, evaluation, and
the check that the backbone stayed frozen.

``evaluate`` and ``sharded_eval_loader`` are shared with ``transfer/finetune.py``.
References: facebookresearch/moco-v3 main_lincls.py (train, validate, sanity_check);
facebookresearch/mae engine_finetune.py (engine layout).
"""
import math
from contextlib import nullcontext

import torch
import torch.nn as nn

from moco import dist, launch, schedules
from moco.data.sampler import ignore_stop_signals
from moco.metrics import MetricLogger, SmoothedValue, accuracy
from moco.models import BackboneFeatures


class LinearProbe(nn.Module):
    """Frozen backbone -> classifier, computed as the original's ``model(images)``, but cheaper:
    the backbone runs under ``no_grad`` (its parameters are frozen, so no gradient is lost) and, if
    asked, under ``amp`` autocast; the classifier and the loss always see fp32 features.

    ``classifier`` defaults to the encoder's own head; pass its DDP wrapper when distributed.
    """

    def __init__(self, encoder, head, amp, classifier=None):
        super().__init__()
        self.features = BackboneFeatures(encoder, head)
        self.classifier = getattr(encoder, head) if classifier is None else classifier
        self.amp = amp

    def forward(self, x):
        with torch.no_grad(), self.amp.autocast():
            feats = self.features(x)                     # (N, C), detached
        return self.classifier(feats.float())            # (N, num_classes) fp32


def distributed_probe(model, head, amp, device, gpu=None):
    """The LinearProbe of ``model`` for several processes: the whole model (a random backbone too, when
    nothing was pretrained) starts as rank 0's, as when the original wraps all of it in DDP, and only the
    classifier, the one part with gradients, is wrapped in DDP."""
    dist.broadcast_from_rank0(model)
    return LinearProbe(model, head, amp, dist.ddp(getattr(model, head), device, gpu))


def train_one_epoch(model, loader, criterion, optimizer, epoch, args, run_log, stop=None):
    """One epoch of SGD on the classifier, at the lr of this epoch (cosine per epoch, no warmup). On a
    stop signal (``stop``) it ends after the current step: the checkpoint of the previous epoch is the
    one to resume from (the epoch is redone)."""
    # Under the linear classification protocol no part of the pretrained model may change:
    # BatchNorm in train mode would update its running statistics even without gradients.
    model.eval()
    lr = schedules.lincls_lr(epoch, args.lr, args.epochs)
    schedules.set_lr(optimizer, lr)
    logger = MetricLogger()
    logger.add_meter('lr', SmoothedValue(window_size=1, fmt='{value:.4g}'))
    iters = len(loader)
    steps = logger.log_every(loader, args.print_freq, f'Epoch {epoch + 1}/{args.epochs}',
                             images_per_step=args.batch_size * args.world_size)
    for i, (images, target, _) in enumerate(steps):
        images = images.to(args.device, non_blocking=True)
        target = target.to(args.device, non_blocking=True)
        output = model(images)
        loss = criterion(output, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        acc1, acc5 = accuracy(output, target, topk=topk(output))
        n = images.shape[0]
        logger.update(loss=loss.detach(), n=n)
        logger.update(acc1=acc1, acc5=acc5, n=n)
        logger.update(lr=lr)
        if i % args.print_freq == 0 or i == iters - 1:
            loss_value = logger.meters['loss'].value
            if not math.isfinite(loss_value):
                raise FloatingPointError(f'loss is {loss_value} at epoch {epoch + 1}, step {i + 1}: stopping')
            run_log.scalars(epoch * iters + i, loss=loss_value, lr=lr)
        launch.stop_after_step(stop, f'at epoch {epoch + 1}, step {i + 1}: the checkpoint of epoch {epoch} in '
                                   f'{args.output_dir} is kept (epoch {epoch + 1} is redone)')
    return logger.global_averages()


def topk(output):
    return (1, min(5, output.shape[1]))


@torch.no_grad()
def evaluate(model, loader, args, amp=None):
    """Top-1/top-5 (percent) and mean cross-entropy over the whole loader, summed exactly over all
    processes (each process evaluates its own shard, see ``sharded_eval_loader``)."""
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction='sum')
    totals = torch.zeros(4, dtype=torch.float64, device=args.device)  # loss, correct@1, correct@5, n
    logger = MetricLogger()
    for images, target in logger.log_every(loader, args.print_freq, 'Test:'):
        images = images.to(args.device, non_blocking=True)
        target = target.to(args.device, non_blocking=True)
        with amp.autocast() if amp is not None else nullcontext():
            output = model(images)
        output = output.float()
        n = target.shape[0]
        acc1, acc5 = accuracy(output, target, topk=topk(output))
        totals += torch.stack([criterion(output, target).double(), acc1.double() * n / 100,
                               acc5.double() * n / 100, torch.tensor(n, dtype=torch.float64, device=args.device)])
        logger.update(acc1=acc1, acc5=acc5, n=n)
    if dist.world_size() > 1:
        torch.distributed.all_reduce(totals)
    loss, correct1, correct5, count = totals.tolist()
    stats = {'acc1': 100. * round(correct1) / count, 'acc5': 100. * round(correct5) / count, 'loss': loss / count}
    print(f' * Acc@1 {stats["acc1"]:.3f} Acc@5 {stats["acc5"]:.3f} loss {stats["loss"]:.4f} '
          f'({int(count)} images)')
    return stats


def sharded_eval_loader(dataset, batch_size, workers, pin_memory=False):
    """Each process gets every world_size-th image, with no padding, so the summed counts of
    ``evaluate`` are those of the whole set, exactly (the original evaluates the whole set on every
    process; the result is the same)."""
    shard = torch.utils.data.Subset(dataset, range(dist.rank(), len(dataset), dist.world_size()))
    return torch.utils.data.DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=workers,
                                       pin_memory=pin_memory, drop_last=False,
                                       worker_init_fn=ignore_stop_signals)


def sanity_check(model, pretrained, head):
    """Linear probing must not change any weight or statistic but the classifier's.

    model: the bare backbone (with classifier ``head``); pretrained: its state before training.
    Raises RuntimeError naming the first tensor that changed.
    """
    for k, v in model.state_dict().items():
        if k in (f'{head}.weight', f'{head}.bias'):
            continue
        if k not in pretrained:
            raise RuntimeError(f'sanity check failed: {k} is not in the pretrained weights')
        if not torch.equal(v.detach().cpu(), pretrained[k].cpu()):
            raise RuntimeError(f'sanity check failed: {k} changed during linear classification '
                               '(the backbone must stay frozen)')
    print('=> sanity check passed: the backbone is unchanged')
