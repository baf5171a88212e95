"""moco/monitors.py: each quantity against a direct computation on tiny models and known matrices; spikes
on a synthetic series; the spike guard's rule; the collapse tripwire."""
import math

import pytest
import torch

from helpers import small_moco
from moco import monitors as mon
from moco.amp import Amp


def _backward(model, size):
    x = torch.randn(4, 3, size, size)
    model.zero_grad(set_to_none=True)
    model(x, x.flip(-1), 0.99).backward()


@pytest.mark.parametrize('arch, size', [('resnet18_cifar', 16), ('vit_tiny_patch4', 8)])
def test_gradient_magnitudes_are_the_max_abs_gradient_per_layer(arch, size):
    torch.manual_seed(0)
    model = small_moco('mocov3', arch)
    _backward(model, size)
    values = dict(zip(mon.GradientMonitor(model).names,
                      mon.GradientMonitor(model).measure().tolist()))
    enc = model.base_encoder
    modules = {'first_layer': enc.patch_embed if 'vit' in arch else enc.conv1,
               'first_block': enc.blocks[0] if 'vit' in arch else enc.layer1,
               'last_block': enc.blocks[-1] if 'vit' in arch else enc.layer4,
               'projector': enc.head if 'vit' in arch else enc.fc, 'predictor': model.predictor}
    for name, module in modules.items():
        expected = max(p.grad.abs().max().item() for p in module.parameters() if p.grad is not None)
        assert values[name] == pytest.approx(expected, rel=1e-6), name
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    total = math.sqrt(sum((g.double() ** 2).sum().item() for g in grads))
    assert values['total_norm'] == pytest.approx(total, rel=1e-5)
    assert all(p.grad is None for p in model.momentum_encoder.parameters())   # not in any update


def test_a_frozen_patch_projection_reports_no_gradient():
    torch.manual_seed(0)
    model = small_moco('mocov3', 'vit_tiny_patch4', stop_grad_conv1=True)
    _backward(model, 8)
    monitor = mon.GradientMonitor(model)
    values = dict(zip(monitor.names, monitor.measure().tolist()))
    assert math.isnan(values['first_layer'])
    assert all(math.isfinite(values[k]) for k in ('first_block', 'last_block', 'projector', 'predictor', 'total_norm'))


