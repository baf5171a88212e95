"""Split a folder of images into the train/ and val/ folders the scripts read:

    python -m moco.tools.split_folder SRC DEST [--val-fraction 0.1] [--seed 0] [--copy]

SRC holds class folders of images (SRC/<class>/<image>), or images alone (then DEST/train and
DEST/val hold images alone: pretraining needs no labels, the kNN monitor and the probe do). The same
fraction of each class goes to val/, chosen at random from --seed. Files are linked (symbolic links
to their absolute paths) unless --copy.
"""
import os
import random
import shutil
import sys

from moco import cli
from moco.data.folder import image_files


def get_args_parser():
    p = cli.parser('Split a folder of images into train/ and val/', prog='python -m moco.tools.split_folder')
    p.add_argument('src', metavar='SRC', help='class folders of images, or images alone')
    p.add_argument('dest', metavar='DEST', help='new folder: DEST/train and DEST/val are written')
    p.add_argument('--val-fraction', default=0.1, type=float, help='share of each class that goes to val/')
    p.add_argument('--seed', default=0, type=int, help='seed of the random choice')
    p.add_argument('--copy', action='store_true', help='copy the files instead of linking them')
    return p


def groups(src):
    """{class name or '': sorted image paths} of SRC."""
    classes = sorted(e.name for e in os.scandir(src) if e.is_dir() and not e.name.startswith('.'))
    if classes:
        found = {c: sorted(os.path.join(src, c, f) for f in image_files(os.path.join(src, c))) for c in classes}
        return {c: files for c, files in found.items() if files}
    return {'': sorted(os.path.join(src, f) for f in image_files(src))}


def split(src, dest, val_fraction=0.1, seed=0, copy=False):
    """Write DEST/train and DEST/val; returns {'train': n, 'val': m}."""
    if not os.path.isdir(src):
        raise SystemExit(f'error: {src} is not a folder')
    if not 0 < val_fraction < 1:
        raise SystemExit(f'error: --val-fraction must be between 0 and 1 (got {val_fraction})')
    if os.path.exists(dest) and os.listdir(dest):
        raise SystemExit(f'error: {dest} already exists and is not empty; choose a new folder')
    found = groups(src)
    if not any(found.values()):
        raise SystemExit(f'error: no images in {src} (nor in class folders under it)')
    rng = random.Random(seed)
    counts = {'train': 0, 'val': 0}
    for name, files in found.items():
        files = list(files)
        rng.shuffle(files)
        n_val = max(1, round(len(files) * val_fraction)) if len(files) > 1 else 0
        for split_name, chosen in (('val', files[:n_val]), ('train', files[n_val:])):
            folder = os.path.join(dest, split_name, name)
            os.makedirs(folder, exist_ok=True)
            for path in chosen:
                target = os.path.join(folder, os.path.basename(path))
                if copy:
                    shutil.copy2(path, target)
                else:
                    os.symlink(os.path.abspath(path), target)
            counts[split_name] += len(chosen)
    return counts


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    counts = split(args.src, args.dest, args.val_fraction, args.seed, args.copy)
    print(f"wrote {args.dest}/train ({counts['train']} images) and {args.dest}/val ({counts['val']} images)")


if __name__ == '__main__':
    sys.exit(main())
