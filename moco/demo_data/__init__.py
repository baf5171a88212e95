"""Small real data shipped with the repository: CIFAR-10 (JPEG) images, 32x32, ImageFolder layout.

cifar10_demo.tar.gz holds cifar10_demo/{train,val}/<class>/*.jpg, the first images (sorted by file
name) of each class of a JPEG copy of CIFAR-10 (Krizhevsky 2009): train/ from its training split,
val/ from its test split. Pixels differ slightly from the pickled CIFAR-10 (JPEG loss).
"""
import os
import tarfile

ARCHIVE = os.path.join(os.path.dirname(__file__), 'cifar10_demo.tar.gz')
CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck')


def extract(dest, per_class=None):
    """Unpack into dest/cifar10_demo and return that path. ``per_class`` = {'train': n, 'val': m}
    keeps only the first n / m images of each class (tests use a few)."""
    root = os.path.join(dest, 'cifar10_demo')
    kept = {}
    with tarfile.open(ARCHIVE, 'r:gz') as tar:
        members = []
        for m in tar.getmembers():
            parts = m.name.split('/')
            if not m.isfile() or len(parts) != 4:
                continue
            split, cls = parts[1], parts[2]
            if per_class is not None:
                n = kept.get((split, cls), 0)
                if n >= per_class.get(split, 0):
                    continue
                kept[(split, cls)] = n + 1
            members.append(m)
        tar.extractall(dest, members=members, filter='data')
    return root
