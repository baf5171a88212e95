"""Losses as small functions of tensors, so that tests can call them directly."""
import torch
import torch.nn.functional as F

from moco import dist
from moco.dtypes import at_least_fp32


def infonce(q, k, T):
    """MoCo v3 contrastive loss (paper Alg. 1, ``ctr``).

    q: (N, C) queries of this process; k: (N, C) keys of this process (no gradient).
    Keys of all processes are gathered, so each query has 1 positive and N*world - 1 negatives; the
    positive of query i on rank r is global key i + N*r. The loss is scaled by 2T as in the paper.
    """
    q = F.normalize(q, dim=1)
    k = F.normalize(k, dim=1)
    k = dist.concat_all_gather(k)                                  # (N*world, C)
    logits = q @ k.t() / T                                         # (N, N*world)
    N = logits.shape[0]
    labels = torch.arange(N, dtype=torch.long, device=q.device) + N * dist.rank()
    return F.cross_entropy(logits, labels) * (2 * T)


def regression_loss(p, z):
    """BYOL's loss of one direction: mean_i (2 - 2 cos(p_i, z_i)), in fp32 or wider (between 0 and 4).

    p: (N, C) predictions of this process; z: (N, C) targets (no gradient). No gathering: DDP's
    gradient averaging makes it the global mean.
    """
    p = F.normalize(at_least_fp32(p), dim=1)
    z = F.normalize(at_least_fp32(z), dim=1)
    return (2 - 2 * (p * z).sum(dim=1)).mean()
