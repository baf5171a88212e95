"""moco/microbatch.py (--micro-batch): the step by pieces of the per-process batch against the whole-batch
step, on a tiny ViT (``vit_tiny_patch4`` at 8 px, heads 16/32, batch 8, pieces of 2 and 3: an uneven last
piece) for MoCo v3, BYOL and Momentum² Teacher, mostly through ``train_one_epoch``.

Tolerances. One step in float32: the loss with rtol 1e-5, every gradient, parameter and buffer within
1e-5 of its tensor's own scale (observed: up to 1.2e-5 elementwise, 9e-6 in norm; a piece's matrix products
round differently from the batch's), plus a floor for the tensors whose exact gradient is zero and which
hold only rounding noise (the final LayerNorm's bias and the biases of Linears before a BatchNorm: a
BatchNorm removes a constant shift). A single piece (the whole batch) is the whole-batch step bit for bit.
Several AdamW steps run in float64: AdamW's first update is g/|g| elementwise, so float32 noise of 1e-7 flips
the sign of every element whose gradient is below it (the key bias, whose exact gradient is zero, and the
smallest elements of large matrices) and moves it by 2 lr in either step (observed: ~1e-3 with lr 1e-3,
whatever changes the order of float sums, as a second process does too); in float64 the noise is 1e-16 and
the weights after 3 steps agree to rtol 1e-5 with an absolute floor of 1e-9 (observed: 1e-9 relative).
"""
import builtins
import contextlib
import copy
import functools
import os
import time
from types import SimpleNamespace

import pytest
import torch

from helpers import small_moco, unassigned_port
from moco import launch, microbatch
from moco.amp import Amp, NonFiniteSteps
from moco.builder import METHODS
from moco.engine_pretrain import Pretraining, train_one_epoch
from moco.errors import UserError
from moco.microbatch import MicroBatchStep
from moco.models import encoder_factory
from moco.monitors import SpikeGuard, TrainingMonitors

METHOD_NAMES = ('mocov3', 'byol', 'm2t')
B, IMG, M, LR = 8, 8, 0.99, 1e-3
REL = 1e-5
FLOOR_GRAD = 1e-6     # of the largest gradient: tensors whose exact gradient is zero hold rounding noise only
FLOOR64 = 1e-9        # absolute, float64 weights after AdamW steps


def _model(method, dtype=torch.float32):
    torch.manual_seed(0)
    return small_moco(method, 'vit_tiny_patch4').to(dtype).train()


def _views(seed=1, n=B, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, IMG, IMG, generator=g, dtype=dtype) for _ in range(2)]


def _batches(steps, seed=1, n=B, dtype=torch.float64):
    return [(_views(seed + i, n, dtype), torch.zeros(n), torch.zeros(n, dtype=torch.long)) for i in range(steps)]


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_close(a, b, rel=REL, floor=0., what=''):
    """max|b - a| within ``rel`` of a's own scale (elementwise rtol ``rel`` too), plus ``floor``."""
    torch.testing.assert_close(b, a, rtol=rel, atol=rel * a.abs().max().item() + floor, msg=lambda m: f'{what}: {m}')


def _micro_step(model, n, x1, x2):
    step = MicroBatchStep(model, n)
    loss = step(x1, x2, M)
    step.backward(loss)
    return loss


# ---- one step ----

@pytest.mark.parametrize('pieces', [2, 3, B])
@pytest.mark.parametrize('method', METHOD_NAMES)
def test_one_step_equals_the_whole_batch_step(method, pieces):
    """Loss, every gradient, and the state after the step (the momentum encoder after its update, every
    BatchNorm's statistics). One piece of the whole batch: bit for bit."""
    x1, x2 = _views()
    whole, micro = _model(method), _model(method)
    loss = whole(x1, x2, M)
    loss.backward()
    micro_loss = _micro_step(micro, pieces, x1, x2)
    grads, micro_grads = _grads(whole), _grads(micro)
    assert grads.keys() == micro_grads.keys() and len(grads) > 100
    if pieces == B:
        assert torch.equal(loss, micro_loss)
        assert all(torch.equal(grads[k], micro_grads[k]) for k in grads)
        assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), micro.state_dict().values()))
        return
    torch.testing.assert_close(micro_loss, loss, rtol=REL, atol=0)
    largest = max(g.abs().max().item() for g in grads.values())
    for k in grads:
        _assert_close(grads[k], micro_grads[k], floor=FLOOR_GRAD * largest, what=k)
    for (k, a), b in zip(whole.state_dict().items(), micro.state_dict().values()):
        if a.is_floating_point():
            _assert_close(a, b, floor=1e-6, what=k)
        else:
            assert torch.equal(a, b), k


