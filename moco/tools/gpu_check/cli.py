"""The command line of python -m moco.tools.gpu_check (--help), with the dry run's defaults."""
import argparse
import os
import sys

from .check import Check, run_check
from .parts import PARTS
from .settings import CARRIED_TAR, ROOT


def parse_timeouts(text):
    out = {}
    for item in filter(None, (text or '').split(',')):
        name, _, seconds = item.partition('=')
        if name not in PARTS:
            raise argparse.ArgumentTypeError(f'unknown part {name!r} (parts: {", ".join(PARTS)})')
        out[name] = float(seconds)
    return out


def parse_parts(text):
    parts = [p for p in text.split(',') if p]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise argparse.ArgumentTypeError(f'unknown part(s) {unknown} (parts: {", ".join(PARTS)})')
    return parts


def build_parser():
    description = sys.modules[__package__].__doc__.splitlines()[0]
    p = argparse.ArgumentParser(prog='python -m moco.tools.gpu_check', description=description)
    p.add_argument('--dry-run', action='store_true', help='the same parts on CPU with tiny stand-ins (CI)')
    p.add_argument('--budget-min', type=float, default=None,
                   help='minutes for all parts (default 9; dry run 30: a limit only, its parts take what they need)')
    p.add_argument('--parts', type=parse_parts, default=list(PARTS),
                   help=f'comma-separated, of {",".join(PARTS)} (default: all)')
    p.add_argument('--part-timeout', type=parse_timeouts, default={}, metavar='PART=S,...',
                   help='seconds for a part instead of its share of the budget')
    p.add_argument('--out', default=None, help='results folder (default: $OUT if set, else output/gpu_check, '
                                               'dry run output/gpu_check_dry)')
    p.add_argument('--work-dir', default=None,
                   help='data, JPEGs, run folders (default /tmp/moco_gpu_check, dry run /tmp/moco_gpu_check_dry)')
    p.add_argument('--cifar-tar', default=None,
                   help=f'CIFAR-10 JPEG tarball (default: {CARRIED_TAR}; dry run: one made '
                        'from the shipped demo data)')
    p.add_argument('--cifar-dir', default=None, help='an unpacked CIFAR-10 folder with train/ and val/ (no tarball)')
    p.add_argument('--cifar-epochs', type=int, default=None,
                   help='epochs of the fast run if they fit (default 200; dry 4)')
    p.add_argument('--cifar-ref-epochs', type=int, default=None,
                   help='epochs of the original-numerics run if they fit (default 50; dry 2)')
    p.add_argument('--knn-freq', type=int, default=None, help='kNN every N epochs (default 20; dry 2)')
    return p


def get_args(argv=None):
    """The parsed arguments, the defaults that depend on --dry-run filled in, the paths absolute."""
    args = build_parser().parse_args(argv)
    dry = args.dry_run
    args.budget_min = args.budget_min or (30.0 if dry else 9.0)
    args.out = args.out or (os.path.join(ROOT, 'output', 'gpu_check_dry') if dry else
                            os.environ.get('OUT') or os.path.join(ROOT, 'output', 'gpu_check'))
    args.work_dir = args.work_dir or ('/tmp/moco_gpu_check_dry' if dry else '/tmp/moco_gpu_check')
    args.cifar_epochs = args.cifar_epochs or (4 if dry else 200)
    args.cifar_ref_epochs = args.cifar_ref_epochs or (2 if dry else 50)
    args.knn_freq = args.knn_freq or (2 if dry else 20)
    for name in ('out', 'work_dir', 'cifar_tar', 'cifar_dir'):
        if getattr(args, name):
            setattr(args, name, os.path.abspath(getattr(args, name)))
    return args


def main(argv=None):
    return run_check(Check(get_args(argv)))
