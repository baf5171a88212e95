"""Optimizers of the paper: LARS for ResNets, AdamW for ViTs (and plain SGD for Momentum² Teacher)."""
import torch


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio (You et al. 2017), as in MoCo v3.

    Tensors with ndim <= 1 (biases, norm weights) get neither weight decay nor the trust ratio.
    For the others: g <- g + wd * p;  g <- g * (eta * |p| / |g|)  (1 when either norm is zero).
    Then mu <- momentum * mu + g;  p <- p - lr * mu. The state key 'mu' matches the original, so
    optimizer states of original checkpoints load.
    """

    def __init__(self, params, lr=0, weight_decay=0, momentum=0.9, trust_coefficient=0.001, foreach=True):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient)
        super().__init__(params, defaults)
        self.foreach = foreach

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g in self.param_groups:
            params = [p for p in g['params'] if p.grad is not None]  # frozen ones have no gradient
            if params:
                (self._step_foreach if self.foreach else self._step_loop)(g, params)
        return loss

    def _mu(self, p):
        state = self.state[p]
        if 'mu' not in state:
            state['mu'] = torch.zeros_like(p)
        return state['mu']

    def _step_loop(self, g, params):
        """The original's loop over tensors (the reference for the foreach step)."""
        for p in params:
            dp = p.grad
            if p.ndim > 1:  # not a bias or a normalisation weight
                dp = dp.add(p, alpha=g['weight_decay'])
                param_norm = torch.norm(p)
                update_norm = torch.norm(dp)
                one = torch.ones_like(param_norm)
                q = torch.where(param_norm > 0.,
                                torch.where(update_norm > 0, (g['trust_coefficient'] * param_norm / update_norm), one),
                                one)
                dp = dp.mul(q)
            mu = self._mu(p)
            mu.mul_(g['momentum']).add_(dp)
            p.add_(mu, alpha=-g['lr'])

    def _step_foreach(self, g, params):
        """The same step with multi-tensor ops: a few kernels per group instead of ~10 per tensor, and no
        host synchronisation (the trust ratios stay on the device)."""
        updates = [p.grad for p in params]
        adapted = [i for i, p in enumerate(params) if p.ndim > 1]
        if adapted:
            weights = [params[i] for i in adapted]
            dps = torch._foreach_add([updates[i] for i in adapted], weights, alpha=g['weight_decay'])
            param_norm = torch.stack(torch._foreach_norm(weights))
            update_norm = torch.stack(torch._foreach_norm(dps))
            one = torch.ones_like(param_norm)
            q = torch.where(param_norm > 0.,
                            torch.where(update_norm > 0, g['trust_coefficient'] * param_norm / update_norm, one), one)
            torch._foreach_mul_(dps, list(q.unbind()))
            for k, i in enumerate(adapted):
                updates[i] = dps[k]
        mus = [self._mu(p) for p in params]
        torch._foreach_mul_(mus, g['momentum'])
        torch._foreach_add_(mus, updates)
        torch._foreach_add_(params, mus, alpha=-g['lr'])


def build_optimizer(name, model, lr, weight_decay, momentum=0.9, lars_trust=0.001):
    """'lars' (SGD momentum + trust ratio), 'adamw' (torch AdamW, weight decay on all tensors) or 'sgd'.

    All parameters are passed, frozen ones included (they have no gradient, so no update), exactly as
    the original does: parameter indices in the optimizer state then match original checkpoints.
    """
    params = list(model.parameters())
    if name == 'lars':
        return LARS(params, lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=lars_trust)
    if name == 'adamw':  # one fused kernel on CUDA (same update up to rounding), multi-tensor on CPU
        fused = all(p.is_cuda for p in params) or None
        return torch.optim.AdamW(params, lr, weight_decay=weight_decay, fused=fused)
    if name == 'sgd':  # Momentum² Teacher at small batch: weight decay on every tensor, BN and biases included
        return torch.optim.SGD(params, lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f'unknown optimizer {name!r}')
