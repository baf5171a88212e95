"""The three input pipelines of pretraining behind one call (``--data-pipeline``).

reference: PIL views in loader workers, the original's bytes (``views.pil_pretrain_transform``, the equal
           of the original's op list, ``views.original_pretrain_transform``); the views travel as uint8 and
           become the original's float32 input on the device.
memory:    the whole folder decoded once into (GPU) memory, views made batch-wise on the device;
           small images of one size such as CIFAR (moco/data/memory.py).
gpu:       workers read JPEG bytes, the batch is decoded and both views made on the GPU; full-size
           folders such as ImageNet (moco/data/gpu.py).
auto:      reference, the original's pixels. With --fast: memory when the training images share one
           small size (CIFAR, STL-10), else gpu with CUDA, else reference.

``resolve`` decides 'auto' (once, in the pretraining program); ``pretrain_loader`` builds the loader of
the name it returned. Every loader gives its image count as ``num_images``.
"""
import os

from moco.data.folder import image_folder
from moco.data.sampler import make_loader
from moco.data.views import ToFloat, pil_pretrain_transform

PIPELINES = ('auto', 'reference', 'memory', 'gpu')
RESOLVED = ('reference', 'memory', 'gpu')   # what ``resolve`` returns, and ``pretrain_loader`` takes
MEMORY_MAX_SIDE = 96      # --fast keeps folders of images up to this size (and of one size) in memory
MEMORY_MAX_IMAGES = 200_000
SIZES_LOOKED_AT = 32


def resolve(pipeline, device, root=None, fast=False):
    """The pipeline that ``--data-pipeline`` names; 'auto' is the reference pipeline unless ``fast``.
    The one place 'auto' is decided; a name it returned resolves to itself without reading any file."""
    if pipeline != 'auto':
        return pipeline
    if not fast:
        return 'reference'
    if root is not None and one_small_size(os.path.join(root, 'train')):
        return 'memory'
    return 'gpu' if device.type == 'cuda' else 'reference'


def one_small_size(folder):
    """Whether ``folder`` (class folders of images) looks like a small-image data set that fits in memory:
    at most MEMORY_MAX_IMAGES files, and SIZES_LOOKED_AT of them, spread over the sorted list, all of
    one size of at most MEMORY_MAX_SIDE px (read from the file headers only)."""
    from PIL import Image
    try:
        files = sorted(os.path.join(d.path, f) for d in os.scandir(folder) if d.is_dir() for f in os.listdir(d.path))
    except OSError:
        return False          # the loader says what is wrong with the folder
    if not files or len(files) > MEMORY_MAX_IMAGES:
        return False
    sizes = set()
    for path in files[::max(1, len(files) // SIZES_LOOKED_AT)]:
        try:
            with Image.open(path) as img:
                sizes.add(img.size)
        except Exception:     # an unreadable file: the loader reports it
            continue
    return len(sizes) == 1 and max(next(iter(sizes))) <= MEMORY_MAX_SIDE


def pretrain_loader(pipeline, root, batch_size, device, image_size, crop_min=0.08, blur=True, seed=None,
                    workers=0, strict=False):
    """The loader of ``([view1, view2], targets, skipped)`` batches of root/train (its image count:
    ``loader.num_images``). ``pipeline``: a name ``resolve`` returned (one of RESOLVED; 'auto' is decided
    there, with --fast)."""
    if pipeline not in RESOLVED:
        raise ValueError(f'data pipeline {pipeline!r}: expected one of {RESOLVED} (resolve {PIPELINES[0]!r} first)')
    if pipeline == 'memory':
        from moco.data.memory import InMemoryLoader
        loader = InMemoryLoader(root, 'train', batch_size, device, image_size, crop_min, blur=blur, seed=seed,
                                workers=workers, strict=strict)
    elif pipeline == 'gpu':
        from moco.data.gpu import GpuJpegLoader
        loader = GpuJpegLoader(root, 'train', batch_size, device, image_size, crop_min, blur=blur, seed=seed,
                               workers=workers, strict=strict)
    else:
        train_set = image_folder(root, 'train', pil_pretrain_transform(image_size, crop_min, blur=blur), strict=strict)
        loader = PilViewsLoader(make_loader(train_set, batch_size, workers, shuffle=True, drop_last=True, seed=seed,
                                            pin_memory=device.type == 'cuda'), device)
    return loader


class PilViewsLoader:
    """The reference pipeline's DataLoader of PIL views (``views.pil_pretrain_transform``, the original's
    bytes), its uint8 views sent to ``device`` and made the original's float32 input there (``views.ToFloat``).
    ``sampler`` is the DataLoader's (``start_epoch`` sets it); ``num_images`` as the device pipelines'
    (``DeviceLoader.num_images``)."""

    def __init__(self, loader, device):
        self.loader, self.device, self.to_float = loader, device, ToFloat()
        self.sampler = loader.sampler

    @property
    def num_images(self):
        return self.sampler.n

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for views, targets, skipped in self.loader:
            yield [self.to_float(v.to(self.device, non_blocking=True)) for v in views], targets, skipped
