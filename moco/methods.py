"""The three methods and the hyper-parameters each uses when a flag is not given.

mocov3 keeps the original main_moco.py defaults exactly. byol follows the official DeepMind presets
(configs/byol.py; batch 4096): the preset is chosen by the number of epochs. m2t follows the
Momentum² Teacher release: SGD for batches up to 1024, LARS above. Both force the cosine momentum
schedule (always on in their papers) and use crop scale 0.08 (the default here).
See ../CONFIG.md for the commands and ../README.md for what differs from each release.
"""

METHODS = ('mocov3', 'byol', 'm2t')

# epochs up to -> (base lr per 256, weight decay, base momentum of the target)
BYOL_PRESETS = ((40, 0.45, 1e-6, 0.97), (100, 0.45, 1e-6, 0.99), (300, 0.3, 1e-6, 0.99),
                (float('inf'), 0.2, 1.5e-6, 0.996))


def method_defaults(method, epochs, total_batch):
    """dict(lr, weight_decay, moco_m, optimizer, moco_m_cos) of ``method`` for a run of ``epochs`` at
    ``total_batch``; moco_m_cos None means 'as the flag says'."""
    if method == 'mocov3':
        return dict(lr=0.6, weight_decay=1e-6, moco_m=0.99, optimizer='lars', moco_m_cos=None)
    if method == 'byol':
        _, lr, wd, m = next(p for p in BYOL_PRESETS if epochs <= p[0])
        return dict(lr=lr, weight_decay=wd, moco_m=m, optimizer='lars', moco_m_cos=True)
    if method == 'm2t':
        if total_batch <= 1024:  # SGD, weight decay on every parameter
            return dict(lr=0.05, weight_decay=1e-4, moco_m=0.99, optimizer='sgd', moco_m_cos=True)
        return dict(lr=0.45 if epochs <= 200 else 0.3, weight_decay=1e-6, moco_m=0.99, optimizer='lars',
                    moco_m_cos=True)
    raise ValueError(f'unknown method {method!r}')


def apply_method_defaults(args):
    """Fill the flags left at None with the method's values (the flags given always win)."""
    defaults = method_defaults(args.method, args.epochs, args.batch_size)
    for key in ('lr', 'weight_decay', 'moco_m', 'optimizer'):
        if getattr(args, key) is None:
            setattr(args, key, defaults[key])
    if defaults['moco_m_cos']:
        args.moco_m_cos = True
