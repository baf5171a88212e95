"""Distributed equivalence on CPU (gloo): P processes with per-process batch B/P must give the same
loss, the same (DDP-averaged) gradients, the same optimizer step and the same BatchNorm running
statistics as one process with batch B (the paper's Alg. 1), with BatchNorm synchronised by
``moco.norm.convert_sync_batchnorm``. Also the InfoNCE label offset under a real process group and
``concat_all_gather`` at world size 1; a non-finite loss on one process makes every process skip the
step; and the data each process reads: with two processes, each image of the epoch has the same
label and (reference pipeline) the same two views, bit for bit, as with one process.

One module-scoped fixture spawns the two gloo workers once; they run every case and write their
results to files. The single-process references are computed in the test process from the same
initial weights (saved to a temporary file and loaded by the workers).

Tolerance: float32 throughout. Losses are compared with rtol 1e-5. A tensor ``b`` matches its
reference ``a`` when max|b - a| <= 1e-4 * max|a| + floor: a relative error of 1e-4 of the tensor's own
scale (observed: up to ~3e-5 for the ResNet, ~5e-6 for the ViT), plus a floor for tensors whose exact
value is zero and which therefore hold only rounding noise (the ViT's final ``norm.bias`` gradient: a
constant shift of the features is removed by the projector's first BatchNorm). The floor is 1e-6 of
the largest gradient for gradients and 1e-6 for parameters and running statistics. A sensitivity
control (the same two processes with per-process, unsynchronised BatchNorm) must fail this very test
by a wide margin.
"""
import functools
import os
import time

import pytest
import torch
import torch.nn.functional as F

import vits
from helpers import unassigned_port
from moco import dist as moco_dist
from moco.builder import MoCo_ViT
from moco.losses import infonce
from moco.models import build_moco
from moco.norm import AllReduceBatchNorm, convert_sync_batchnorm
from moco.optim import build_optimizer

pytestmark = pytest.mark.slow   # launches the scripts or several processes (make test-fast leaves it out)

WORLD = 2
B = 8                 # global batch; each process takes its half
IMG = 16              # small images keep the ResNet cheap
M = 0.9               # momentum coefficient of the step
LR, WD = 0.5, 1e-4    # LARS step after the backward
REL_TOL, ABS_TOL = 1e-4, 1e-6
# trainable tensors whose exact gradient is zero at any point (BatchNorm after a bias-free Linear)
ZERO_GRAD = {'resnet': set(), 'vit': {'base_encoder.norm.bias'}}
INFONCE_N, INFONCE_C, INFONCE_T = 3, 5, 0.5
DATA_SEED = 3
PIPELINES = ('reference', 'memory', 'gpu')
TIMEOUT = 300


def _factory(case):
    if case == 'resnet':
        return build_moco('resnet18_cifar', dim=16, mlp_dim=32, T=1.0)
    if case == 'vit':
        return MoCo_ViT(functools.partial(vits.vit_tiny_patch4, depth=2, img_size=IMG), dim=16, mlp_dim=32, T=0.2)
    raise ValueError(case)


CASES = ('resnet', 'vit')


def _make_initial_state(case, path):
    """A model in which every gradient that can be non-zero is, at the first step: zero_init_residual
    and the fresh BN (weight 1, bias 0) are replaced by random affine parameters (and random running
    statistics), and the momentum encoder is moved away from the base encoder so that its update
    inside forward() matters."""
    torch.manual_seed(1234)
    model = _factory(case)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                if mod.affine:
                    mod.weight.uniform_(0.5, 1.5)
                    mod.bias.normal_(0., 0.1)
                mod.running_mean.normal_(0., 0.1)
                mod.running_var.uniform_(0.5, 1.5)
        for pb, pm in zip(model.base_encoder.parameters(), model.momentum_encoder.parameters()):
            pm.copy_(pb + 0.01 * torch.randn_like(pb))
    torch.save(model.state_dict(), path)
    x1 = torch.randn(B, 3, IMG, IMG)
    x2 = torch.randn(B, 3, IMG, IMG)
    return x1, x2


def _step(model, bare, x1, x2):
    """forward + backward + one LARS step; returns (loss, grads, state_dict after the step)."""
    model.train()
    optimizer = build_optimizer('lars', model, LR, WD)
    optimizer.zero_grad(set_to_none=True)
    loss = model(x1, x2, M)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in bare.named_parameters() if p.requires_grad}
    optimizer.step()
    state = {k: v.detach().clone() for k, v in bare.state_dict().items()}
    return loss.detach().clone(), grads, state


