"""Mixed precision as one code path: autocast (or nothing) plus a GradScaler that is a no-op
unless fp16. The original uses fp16 autocast with a GradScaler for the whole forward and loss, and
that is the default here; bf16 is asked for (``--amp bf16``, or ``--amp auto`` with ``--fast``)."""
from contextlib import nullcontext
from typing import NamedTuple, Optional

import torch

from moco import dist
from moco.errors import UserError

PRECISIONS = ('auto', 'fp16', 'bf16', 'fp32')


def add_training_precision_args(group, reference, fast_help):
    """``--amp``, ``--fast`` and ``--max-nonfinite-steps`` of the training scripts; ``reference`` names
    whose precision fp16 is (e.g. "the original's"), ``fast_help`` says what ``--fast`` turns on."""
    group.add_argument('--amp', default='auto', choices=PRECISIONS,
                       help=f'mixed precision: auto = fp16 autocast with a GradScaler on CUDA ({reference}), '
                            'fp32 on CPU; with --fast, bf16 on CUDA GPUs that have it')
    group.add_argument('--fast', action='store_true',
                       help='the fast path, not the original numerics: ' + fast_help + ' (each part is also a '
                            'flag of its own; README "Speed")')
    group.add_argument('--max-nonfinite-steps', default=10, type=int, metavar='K',
                       help='a step whose loss is NaN/inf is skipped; K such steps in a row stop the run (default: '
                            '10; 0: no check, and a NaN reaches the weights). The check is the step\'s one host sync, '
                            'which also carries fp16\'s inf check, --skip-spikes and the stop signal; with 0: no sync '
                            'in fp32/bf16 or with fused AdamW, one in fp16 with LARS/SGD or --skip-spikes (CONFIG.md '
                            '"What differs")')


def resolve_precision(name, device, fast=False):
    """'auto': the original's fp16 with a GradScaler on CUDA, fp32 on CPU. With ``fast``: bf16 on CUDA
    GPUs that have it (Ampere and newer: no GradScaler, no overflow, but logits rounded to 8 bits of
    mantissa, so not the original's numerics)."""
    if name == 'auto':
        if device.type != 'cuda':
            return 'fp32'
        return 'bf16' if fast and torch.cuda.is_bf16_supported() else 'fp16'
    if name == 'fp16' and device.type != 'cuda':
        raise UserError('--amp fp16 needs a CUDA GPU; on CPU use --amp bf16 or --amp fp32')
    return name


class NonFiniteLoss(UserError):
    """The loss stayed NaN/inf for too many consecutive steps."""


class NonFiniteSteps:
    """Bookkeeping of the steps skipped for a non-finite loss, shared by the
    training loops: a warning for each, and ``limit`` in a row (the streak carries over epochs) stop the
    run with a NonFiniteLoss, leaving the checkpoints on disk as they were."""

    def __init__(self, limit, output_dir):
        self.limit, self.output_dir = limit, output_dir
        self.streak = self.skipped = 0

    @property
    def check(self):
        """Whether steps are checked at all (``limit`` 0: no check, no host sync)."""
        return self.limit > 0

    def record(self, finite, loss, epoch, iteration):
        """Count one step; returns ``finite``."""
        if finite:
            self.streak = 0
            return True
        self.streak += 1
        self.skipped += 1
        print(f'warning: loss is {loss.item()} at epoch {epoch + 1}, step {iteration + 1}: step skipped '
              f'({self.streak} in a row)', flush=True)
        if self.streak >= self.limit:
            raise NonFiniteLoss(
                f'the loss was not finite for {self.streak} consecutive steps (epoch {epoch + 1}, step '
                f'{iteration + 1}): stopping. The last good checkpoint is untouched in {self.output_dir}; try a '
                'lower --lr, --amp fp32, or a higher --max-nonfinite-steps')
        return False


def found_inf_of(scaler, optimizer):
    """After ``scaler.unscale_(optimizer)``: the GradScaler's own found-inf flag of this step, a device
    tensor, > 0 when some gradient was inf/NaN: the sum over devices of its ``found_inf_per_device``, which
    ``GradScaler.step`` reads with ``.item()`` to decide whether to step and ``update`` reads to lower the
    scale. That state is private (torch 1.6 to 2.14 keep it in ``_per_optimizer_states``): None when this
    torch keeps it elsewhere, and the GradScaler then decides by itself."""
    try:
        per_device = scaler._per_optimizer_states[id(optimizer)]['found_inf_per_device']
        flags = list(per_device.values())
    except (AttributeError, KeyError, TypeError):
        return None
    if not flags or not all(torch.is_tensor(f) and f.numel() == 1 for f in flags):
        return None
    total = flags[0].reshape(())
    for f in flags[1:]:
        total = total + f.to(total.device, non_blocking=True).reshape(())
    return total


class StepValues(NamedTuple):
    """What ``read_step`` read: whether the loss was finite on every process, whether the GradScaler
    found inf/NaN gradients (None: not read), the shared values averaged over processes (or None)."""
    finite: bool
    overflow: Optional[bool]
    shared: Optional[list]


