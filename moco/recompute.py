"""Activation checkpointing of the online encoder (``--grad-checkpointing``): the activations inside each
residual block (``models.residual_blocks``: a ViT's transformer blocks; the blocks of each stage of a ResNet,
ResNeXt, Wide ResNet or RegNet) are not kept for the backward but recomputed there, block by block, with
torch's non-reentrant ``torch.utils.checkpoint.checkpoint``. Only each block's input stays in memory, for
one extra forward of the encoder's blocks per step. The momentum encoder runs under ``no_grad`` and keeps
nothing anyway.

The same mathematics, bit for bit (tests/test_recompute.py, CPU fp32 and bf16): the recomputation repeats
the forward's ops on the same inputs, under the same autocast and random state (``preserve_rng_state``).
One thing a plain recomputation would change: a BatchNorm in train mode updates its running statistics
(and ``num_batches_tracked``) on every call, so recomputing it counts each batch twice (pytorch#96136).
Here the recomputation puts every buffer of the block back as it found it (copied back, so exactly), so
each forward counts once, as without checkpointing. A synchronised BatchNorm (``moco/norm.py``,
``nn.SyncBatchNorm``) repeats its collectives in the recomputation: every process runs the same backward
graph, so they come in the same order on every process.

Nothing is wrapped: each block's ``forward`` is replaced on the instance, so parameter and buffer names,
hence checkpoint files, do not change, and a later ``convert_sync_batchnorm`` (which swaps the BatchNorms
inside the blocks) keeps it. Under ``torch.compile`` the blocks are checkpointed without the buffer
guard (a context Dynamo does not trace): right for ViTs, whose blocks hold no buffers; with BatchNorms in
the blocks torch.compile's backward fails, so ``enable_grad_checkpointing`` refuses the pair in one line.
"""
import contextlib
from types import MethodType

import torch
from torch.utils.checkpoint import checkpoint

from moco.errors import UserError
from moco.models import residual_blocks

_MARK = '_moco_recompute'   # set on a block whose forward is checkpointed


@contextlib.contextmanager
def _buffers_kept(module):
    """Runs the block's recomputation and puts its buffers (BatchNorm running statistics, counters) back
    as they were, even when the recomputation stops early (torch stops it once it has what it needs)."""
    saved = [(b, b.clone()) for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)


def _checkpointed_forward(self, *args, **kwargs):
    forward = type(self).forward.__get__(self)
    if not torch.is_grad_enabled():            # evaluation, the kNN monitor: nothing to keep or recompute
        return forward(*args, **kwargs)
    if torch.compiler.is_compiling():          # torch's own checkpoint: ViT blocks, which hold no buffers
        return checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=True,
                      context_fn=lambda: (contextlib.nullcontext(), _buffers_kept(self)), **kwargs)


def checkpoint_blocks(encoder):
    """Recompute each residual block of ``encoder`` in the backward (in place; again: no change).
    Returns the number of blocks."""
    blocks = residual_blocks(encoder)
    for block in blocks:
        if not getattr(block, _MARK, False):
            block.forward = MethodType(_checkpointed_forward, block)
            setattr(block, _MARK, True)
    return len(blocks)


def uncheckpoint_blocks(encoder):
    """Undo ``checkpoint_blocks``: the blocks keep their activations again."""
    for block in residual_blocks(encoder):
        if getattr(block, _MARK, False):
            del block.forward
            delattr(block, _MARK)


def is_checkpointed(encoder):
    return all(getattr(block, _MARK, False) for block in residual_blocks(encoder))


def enable_grad_checkpointing(model, compile=False):
    """``--grad-checkpointing``: recompute the residual blocks of the online encoder (``base_encoder``) of a
    MoCo v3, BYOL or Momentum² Teacher model (``models.build_moco``) in the backward. Returns the number of
    blocks. ``compile`` (``--compile`` too): refused for blocks that hold buffers (the BatchNorms of
    ResNets and RegNets), whose recomputation torch.compile's backward rejects (torch 2.14: "modified by
    an inplace operation"); ViT blocks hold none, and are checkpointed under compile too."""
    if compile and any(True for block in residual_blocks(model.base_encoder) for _ in block.buffers()):
        raise UserError(f'--grad-checkpointing does not work with --compile for a {type(model.base_encoder).__name__}: '
                        'torch.compile cannot recompute the BatchNorms inside its residual blocks; drop one of the '
                        'two flags (ViTs take both)')
    return checkpoint_blocks(model.base_encoder)
