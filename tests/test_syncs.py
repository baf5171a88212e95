"""How often a pretraining step waits for the device (a host sync), counted in real ``train_one_epoch`` runs
of a tiny MoCo ViT on the CPU: every read of a tensor's value on the host (``item``, ``tolist``, ``bool``,
``float``, ...) is counted, and every python-level all-reduce (DDP's gradient all-reduce runs in C++ and is
not counted). On a GPU each read drains the device's queue; on the CPU the same reads happen, so their count
is the count of syncs the step would have on a GPU.

Modes: fp32/bf16 with and without the finiteness check (``--max-nonfinite-steps 0``); fp16's GradScaler
(enabled on the CPU) with LARS, whose ``GradScaler.step`` reads its found-inf flag on the host, and with
fused AdamW, which reads it on the device; ``--skip-spikes``; one process, and two gloo processes (there also:
a stop flag raised on one process stops both after the same step). Only steps that are not logged are
counted (a logged step reads the progress line's values as well). Before the step's reads were folded into
one: fp16 with LARS 2 (3 with two processes), --skip-spikes 2 (3), both 3 (4), any other mode with two
processes 1 more than with one (the stop check).
"""
import functools
import os
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import vits
from helpers import unassigned_port
from moco import launch
from moco.amp import Amp, NonFiniteSteps
from moco.builder import MoCo_ViT
from moco.engine_pretrain import Pretraining, train_one_epoch
from moco.monitors import TrainingMonitors
from moco.optim import build_optimizer

READS = ('item', 'tolist', 'numpy', 'cpu', '__bool__', '__float__', '__int__', '__index__', '__array__')
STEPS = 6          # steps 0 and 5 are logged (the first and the last of the epoch), 1..4 are counted
IMG, BATCH = 8, 4

# mode: (fp16's GradScaler, --max-nonfinite-steps, --skip-spikes, optimizer)
MODES = {'fp32': (False, 10, False, 'lars'), 'fp32_nocheck': (False, 0, False, 'lars'),
         'fp16': (True, 10, False, 'lars'), 'fp16_nocheck': (True, 0, False, 'lars'),
         'fp16_fused_adamw': (True, 10, False, 'adamw_fused'),
         'fp16_fused_adamw_nocheck': (True, 0, False, 'adamw_fused'),
         'skip_spikes': (False, 10, True, 'lars'), 'fp16_skip_spikes': (True, 10, True, 'lars')}
# (host reads, all-reduces) of a step that is not logged; before: fp16 2 (the finiteness check, then
# GradScaler.step's own read of its found-inf flag), --skip-spikes 2 (the guard's own read), both 3
ONE_PROCESS = {'fp32': (1, 0), 'fp32_nocheck': (0, 0), 'fp16': (1, 0), 'fp16_nocheck': (1, 0),
               'fp16_fused_adamw': (1, 0), 'fp16_fused_adamw_nocheck': (0, 0),
               'skip_spikes': (1, 0), 'fp16_skip_spikes': (1, 0)}
# with two processes the stop flag rides in the step's one all-reduce; without one (no finiteness check,
# nothing else to read) it is all-reduced asynchronously and read one step later (a read that waits for the
# step before, not for this one). Before: one more read and all-reduce in every mode (the stop check's)
TWO_PROCESSES = {mode: (1, 1) for mode in MODES}
DEFERRED = ('fp32_nocheck', 'fp16_fused_adamw_nocheck')   # the modes whose stop check answers one step late


def _model():
    torch.manual_seed(0)
    return MoCo_ViT(functools.partial(vits.vit_tiny_patch4, depth=1, img_size=IMG), dim=8, mlp_dim=16, T=0.2)


class _Counter:
    """Counts host reads and all-reduces; ``marks``: the counts when each batch is handed out."""

    def __init__(self, monkeypatch):
        self.reads = self.reduces = 0
        self.marks = []
        for name in READS:
            if hasattr(torch.Tensor, name):
                monkeypatch.setattr(torch.Tensor, name, self._counted(getattr(torch.Tensor, name), 'reads'))
        import torch.distributed as tdist
        monkeypatch.setattr(tdist, 'all_reduce', self._counted(tdist.all_reduce, 'reduces'))

    def _counted(self, fn, what):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            setattr(self, what, getattr(self, what) + 1)
            return fn(*args, **kwargs)
        return wrapper

    def loader(self, batches):
        for batch in batches:
            self.marks.append((self.reads, self.reduces))
            yield batch

    def per_step(self):
        """(reads, all-reduces) of each step that is not logged."""
        steps = [(r1 - r0, a1 - a0) for (r0, a0), (r1, a1) in zip(self.marks, self.marks[1:])]
        return steps[1:]   # step 0 is logged; the last step (logged) has no mark after it


