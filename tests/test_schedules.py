"""The lr and momentum schedules of the paper and the original release (README), checked against the
formulas at hand-picked points."""
import math

import pytest
import torch

from moco.schedules import lincls_lr, moco_momentum, pretrain_lr, set_lr

LR = 0.6 * 4096 / 256   # the scaled lr the training script passes (base lr x batch / 256)
WARMUP, EPOCHS = 10, 100


def test_pretrain_lr_warmup_is_linear_from_zero():
    assert pretrain_lr(0, LR, WARMUP, EPOCHS) == 0.0
    assert pretrain_lr(5, LR, WARMUP, EPOCHS) == pytest.approx(LR / 2, rel=1e-12)
    assert pretrain_lr(2.5, LR, WARMUP, EPOCHS) == pytest.approx(LR / 4, rel=1e-12)
    # per-iteration (fractional) t: epoch 3, iteration 7 of 20
    t = 3 + 7 / 20
    assert pretrain_lr(t, LR, WARMUP, EPOCHS) == pytest.approx(LR * t / WARMUP, rel=1e-12)


def test_pretrain_lr_end_of_warmup_equals_lr_and_is_continuous():
    assert pretrain_lr(WARMUP, LR, WARMUP, EPOCHS) == pytest.approx(LR, rel=1e-12)
    just_before = pretrain_lr(WARMUP - 1e-9, LR, WARMUP, EPOCHS)
    assert just_before == pytest.approx(LR, rel=1e-8)


def test_pretrain_lr_cosine_phase():
    mid = WARMUP + (EPOCHS - WARMUP) / 2
    assert pretrain_lr(mid, LR, WARMUP, EPOCHS) == pytest.approx(LR / 2, rel=1e-12)
    quarter = WARMUP + (EPOCHS - WARMUP) / 4
    assert pretrain_lr(quarter, LR, WARMUP, EPOCHS) == pytest.approx(
        LR * 0.5 * (1 + math.cos(math.pi / 4)), rel=1e-12)
    t = 37.25
    expected = LR * 0.5 * (1 + math.cos(math.pi * (t - WARMUP) / (EPOCHS - WARMUP)))
    assert pretrain_lr(t, LR, WARMUP, EPOCHS) == pytest.approx(expected, rel=1e-12)
    assert pretrain_lr(EPOCHS, LR, WARMUP, EPOCHS) == pytest.approx(0.0, abs=1e-12)


def test_pretrain_lr_without_warmup_starts_at_lr():
    assert pretrain_lr(0, LR, 0, EPOCHS) == pytest.approx(LR, rel=1e-12)
    assert pretrain_lr(EPOCHS / 2, LR, 0, EPOCHS) == pytest.approx(LR / 2, rel=1e-12)


def test_moco_momentum_cosine_from_m0_to_one():
    m0 = 0.99
    assert moco_momentum(0, m0, EPOCHS) == pytest.approx(m0, abs=1e-15)
    assert moco_momentum(EPOCHS / 2, m0, EPOCHS) == pytest.approx((1 + m0) / 2, abs=1e-15)
    assert moco_momentum(EPOCHS, m0, EPOCHS) == pytest.approx(1.0, abs=1e-15)
    t = 12.5
    assert moco_momentum(t, m0, EPOCHS) == pytest.approx(
        1 - 0.5 * (1 + math.cos(math.pi * t / EPOCHS)) * (1 - m0), abs=1e-15)
    # monotonically increasing
    values = [moco_momentum(t, m0, EPOCHS) for t in range(EPOCHS + 1)]
    assert all(a < b for a, b in zip(values, values[1:]))


def test_lincls_lr_cosine_per_epoch_without_warmup():
    lr, epochs = 0.1 * 1024 / 256, 90
    assert lincls_lr(0, lr, epochs) == pytest.approx(lr, rel=1e-12)
    assert lincls_lr(30, lr, epochs) == pytest.approx(lr * 0.75, rel=1e-12)  # cos(pi/3) = 1/2
    assert lincls_lr(45, lr, epochs) == pytest.approx(lr / 2, rel=1e-12)
    assert lincls_lr(epochs, lr, epochs) == pytest.approx(0.0, abs=1e-12)


def test_set_lr_sets_every_group():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([{'params': [a]}, {'params': [b], 'lr': 5.0}], lr=1.0)
    set_lr(opt, 0.123)
    assert [g['lr'] for g in opt.param_groups] == [0.123, 0.123]


@pytest.mark.parametrize('base', [0.99, 0.996, 0.97])
def test_target_momentum_at_0_half_and_end(base):
    K = 100
    assert moco_momentum(0, base, K) == pytest.approx(base, abs=1e-12)
    assert moco_momentum(K / 2, base, K) == pytest.approx((1 + base) / 2, abs=1e-12)
    assert moco_momentum(K, base, K) == pytest.approx(1, abs=1e-12)
