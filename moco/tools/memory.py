"""Peak GPU memory of one pretraining step per process, estimated on the CPU without a GPU:

    python -m moco.tools.memory -a vit_base -b 4096 --gpus 8 [--grad-checkpointing] [--micro-batch N]
                                [--amp fp16|bf16|fp32] [--optimizer adamw|lars] [--image-size 224] [--fit 40 80 141]
    python -m moco.tools.memory --table            # the paper's recipes at batch 4096: a markdown table

How: the real step of ``main_moco.py`` (``build_moco``, ``enable_grad_checkpointing``, ``MicroBatchStep``,
autocast, the scaled backward, the optimizer's step) runs on *fake* CPU tensors
(``torch._subclasses.fake_tensor.FakeTensorMode``: shapes and dtypes, no data, no memory), under a dispatch
mode that adds each new storage's bytes and subtracts them when the storage is freed (a weakref finalizer).
The optimizer's state is made first (a step with zero gradients), then one step is measured, as in a run's
steady state.
Counted: both encoders' parameters and buffers, the predictor, the gradients, the optimizer's state, the two
views of the batch (fp32), the activations autograd keeps for the backward, and every temporary.

Modelled as on the GPUs: several processes (``--gpus``) gather the keys of all of them (the logits are
N x N*gpus); DDP keeps the gradients in its buckets (``gradient_as_bucket_view=True``: no second copy, but
held for the whole step); ``--micro-batch`` averages them through flat bucket copies (moco/microbatch.py);
AdamW is the fused one (as on CUDA).

Not as on the GPUs, and left out (README "Memory of the paper's recipes"): fp16 autocast runs as the CPU's,
which casts a different list of ops than CUDA's (CUDA also runs softmax, layer_norm and the losses in fp32);
attention is the CPU's fused SDPA kernel (it keeps, as CUDA's flash attention, the output and the
log-sum-exp, not the N^2 attention matrix); SyncBatchNorm's extra statistics; the caching allocator's
fragmentation and rounding; the CUDA context (0.5-1 GiB); cuBLAS/cuDNN workspaces; NCCL's buffers; the
data loader's pinned memory. ``--fit`` therefore keeps ``--reserve`` GiB (default 3) free.
"""
import contextlib
import sys
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from moco import cli
from moco import dist as moco_dist
from moco import microbatch as moco_microbatch
from moco.errors import UserError, first_line
from moco.microbatch import MicroBatchStep
from moco.models import arch_names, build_moco, check_patch_size, is_vit
from moco.optim import build_optimizer
from moco.recompute import enable_grad_checkpointing

GIB = 2 ** 30
DTYPES = {'fp16': torch.float16, 'bf16': torch.bfloat16, 'fp32': None}
# the paper's recipes at batch 4096 (Table / appendix): arch, label, optimizer, --moco-t
PAPER_RECIPES = (('resnet50', 'ResNet-50', 'lars', 1.0), ('vit_small', 'ViT-S', 'adamw', 0.2),
                 ('vit_base', 'ViT-B', 'adamw', 0.2), ('vit_large', 'ViT-L', 'adamw', 0.2),
                 ('vit_huge', 'ViT-H', 'adamw', 0.2))


class MemoryTracker(TorchDispatchMode):
    """Bytes of the live storages created by the ops run under it (plus those ``track``ed by hand), and their
    peak. A storage counts once, however many tensors view it, until it is freed."""

    def __init__(self):
        super().__init__()
        self.live = {}
        self.current = self.peak = 0

    def track(self, t):
        if not isinstance(t, torch.Tensor):
            return
        storage = t.untyped_storage()
        key = id(storage)
        known = self.live.get(key)
        if known is not None and known[0]() is storage:
            return
        size = storage.nbytes()
        self.current += size
        self.peak = max(self.peak, self.current)
        self.live[key] = (weakref.ref(storage), weakref.finalize(storage, self._free, key, size))

    def _free(self, key, size):
        self.live.pop(key, None)
        self.current -= size

    def reset_peak(self):
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            self.track(t)
        return out