def test_bf16_autocast_is_replayed_in_the_second_pass():
    """Under bf16 autocast (CPU). One piece: the loss bit for bit, gradients within 1e-3 (the whole-batch
    step sums the two views' gradients of each weight in bf16, through autocast's one cast of it; the pieces
    in float32), far closer than fp32 is (so the second pass ran in bf16). Three pieces: the loss within
    2e-3 and the gradients within 0.2 in norm (bf16 rounds the pieces' products otherwise; bf16 against fp32
    is 0.14 to 0.27 here)."""
    x1, x2 = _views()

    def run(method, pieces, bf16=True):
        model = _model(method)
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16):
            if pieces:
                step = MicroBatchStep(model, pieces)
                loss = step(x1, x2, M)
            else:
                loss = model(x1, x2, M)
        step.backward(loss) if pieces else loss.backward()
        return loss.detach(), torch.cat([g.reshape(-1) for g in _grads(model).values()])

    def rel(a, b):
        return ((a - b).norm() / a.norm()).item()

    for method in METHOD_NAMES:
        loss, grads = run(method, 0)
        _, fp32_grads = run(method, 0, bf16=False)
        one_loss, one_grads = run(method, B)
        assert torch.equal(one_loss, loss) and rel(grads, one_grads) < 1e-3 < 1e-2 < rel(grads, fp32_grads), method
        three_loss, three_grads = run(method, 3)
        torch.testing.assert_close(three_loss, loss, rtol=2e-3, atol=0)
        assert rel(grads, three_grads) < 0.2, method


def test_random_draws_are_replayed_in_the_second_pass(monkeypatch):
    """With drop-path (not in MoCo v3's recipes, which draw nothing): each piece's second pass gives the
    features of its first, and one piece is the whole-batch step bit for bit, the generator left where the
    whole-batch step leaves it."""
    def model():
        torch.manual_seed(0)
        factory = encoder_factory('vit_tiny_patch4', image_size=IMG, drop_path_rate=0.5)
        return METHODS['mocov3'][1](factory, 16, 32, 0.2).train()

    x1, x2 = _views()
    passes = []
    original = microbatch.backbone_features

    def recorded(encoder, x):
        out = original(encoder, x)
        passes.append((encoder, out.detach().clone()))
        return out
    monkeypatch.setattr(microbatch, 'backbone_features', recorded)
    net = model()
    _micro_step(net, 3, x1, x2)
    online = [out for encoder, out in passes if encoder is net.base_encoder]
    assert len(online) == 12   # 2 views x 3 pieces, twice
    assert all(torch.equal(a, b) for a, b in zip(online[:6], online[6:]))
    assert not torch.equal(online[0], original(net.base_encoder, x1[:3]))   # drop-path draws

    monkeypatch.setattr(microbatch, 'backbone_features', original)
    whole, micro = model(), model()
    torch.manual_seed(5)
    loss = whole(x1, x2, M)
    loss.backward()
    after = torch.get_rng_state()
    torch.manual_seed(5)
    micro_loss = _micro_step(micro, B, x1, x2)
    assert torch.equal(torch.get_rng_state(), after) and torch.equal(loss, micro_loss)
    assert all(torch.equal(a, b) for a, b in zip(_grads(whole).values(), _grads(micro).values()))


