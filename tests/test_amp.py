"""moco/amp.py: a step with a non-finite loss is skipped, and K of them in a row stop the run (NonFiniteSteps)."""

import numpy as np
import pytest
import torch

from moco.amp import NonFiniteLoss, NonFiniteSteps
from moco.engine_pretrain import train_one_epoch


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
    stats = train_one_epoch(model, loader, opt, Amp('fp32', torch.device('cpu')), 0, args, log, n_iters,
                            nonfinite=nonfinite)
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
