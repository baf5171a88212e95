"""The fast path for small images (``--data-pipeline memory``): the whole training folder decoded once
into one uint8 tensor on the training device (GPU memory when there is one: CIFAR-10 takes 150 MB),
and both views computed batch-wise there by ``moco.data.tensor_views``. A 32 px epoch then costs no JPEG
decoding, no PIL and no per-image Python.

The order of the images is the reference path's (``EpochSampler``: a function of seed and epoch,
sharded over processes, resumable mid-epoch); the random parameters of each batch's views are drawn
from the batch's first sample seed, so a seeded run is repeatable and resumes exactly.
"""
import torch
import torchvision.transforms as transforms

from moco.data import tensor_views
from moco.data.device_loader import DeviceLoader, to_device_async
from moco.data.folder import image_folder
from moco.errors import UserError

MAX_IMAGES = 2_000_000  # beyond this, decoding everything up front is not what a user wants


def decode_folder(root, split, workers=0, strict=False):
    """(uint8 images (N, 3, H, W), int64 labels, unreadable files replaced) of root/split; every
    image must have the same size."""
    dataset = image_folder(root, split, transforms.PILToTensor(), strict=strict)
    if len(dataset) > MAX_IMAGES:
        raise UserError(f'{len(dataset)} images are too many for --data-pipeline memory; use the reference pipeline')
    # batches are stacked in the workers (one shared tensor each, not one per image)
    loader = torch.utils.data.DataLoader(_Indexed(dataset), batch_size=512, num_workers=workers,
                                         collate_fn=_stack_one_size)
    batches = list(loader)
    _check_one_size({tuple(x.shape[1:]) for x, _, _ in batches})
    return (torch.cat([x for x, _, _ in batches]), torch.cat([y for _, y, _ in batches]),
            sum(s for _, _, s in batches))


def _check_one_size(shapes):
    if len(shapes) > 1:
        raise UserError(f'--data-pipeline memory needs images of one size; found {sorted(shapes)[:3]} '
                        '(resize them once, or use the reference pipeline)')


def _stack_one_size(items):
    """collate of (image, label, skipped) items into (images, labels, files replaced)."""
    _check_one_size({tuple(x.shape) for x, _, _ in items})
    return (torch.stack([x for x, _, _ in items]), torch.tensor([y for _, y, _ in items]),
            sum(s for _, _, s in items))


class _Indexed(torch.utils.data.Dataset):
    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return self.dataset.load(i)


class InMemoryLoader(DeviceLoader):
    """The in-memory pipeline as a loader (see DeviceLoader)."""

    def __init__(self, root, split, batch_size, device, image_size, crop_min=0.08, blur=True, seed=None,
                 workers=0, strict=False, prefetch=None):
        images, targets, skipped = decode_folder(root, split, workers, strict)
        if skipped:
            print(f'{skipped} unreadable image(s) replaced while decoding {root}/{split}')
        super().__init__(len(images), batch_size, device, seed, prefetch)
        self.images, self.targets = images.to(self.device), targets.to(self.device)
        self.image_size, self.crop_min, self.blur = image_size, crop_min, blur

    def _batches(self):
        pairs = list(self.sampler)
        no_skips = torch.zeros(self.batch_size, dtype=torch.long)
        for b in range(len(self)):
            chunk = pairs[b * self.batch_size:(b + 1) * self.batch_size]
            index = to_device_async(torch.tensor([i for i, _ in chunk]), self.device)
            generator = torch.Generator().manual_seed(chunk[0][1])
            views = tensor_views.two_views(self.images[index], self.image_size, self.crop_min, self.blur, generator)
            yield views, self.targets[index], no_skips
