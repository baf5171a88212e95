"""moco/losses.py: the contrastive loss ctr(q, k) of the paper (Alg. 1), BYOL's regression loss, and the
pairing of views in MoCo.forward."""
import math

import numpy as np
import pytest
import torch

import moco.dist
from helpers import TinyNet
from moco.builder import MoCo_ResNet
from moco.losses import infonce, regression_loss


def _infonce_by_hand(q, keys, T, positives):
    """Loops in float64: normalise, logits q_i . k_j / T, -log softmax at the positive, mean, x 2T.

    q: (N, C) queries; keys: (M, C) all keys (already gathered); positives[i]: index of q_i's key."""
    q = np.asarray(q, dtype=np.float64)
    keys = np.asarray(keys, dtype=np.float64)
    total = 0.0
    for i in range(q.shape[0]):
        qi = q[i] / math.sqrt(sum(x * x for x in q[i]))
        logits = []
        for j in range(keys.shape[0]):
            kj = keys[j] / math.sqrt(sum(x * x for x in keys[j]))
            logits.append(sum(a * b for a, b in zip(qi, kj)) / T)
        log_den = math.log(sum(math.exp(v) for v in logits))
        total += -(logits[positives[i]] - log_den)
    return total / q.shape[0] * 2 * T


@pytest.mark.parametrize('T', [1.0, 0.2])
def test_infonce_matches_hand_computation(T):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(5, 3, generator=gen, dtype=torch.float64) * 3   # not normalised on purpose
    k = torch.randn(5, 3, generator=gen, dtype=torch.float64) * 0.5
    loss = infonce(q, k, T)
    expected = _infonce_by_hand(q.numpy(), k.numpy(), T, positives=list(range(5)))
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(expected, rel=1e-10)


def test_infonce_known_value_for_orthogonal_pairs():
    # q_i = k_i = e_i: logits = I / T, loss = 2T * (log(e^{1/T} + (N-1)) - 1/T)
    N, T = 4, 0.5
    q = torch.eye(N) * 7.0
    k = torch.eye(N)
    expected = 2 * T * (math.log(math.exp(1 / T) + N - 1) - 1 / T)
    assert infonce(q, k, T).item() == pytest.approx(expected, rel=1e-6)


def test_infonce_gradient_flows_to_q():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(4, 6, generator=gen, requires_grad=True)
    k = torch.randn(4, 6, generator=gen)
    infonce(q, k, 1.0).backward()
    assert q.grad is not None and q.grad.abs().sum() > 0


def _fake_world(monkeypatch, rank, world_size, other_keys):
    """Simulate a process group: keys of the other rank are ``other_keys``; this rank's keys sit at
    position ``rank`` of the gathered tensor."""
    calls = []

    def gather(t):
        calls.append(t.detach().clone())
        other = torch.nn.functional.normalize(other_keys, dim=1)   # the other rank gathers normalised keys too
        parts = [other] * world_size
        parts[rank] = t
        return torch.cat(parts, dim=0)

    monkeypatch.setattr(moco.dist, 'rank', lambda: rank)
    monkeypatch.setattr(moco.dist, 'world_size', lambda: world_size)
    monkeypatch.setattr(moco.dist, 'concat_all_gather', gather)
    return calls


@pytest.mark.parametrize('rank', [0, 1])
def test_infonce_label_offset_with_two_processes(monkeypatch, rank):
    N, T = 3, 0.7
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(N, 4, generator=gen, dtype=torch.float64)
    k = q + 0.1 * torch.randn(N, 4, generator=gen, dtype=torch.float64)   # positives clearly the best
    other = torch.randn(N, 4, generator=gen, dtype=torch.float64)
    calls = _fake_world(monkeypatch, rank, 2, other)

    loss = infonce(q, k, T)

    all_keys = torch.cat([k, other]) if rank == 0 else torch.cat([other, k])
    expected = _infonce_by_hand(q.numpy(), all_keys.numpy(), T, positives=[i + N * rank for i in range(N)])
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    # a wrong offset (labels i instead of i + N*rank) would give a clearly different value
    wrong = _infonce_by_hand(q.numpy(), all_keys.numpy(), T, positives=[i + N * (1 - rank) for i in range(N)])
    assert abs(wrong - expected) > 0.1
    assert len(calls) == 1 and calls[0].shape == (N, 4)
    torch.testing.assert_close(calls[0].norm(dim=1), torch.ones(N, dtype=torch.float64))  # gathered normalised


def test_forward_pairs_q1_with_k2_and_q2_with_k1(monkeypatch):
    torch.manual_seed(0)
    model = MoCo_ResNet(TinyNet, dim=16, mlp_dim=32, T=0.5)
    x1, x2 = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    calls = []
    original = model.contrastive_loss

    def record(q, k):
        calls.append((q.detach().clone(), k.detach().clone()))
        return original(q, k)

    monkeypatch.setattr(model, 'contrastive_loss', record)
    loss = model(x1, x2, 0.9)

    # recompute with the model's submodules after the update (parameters no longer change)
    with torch.no_grad():
        q1 = model.predictor(model.base_encoder(x1))
        q2 = model.predictor(model.base_encoder(x2))
        k1 = model.momentum_encoder(x1)
        k2 = model.momentum_encoder(x2)
    assert not torch.allclose(k1, k2, atol=1e-3) and not torch.allclose(q1, q2, atol=1e-3)
    assert len(calls) == 2
    (qa, ka), (qb, kb) = calls
    torch.testing.assert_close(qa, q1)
    torch.testing.assert_close(ka, k2)
    torch.testing.assert_close(qb, q2)
    torch.testing.assert_close(kb, k1)
    torch.testing.assert_close(loss.detach(), infonce(q1, k2, 0.5) + infonce(q2, k1, 0.5))


def test_contrastive_loss_uses_model_temperature():
    model = MoCo_ResNet(TinyNet, dim=16, mlp_dim=32, T=0.2)
    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(4, 16, generator=gen), torch.randn(4, 16, generator=gen)
    assert model.contrastive_loss(q, k).item() == pytest.approx(infonce(q, k, 0.2).item(), rel=1e-6)
    assert model.contrastive_loss(q, k).item() != pytest.approx(infonce(q, k, 1.0).item(), rel=1e-3)


def test_regression_loss_range_and_values():
    p = torch.randn(64, 16)
    assert regression_loss(p, p).abs() < 1e-6                           # aligned: 0
    assert abs(regression_loss(p, -p).item() - 4) < 1e-6                 # opposite: 4 per direction
    q = torch.tensor([[1., 0.], [0., 2.]])
    z = torch.tensor([[0., 3.], [0., 1.]])                               # cos 0 and 1
    assert abs(regression_loss(q, z).item() - (2 + 0) / 2) < 1e-6
    both = regression_loss(p, torch.randn(64, 16)) + regression_loss(torch.randn(64, 16), p)
    assert 0 <= both <= 8
    assert regression_loss(p.half(), p.half()).dtype == torch.float32   # computed in fp32