@pytest.mark.parametrize('pieces', [3, B])
def test_composes_with_grad_checkpointing(pieces):
    """--grad-checkpointing (moco/recompute.py: each block recomputed in the backward) inside the pieces'
    second pass: the same step bit for bit, with drop-path drawing too."""
    recompute = pytest.importorskip('moco.recompute')

    def model():
        torch.manual_seed(0)
        factory = encoder_factory('vit_tiny_patch4', image_size=IMG, drop_path_rate=0.5)
        return METHODS['byol'][1](factory, 16, 32).train()

    x1, x2 = _views()
    plain, checkpointed = model(), model()
    assert recompute.enable_grad_checkpointing(checkpointed) == 12
    losses = []
    for net in (plain, checkpointed):
        torch.manual_seed(5)
        losses.append(_micro_step(net, pieces, x1, x2))
    assert torch.equal(*losses)
    assert all(torch.equal(a, b) for a, b in zip(_grads(plain).values(), _grads(checkpointed).values()))


def test_the_step_reads_nothing_on_the_host(monkeypatch):
    """No host sync of its own: the loop's one read per step stays the only one."""
    model, (x1, x2), reads = _model('mocov3'), _views(), []

    def counted(fn, name):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            reads.append(name)
            return fn(*args, **kwargs)
        return wrapper
    for name in ('item', 'tolist', '__bool__', '__float__', '__int__', 'cpu', 'numpy'):
        monkeypatch.setattr(torch.Tensor, name, counted(getattr(torch.Tensor, name), name))
    _micro_step(model, 3, x1, x2)
    assert reads == []


def test_backbones_with_batchnorm_are_refused():
    assert '--grad-checkpointing' in microbatch.refusal('resnet50')
    assert '--grad-checkpointing' in microbatch.refusal('vit_conv_small')
    assert microbatch.refusal('vit_base') is None
    with pytest.raises(UserError, match='BatchNorm'):
        MicroBatchStep(small_moco('mocov3', 'resnet18_cifar'), 2)
    conv_stem = METHODS['mocov3'][1](encoder_factory('vit_conv_small', image_size=32, depth=1), 16, 32)
    with pytest.raises(UserError, match='patch_embed'):
        MicroBatchStep(conv_stem, 2)


# ---- through the training loop ----

class _Log:
    def __init__(self):
        self.grads, self.losses = [], []

    def scalars(self, step, prefix=None, **values):
        (self.grads if prefix == 'grad' else self.losses).append(values.get('loss') if prefix is None else values)


def _args(tmp_path, micro, world_size=1, batch=B, **kw):
    return SimpleNamespace(lr=LR, batch_size=batch, warmup_epochs=0, epochs=1, moco_m=M, moco_m_cos=False,
                           device=torch.device('cpu'), memory_format=torch.contiguous_format, print_freq=1,
                           world_size=world_size, save_every_iters=0, max_nonfinite_steps=10,
                           output_dir=str(tmp_path), micro_batch=micro, **kw)


@contextlib.contextmanager
def _quiet():
    print_ = builtins.print
    builtins.print = lambda *a, **k: None
    try:
        yield
    finally:
        builtins.print = print_


def _train(method, micro, batches, tmp_path, model=None, amp=None, monitors=None, iters=None, start_iter=0,
           optimizer=None, stop=None, save_progress=None, world_size=1, batch=B):
    """``train_one_epoch`` over ``batches`` with AdamW (a float64 model unless ``model`` is given); returns
    (the bare model, stats, log, monitors, optimizer)."""
    from moco.dist import unwrap
    model = model if model is not None else _model(method, torch.float64)
    optimizer = optimizer or torch.optim.AdamW(model.parameters(), LR, weight_decay=0.1)
    monitors = monitors or TrainingMonitors(unwrap(model))
    log = _Log()
    with _quiet():
        run = Pretraining(model, optimizer, amp or Amp('fp32', torch.device('cpu')),
                          _args(tmp_path, micro, world_size, batch), log, iters or len(batches),
                          NonFiniteSteps(10, str(tmp_path)), monitors, stop, save=save_progress)
        stats = train_one_epoch(run, batches, 0, start_iter=start_iter)
    return unwrap(model), stats, log, monitors, optimizer


def _assert_states_close(a, b, what=''):
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        if x.is_floating_point():
            torch.testing.assert_close(y, x, rtol=REL, atol=FLOOR64, equal_nan=True,
                                       msg=lambda m, k=k: f'{what}{k}: {m}')
        else:
            assert torch.equal(x, y), what + k


