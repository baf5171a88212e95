"""The hyper-parameters each method uses when a flag is not given (each method's class in
moco/builder.py declares them in ``defaults``).

mocov3 keeps the original main_moco.py defaults exactly. byol follows the official DeepMind presets
(configs/byol.py; batch 4096): the preset is chosen by the number of epochs. m2t follows the
Momentum² Teacher release: SGD for batches up to 1024, LARS above. Both force the cosine momentum
schedule (always on in their papers) and use crop scale 0.08 (the default here).
CONFIG.md has the commands and README.md what differs from each release.
"""
from moco.builder import METHODS


def method_defaults(method, epochs, total_batch):
    """dict(lr, weight_decay, moco_m, optimizer, moco_m_cos) of ``method`` for a run of ``epochs`` at
    ``total_batch``; moco_m_cos None means 'as the flag says'."""
    if method not in METHODS:
        raise ValueError(f'unknown method {method!r}')
    return METHODS[method][0].defaults(epochs, total_batch)


def apply_method_defaults(args):
    """Fill the flags left at None with the method's values (the flags given always win)."""
    defaults = method_defaults(args.method, args.epochs, args.batch_size)
    for key in ('lr', 'weight_decay', 'moco_m', 'optimizer'):
        if getattr(args, key) is None:
            setattr(args, key, defaults[key])
    if defaults['moco_m_cos']:
        args.moco_m_cos = True
