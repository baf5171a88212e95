"""``--micro-batch N``: the step of the whole per-process batch, holding the backbone activations of only N
images at a time (the paper's batch 4096 on fewer GPUs).

Plain gradient accumulation would be another training for a contrastive loss (a query's negatives are the
other images of its batch, the heads' BatchNorms normalise over the batch). This step is the same training
up to the order of float sums, for a backbone that treats each image on its own (a ViT: LayerNorm is per
sample, no BatchNorm):

1. both backbones run over the pieces of each view without gradients, keeping only their features (the
   pooled [cls] token before the head);
2. the heads (projector, predictor and their BatchNorms) and the loss run on the whole batch, in the order of
   ``MoCo.forward`` (``MoCo.forward_from_features``: queries, momentum update, keys);
3. the backward of the (scaled) loss gives the heads' gradients and the loss's gradient with respect to
   each online feature (a leaf tensor);
4. each piece of the online backbone runs again, with gradients, and is back-propagated from its features'
   gradients: the backbone's gradients accumulate over the pieces;
5. with several processes, the gradients are averaged in ~25 MB buckets (no DDP: its reducer expects one
   backward pass a step).

The online backbone thus runs forward twice: about 5 backbone passes' worth of compute a step instead of 4
(forward, backward ~2, momentum forward), +25%; memory holds one piece's activations, the whole batch's
features and the heads' activations. Under fp16 the loss is scaled once: the piece
passes receive feature gradients that are already scaled. A piece's second pass draws the random numbers
of its first (the generator's state is saved and replayed), so dropout or drop-path would see the same
masks (MoCo v3's ViTs use neither in pretraining). Backbones with BatchNorm (ResNets, convolutional stems)
are refused: their BatchNorms would see a piece, not the batch (``--grad-checkpointing`` saves memory
there).
"""
import contextlib

import torch
import torch.distributed as tdist
import torch.nn as nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from moco import dist
from moco.errors import UserError
from moco.models import is_vit
from moco.momentum_bn import MomentumBatchNorm

BUCKET_BYTES = 25 * 2 ** 20   # gradients averaged per all-reduce (DDP's default bucket)
BATCH_NORMS = (nn.modules.batchnorm._BatchNorm, MomentumBatchNorm)   # SyncBatchNorm, AllReduceBatchNorm too


def refusal(arch):
    """Why --micro-batch cannot train ``arch`` exactly (one line), or None: a backbone with BatchNorm."""
    if not is_vit(arch):
        return (f'--micro-batch is for ViTs: the BatchNorms of the {arch} backbone would normalise each piece '
                'instead of the batch (another training); to fit a larger batch, use --grad-checkpointing')
    if arch.startswith('vit_conv'):
        return (f'--micro-batch cannot train {arch}: the BatchNorms of its convolutional stem would normalise '
                'each piece instead of the batch; use --grad-checkpointing, or a ViT with a patch projection')
    return None


def check_model(model):
    """Raise a UserError when ``model``'s online backbone (its encoder without the head) holds a BatchNorm
    or is not a timm ViT (whose ``forward_features``/``forward_head`` give the feature before the head)."""
    encoder = model.base_encoder
    head = getattr(encoder, model.head_attr)
    in_head = {id(m) for m in head.modules()}
    norms = [name for name, m in encoder.named_modules() if isinstance(m, BATCH_NORMS) and id(m) not in in_head]
    if norms:
        raise UserError(f'--micro-batch needs a backbone without BatchNorm (its BatchNorms would normalise each '
                        f'piece instead of the batch); this one has BatchNorm in {norms[0]}: use --grad-checkpointing')
    if not hasattr(encoder, 'forward_features'):
        raise UserError(f'--micro-batch is for ViTs (a {type(encoder).__name__} backbone)')


def backbone_features(encoder, x):
    """The encoder's output before its head (a timm ViT: the pooled [cls] token after the final norm),
    by the same operations as ``encoder(x)``."""
    return encoder.forward_head(encoder.forward_features(x), pre_logits=True)


def micro_batch_step(model, args):
    """The training loop's step with --micro-batch (``args.micro_batch`` > 0), else None."""
    size = getattr(args, 'micro_batch', 0) or 0
    return MicroBatchStep(model, size) if size > 0 else None


