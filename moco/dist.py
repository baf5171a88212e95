"""The process group and its primitives, shared by every script: joining the group, the batch
shared among processes, DDP, and collectives that also work without a group (``rank()``,
``world_size()`` and ``concat_all_gather``: at world size 1 the gather is the identity). How the
processes are started, stopped and exit is moco/launch.py.
"""
import builtins
import datetime
import inspect
import os
import random
import sys

import torch
import torch.distributed as tdist

from moco.errors import UserError


def _store_of_this_restart(args, timeout):
    """Under torchrun (env:// with TORCHELASTIC_RESTART_COUNT set), the agent's store with a prefix per
    restart round, else None (init_method makes the store). The agent keeps one store across restarts, so
    without the prefix the restarted workers can read the addresses the killed ones published and fail
    to connect (seen with gloo: 'Connection refused' to a dead worker's port)."""
    restart = os.environ.get('TORCHELASTIC_RESTART_COUNT')
    if restart is None or args.dist_url != 'env://':
        return None
    store, _, _ = next(tdist.rendezvous('env://', rank=args.rank, world_size=args.world_size, timeout=timeout))
    return tdist.PrefixStore(f'moco/restart_{restart}', store)


def init_process(args):
    """Inside a worker: choose the device, join the process group, silence non-zero ranks, seed python
    and torch from ``args.seed`` (when given).

    Returns the torch.device of this process (also set as ``args.device``).
    """
    if args.gpu is not None:
        torch.cuda.set_device(args.gpu)
        device = torch.device('cuda', args.gpu)
    else:
        device = torch.device('cpu')
    if args.distributed:
        backend = args.dist_backend
        if device.type == 'cpu' and backend == 'nccl':
            print(f'[rank {args.rank}] no CUDA device: using the gloo backend instead of nccl')
            backend = 'gloo'
        timeout = datetime.timedelta(minutes=args.dist_timeout)
        try:
            store = _store_of_this_restart(args, timeout)
            tdist.init_process_group(backend=backend, init_method=None if store else args.dist_url, store=store,
                                     world_size=args.world_size, rank=args.rank, timeout=timeout)
        except RuntimeError as e:
            if 'address already in use' in str(e).lower():
                raise UserError(f'cannot start the process group: {args.dist_url} is already in use '
                                '(another run?); choose another port in --dist-url') from None
            raise
        if device.type == 'cpu' and 'OMP_NUM_THREADS' not in os.environ:  # share the cores of this node
            local_procs = int(os.environ.get('LOCAL_WORLD_SIZE', 0)) or max(1, args.world_size)
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_procs))
    setup_for_distributed(rank() == 0)
    args.device = device
    if getattr(args, 'seed', None) is not None:
        random.seed(args.seed)
        torch.manual_seed(args.seed)
    return device