@pytest.mark.parametrize('method', METHOD_NAMES)
def test_three_adamw_steps_through_the_loop_equal_the_whole_batch_loop(method, tmp_path):
    """Float64 (see the top): the losses, every logged gradient magnitude of the monitors and the weights,
    buffers and optimizer state after 3 steps."""
    batches = _batches(3)
    whole, stats, log, _, opt = _train(method, 0, batches, tmp_path)
    micro, micro_stats, micro_log, _, micro_opt = _train(method, 3, batches, tmp_path)
    assert micro_stats['loss'] == pytest.approx(stats['loss'], rel=1e-12)
    assert micro_log.losses == pytest.approx(log.losses, rel=1e-12)
    assert len(log.grads) == 3 and set(log.grads[0]) >= {'first_layer', 'last_block', 'predictor', 'total_norm'}
    for values, micro_values in zip(log.grads, micro_log.grads):
        assert micro_values == pytest.approx(values, rel=1e-9)
    _assert_states_close(whole, micro)
    for i, s in opt.state_dict()['state'].items():
        for k, v in s.items():
            torch.testing.assert_close(micro_opt.state_dict()['state'][i][k], v, rtol=REL, atol=FLOOR64)


def test_a_grad_scaler_scales_the_loss_once(tmp_path):
    """fp16's GradScaler (its logic, on the CPU), with SGD (AdamW would hide a wrong scale): a power-of-two
    scale is exact, so the gradients and weights equal the unscaled run's bit for bit, unless the heads' or
    the pieces' gradients were scaled twice or not at all."""
    batches = _batches(3, dtype=torch.float32)
    amp = Amp('fp32', torch.device('cpu'))
    amp.scaler = torch.amp.GradScaler('cpu', init_scale=2. ** 10)
    runs = []
    for scaler in (None, amp):
        model = _model('mocov3')
        runs.append(_train('mocov3', 3, batches, tmp_path, model=model, amp=scaler,
                           optimizer=torch.optim.SGD(model.parameters(), 0.1, momentum=0.9))[0])
    assert amp.scaler.get_scale() == 2. ** 10
    plain, scaled = runs
    assert all(torch.equal(a, b) for a, b in zip(_grads(plain).values(), _grads(scaled).values()))
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), scaled.state_dict().values()))


def test_a_nan_in_one_piece_skips_the_step(tmp_path):
    """A NaN image in the second piece of step 2: skipped as the whole-batch loop skips it; the weights after
    4 steps equal (the heads' BatchNorm statistics are NaN in both from then on, as without pieces)."""
    batches = _batches(4)
    batches[1][0][0][4, 0, 0, 0] = float('nan')
    whole, stats = _train('byol', 0, batches, tmp_path)[:2]
    micro, micro_stats = _train('byol', 3, batches, tmp_path)[:2]
    assert stats['skipped_steps'] == micro_stats['skipped_steps'] == 1
    assert all(torch.isfinite(p).all() for p in micro.parameters())
    _assert_states_close(whole, micro)


def test_skip_spikes_takes_the_same_decisions(tmp_path):
    """--skip-spikes' guard judges the micro-batched step's loss and gradient norm as the whole batch's: a
    guard that skips every step above the mean (6 steps, history from 2) skips the same steps."""
    batches = _batches(6)
    runs = []
    for micro in (0, 3):
        model = _model('mocov3', torch.float64)
        monitors = TrainingMonitors(model, skip_spikes=True)
        monitors.guard = SpikeGuard(sigmas=0., min_history=2)
        runs.append(_train('mocov3', micro, batches, tmp_path, model=model, monitors=monitors))
    (whole, _, _, guard, _), (micro, _, _, micro_guard, _) = runs
    assert micro_guard.guard.skipped == guard.guard.skipped > 0
    for k in ('loss', 'grad_norm'):
        assert list(micro_guard.guard.history[k]) == pytest.approx(list(guard.guard.history[k]), rel=1e-9)
    _assert_states_close(whole, micro)


