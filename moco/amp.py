"""Mixed precision as one code path: autocast (or nothing) plus a GradScaler that is a no-op
unless fp16. The original uses fp16 autocast with a GradScaler for the whole forward and loss, and
that is the default here; bf16 is asked for (``--amp bf16``, or ``--amp auto`` with ``--fast``)."""
from contextlib import nullcontext

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
                            'in fp32/bf16 or with fused AdamW, one in fp16 with LARS/SGD or --skip-spikes (README '
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


def at_least_fp32(x):
    """``x`` in float32, or kept in its own dtype when that is wider (float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class NonFiniteLoss(UserError):
    """The loss stayed NaN/inf for too many consecutive steps."""


class NonFiniteSteps:
    """Bookkeeping of the steps ``Amp.backward_step`` skipped for a non-finite loss, shared by the
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


class Amp:
    """``with amp.autocast(): loss = ...``, then ``amp.backward_step(loss, optimizer)``."""

    def __init__(self, precision, device, fast=False):
        self.precision = resolve_precision(precision, device, fast)
        self.device_type = device.type
        self.dtype = {'fp16': torch.float16, 'bf16': torch.bfloat16}.get(self.precision)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == 'fp16')

    def autocast(self):
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def backward_step(self, loss, optimizer, check_finite=True, after_backward=None, stop=None, backward=None):
        """Backward and step; returns False if the loss was not finite on some process, in which case
        no process takes the step (fp16: the GradScaler skips it and lowers its scale, as usual).

        Everything the step must know on the host is read at once, after the backward is queued: one
        all-reduce (several processes) and one read, and none when nothing is to be known. Folded into it:
        whether the loss is finite on every process (``check_finite``; False: no check, and bf16/fp32 step
        whatever the loss, as the original would); under fp16, whether the GradScaler found inf/NaN
        gradients, which its ``step`` would read with a sync of its own (not with an optimizer that reads
        it on the device, as fused AdamW does); ``after_backward``'s shared values (the spike guard's loss
        and gradient norm); and, with several processes, the stop flag of ``stop`` (a launch.StopRequest,
        which is then ``settle``d for this step).

        ``after_backward``: a callable ``(finite) -> take`` called after the read, or an object whose
        ``share()`` returns a 1-D device tensor (or None) to be averaged over processes in that read and
        whose ``decide(finite, shared, overflow) -> take`` gets the averages (``overflow``: the GradScaler
        found inf/NaN gradients, None when not known). Either sees the gradients unscaled (fp16), before
        the step; take False: skipped on every process, which must all answer alike.

        ``backward``: a callable that back-propagates the scaled loss in place of ``.backward()`` and leaves
        the gradients as DDP would (--micro-batch: ``moco.microbatch.MicroBatchStep.backward``)."""
        optimizer.zero_grad(set_to_none=True)
        if backward is None:
            self.scaler.scale(loss).backward()
        else:
            backward(self.scaler.scale(loss))
        scaled = self.scaler.is_enabled()
        share = getattr(after_backward, 'share', None)
        # GradScaler.step decides on the host whether it found inf, unless the optimizer decides on the device
        host_inf = scaled and not getattr(optimizer, '_step_supports_amp_scaling', False)
        if after_backward is not None or host_inf:
            self.scaler.unscale_(optimizer)   # what the step would do first (a no-op without fp16)
        shared = share() if share is not None else None
        found_inf = found_inf_of(self.scaler, optimizer) if scaled and (host_inf or shared is not None) else None
        host_inf = host_inf and found_inf is not None   # else GradScaler.step reads it itself

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
        values = dist.sum_to_host(torch.cat(parts)) if parts else []   # the step's one host sync

        finite = values.pop(0) == 0 if check_finite else True
        overflow = values.pop(0) > 0 if found_inf is not None else None
        if shared is not None:
            n = shared.numel()
            shared, values = [v / dist.world_size() for v in values[:n]], values[n:]
        if fold_stop:
            stop.settle(values.pop(0) > 0)

        take = True
        if after_backward is not None:
            take = after_backward.decide(finite, shared, overflow) if share is not None else after_backward(finite)
        if not scaled:
            if take and finite:
                optimizer.step()
            return finite
        if host_inf:
            if take and not overflow:
                optimizer.step()   # as GradScaler.step: it steps iff its found_inf_per_device sum is 0
        elif take:
            self.scaler.step(optimizer)
        self.scaler.update()   # its bookkeeping of the unscaled gradients (inf found: a lower scale)
        return finite

    def state_dict(self):
        return self.scaler.state_dict()

    def load_state_dict(self, state):
        if state and self.scaler.is_enabled():
            self.scaler.load_state_dict(state)