def _nonfinite_steps(rank):
    """(stepped, weight unchanged) of one Amp.backward_step per case: a NaN loss on rank 0 only, on rank
    1 only, on neither."""
    from moco.amp import Amp
    amp, result = Amp('fp32', torch.device('cpu')), {}
    for nan_rank in (0, 1, None):
        torch.manual_seed(0)
        net = torch.nn.Linear(3, 1)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
        before = net.weight.detach().clone()
        loss = net(torch.ones(2, 3)).square().sum()
        if rank == nan_rank:
            loss = loss * float('nan')
        stepped = amp.backward_step(loss, optimizer)
        result[str(nan_rank)] = (stepped, torch.equal(net.weight.detach(), before))
    return result


SPIKE_STEP, GUARD_STEPS = 30, 34


def spike_guard_steps(rank, spike_rank=0):
    """Whether each of GUARD_STEPS steps was taken under --skip-spikes' guard (moco.monitors.SpikeGuard
    deciding in Amp.backward_step, as the pretraining loop does): a regression whose loss on
    ``spike_rank`` alone is 1000x at SPIKE_STEP. Runs with or without a process group."""
    from moco.amp import Amp
    from moco.monitors import SpikeGuard, total_grad_norm
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 1)
    model = torch.nn.parallel.DistributedDataParallel(net) if moco_dist.world_size() > 1 else net
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-3)
    amp, guard, taken = Amp('fp32', torch.device('cpu')), SpikeGuard(window=64, min_history=20), []
    data = torch.Generator().manual_seed(1 + rank)
    for step in range(GUARD_STEPS):
        x = torch.randn(8, 4, generator=data)
        loss = (model(x) - x.sum(1, keepdim=True)).square().mean()
        if step == SPIKE_STEP and rank == spike_rank:
            loss = loss * 1000

        def decide(finite, loss=loss):
            taken.append(finite and guard.decide(loss, total_grad_norm(net.parameters())))
            return taken[-1]
        amp.backward_step(loss, optimizer, after_backward=decide)
    return taken, guard.skipped


def _epoch_batches(data, batch_size, pipeline):
    """Every batch of epoch 1 of this process's loader: (views or None, targets)."""
    from moco.data.pipelines import pretrain_loader
    from moco.data.sampler import start_epoch
    loader = pretrain_loader(pipeline, data, batch_size, torch.device('cpu'), IMG, seed=DATA_SEED)
    start_epoch(loader, 1)
    return [(views if pipeline == 'reference' else None, targets) for views, targets, _ in loader]