def test_a_mid_epoch_resume_equals_the_uninterrupted_run(tmp_path):
    """A stop signal after step 2 of 4 (the loop saves, then raises Stopped); a fresh model, optimizer and
    monitors loaded from what was saved continue at step 3: bit for bit the uninterrupted run."""
    batches = _batches(4, dtype=torch.float32)
    uninterrupted = _train('m2t', 3, batches, tmp_path, model=_model('m2t'))[0]

    stop, saved = launch.StopRequest(names=()), {}
    model = _model('m2t')
    optimizer = torch.optim.AdamW(model.parameters(), LR, weight_decay=0.1)
    monitors = TrainingMonitors(model)

    def save_progress(epoch, iters_done):
        saved.update(iters=iters_done, state=copy.deepcopy((model.state_dict(), optimizer.state_dict(),
                                                             monitors.state_dict())))

    class Flagging:   # the loader: the signal arrives while step 2 runs
        def __len__(self):
            return len(batches)

        def __iter__(self):
            for i, batch in enumerate(batches):
                if i == 1:
                    stop.received = 'TERM'
                yield batch
    with pytest.raises(launch.Stopped):
        _train('m2t', 3, Flagging(), tmp_path, model=model, optimizer=optimizer, monitors=monitors, stop=stop,
               save_progress=save_progress)
    assert saved['iters'] == 2

    model = _model('m2t')
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.)   # loading must overwrite everything
    optimizer = torch.optim.AdamW(model.parameters(), LR, weight_decay=0.1)
    monitors = TrainingMonitors(model)
    state, optimizer_state, monitors_state = saved['state']
    model.load_state_dict(state)
    optimizer.load_state_dict(optimizer_state)
    monitors.load_state_dict(monitors_state)
    resumed = _train('m2t', 3, batches[2:], tmp_path, model=model, optimizer=optimizer, monitors=monitors,
                     iters=4, start_iter=2)[0]
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted.state_dict().values(), resumed.state_dict().values()))


# ---- two processes ----

WORLD, STEPS, NAN_STEP = 2, 3, 1