@contextlib.contextmanager
def _simulated_processes(gpus):
    """The step of one of ``gpus`` processes without a process group: the gathered keys are ``gpus`` copies
    of this process's; --micro-batch's gradient averaging flattens its buckets (the all-reduce moves no memory)."""
    gather, average = moco_dist.concat_all_gather, moco_microbatch.average_gradients

    def fake_gather(t):
        return torch.cat([t] * gpus) if gpus > 1 else t

    def fake_average(params, bucket_bytes=moco_microbatch.BUCKET_BYTES):
        if gpus == 1:
            return
        grads = [p.grad for p in params if p.grad is not None]
        buckets, current, size = [], [], 0
        for g in grads:
            if current and size >= bucket_bytes:
                buckets.append(current)
                current, size = [], 0
            current.append(g)
            size += g.numel() * g.element_size()
        buckets.append(current)
        flats = [torch.cat([g.reshape(-1) for g in bucket]) for bucket in buckets]   # all at once, as there
        for bucket, flat in zip(buckets, flats):
            flat.div_(gpus)
            pieces = flat.split([g.numel() for g in bucket])
            torch._foreach_copy_(bucket, [f.view_as(g) for f, g in zip(pieces, bucket)])
        del flats
    moco_dist.concat_all_gather, moco_microbatch.average_gradients = fake_gather, fake_average
    try:
        yield
    finally:
        moco_dist.concat_all_gather, moco_microbatch.average_gradients = gather, average


def measure_step(arch, batch, gpus=1, grad_checkpointing=False, micro_batch=0, amp='fp16', optimizer='adamw',
                 image_size=224, moco_dim=256, mlp_dim=4096, moco_t=0.2, method='mocov3', fake=True, steps=1,
                 before_step=None):
    """Bytes of one training step of one process holding ``batch`` images (the per-process batch), as a dict:
    ``peak`` (the last step's), and its parts: ``params`` (both encoders, predictor, buffers), ``grads``,
    ``optimizer`` (state), ``inputs`` (the two views), ``saved`` (what the forward leaves for the backward,
    beyond the rest), ``temporaries`` (the peak above all of these). ``fake=False``: real CPU tensors
    (for checking the estimate; the same code)."""
    dtype = DTYPES[amp]
    fake_mode = torch._subclasses.fake_tensor.FakeTensorMode(allow_non_fake_inputs=True) if fake else None
    mode = fake_mode if fake else contextlib.nullcontext()
    with torch.device('meta') if fake else contextlib.nullcontext():
        model = build_moco(arch, moco_dim, mlp_dim, moco_t, image_size=image_size if is_vit(arch) else None,
                           method=method)
    with mode:
        if fake:
            model.to_empty(device='cpu')
        if grad_checkpointing:
            enable_grad_checkpointing(model)
        micro = MicroBatchStep(model, micro_batch) if micro_batch else None
        opt = build_optimizer(optimizer, model, 0.1, 0.05)
        if optimizer == 'adamw':   # fused, as on CUDA (build_optimizer's multi-tensor one on CPU keeps temporaries)
            opt = torch.optim.AdamW(list(model.parameters()), 0.1, weight_decay=0.05, fused=True)
    ddp = gpus > 1 and not micro_batch
    trainable = [p for p in model.parameters() if p.requires_grad]
    tracker = MemoryTracker()
    for t in list(model.parameters()) + list(model.buffers()):
        tracker.track(t)
    out = dict(params=tracker.current)
    scale = 2.0 ** 16 if amp == 'fp16' else 1.0
    with mode, tracker, _simulated_processes(gpus):
        x1 = torch.randn(batch, 3, image_size, image_size)
        x2 = torch.randn(batch, 3, image_size, image_size)
        out['inputs'] = tracker.current - out['params']
        for p in trainable:   # the optimizer's state as after a first step (zero gradients: no change)
            p.grad = torch.zeros_like(p)
        opt.step()
        if not ddp:   # else gradient_as_bucket_view: the gradients are views of DDP's buckets, held all along
            opt.zero_grad(set_to_none=True)
        for _ in range(steps):
            if not ddp:
                opt.zero_grad(set_to_none=True)
            if before_step is not None:   # a check's hook (tests: the RSS of the process)
                before_step()
            start = tracker.current
            tracker.reset_peak()
            with torch.autocast('cpu', dtype=dtype) if dtype is not None else contextlib.nullcontext():
                loss = model(x1, x2, 0.99) if micro is None else micro(x1, x2, 0.99)
            after_forward = tracker.current
            scaled = loss * scale   # GradScaler.scale
            if micro is None:
                scaled.backward()
            else:
                micro.backward(scaled)
            del scaled, loss
            grads = [p.grad for p in trainable if p.grad is not None]
            if scale != 1:
                torch._foreach_mul_(grads, 1 / scale)   # unscale_, in place
            del grads
            opt.step()
    out['grads'] = sum(p.numel() * p.element_size() for p in trainable)
    out['optimizer'] = sum(t.untyped_storage().nbytes() for s in opt.state.values() for t in s.values()
                           if isinstance(t, torch.Tensor) and t.dim() > 0)
    out['peak'] = tracker.peak
    out['saved'] = after_forward - start
    out['step_increase'] = tracker.peak - start
    out['temporaries'] = tracker.peak - after_forward
    out['grads_held'] = out['grads'] if ddp else 0
    return out


