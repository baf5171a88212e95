"""Download CIFAR-10 or CIFAR-100 with torchvision and write the ImageFolder layout the scripts read:

    python -m moco.tools.prepare_data cifar10 data/cifar10        ->  data/cifar10/{train,val}/<class>/<index>.png

PNG keeps the images exactly as published (the shipped demo data is JPEG to stay small). ``val/`` is
the official test split. Needs network access the first time (torchvision's download into --cache).
"""
import argparse
import os
import sys

from moco.errors import first_line

DATASETS = {'cifar10': 'CIFAR10', 'cifar100': 'CIFAR100'}


def write_split(dataset, folder):
    """Write every (PIL image, label) of ``dataset`` as folder/<class name>/<index>.png."""
    classes = dataset.classes
    for name in classes:
        os.makedirs(os.path.join(folder, name), exist_ok=True)
    for i in range(len(dataset)):
        img, label = dataset[i]
        img.save(os.path.join(folder, classes[label], f'{i:05d}.png'))
    return len(dataset)


def prepare(name, dest, cache=None, download=True):
    import torchvision.datasets as tvd
    cls = getattr(tvd, DATASETS[name])
    cache = cache or os.path.join(dest, 'download')
    counts = {}
    for split, train in (('train', True), ('val', False)):
        out = os.path.join(dest, split)
        if os.path.isdir(out) and os.listdir(out):
            raise SystemExit(f'error: {out} already exists and is not empty; remove it or choose another folder')
        try:
            dataset = cls(cache, train=train, download=download)
        except (RuntimeError, OSError) as e:  # no network, a truncated archive, ...
            raise SystemExit(f'error: cannot get {name} into {cache}: {first_line(e, None)}') from None
        counts[split] = write_split(dataset, out)
    return counts


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], prog='python -m moco.tools.prepare_data',
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('dataset', choices=sorted(DATASETS))
    p.add_argument('dest', help='folder to create train/ and val/ in')
    p.add_argument('--cache', default=None, help='where torchvision downloads the archive (default: DEST/download)')
    args = p.parse_args(argv)
    counts = prepare(args.dataset, args.dest, args.cache)
    print(f'{args.dataset}: {counts["train"]} training and {counts["val"]} test images in {args.dest}/train and '
          f'{args.dest}/val')


if __name__ == '__main__':
    sys.exit(main())