class MicroBatchStep:
    """``loss = step(x1, x2, m)`` (inside the step's autocast), then ``step.backward(scaled_loss)`` in place
    of ``scaled_loss.backward()`` (``Amp.backward_step(..., backward=step.backward)``): the gradients of the
    whole batch, averaged over processes, in every parameter's ``.grad``.

    ``model``: the bare MoCo/BYOL/M2T ViT model, not wrapped in DDP (this step averages the gradients
    itself; the initial weights must be equal on every process: ``dist.broadcast_from_rank0``). Its
    BatchNorms (all in the heads) keep equal statistics on every process where they are synchronised, as
    under DDP; M2T's per-process ones stay per process, as under DDP with ``sync_buffers=False``."""

    def __init__(self, model, micro_batch):
        if isinstance(model, nn.parallel.DistributedDataParallel):
            raise TypeError('MicroBatchStep takes the bare model: it averages the gradients itself, without DDP')
        if micro_batch < 1:
            raise ValueError(f'micro_batch must be positive (got {micro_batch})')
        check_model(model)
        self.model, self.micro_batch = model, micro_batch
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._pending = None

    def __call__(self, x1, x2, m):
        model, n = self.model, self.micro_batch
        device_type = x1.device.type
        autocast = torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
        online = []
        for x in (x1, x2):
            states, pieces = [], []
            for piece in x.split(n):
                states.append(_rng_state(x.device))
                with torch.no_grad(), _uncached(device_type, *autocast):
                    pieces.append(backbone_features(model.base_encoder, piece))
            online.append((torch.cat(pieces).requires_grad_(), states))

        def momentum_features(i):   # called by the model after the momentum update, under no_grad
            return torch.cat([backbone_features(model.momentum_encoder, piece) for piece in (x1, x2)[i].split(n)])

        loss = model.forward_from_features(online[0][0], online[1][0], m, momentum_features)
        self._pending = (x1, x2), online, device_type, autocast
        return loss

    def backward(self, scaled_loss):
        """The backward of the step's (scaled) loss: the heads', then the online backbone's piece by piece;
        with several processes, the gradients then averaged (one all-reduce per bucket)."""
        views, online, device_type, (enabled, dtype) = self._pending
        self._pending = None
        scaled_loss.backward()
        encoder, n = self.model.base_encoder, self.micro_batch
        for x, (features, states) in zip(views, online):
            for piece, grad, state in zip(x.split(n), features.grad.split(n), states):
                # an autocast region of its own: its casts of the weights belong to this piece's graph, which its
                # backward frees (the whole-batch step sums both views' gradients of a weight through one cast,
                # in bf16/fp16; here each piece's arrive in float32)
                with _replayed_rng(x.device, state), torch.autocast(device_type, dtype=dtype, enabled=enabled):
                    out = backbone_features(encoder, piece)
                torch.autograd.backward(out, grad)
        average_gradients(self.params)


def average_gradients(params, bucket_bytes=BUCKET_BYTES):
    """The gradients of ``params`` averaged over processes, as DDP would: flattened per bucket of about
    ``bucket_bytes``, the all-reduces started together, then divided by the world size. The same parameters
    must have a gradient on every process (the same model and step: they do). Nothing at world size 1."""
    world = dist.world_size()
    if world == 1:
        return
    buckets, current, size = [], [], 0
    for g in (p.grad for p in params if p.grad is not None):
        if current and (g.dtype != current[0].dtype or g.device != current[0].device or size >= bucket_bytes):
            buckets.append(current)
            current, size = [], 0
        current.append(g)
        size += g.numel() * g.element_size()
    if current:
        buckets.append(current)
    flats = [_flatten_dense_tensors(bucket) for bucket in buckets]
    works = [tdist.all_reduce(flat, async_op=True) for flat in flats]
    for bucket, flat, work in zip(buckets, flats, works):
        work.wait()
        flat.div_(world)
        torch._foreach_copy_(bucket, _unflatten_dense_tensors(flat, bucket))


def _uncached(device_type, enabled, dtype):
    """Phase 1's autocast without its cache of cast weights: a cast made under no_grad has no gradient history,
    and a later pass with gradients in the same autocast region would reuse it (and give no gradient)."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype, cache_enabled=False)


def _rng_state(device):
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == 'cuda' else None


@contextlib.contextmanager
def _replayed_rng(device, state):
    """The random-number generators of ``device`` (and the CPU's) at ``state`` inside, and as they were after."""
    cuda = device.type == 'cuda'
    with torch.random.fork_rng(devices=[device] if cuda else []):
        torch.set_rng_state(state[0])
        if cuda:
            torch.cuda.set_rng_state(state[1], device)
        yield