class _Loader:
    def __init__(self, counter, n, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.batches = [([torch.randn(BATCH, 3, IMG, IMG, generator=g) for _ in range(2)], torch.zeros(BATCH),
                         np.zeros(BATCH, dtype=np.int64)) for _ in range(n)]   # numpy: no tensor read
        self.counter = counter

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        return self.counter.loader(self.batches)


def run_epoch(mode, counter, tmp_path, stop=None, ddp=False, loader=None):
    """One epoch of ``STEPS`` steps in ``mode``; returns the stats."""
    scaled, max_nonfinite, skip_spikes, optimizer_name = MODES[mode]
    model = _model()
    net = torch.nn.parallel.DistributedDataParallel(model) if ddp else model
    world = torch.distributed.get_world_size() if ddp else 1
    args = SimpleNamespace(lr=0.01, batch_size=BATCH, warmup_epochs=0, epochs=1, moco_m=0.99, moco_m_cos=False,
                           device=torch.device('cpu'), memory_format=torch.contiguous_format, print_freq=1000,
                           world_size=world, save_every_iters=0, max_nonfinite_steps=max_nonfinite,
                           output_dir=str(tmp_path), method='mocov3')
    if optimizer_name == 'adamw_fused':   # reads GradScaler's found-inf flag on the device (CUDA's default AdamW)
        optimizer = torch.optim.AdamW(model.parameters(), 0.01, weight_decay=1e-6, fused=True)
    else:
        optimizer = build_optimizer(optimizer_name, model, 0.01, 1e-6)
    amp = Amp('fp32', torch.device('cpu'))
    if scaled:   # fp16's GradScaler, on the CPU (the tensors stay fp32; only the scaler's logic matters)
        amp.scaler = torch.amp.GradScaler('cpu', init_scale=2. ** 10)
    monitors = TrainingMonitors(model, skip_spikes=skip_spikes)
    log = SimpleNamespace(scalars=lambda *a, **k: None)
    loader = loader or _Loader(counter, STEPS)
    run = Pretraining(net, optimizer, amp, args, log, len(loader), NonFiniteSteps(max_nonfinite, str(tmp_path)),
                      monitors, stop)
    return train_one_epoch(run, loader, 0)


@pytest.mark.parametrize('mode', MODES)
def test_host_syncs_of_a_step_with_one_process(mode, tmp_path, monkeypatch):
    counter = _Counter(monkeypatch)
    run_epoch(mode, counter, tmp_path, stop=launch.StopRequest(names=()))
    assert counter.per_step() == [ONE_PROCESS[mode]] * (STEPS - 2)


def _worker(rank, port, tmp):
    import torch.distributed as tdist
    torch.set_num_threads(1)
    tdist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', world_size=2, rank=rank)
    try:
        result = {}
        for mode in MODES:
            mp = pytest.MonkeyPatch()
            try:
                counter = _Counter(mp)
                run_epoch(mode, counter, tmp, stop=launch.StopRequest(names=()), ddp=True)
                result[mode] = counter.per_step()
            finally:
                mp.undo()
            # a stop flag raised on rank 1 alone, before the backward of step 2: both stop after the same step
            steps = []
            with pytest.raises(launch.Stopped):
                run_epoch(mode, None, tmp, stop=(stop := launch.StopRequest(names=())), ddp=True,
                          loader=_Flagging(stop, steps))
            result[mode + '_stop'] = steps
        torch.save(result, os.path.join(tmp, f'rank{rank}.pt'))
    finally:
        tdist.destroy_process_group()


class _Flagging:
    """A loader that raises the stop flag of ``stop`` on rank 1 before step 2 and notes each step handed out."""

    def __init__(self, stop, steps):
        self.inner = _Loader(SimpleNamespace(loader=lambda b: iter(b)), STEPS)
        self.stop, self.steps = stop, steps

    def __len__(self):
        return STEPS

    def __iter__(self):
        for i, batch in enumerate(self.inner.batches):
            if i == 2 and torch.distributed.get_rank() == 1:
                self.stop.received = 'TERM'
            self.steps.append(i)
            yield batch


@pytest.mark.slow
def test_host_syncs_of_a_step_with_two_processes(tmp_path):
    import torch.multiprocessing as mp
    ctx = mp.spawn(_worker, args=(unassigned_port(), str(tmp_path)), nprocs=2, join=False)
    deadline = time.time() + 300
    try:
        while not ctx.join(timeout=1):
            assert time.time() < deadline, 'the two gloo workers did not finish in 300 s'
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    results = [torch.load(os.path.join(tmp_path, f'rank{r}.pt'), weights_only=True) for r in range(2)]
    for mode in MODES:
        for r in range(2):
            assert results[r][mode] == [TWO_PROCESSES[mode]] * (STEPS - 2), (mode, r)
        # both processes stop after the same step; the deferred check one step later than the folded one
        assert results[0][mode + '_stop'] == results[1][mode + '_stop'] == \
            list(range(4 if mode in DEFERRED else 3)), mode
