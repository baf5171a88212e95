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
                            '10; 0: no check, hence no host sync in the step, and a NaN reaches the weights)')


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

    def backward_step(self, loss, optimizer, check_finite=True, after_backward=None):
        """Backward and step; returns False if the loss was not finite on some process, in which case
        no process takes the step (fp16: the GradScaler skips it and lowers its scale, as usual).

        Deciding needs the loss on the host: one sync per step, after the backward is queued (the
        GradScaler of the original syncs once per step as well). ``check_finite=False``: no check and
        no sync (bf16/fp32 then step whatever the loss, as the original would).

        ``after_backward(finite)``, when given, sees the gradients unscaled (fp16), before the step, and
        returns whether to take it (False: skipped on every process, which must all answer alike)."""
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        finite = dist.all_true(torch.isfinite(loss.detach())) if check_finite else True
        take = True
        if after_backward is not None:
            self.scaler.unscale_(optimizer)   # what the step would do first (a no-op without fp16)
            take = after_backward(finite)
        if take and (finite or self.scaler.is_enabled()):
            self.scaler.step(optimizer)
            self.scaler.update()
        elif after_backward is not None and self.scaler.is_enabled():
            self.scaler.update()   # its bookkeeping of the unscaled gradients (inf found: a lower scale)
        return finite

    def state_dict(self):
        return self.scaler.state_dict()

    def load_state_dict(self, state):
        if state and self.scaler.is_enabled():
            self.scaler.load_state_dict(state)
