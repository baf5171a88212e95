"""Schedules as pure functions of a fractional epoch t = epoch + i / iters_per_epoch."""
import math


def scaled_lr(base_lr, total_batch, reference_batch=256):
    """The linear scaling rule: the actual lr is base lr x total batch / reference batch (Goyal et al.
    2017). MoCo v3's pretraining and probe use 256; DeiT's fine-tuning recipe (transfer/) uses 512."""
    return base_lr * total_batch / reference_batch


def pretrain_lr(t, lr, warmup_epochs, epochs):
    """Pretraining: linear warmup from 0, then half-cycle cosine to 0 (per iteration).

    ``lr`` is the already scaled rate (base lr x batch / 256).
    """
    if t < warmup_epochs:
        return lr * t / warmup_epochs
    return lr * 0.5 * (1. + math.cos(math.pi * (t - warmup_epochs) / (epochs - warmup_epochs)))


def moco_momentum(t, m0, epochs):
    """--moco-m-cos: momentum rises from m0 to 1 with a half-cycle cosine."""
    return 1. - 0.5 * (1. + math.cos(math.pi * t / epochs)) * (1. - m0)


def lincls_lr(epoch, lr, epochs):
    """Linear probe: half-cycle cosine per EPOCH, no warmup."""
    return lr * 0.5 * (1. + math.cos(math.pi * epoch / epochs))


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group['lr'] = lr
