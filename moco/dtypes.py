"""Float dtype helpers of the lowest layer (losses, normalisation layers, mixed precision), so that
these depend on nothing of the training machinery."""
import torch


def at_least_fp32(x):
    """``x`` in float32, or kept in its own dtype when that is wider (float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))