def estimate(arch, total_batch, gpus=8, micro_batch=0, **kw):
    """``measure_step`` of one of ``gpus`` processes sharing ``total_batch``."""
    if total_batch % gpus:
        raise UserError(f'-b {total_batch} is not divisible by --gpus {gpus}')
    return measure_step(arch, total_batch // gpus, gpus=gpus, micro_batch=micro_batch, **kw)


def fits(result, memory_gib, reserve_gib):
    return result['peak'] + reserve_gib * GIB <= memory_gib * GIB


def largest_piece(arch, total_batch, gpus, memory_gib, reserve_gib, **kw):
    """The largest --micro-batch N whose step fits ``memory_gib`` (N + 1 does not, or N is the whole per-process
    batch), or 0 when even N = 1 does not fit. Binary search: the peak grows with N."""
    per_gpu = total_batch // gpus
    lo, hi = 0, per_gpu   # lo fits (0: nothing yet), hi + 1 does not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(estimate(arch, total_batch, gpus, micro_batch=mid, **kw), memory_gib, reserve_gib):
            lo = mid
        else:
            hi = mid - 1
    return lo


def fewest_gpus(arch, total_batch, memory_gib, reserve_gib, max_gpus=1024, **kw):
    """The fewest processes (dividing ``total_batch``, 2 images or more each) whose step fits, or None.
    Binary search over the divisors: the peak shrinks with the per-process batch."""
    counts = [g for g in range(1, min(total_batch // 2, max_gpus) + 1) if total_batch % g == 0]   # BN: 2+ images
    if not fits(estimate(arch, total_batch, counts[-1], **kw), memory_gib, reserve_gib):
        return None
    lo, hi = 0, len(counts) - 1   # counts[hi] fits
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(estimate(arch, total_batch, counts[mid], **kw), memory_gib, reserve_gib):
            hi = mid
        else:
            lo = mid + 1
    return counts[hi]


def gib(n):
    return f'{n / GIB:.1f}'


def describe(r):
    return (f'peak {gib(r["peak"])} GiB per process = parameters {gib(r["params"])} + optimizer state '
            f'{gib(r["optimizer"])} + views {gib(r["inputs"])}' + (f' + DDP gradient buckets {gib(r["grads_held"])}'
                                                                 if r['grads_held'] else '') +
            f' + kept for the backward {gib(r["saved"])} + backward (gradients {gib(r["grads"])}, temporaries) '
            f'{gib(r["temporaries"])}')


def table(total_batch=4096, gpus=8, memory_gib=80, reserve_gib=3, fixed_piece=64, out=print):
    """The markdown table of the paper's recipes (README)."""
    out(f'| recipe (-b {total_batch}, fp16, {image_size_note()}) | plain | --grad-checkpointing | --micro-batch N '
        f'| fewest {memory_gib} GiB GPUs, plain |')
    out('|---|---|---|---|---|')
    for arch, label, optimizer, t in PAPER_RECIPES:
        kw = dict(amp='fp16', optimizer=optimizer, moco_t=t, image_size=224)
        plain = estimate(arch, total_batch, gpus, **kw)
        ckpt = estimate(arch, total_batch, gpus, grad_checkpointing=True, **kw)
        if is_vit(arch):
            n = largest_piece(arch, total_batch, gpus, memory_gib, reserve_gib, **kw) or fixed_piece
            n = min(n, total_batch // gpus)
            micro = f'{gib(estimate(arch, total_batch, gpus, micro_batch=n, **kw)["peak"])} (N={n})'
        else:
            micro = 'n/a (BatchNorm)'
        fewest = fewest_gpus(arch, total_batch, memory_gib, reserve_gib, **kw)
        out(f'| {label} ({optimizer}) | {gib(plain["peak"])} | {gib(ckpt["peak"])} | {micro} | {fewest} |')


def image_size_note():
    return '224 px, 8 processes, GiB per process'


def get_args_parser():
    p = cli.parser('Peak GPU memory of one MoCo v3 pretraining step per process, estimated on the CPU (fake '
                   'tensors). Leaves out the CUDA context, cuBLAS/cuDNN workspaces, NCCL buffers and the '
                   'allocator\'s fragmentation: --fit keeps --reserve GiB for them.',
                   prog='python -m moco.tools.memory')
    p.add_argument('-a', '--arch', default='resnet50', type=cli.choice_type(arch_names()))
    p.add_argument('-b', '--batch-size', default=4096, type=int, help='total batch over all GPUs, as main_moco.py')
    p.add_argument('--gpus', default=8, type=int, help='processes (GPUs) sharing the batch')
    p.add_argument('--grad-checkpointing', action='store_true')
    p.add_argument('--micro-batch', default=0, type=int, metavar='N')
    p.add_argument('--amp', default='fp16', choices=tuple(DTYPES), help='fp16: the original\'s precision on CUDA')
    p.add_argument('--optimizer', default=None, choices=('lars', 'adamw', 'sgd'),
                   help='default: adamw for ViTs, lars otherwise (the paper\'s)')
    p.add_argument('--image-size', default=224, type=int)
    p.add_argument('--moco-dim', default=256, type=int)
    p.add_argument('--moco-mlp-dim', default=4096, type=int)
    p.add_argument('--moco-t', default=None, type=float, help='default: 0.2 for ViTs, 1.0 otherwise')
    p.add_argument('--method', default='mocov3', choices=('mocov3', 'byol', 'm2t'))
    p.add_argument('--fit', nargs='+', type=float, default=(), metavar='GIB',
                   help='for each GPU memory: the largest --micro-batch piece (ViTs) and the fewest GPUs that fit')
    p.add_argument('--reserve', default=3.0, type=float,
                   help='GiB --fit keeps free for what the estimate leaves out (context, workspaces, NCCL, caching)')
    p.add_argument('--table', action='store_true', help='the paper\'s recipes at -b (default 4096) on --gpus: markdown')
    return p


def check(args):
    cli.require_positive(args, 'batch_size', 'gpus', 'image_size', 'moco_dim', 'moco_mlp_dim')
    cli.require_not_negative(args, 'micro_batch', 'reserve')
    if args.batch_size % args.gpus:
        raise UserError(f'-b {args.batch_size} is not divisible by --gpus {args.gpus}: the batch per process must be '
                        'whole')
    if args.micro_batch and moco_microbatch.refusal(args.arch):
        raise UserError(moco_microbatch.refusal(args.arch))
    if is_vit(args.arch):
        check_patch_size(args.arch, args.image_size)
    if any(m <= 0 for m in args.fit):
        raise UserError('--fit takes GPU memories in GiB, all positive')


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    try:
        check(args)
        tic = time.time()
        if args.table:
            table(args.batch_size, args.gpus, memory_gib=80, reserve_gib=args.reserve)
            print(f'(estimates: python -m moco.tools.memory --table, {time.time() - tic:.0f} s; '
                  f'+{args.reserve:g} GiB reserve in the last columns)')
            return 0
        optimizer = args.optimizer or ('adamw' if is_vit(args.arch) else 'lars')
        moco_t = args.moco_t if args.moco_t is not None else (0.2 if is_vit(args.arch) else 1.0)
        kw = dict(amp=args.amp, optimizer=optimizer, image_size=args.image_size, moco_dim=args.moco_dim,
                  mlp_dim=args.moco_mlp_dim, moco_t=moco_t, method=args.method,
                  grad_checkpointing=args.grad_checkpointing)
        r = estimate(args.arch, args.batch_size, args.gpus, micro_batch=args.micro_batch, **kw)
        per = args.batch_size // args.gpus
        flags = ' --grad-checkpointing' * args.grad_checkpointing + (f' --micro-batch {args.micro_batch}'
                                                                      if args.micro_batch else '')
        print(f'{args.arch} -b {args.batch_size} on {args.gpus} GPU(s) ({per} per process), {args.amp}, '
              f'{optimizer}{flags}: {describe(r)}')
        for memory in args.fit:
            fewest = fewest_gpus(args.arch, args.batch_size, memory, args.reserve, **kw)
            line = f'fit {memory:g} GiB (keeping {args.reserve:g} free): fewest GPUs {fewest or "none up to 1024"}'
            if is_vit(args.arch) and not moco_microbatch.refusal(args.arch):
                n = largest_piece(args.arch, args.batch_size, args.gpus, memory, args.reserve, **kw)
                line += (f'; on {args.gpus} GPU(s): --micro-batch {n}' if n else
                         f'; on {args.gpus} GPU(s): no --micro-batch fits')
            print(line)
        print(f'({time.time() - tic:.0f} s; an estimate: python -m moco.tools.memory --help says what it leaves out)',
              file=sys.stderr)
        return 0
    except UserError as e:
        print(f'error: {first_line(e)}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