def share_batch(args):
    """The original's convention: -b (and -j) are totals, divided among the processes (-j among those
    of a node). Returns the total batch."""
    total_batch = args.batch_size
    if args.batch_size % args.world_size:
        raise UserError(f'-b {args.batch_size} is not divisible by the {args.world_size} processes')
    args.batch_size = args.batch_size // args.world_size
    local_procs = int(os.environ.get('LOCAL_WORLD_SIZE', 0)) or (
        (torch.cuda.device_count() or 1) if args.multiprocessing_distributed else 1)
    args.workers = min((args.workers + local_procs - 1) // local_procs, os.cpu_count() or 1)
    return total_batch


def ddp(module, device, gpu=None, sync_buffers=True, **kwargs):
    """``module`` in DistributedDataParallel, on this process's GPU or on the CPU: the one wrapper of
    the three scripts. ``sync_buffers=False`` keeps BatchNorm statistics per process (Momentum² Teacher's
    momentum BN, as in its release under torch 1.5; torch >= 1.10 would impose rank 0's on every step)."""
    if not sync_buffers:   # newer torch names the switch forward_sync_buffers
        switch = ('forward_sync_buffers' if 'forward_sync_buffers' in
                  inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters else 'broadcast_buffers')
        kwargs[switch] = False
    return torch.nn.parallel.DistributedDataParallel(
        module, device_ids=[gpu] if device.type == 'cuda' else None, **kwargs)


def unwrap(model):
    """The bare model under DDP and torch.compile wrappers (their keys must not reach the file)."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, '_orig_mod'):
            model = model._orig_mod
        else:
            return model


def cleanup():
    if is_initialized():
        tdist.destroy_process_group()


def setup_for_distributed(is_master):
    """Silence print() on all ranks but 0; print(..., force=True) still prints."""
    builtin_print = getattr(builtins.print, '_moco_original', builtins.print)

    def print_(*args, **kwargs):
        force = kwargs.pop('force', False)
        if is_master or force or kwargs.get('file') in (sys.stderr, sys.__stderr__):  # errors from any rank
            builtin_print(*args, **kwargs)

    print_._moco_original = builtin_print
    builtins.print = print_


def is_initialized():
    return tdist.is_available() and tdist.is_initialized()


def rank():
    return tdist.get_rank() if is_initialized() else 0


def world_size():
    return tdist.get_world_size() if is_initialized() else 1


def is_main_process():
    return rank() == 0


@torch.no_grad()
def broadcast_from_rank0(module):
    """Every parameter and buffer of ``module`` set to rank 0's values, as wrapping the whole module in DDP
    does when it is built (the original probe's ``model``); nothing at world size 1."""
    if world_size() > 1:
        for tensor in [*module.parameters(), *module.buffers()]:
            tdist.broadcast(tensor.data, src=0)


@torch.no_grad()
def concat_all_gather(tensor):
    """All-gather along dim 0 without gradient; the identity at world size 1."""
    if world_size() == 1:
        return tensor
    tensor = tensor.contiguous()
    gathered = [torch.empty_like(tensor) for _ in range(world_size())]
    tdist.all_gather(gathered, tensor)
    return torch.cat(gathered, dim=0)


def all_true(flag):
    """True if the boolean tensor ``flag`` is true on every process (the same answer everywhere, so that
    all processes take the same branch); reads it on the host."""
    if world_size() > 1:
        flag = flag.to(torch.int32)
        tdist.all_reduce(flag, op=tdist.ReduceOp.MIN)
    return bool(flag)


def all_reduce_mean(value):
    """Average a python number or tensor over processes (for logging)."""
    if world_size() == 1:
        return value
    t = torch.as_tensor(value, dtype=torch.float64, device=collective_device()).clone()
    tdist.all_reduce(t)
    return (t / world_size()).item() if not torch.is_tensor(value) else t / world_size()


def any_true(flag):
    """True if the python bool ``flag`` is true on any process (the same answer everywhere)."""
    if world_size() == 1:
        return bool(flag)
    t = torch.tensor([int(flag)], device=collective_device())
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item())


def sum_to_host(values):
    """The 1-D tensor ``values`` summed over processes, as a list of python numbers: one all-reduce (none at
    world size 1) and one host read, so several per-step answers cost a single sync."""
    if world_size() > 1:
        tdist.all_reduce(values)
    return values.tolist()


class DeferredAnyTrue:
    """``any_true`` answered one call late, so that asking costs no wait for the device's queue:
    ``exchange(flag)`` starts an asynchronous all-reduce of this call's ``flag`` and returns the answer
    of the previous call (False at the first), waiting only for that earlier all-reduce (on a GPU: for
    the work queued before it, not for the work queued since). Every process must make the same calls
    in the same order; ``drain()`` ends the pending all-reduce and returns its answer (False if none)."""

    def __init__(self):
        self._pending = None

    def exchange(self, flag):
        previous = self.drain()
        device = collective_device()
        t = torch.full((1,), int(bool(flag)), dtype=torch.int32, device=device)   # no host-to-device copy
        work = tdist.all_reduce(t, op=tdist.ReduceOp.MAX, async_op=True)
        if device.type == 'cuda':
            work.wait()   # nccl: the current stream waits for the all-reduce, the host does not
            host = torch.empty(1, dtype=torch.int32, pin_memory=True)
            host.copy_(t, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            self._pending = (None, host, done)
        else:
            self._pending = (work, t, None)
        return previous

    def drain(self):
        if self._pending is None:
            return False
        work, t, done = self._pending
        self._pending = None
        if work is not None:
            work.wait()
        if done is not None:
            done.synchronize()
        return bool(t[0])


def collective_device():
    """Where the tensors of a collective must live: CUDA for nccl, the CPU for gloo."""
    return torch.device('cuda') if tdist.get_backend() == 'nccl' else torch.device('cpu')