def _two_process_worker(rank, port, tmp):
    import torch.distributed as tdist

    from moco import dist
    from moco.norm import convert_sync_batchnorm
    torch.set_num_threads(1)
    tdist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', world_size=WORLD, rank=rank)
    try:
        half = slice(rank * B // WORLD, (rank + 1) * B // WORLD)
        batches = [([v[half] for v in views], t[half], s[half]) for views, t, s in _batches(STEPS)]
        out = {}
        for method in METHOD_NAMES:
            for micro in (0, 3):
                torch.manual_seed(10 + rank)   # different weights on each process: the start broadcasts rank 0's
                model = small_moco(method, 'vit_tiny_patch4').double()
                if model.sync_bn:
                    model = convert_sync_batchnorm(model, torch.device('cpu'))
                if micro:
                    dist.broadcast_from_rank0(model)
                    net = model
                else:
                    net = dist.ddp(model, torch.device('cpu'), sync_buffers=model.sync_bn)
                _, stats, log, _, _ = _train(method, micro, batches, tmp, model=net, world_size=WORLD, batch=B // WORLD)
                out[f'{method}_{micro}'] = {'state': model.state_dict(), 'loss': stats['loss'], 'grads': log.grads}
        # a NaN in rank 0's second piece at step 2: every process skips it
        nan_batches = copy.deepcopy(batches)
        if rank == 0:
            nan_batches[NAN_STEP][0][0][3, 0, 0, 0] = float('nan')
        model = convert_sync_batchnorm(small_moco('mocov3', 'vit_tiny_patch4').double(), torch.device('cpu'))
        dist.broadcast_from_rank0(model)
        _, stats, _, _, _ = _train('mocov3', 3, nan_batches, tmp, model=model, world_size=WORLD, batch=B // WORLD)
        out['nan'] = {'skipped': stats['skipped_steps'],
                      'params': {k: v for k, v in model.named_parameters()}}
        torch.save(out, os.path.join(tmp, f'rank{rank}.pt'))
    finally:
        tdist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_equal_ddp_and_one_process(tmp_path):
    """Two gloo processes (batch 4 each, pieces of 3) without DDP, in float64: the same weights, buffers,
    losses and gradient magnitudes as the two processes under DDP (all three methods; Momentum² Teacher's
    per-process BatchNorm statistics stay per process, as under DDP with sync_buffers=False) and, for MoCo v3
    and BYOL, as one process with the whole batch (M2T's per-process BatchNorm makes it another training);
    every process's weights equal. A NaN on one process skips the step on both."""
    import torch.multiprocessing as mp
    started = time.time()
    ctx = mp.spawn(_two_process_worker, args=(unassigned_port(), str(tmp_path)), nprocs=WORLD, join=False)
    try:
        while not ctx.join(timeout=1):
            assert time.time() < started + 300, 'the two gloo workers did not finish in 300 s'
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    results = [torch.load(os.path.join(tmp_path, f'rank{r}.pt'), weights_only=True) for r in range(WORLD)]
    batches = _batches(STEPS)
    for method in METHOD_NAMES:
        for r in range(WORLD):
            ddp, micro = results[r][f'{method}_0'], results[r][f'{method}_3']
            assert micro['loss'] == pytest.approx(ddp['loss'], rel=1e-12)
            for values, micro_values in zip(ddp['grads'], micro['grads']):
                assert micro_values == pytest.approx(values, rel=1e-9)
            for k, v in ddp['state'].items():
                torch.testing.assert_close(micro['state'][k], v, rtol=REL, atol=FLOOR64, msg=lambda m, k=k: f'{k} {m}')
        params = [k for k in results[0][f'{method}_3']['state'] if 'running' not in k and 'num_batches' not in k]
        assert all(torch.equal(results[0][f'{method}_3']['state'][k], results[1][f'{method}_3']['state'][k])
                   for k in params)
        if method != 'm2t':
            torch.manual_seed(10)   # rank 0's initial weights
            model = small_moco(method, 'vit_tiny_patch4').double()
            whole = _train(method, 0, batches, tmp_path, model=model)[0].state_dict()
            for k, v in whole.items():
                torch.testing.assert_close(results[0][f'{method}_3']['state'][k], v, rtol=REL, atol=FLOOR64,
                                           msg=lambda m, k=k: f'{k} {m}')
    assert results[0]['nan']['skipped'] == results[1]['nan']['skipped'] == 1
    assert all(torch.equal(v, results[1]['nan']['params'][k]) for k, v in results[0]['nan']['params'].items())


@pytest.mark.slow
def test_main_moco_trains_by_pieces_and_refuses_resnets(tiny_folder, tmp_path, capsys):
    """Through the command line: an epoch with --micro-batch 3 ends where the whole-batch epoch ends (float
    rounding apart); a ResNet is refused with one line that points to --grad-checkpointing."""
    import main_moco
    from helpers import run_in_process
    common = ['-a', 'vit_tiny_patch4', '--image-size', '8', '--moco-dim', '8', '--moco-mlp-dim', '16', '-b', '8',
              '--epochs', '1', '--warmup-epochs', '0', '--optimizer', 'sgd', '--lr', '0.1', '-j', '0', '--seed', '0',
              '--stop-grad-conv1']
    states = []
    for name, extra in (('whole', []), ('pieces', ['--micro-batch', '3'])):
        code, errors = run_in_process(main_moco, [*common, *extra, '--output-dir', tmp_path / name, tiny_folder],
                                      capsys)
        assert code == 0 and not errors, errors
        states.append(torch.load(tmp_path / name / 'checkpoint_0000.pth.tar', weights_only=True)['state_dict'])
    for k in states[0]:   # five steps in float32: sums in another order drift a little (exact in float64: above)
        a, b = states[0][k].double(), states[1][k].double()
        assert (a - b).abs().max() <= 1e-3 * a.abs().max() + 2e-5, k   # (biases whose gradient is ~0)
    code, errors = run_in_process(main_moco, ['-a', 'resnet18_cifar', '--micro-batch', '2', '--output-dir',
                                              tmp_path / 'resnet', tiny_folder], capsys)
    assert code == 2 and len(errors) == 1 and '--grad-checkpointing' in errors[0]
    assert not (tmp_path / 'resnet').exists()