def _worker(rank, port, tmp, data):
    import torch.distributed as tdist
    torch.set_num_threads(1)
    tdist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', world_size=WORLD, rank=rank)
    try:
        out = {'rank': rank, 'world_size': moco_dist.world_size(), 'dist_rank': moco_dist.rank()}

        # InfoNCE and the all-gather under a real 2-process group
        qk = torch.load(os.path.join(tmp, 'infonce.pt'), weights_only=True)
        n = INFONCE_N
        q = qk['q'][rank * n:(rank + 1) * n].clone().requires_grad_(True)
        k = qk['k'][rank * n:(rank + 1) * n].clone().requires_grad_(True)
        loss = infonce(q, k, INFONCE_T)
        loss.backward()
        out['infonce'] = {'loss': loss.detach(), 'q_grad': q.grad.clone(), 'k_grad_is_none': k.grad is None,
                          'gathered': moco_dist.concat_all_gather(torch.full((2, 3), float(rank)))}

        for case in CASES:
            xs = torch.load(os.path.join(tmp, f'{case}_x.pt'), weights_only=True)
            half = slice(rank * B // WORLD, (rank + 1) * B // WORLD)
            x1, x2 = xs['x1'][half], xs['x2'][half]
            for sync in (True, False):  # False: the sensitivity control with per-process BN
                torch.manual_seed(99 + rank)  # the initial weights come from the file, not this seed
                model = _factory(case)
                model.load_state_dict(torch.load(os.path.join(tmp, f'{case}_init.pt'), weights_only=True))
                if sync:
                    model = convert_sync_batchnorm(model, torch.device('cpu'))
                    n_sync = sum(isinstance(mod, AllReduceBatchNorm) for mod in model.modules())
                    n_bn = sum(isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) for mod in model.modules())
                    out[f'{case}_n_sync_bn'] = (n_sync, n_bn)
                ddp = torch.nn.parallel.DistributedDataParallel(model)
                loss, grads, state = _step(ddp, model, x1, x2)
                out[f'{case}_{"sync" if sync else "local"}'] = {'loss': loss, 'grads': grads, 'state': state}
        out['nonfinite'] = _nonfinite_steps(rank)
        out['spike_guard'] = spike_guard_steps(rank)
        for pipeline in PIPELINES:
            out[f'batches_{pipeline}'] = _epoch_batches(data, B // WORLD, pipeline)
        torch.save(out, os.path.join(tmp, f'rank{rank}.pt'))
    finally:
        tdist.destroy_process_group()


@pytest.fixture(scope='module')
def two_process_results(tmp_path_factory, tiny_folder):
    """Spawn the two gloo workers once; return (tmp dir, [rank 0 results, rank 1 results])."""
    import torch.multiprocessing as mp
    tmp = str(tmp_path_factory.mktemp('dist'))
    g = torch.Generator().manual_seed(7)
    torch.save({'q': torch.randn(WORLD * INFONCE_N, INFONCE_C, generator=g),
                'k': torch.randn(WORLD * INFONCE_N, INFONCE_C, generator=g)}, os.path.join(tmp, 'infonce.pt'))
    for case in CASES:
        x1, x2 = _make_initial_state(case, os.path.join(tmp, f'{case}_init.pt'))
        torch.save({'x1': x1, 'x2': x2}, os.path.join(tmp, f'{case}_x.pt'))
    ctx = mp.spawn(_worker, args=(unassigned_port(), tmp, tiny_folder), nprocs=WORLD, join=False)
    deadline = time.time() + TIMEOUT
    try:
        while not ctx.join(timeout=1):  # raises if a worker failed
            assert time.time() < deadline, f'the {WORLD} gloo workers did not finish in {TIMEOUT} s'
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    results = [torch.load(os.path.join(tmp, f'rank{r}.pt'), weights_only=True) for r in range(WORLD)]
    return tmp, results


@pytest.fixture(scope='module')
def single_process_results(two_process_results):
    """The reference: one process, batch B, plain BatchNorm, no process group."""
    tmp, _ = two_process_results
    assert not moco_dist.is_initialized()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = {}
        for case in CASES:
            model = _factory(case)
            model.load_state_dict(torch.load(os.path.join(tmp, f'{case}_init.pt'), weights_only=True))
            xs = torch.load(os.path.join(tmp, f'{case}_x.pt'), weights_only=True)
            loss, grads, state = _step(model, model, xs['x1'], xs['x2'])
            ref[case] = {'loss': loss, 'grads': grads, 'state': state,
                         'init': torch.load(os.path.join(tmp, f'{case}_init.pt'), weights_only=True)}
        return ref
    finally:
        torch.set_num_threads(threads)


def _mismatches(ref, got, keys, floor=ABS_TOL):
    """Names (with their relative error) where got differs from ref beyond the stated tolerance."""
    bad = []
    for k in keys:
        a, b = ref[k].double(), got[k].double()
        assert a.shape == b.shape, k
        err = (a - b).abs().max().item() if a.numel() else 0.
        scale = a.abs().max().item() if a.numel() else 0.
        if err > REL_TOL * scale + floor:
            bad.append((k, err / max(scale, 1e-30)))
    return bad


def _bn_buffer_keys(state):
    return [k for k in state if k.endswith(('running_mean', 'running_var', 'num_batches_tracked'))]


def test_workers_saw_a_two_process_group(two_process_results):
    _, res = two_process_results
    assert [(r['world_size'], r['dist_rank']) for r in res] == [(2, 0), (2, 1)]


@pytest.mark.parametrize('case', CASES)
def test_every_batchnorm_is_converted(two_process_results, case):
    _, res = two_process_results
    n_sync, n_bn = res[0][f'{case}_n_sync_bn']
    assert n_bn > 0 and n_sync == n_bn
    # ResNet-18: 20 BNs per encoder (+ 2 projector BNs) x 2 encoders + 1 predictor BN
    if case == 'resnet':
        assert n_bn == 2 * (20 + 2) + 1
    else:  # ViT: 3-layer projector (3 BNs) per encoder + 2-layer predictor (2 BNs)
        assert n_bn == 2 * 3 + 2


@pytest.mark.parametrize('case', CASES)
def test_mean_loss_equals_single_process_loss(two_process_results, single_process_results, case):
    _, res = two_process_results
    ref = single_process_results[case]['loss']
    losses = torch.stack([r[f'{case}_sync']['loss'] for r in res])
    assert losses[0] != losses[1]  # each process has its own half of the batch
    torch.testing.assert_close(losses.mean(), ref, rtol=1e-5, atol=0.)


@pytest.mark.parametrize('case', CASES)
def test_averaged_gradients_equal_single_process_gradients(two_process_results, single_process_results, case):
    _, res = two_process_results
    ref = single_process_results[case]['grads']
    got0, got1 = res[0][f'{case}_sync']['grads'], res[1][f'{case}_sync']['grads']
    assert set(got0) == set(ref) == set(got1)
    # non-trivial: every trainable tensor has a gradient well above rounding noise (but the one whose
    # exact gradient is zero), the momentum encoder none
    gmax = max(g.abs().max().item() for g in ref.values())
    assert gmax > 0.1
    assert {k for k, g in ref.items() if g.abs().max() < 1e-4 * gmax} == ZERO_GRAD[case]
    assert not any(k.startswith('momentum_encoder.') for k in ref)
    assert any(k.startswith('base_encoder.') for k in ref) and any(k.startswith('predictor.') for k in ref)
    # DDP made both processes hold the same averaged gradient
    floor = ABS_TOL * gmax
    assert _mismatches(got0, got1, ref, floor) == []
    assert _mismatches(ref, got0, ref, floor) == []


@pytest.mark.parametrize('case', CASES)
def test_step_and_batchnorm_statistics_equal_single_process(two_process_results, single_process_results, case):
    _, res = two_process_results
    ref, init = single_process_results[case]['state'], single_process_results[case]['init']
    got = res[0][f'{case}_sync']['state']
    assert set(got) == set(ref)
    bn_keys = _bn_buffer_keys(ref)
    # the running statistics of every BN (base, momentum encoder, predictor) moved ...
    moved = [k for k in bn_keys if not k.endswith('num_batches_tracked') and not torch.equal(ref[k], init[k])]
    assert len(moved) == len([k for k in bn_keys if not k.endswith('num_batches_tracked')])
    assert all(ref[k].item() == init[k].item() + 2 for k in bn_keys if k.endswith('num_batches_tracked'))
    # ... the same way in both setups (global-batch mean, unbiased global variance)
    assert _mismatches(ref, got, bn_keys) == []
    # parameters after the LARS step (base encoder, predictor) and after the momentum update
    param_keys = [k for k in ref if k not in bn_keys]
    assert any(not torch.equal(ref[k], init[k]) for k in param_keys if k.startswith('momentum_encoder.'))
    assert _mismatches(ref, got, param_keys) == []
    assert _mismatches(ref, res[1][f'{case}_sync']['state'], list(ref)) == []


@pytest.mark.parametrize('case', CASES)
def test_control_without_sync_batchnorm_differs(two_process_results, single_process_results, case):
    """Sensitivity of the comparison above: per-process BN statistics of 4 samples instead of 8 must
    fail the same tolerance, on the gradients and on the running statistics."""
    _, res = two_process_results
    ref = single_process_results[case]
    local = res[0][f'{case}_local']
    floor = ABS_TOL * max(g.abs().max().item() for g in ref['grads'].values())
    bad = _mismatches(ref['grads'], local['grads'], ref['grads'], floor)
    # every gradient but the exactly-zero ones is off, the worst by far more than the tolerance
    assert {k for k, _ in bad} == set(ref['grads']) - ZERO_GRAD[case]
    assert max(err for _, err in bad) > 1000 * REL_TOL
    assert _mismatches(ref['state'], local['state'], _bn_buffer_keys(ref['state'])) != []


def _infonce_by_hand(q, k_all, T, offset):
    qn = q / q.norm(dim=1, keepdim=True)
    kn = k_all / k_all.norm(dim=1, keepdim=True)
    logits = qn @ kn.t() / T
    n = q.shape[0]
    pos = logits[torch.arange(n), torch.arange(n) + offset]
    return (torch.logsumexp(logits, dim=1) - pos).mean() * 2 * T


def test_infonce_labels_are_offset_by_rank(two_process_results):
    tmp, res = two_process_results
    qk = torch.load(os.path.join(tmp, 'infonce.pt'), weights_only=True)
    n = INFONCE_N
    for r in range(WORLD):
        q = qk['q'][r * n:(r + 1) * n].double().requires_grad_(True)
        expected = _infonce_by_hand(q, qk['k'].double(), INFONCE_T, offset=n * r)
        expected.backward()
        got = res[r]['infonce']
        torch.testing.assert_close(got['loss'].double(), expected.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got['q_grad'].double(), q.grad, rtol=1e-4, atol=1e-6)
        assert got['k_grad_is_none']  # the keys get no gradient (gathered under no_grad)
        if r > 0:  # non-trivial: without the offset the loss would be another number
            wrong = _infonce_by_hand(q.detach(), qk['k'].double(), INFONCE_T, offset=0)
            assert abs(wrong.item() - expected.item()) > 1e-2
    # both processes' keys took part: the gathered tensor is the rank-ordered concatenation
    for r in range(WORLD):
        gathered = res[r]['infonce']['gathered']
        assert torch.equal(gathered, torch.cat([torch.full((2, 3), 0.), torch.full((2, 3), 1.)]))


def test_concat_all_gather_is_identity_at_world_size_one():
    assert not moco_dist.is_initialized() and moco_dist.world_size() == 1 and moco_dist.rank() == 0
    t = torch.randn(4, 3)
    out = moco_dist.concat_all_gather(t)
    assert out.shape == t.shape and torch.equal(out, t)
    # and InfoNCE without a process group uses labels 0..N-1 over the local keys only
    q, k = torch.randn(5, 7), torch.randn(5, 7)
    expected = F.cross_entropy(F.normalize(q, dim=1) @ F.normalize(k, dim=1).t() / 0.2, torch.arange(5)) * 0.4
    torch.testing.assert_close(infonce(q, k, 0.2), expected)
    torch.testing.assert_close(infonce(q, k, 0.2), _infonce_by_hand(q, k, 0.2, offset=0))


@pytest.mark.parametrize('nan_rank', ['0', '1', 'None'])
def test_a_nonfinite_loss_on_one_process_skips_the_step_on_every_process(two_process_results, nan_rank):
    _, res = two_process_results
    expected = (True, False) if nan_rank == 'None' else (False, True)    # (stepped, weight unchanged)
    assert [r['nonfinite'][nan_rank] for r in res] == [expected] * WORLD


def test_skip_spikes_skips_the_injected_step_on_every_process_and_nothing_else(two_process_results):
    _, results = two_process_results
    for r in results:   # the spike is on rank 0 only: rank 1 skips the same step
        taken, skipped = r['spike_guard']
        assert skipped == 1 and [i for i, t in enumerate(taken) if not t] == [SPIKE_STEP]
    taken, skipped = spike_guard_steps(0)   # one process
    assert skipped == 1 and [i for i, t in enumerate(taken) if not t] == [SPIKE_STEP]


@pytest.mark.parametrize('pipeline', PIPELINES)
def test_each_image_is_read_as_with_one_process(two_process_results, tiny_folder, pipeline):
    """One process with batch B against two with B/2 each, epoch 1 of the same seed: process r's k-th
    image of a batch is the single process's (2k + r)-th (EpochSampler deals the epoch's positions out
    in turn). Its label is the same in every pipeline; its two views too, bit for bit, in the
    reference pipeline, whose views are drawn from (seed, epoch, position) alone. The in-memory and
    GPU pipelines draw a batch's views at once, from the batch's first position, so theirs change
    with the number of processes (their order and labels do not)."""
    _, res = two_process_results
    single = _epoch_batches(tiny_folder, B, pipeline)
    halves = [r[f'batches_{pipeline}'] for r in res]
    assert len(single) == len(halves[0]) == len(halves[1]) == 40 // B
    for b, (views, targets) in enumerate(single):
        for r in range(WORLD):
            half_views, half_targets = halves[r][b]
            assert torch.equal(half_targets, targets[r::WORLD]), (b, r)
            if pipeline == 'reference':
                for v in range(2):
                    assert torch.equal(half_views[v], views[v][r::WORLD]), (b, r, v)
