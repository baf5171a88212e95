"""moco/amp.py: a step with a non-finite loss is skipped, and K of them in a row stop the run (NonFiniteSteps)."""

import numpy as np
import pytest
import torch

from moco.amp import NonFiniteLoss, NonFiniteSteps
from moco.engine_pretrain import Pretraining, train_one_epoch


class _Scripted(torch.nn.Module):
    """A one-parameter 'MoCo' whose loss is NaN at the listed iterations."""

    def __init__(self, nan_at):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.nan_at, self.calls, self.finite_losses = set(nan_at), 0, []

    def before_step(self, progress):   # the per-step hook of every method class (moco/builder.py)
        pass

    def forward(self, x1, x2, m):
        loss = self.w * x1.mean() * 0 + self.w ** 2
        if self.calls in self.nan_at:
            loss = loss * float('nan')
        else:
            self.finite_losses.append(loss.item())
        self.calls += 1
        return loss


def _train(model, n_iters, max_nonfinite, tmp_path):
    from types import SimpleNamespace

    from moco.amp import Amp
    x = torch.zeros(2, 3, 2, 2)
    loader = [([x, x], torch.zeros(2), torch.zeros(2, dtype=torch.long))] * n_iters
    args = SimpleNamespace(lr=0.1, batch_size=2, warmup_epochs=0, epochs=1, moco_m=0.99, moco_m_cos=False,
                           device=torch.device('cpu'), memory_format=torch.contiguous_format, print_freq=100,
                           world_size=1, save_every_iters=0,
                           max_nonfinite_steps=max_nonfinite, output_dir=str(tmp_path), method='mocov3')
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    history = []
    orig_step = opt.step
    opt.step = lambda *a, **k: (orig_step(*a, **k), history.append(model.calls - 1))
    log = SimpleNamespace(scalars=lambda *a, **k: None)
    nonfinite = NonFiniteSteps(max_nonfinite, str(tmp_path))
    stats = train_one_epoch(Pretraining(model, opt, Amp('fp32', torch.device('cpu')), args, log, n_iters, nonfinite),
                            loader, 0)
    return stats, nonfinite.streak, history


def test_nonfinite_steps_are_skipped(tmp_path):
    model = _Scripted(nan_at=[1, 2, 4])
    stats, streak, stepped = _train(model, 6, max_nonfinite=3, tmp_path=tmp_path)
    assert stepped == [0, 3, 5] and streak == 0
    assert stats['skipped_steps'] == 3 and torch.isfinite(model.w)
    assert len(set(model.finite_losses)) == 3                               # the skipped steps changed nothing
    assert abs(stats['loss'] - np.mean(model.finite_losses)) < 1e-6         # the average of finite losses only


def test_k_nonfinite_steps_in_a_row_stop_the_run(tmp_path):
    model = _Scripted(nan_at=[2, 3, 4])
    with pytest.raises(NonFiniteLoss, match='3 consecutive steps'):
        _train(model, 6, max_nonfinite=3, tmp_path=tmp_path)
    assert model.calls == 5 and torch.isfinite(model.w) and model.w.item() < 1


def _scaled_steps(optimizer_name, via_amp, multipliers, after_backward=False):
    """Weights, scale and growth tracker after each step of a GradScaler on the CPU (fp16's logic) over
    losses scaled by ``multipliers`` (1e30: the scaled loss overflows, an inf step): through
    ``Amp.backward_step`` or through the textbook loop (scale, backward, step, update)."""
    from moco.amp import Amp
    from moco.optim import build_optimizer
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    if optimizer_name == 'adamw_fused':   # decides on the device from GradScaler's flag (as fused AdamW on CUDA)
        optimizer = torch.optim.AdamW(model.parameters(), 0.1, weight_decay=1e-4, fused=True)
    else:
        optimizer = build_optimizer(optimizer_name, model, 0.1, 1e-4)
    amp = Amp('fp32', torch.device('cpu'))
    amp.scaler = scaler = torch.amp.GradScaler('cpu', init_scale=2. ** 96, growth_interval=2)
    x, out = torch.randn(16, 4, generator=torch.Generator().manual_seed(1)), []
    for k, mult in enumerate(multipliers):
        loss = model(x[k % 4::4]).square().mean() * mult
        if via_amp:
            amp.backward_step(loss, optimizer, True, (lambda finite: True) if after_backward else None)
        else:
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        out.append(([p.detach().clone() for p in model.parameters()], scaler.get_scale(),
                    scaler._get_growth_tracker()))
    return out


@pytest.mark.parametrize('optimizer_name', ['lars', 'sgd', 'adamw', 'adamw_fused'])
@pytest.mark.parametrize('after_backward', [False, True])
def test_the_folded_grad_scaler_decision_is_the_grad_scalers(optimizer_name, after_backward):
    """Under fp16, Amp.backward_step reads whether the GradScaler found inf with the step's other values
    and steps itself (LARS, SGD) instead of letting GradScaler.step read it again: the same skips, scale
    updates and weights, bit for bit, as the textbook loop (fused AdamW: GradScaler.step, as before)."""
    multipliers = [1, 1, 1e30, 1, 1, 1, 1, 1e30, 1e30, 1, 1]   # overflows, backoffs and growths
    ours = _scaled_steps(optimizer_name, True, multipliers, after_backward)
    reference = _scaled_steps(optimizer_name, False, multipliers)
    scales = [s for _, s, _ in reference]
    assert len(set(scales)) >= 3   # the scale went down and up
    for (w, s, g), (w_ref, s_ref, g_ref) in zip(ours, reference):
        assert s == s_ref and g == g_ref
        assert all(torch.equal(a, b) for a, b in zip(w, w_ref))


def test_a_grad_scaler_without_its_private_flag_decides_by_itself(monkeypatch):
    """If a torch keeps the GradScaler's found-inf flag elsewhere, GradScaler.step decides (one more read)."""
    import moco.amp
    monkeypatch.setattr(moco.amp, 'found_inf_of', lambda scaler, optimizer: None)
    multipliers = [1, 1e30, 1, 1]
    ours, reference = _scaled_steps('lars', True, multipliers), _scaled_steps('lars', False, multipliers)
    for (w, s, g), (w_ref, s_ref, g_ref) in zip(ours, reference):
        assert s == s_ref and g == g_ref and all(torch.equal(a, b) for a, b in zip(w, w_ref))