def test_gradients_are_measured_unscaled_under_a_grad_scaler():
    """The paper's magnitudes are of the true gradients: the monitor reads them after unscale_."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    amp = Amp('fp32', torch.device('cpu'))
    amp.scaler = torch.amp.GradScaler('cpu', init_scale=1024., enabled=True)   # fp16's scaler, on the CPU
    seen = {}

    def after_backward(finite):
        seen['grad'] = model.weight.grad.clone()
        return True
    loss = model(torch.ones(1, 3)).sum()
    amp.backward_step(loss, torch.optim.SGD(model.parameters(), lr=0.), after_backward=after_backward)
    assert torch.allclose(seen['grad'], torch.ones(2, 3))   # d(sum)/dW = 1, not 1024


def test_spikes_are_found_with_the_lag_of_the_later_layers():
    det = mon.SpikeDetector(factor=10, window=20, horizon=100, min_history=5)
    base = {'first_layer': 1.0, 'last_block': 0.1, 'projector': 1.0, 'predictor': 1.0}
    for it in range(0, 200, 10):
        values = dict(base)
        if it == 100:
            values['first_layer'] = 30.0      # 30x its median
        if it == 130:
            values['last_block'] = 2.0        # 20x, 30 iterations later
        if it == 150:
            values['predictor'] = 5.0         # 5x: not a spike
        det.update(it, values)
    assert det.events == [{'iteration': 100, 'ratio': 30.0, 'later': {'last_block': 30}}]
    # the spike entered the median (of 20 logged steps) without moving it: a second one is found again
    assert det.update(200, dict(base, first_layer=12.0))[0]['ratio'] == 12.0
    # nothing before min_history values; NaN (a frozen layer) never counts
    quiet = mon.SpikeDetector(min_history=5)
    assert not any(quiet.update(i, {'first_layer': 100.0 * (i == 3), 'last_block': float('nan')}) for i in range(5))


def test_kNN_dips():
    assert mon.dips([(0, 10.), (5, 30.), (10, 28.5), (15, 28.2), (20, 35.)], points=1.0) == [(10, 1.5)]


def test_rankme_of_matrices_of_known_rank():
    torch.manual_seed(0)
    u = torch.linalg.qr(torch.randn(200, 200))[0]
    for rank in (1, 5, 32):
        features = u[:, :rank] @ torch.randn(rank, 64) if rank < 64 else torch.randn(200, 64)
        s = torch.linalg.svdvals(features.double())
        p = s / s.sum() + 1e-7
        assert mon.rankme(features) == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-6)
    equal = torch.linalg.qr(torch.randn(300, 40))[0] * 3.   # 40 equal singular values: RankMe 40
    assert mon.rankme(equal) == pytest.approx(40, rel=1e-4)
    assert mon.rankme(torch.ones(50, 8) * torch.randn(1, 8)) == pytest.approx(1, abs=1e-3)   # collapsed
    wide = torch.linalg.qr(torch.randn(2000, 1100))[0]      # > 1024: through the Gram matrix
    assert mon.rankme(wide) == pytest.approx(1100, rel=1e-3)


def test_feature_std_is_zero_at_collapse_and_about_one_over_sqrt_d_when_spread():
    torch.manual_seed(0)
    assert mon.feature_std(torch.randn(1, 32).repeat(100, 1)) == pytest.approx(0, abs=1e-9)
    assert mon.feature_std(torch.randn(20000, 64)) == pytest.approx(1 / 8, rel=0.02)


def test_rankme_reads_a_fixed_subset():
    assert mon.rankme_indices(10) == list(range(10))
    a, b = mon.rankme_indices(100_000), mon.rankme_indices(100_000)
    assert a == b and len(a) == mon.RANKME_IMAGES and a == sorted(set(a))


def test_collapsed_moco_loss_is_the_loss_of_identical_features():
    model = small_moco('mocov3')
    q = torch.randn(1, 16).repeat(8, 1)
    pair = model.pair_loss(q, q.clone())
    assert (2 * pair).item() == pytest.approx(model.collapsed_loss(8), rel=1e-6)
    assert model.collapsed_loss(8) == pytest.approx(mon.collapsed_moco_loss(model.T, 8))
    assert small_moco('byol').collapsed_loss(8) is None


def test_tripwire_warns_once(capsys):
    trip = mon.CollapseTripwire(collapsed_loss=4 * math.log(16))
    trip.start_epoch(0)
    trip.loss_step(4 * math.log(16))
    assert trip.end_epoch(0) is None                          # the first epoch starts there
    trip.start_epoch(1)
    for _ in range(3):
        trip.loss_step(4 * math.log(16) * (1 + 1e-4))
    assert 'stayed at' in trip.end_epoch(1)
    trip.start_epoch(2)
    trip.loss_step(1.0)
    assert trip.end_epoch(2) is None
    assert trip.rankme(1.1) is not None and capsys.readouterr().out.count('warning:') == 1   # once per run
    assert mon.CollapseTripwire().rankme(20.) is None


def test_spike_guard_skips_outliers_and_keeps_nan_out_of_its_window():
    guard = mon.SpikeGuard(window=50, sigmas=6, min_history=20)
    torch.manual_seed(0)
    for _ in range(30):
        assert guard.decide(torch.tensor(1.0) + 0.01 * torch.randn(()), torch.tensor(5.0) + 0.05 * torch.randn(()))
    assert not guard.decide(torch.tensor(float('nan')), torch.tensor(5.0))   # skipped; NaN not in the window
    assert not guard.decide(torch.tensor(1.0), torch.tensor(50.0))           # a gradient-norm spike
    assert not guard.decide(torch.tensor(3.0), torch.tensor(5.0))            # a loss spike
    assert guard.decide(torch.tensor(1.005), torch.tensor(5.02))
    # every finite value entered the window, the skipped steps' too (OLMo-core's rule); the NaN did not
    assert guard.skipped == 3 and len(guard.history['loss']) == 33 and len(guard.history['grad_norm']) == 34
    assert all(math.isfinite(v) for v in guard.history['loss']) and 50.0 in guard.history['grad_norm']
    again = mon.SpikeGuard(window=50)
    again.load_state_dict(guard.state_dict())
    assert list(again.history['grad_norm']) == list(guard.history['grad_norm']) and again.skipped == 3


def _guard_taken(norms):
    """Whether the default SpikeGuard takes each step of a gradient-norm series (the loss steady)."""
    guard, g = mon.SpikeGuard(), torch.Generator().manual_seed(1)
    return [guard.decide(1.0 + 0.01 * torch.randn((), generator=g), torch.tensor(n)) for n in norms], guard


def test_spike_guard_absorbs_a_lasting_level_shift_and_still_skips_an_isolated_spike():
    """A gradient norm of 1.0 +- 0.01 that rises 15% for good at step 200: the guard skips the first few
    steps of the new level, then takes steps again (before the fix, a skipped step never entered the
    window: 0 of the 200 steps after the shift were taken while the momentum encoder kept moving)."""
    g = torch.Generator().manual_seed(0)
    noise = (0.01 * torch.randn(400, generator=g)).tolist()
    taken, guard = _guard_taken([1.0 + e for e in noise[:200]] + [1.15 + e for e in noise[200:]])
    assert taken[:200].count(False) <= 2              # at most a rare false alarm before the shift
    after = taken[200:]
    assert not after[0]                               # the rise itself is an outlier
    assert after.index(True) <= 5                     # steps are taken again within a few steps
    assert sum(after) >= 190 and all(after[10:])      # ... and from then on
    # an isolated spike (one step at 1.15) is skipped, the steps after it taken
    taken, guard = _guard_taken([1.0 + e for e in noise[:200]] + [1.15] + [1.0 + e for e in noise[201:260]])
    assert taken[200] is False and all(taken[201:]) and guard.skipped == taken.count(False)


def test_an_fp16_overflow_is_not_a_spike():
    """Finite loss, inf gradients (the scaled loss overflows): the GradScaler skips the step and lowers its
    scale, as without --skip-spikes; the guard does not count it (it counted it as a spike before), nor
    does its window change, nor is it a non-finite step."""
    torch.manual_seed(0)
    model = small_moco('mocov3', 'vit_tiny_patch4')
    monitors = mon.TrainingMonitors(model, skip_spikes=True)
    amp = Amp('fp32', torch.device('cpu'))
    amp.scaler = torch.amp.GradScaler('cpu', init_scale=2. ** 100)   # fp16's scaler, on the CPU
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, 3, 8, 8)
    weight = model.base_encoder.patch_embed.proj.weight
    before = weight.detach().clone()

    def step(scale):
        loss = model(x, x.flip(-1), 0.99) * scale
        return amp.backward_step(loss, optimizer, True, monitors.after_backward(False, loss))
    assert step(1e30)   # 1e30 x 2^100 overflows float32: inf gradients, finite loss
    guard = monitors.guard
    assert guard.skipped == 0 and not guard.history['loss'] and not guard.history['grad_norm']
    assert torch.equal(weight, before) and amp.scaler.get_scale() == 2. ** 99   # GradScaler's own skip
    assert step(1.)                                                               # a normal step
    assert not torch.equal(weight, before) and len(guard.history['grad_norm']) == 1


def test_skipped_spike_steps_are_the_epochs_and_survive_a_mid_epoch_resume():
    """log.txt's skipped_spike_steps is the epoch's count (it was the run's running total), and a resume in
    the middle of an epoch gives the same count as an uninterrupted run."""
    def run(monitors, epoch, spikes, skip_to=0):
        monitors.start_epoch(epoch)
        for k in range(skip_to, len(spikes)):
            monitors.guard.decide(torch.tensor(1.0), torch.tensor(spikes[k]))
    epochs = [[1.0] * 25 + [9.0, 1.0, 100.0], [1.0] * 3 + [1e4], [1.0] * 4]   # 2, 1 and 0 spikes
    monitors = mon.TrainingMonitors(small_moco('mocov3'), skip_spikes=True)
    counts = []
    for epoch, spikes in enumerate(epochs):
        run(monitors, epoch, spikes)
        counts.append(monitors.epoch_record(epoch)['skipped_spike_steps'])
    assert counts == [2, 1, 0] and monitors.guard.skipped == 3   # the closing summary's total

    # the same, stopped in epoch 0 after its first spike and resumed from the checkpoint's state
    first = mon.TrainingMonitors(small_moco('mocov3'), skip_spikes=True)
    first.start_epoch(0)
    for value in epochs[0][:26]:
        first.guard.decide(torch.tensor(1.0), torch.tensor(value))
    resumed = mon.TrainingMonitors(small_moco('mocov3'), skip_spikes=True)
    resumed.load_state_dict(first.state_dict())
    run(resumed, 0, epochs[0], skip_to=26)
    again = [resumed.epoch_record(0)['skipped_spike_steps']]
    for epoch, spikes in enumerate(epochs[1:], start=1):
        run(resumed, epoch, spikes)
        again.append(resumed.epoch_record(epoch)['skipped_spike_steps'])
    assert again == counts and resumed.guard.skipped == 3