def read_step(loss, check_finite=True, found_inf=None, shared=None, stop=None):
    """The step's one host sync: everything the step must know, read at once after the backward is
    queued (one all-reduce with several processes, and no read when there is nothing to know): whether
    ``loss`` is finite on every process (``check_finite``), the GradScaler's ``found_inf`` (a device flag,
    or None), ``shared`` (a 1-D device tensor to average over processes, e.g. the spike guard's loss and
    gradient norm) and, with several processes and a read anyway, ``stop``'s flag (then ``settle``d)."""
    parts = []
    if check_finite:
        parts.append((~torch.isfinite(loss.detach())).float().reshape(1))
    if found_inf is not None:
        parts.append(found_inf.float().reshape(1))
    if shared is not None:
        parts.append(shared.float().reshape(-1))
    fold_stop = bool(parts) and stop is not None and dist.world_size() > 1
    if fold_stop:
        parts.append(torch.full((1,), float(stop.flag), device=parts[0].device))
    values = dist.sum_to_host(torch.cat(parts)) if parts else []

    finite = values.pop(0) == 0 if check_finite else True
    overflow = values.pop(0) > 0 if found_inf is not None else None
    if shared is not None:
        n = shared.numel()
        shared, values = [v / dist.world_size() for v in values[:n]], values[n:]
    if fold_stop:
        stop.settle(values.pop(0) > 0)
    return StepValues(finite, overflow, shared)


class Amp:
    """``with amp.autocast(): loss = ...``, then the step: ``backward``, ``unscale`` and ``found_inf``
    (fp16), ``read_step`` (the one host read) and ``step``, as the pretraining loop writes it out; or
    ``backward_step(loss, optimizer)``, all of them at once."""

    def __init__(self, precision, device, fast=False):
        self.precision = resolve_precision(precision, device, fast)
        self.device_type = device.type
        self.dtype = {'fp16': torch.float16, 'bf16': torch.bfloat16}.get(self.precision)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == 'fp16')

    def autocast(self):
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def backward(self, loss, backward_fn=None):
        """Back-propagate the loss, scaled by the GradScaler (fp16; else as is): ``.backward()``, or
        ``backward_fn(scaled_loss)``, which leaves the gradients as DDP would (--micro-batch:
        ``moco.microbatch.MicroBatchStep.backward``)."""
        if backward_fn is None:
            self.scaler.scale(loss).backward()
        else:
            backward_fn(self.scaler.scale(loss))

    def _host_inf(self, optimizer):
        """fp16, and GradScaler.step would read its found-inf flag on the host (not with an optimizer that
        reads it on the device, as fused AdamW does): the step reads it with its other values instead."""
        return self.scaler.is_enabled() and not getattr(optimizer, '_step_supports_amp_scaling', False)

    def unscale(self, optimizer, gradients_read=False):
        """Unscale the gradients now, what the fp16 step would do first (a no-op otherwise), when they are
        read before the step (``gradients_read``) or the GradScaler's found-inf flag is."""
        if gradients_read or self._host_inf(optimizer):
            self.scaler.unscale_(optimizer)

    def found_inf(self, optimizer, wanted=False):
        """After ``unscale``, under fp16: the GradScaler's found-inf flag (a device tensor) for
        ``read_step``, when GradScaler.step would read it on the host or it is ``wanted``; else None."""
        if self.scaler.is_enabled() and (self._host_inf(optimizer) or wanted):
            return found_inf_of(self.scaler, optimizer)
        return None

    def step(self, optimizer, take, finite, overflow=None):
        """The optimizer step, unless ``take`` is False. bf16/fp32: only if the loss was ``finite``.
        fp16: only if the gradients did not ``overflow`` (as GradScaler.step decides; None: not read, the
        GradScaler reads it itself), then the GradScaler's update (inf found: a lower scale)."""
        if not self.scaler.is_enabled():
            if take and finite:
                optimizer.step()
            return
        if overflow is not None and self._host_inf(optimizer):
            if take and not overflow:
                optimizer.step()   # as GradScaler.step: it steps iff its found_inf_per_device sum is 0
        elif take:
            self.scaler.step(optimizer)
        self.scaler.update()

    def backward_step(self, loss, optimizer, check_finite=True, after_backward=None, stop=None, backward=None):
        """Backward and step, with one host read (``read_step``); returns False if the loss was not
        finite on some process, in which case no process takes the step (fp16: the GradScaler skips it and
        lowers its scale, as usual). ``check_finite`` False: no check, and bf16/fp32 step whatever the
        loss, as the original would.

        ``after_backward``: a callable ``(finite) -> take`` called after the read, or an object whose
        ``share()`` returns a 1-D device tensor (or None) to be averaged over processes in that read and
        whose ``decide(finite, shared, overflow) -> take`` gets the averages. Either sees the gradients
        unscaled (fp16), before the step; take False: skipped on every process, which must all answer
        alike. ``stop``, ``backward``: as ``read_step``'s and ``backward``'s."""
        optimizer.zero_grad(set_to_none=True)
        self.backward(loss, backward)
        self.unscale(optimizer, gradients_read=after_backward is not None)
        share = getattr(after_backward, 'share', None)
        shared = share() if share is not None else None
        read = read_step(loss, check_finite, self.found_inf(optimizer, wanted=shared is not None), shared, stop)
        take = True
        if after_backward is not None:
            take = (after_backward.decide(read.finite, read.shared, read.overflow) if share is not None
                    else after_backward(read.finite))
        self.step(optimizer, take, read.finite, read.overflow)
        return read.finite

    def state_dict(self):
        return self.scaler.state_dict()

    def load_state_dict(self, state):
        if state and self.scaler.is_enabled():
            self.scaler.load_state_dict(state)
