"""Datasets, the asymmetric augmentations of MoCo v3 (the BYOL recipe) and loaders.

This is the reference PIL/torchvision path: the same ops, order and parameters as the original
release, so its randomness and pixels are the original's.
"""
import io
import os
import random
import sys

import numpy as np

import torch
import torchvision.datasets as datasets
import torchvision.transforms as transforms
from PIL import Image, ImageFilter, ImageOps

from moco import dist
from moco.dist import UserError, first_line

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class GaussianBlur:
    """Gaussian blur with sigma ~ U[0.1, 2.0], used as PIL's blur radius (SimCLR)."""

    def __init__(self, sigma=(.1, 2.)):
        self.sigma = sigma

    def __call__(self, x):
        sigma = random.uniform(self.sigma[0], self.sigma[1])
        return x.filter(ImageFilter.GaussianBlur(radius=sigma))


class Solarize:
    """Invert all pixels >= 128 (PIL's default threshold)."""

    def __call__(self, x):
        return ImageOps.solarize(x)


class TwoCropsTransform:
    """Two views of one image, each from its own augmentation."""

    def __init__(self, transform1, transform2):
        self.transform1 = transform1
        self.transform2 = transform2

    def __call__(self, x):
        return [self.transform1(x), self.transform2(x)]


def normalize():
    return transforms.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)


def view_transform(image_size, crop_min, blur_p, solarize_p):
    """One view of the BYOL augmentation; the MoCo v3 views differ only in blur_p and solarize_p."""
    ops = [
        transforms.RandomResizedCrop(image_size, scale=(crop_min, 1.)),
        transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),  # not strengthened
        transforms.RandomGrayscale(p=0.2),
    ]
    if blur_p > 0:
        ops.append(transforms.RandomApply([GaussianBlur([.1, 2.])], p=blur_p))
    if solarize_p > 0:
        ops.append(transforms.RandomApply([Solarize()], p=solarize_p))
    ops += [transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalize()]
    return transforms.Compose(ops)


def pretrain_transform(image_size=224, crop_min=0.08, blur=True):
    """View 1: blur p 1.0, no solarize. View 2: blur p 0.1, solarize p 0.2 (paper appendix, BYOL).
    ``blur=False`` drops the blur from both views (small-image recipes)."""
    return TwoCropsTransform(
        view_transform(image_size, crop_min, blur_p=1.0 if blur else 0., solarize_p=0.),
        view_transform(image_size, crop_min, blur_p=0.1 if blur else 0., solarize_p=0.2))


def eval_transform(image_size=224):
    """Resize(256) + CenterCrop(224) at ImageNet scale; at <= 64 px images are resized to the size."""
    resize = image_size if image_size <= 64 else int(round(image_size * 256 / 224))
    return transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(image_size),
                               transforms.ToTensor(), normalize()])


def lincls_train_transform(image_size=224):
    return transforms.Compose([transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip(),
                               transforms.ToTensor(), normalize()])


class BadImage(Exception):
    """An image file that cannot be decoded (truncated, corrupt, not an image)."""


def load_rgb(path, data=None):
    """PIL RGB image of any file PIL reads: CMYK and YCbCr JPEGs, grayscale, 16-bit grayscale PNGs,
    palette images (with transparency), RGBA. Raises BadImage if the file cannot be decoded.
    ``data``: the file's bytes, already read (``path`` then only names it in messages)."""
    try:
        with (open(path, 'rb') if data is None else io.BytesIO(data)) as f:
            img = Image.open(f)
            img.load()  # decode now: a truncated file fails here, not later inside a transform
            if img.mode in ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I'):  # 16/32-bit gray: scale, don't clip
                arr = np.asarray(img, dtype=np.float64)
                arr = arr / (65535. if img.mode.startswith('I;16') or arr.max() > 255 else 255.) * 255.
                img = Image.fromarray(arr.round().clip(0, 255).astype(np.uint8), 'L')
            elif img.mode == 'P' and 'transparency' in img.info:
                img = img.convert('RGBA')  # what PIL asks for; avoids its warning
            return img.convert('RGB')
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        reason = first_line(e, 160)
        if reason.startswith('cannot identify image file'):  # PIL repeats the file name
            reason = 'not an image PIL can read'
        raise BadImage(f'{path}: {reason}') from None


# Consecutive unreadable files tolerated before a run gives up (a folder of mostly broken files is a
# user mistake, not bad luck).
MAX_CONSECUTIVE_BAD = 50


def too_many_unreadable(how_many, root):
    """The error when a folder holds more unreadable files than a run tolerates."""
    return UserError(f'{how_many} unreadable images in {root}: is this an image folder?')


class SafeImageFolder(datasets.ImageFolder):
    """ImageFolder that survives bad files: an unreadable image is reported once (per process) on
    stderr and replaced by the next readable one, unless ``strict`` (then it is a one-line error).

    ``load(i)`` returns ``(sample, target, skipped)``, ``skipped`` counting the files passed over.
    """

    def __init__(self, root, transform=None, strict=False):
        super().__init__(root, transform, loader=load_rgb)
        self.strict = strict
        self._reported = set()

    def report_bad(self, path, error):
        """A one-line error with ``strict``; else a warning, once per file and process."""
        if self.strict:
            raise UserError(f'unreadable image {error} (without --strict-data it would be skipped)')
        if path not in self._reported:
            self._reported.add(path)
            print(f'warning: skipping unreadable image {error}', file=sys.stderr, flush=True)

    def load(self, index):
        for skipped in range(min(MAX_CONSECUTIVE_BAD, len(self.samples))):
            path, target = self.samples[(index + skipped) % len(self.samples)]
            try:
                sample = self.loader(path)
            except BadImage as e:
                self.report_bad(path, e)
                continue
            if self.transform is not None:
                sample = self.transform(sample)
            return sample, target, skipped
        raise too_many_unreadable(f'{MAX_CONSECUTIVE_BAD} consecutive', self.root)

    def __getitem__(self, index):
        sample, target, _ = self.load(index)
        return sample, target


UNLABELLED = '(unlabelled)'


def image_files(folder):
    return [e.name for e in os.scandir(folder)
            if e.is_file() and e.name.lower().endswith(datasets.folder.IMG_EXTENSIONS)]


class UnlabelledImageFolder(SafeImageFolder):
    """A folder of images without class folders (pretraining needs no labels): one class, UNLABELLED."""

    def find_classes(self, directory):
        return [UNLABELLED], {UNLABELLED: 0}

    def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        return [(os.path.join(directory, name), 0) for name in sorted(image_files(directory))]


def is_unlabelled(dataset):
    return getattr(dataset, 'classes', None) == [UNLABELLED]


def is_unlabelled_folder(path):
    """Whether ``path`` holds images without class folders (what UnlabelledImageFolder reads)."""
    return os.path.isdir(path) and not _has_class_folders(path) and bool(image_files(path))


def _has_class_folders(path):
    return any(e.is_dir() and not e.name.startswith('.') for e in os.scandir(path))


def image_folder(root, split, transform, strict=False):
    """SafeImageFolder of root/split (class folders of images, or images alone: UnlabelledImageFolder),
    with one-line errors for a missing or empty folder."""
    path = os.path.join(root, split)
    if not os.path.isdir(path):
        hint = f'expected {root}/{split}/<class>/<image> or {root}/{split}/<image>'
        if os.path.isdir(root) and image_files(root):
            hint = (f'{root} holds images itself: move them into {root}/{split}/, or split them into train/ and '
                    f'val/ with: python -m moco.split_folder {root} NEW_FOLDER')
        raise UserError(f'data folder not found: {path} ({hint})')
    if is_unlabelled_folder(path):
        return UnlabelledImageFolder(path, transform, strict=strict)
    try:
        return SafeImageFolder(path, transform, strict=strict)
    except (FileNotFoundError, RuntimeError) as e:  # no class folders, or no images in them
        raise UserError(f'no images in {path}: {first_line(e, None)}') from None


def sample_seed(seed, epoch, position):
    """Seed of the augmentation of the image at ``position`` of the shuffled epoch: a function of
    (seed, epoch, position) only, so neither the number of loader workers nor of processes, nor a
    resume in the middle of an epoch, changes any view."""
    return ((seed * 1_000_003 + epoch) * 100_000_007 + position) % (2 ** 63)


class EpochSampler(torch.utils.data.Sampler):
    """This process's share of an epoch, as ``(index, sample_seed)`` pairs.

    The order is a permutation drawn from (seed, epoch) and split among processes as DistributedSampler
    does (every world_size-th position, from the rank); it can start after ``skip_batches`` batches,
    to resume in the middle of an epoch.
    """

    def __init__(self, n, batch_size, shuffle, drop_last, seed, rank=0, world_size=1):
        self.n, self.batch_size, self.shuffle, self.drop_last = n, batch_size, shuffle, drop_last
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.skip_batches = 0, 0

    def set_epoch(self, epoch, skip_batches=0):
        self.epoch, self.skip_batches = epoch, skip_batches

    def _positions(self):
        if self.drop_last:
            total = self.n // self.world_size * self.world_size
        else:  # pad by wrapping around, so that every process gets the same number
            total = -(-self.n // self.world_size) * self.world_size
        return range(self.rank, total, self.world_size)

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        positions = self._positions()[self.skip_batches * self.batch_size:]
        for pos in positions:
            yield order[pos % self.n], sample_seed(self.seed, self.epoch, pos)

    def __len__(self):
        return max(0, len(self._positions()) - self.skip_batches * self.batch_size)


class EpochDataset(torch.utils.data.Dataset):
    """Wraps a dataset for an EpochSampler: item ``(index, seed)`` is ``(sample, target, skipped)``
    with every random op of the transform drawn from ``seed`` (torch and python RNGs)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        in_main_process = torch.utils.data.get_worker_info() is None
        state = (torch.get_rng_state(), random.getstate()) if in_main_process else None
        torch.manual_seed(seed)
        random.seed(seed)
        try:
            if hasattr(self.dataset, 'load'):
                return self.dataset.load(index)
            sample, target = self.dataset[index]
            return sample, target, 0
        finally:
            if state is not None:  # leave the training process's own random streams alone
                torch.set_rng_state(state[0])
                random.setstate(state[1])


def shared_seed(seed=None):
    """``seed``, or (when None) a random one drawn on rank 0 and shared by all processes."""
    if seed is not None:
        return seed
    value = torch.tensor([random.SystemRandom().randrange(2 ** 31)])
    if dist.world_size() > 1:
        if torch.distributed.get_backend() == 'nccl':
            value = value.cuda()
        torch.distributed.broadcast(value, src=0)
    return int(value.item())


def epoch_sampler(n, batch_size, shuffle, drop_last, seed=None):
    """This process's EpochSampler over n items (a shared random seed when ``seed`` is None)."""
    return EpochSampler(n, batch_size, shuffle, drop_last, shared_seed(seed), dist.rank(), dist.world_size())


def make_loader(dataset, batch_size, workers, shuffle, drop_last, seed=None, pin_memory=False):
    """DataLoader over this process's share of ``dataset`` yielding ``(samples, targets, skipped)``.

    Call ``start_epoch`` before each epoch. Order and augmentations are a function of (seed, epoch)
    only (a shared random seed when None: ``loader.sampler.seed``, saved in checkpoints).
    """
    sampler = epoch_sampler(len(dataset), batch_size, shuffle, drop_last, seed)
    return torch.utils.data.DataLoader(EpochDataset(dataset), batch_size=batch_size, sampler=sampler,
                                       num_workers=workers, pin_memory=pin_memory, drop_last=drop_last,
                                       persistent_workers=False, worker_init_fn=dist.ignore_stop_signals)


def start_epoch(loader, epoch, seed=None, skip_batches=0):
    """Set the epoch of the loader (and the batches of it already done, when resuming mid-epoch).
    With a seed, also reseed this process's own random streams (dropout, drop-path, mixup) from
    (seed, epoch, rank), so a run resumed at an epoch boundary repeats an uninterrupted one."""
    if isinstance(loader.sampler, EpochSampler):
        loader.sampler.set_epoch(epoch, skip_batches)
    elif hasattr(loader.sampler, 'set_epoch'):  # e.g. timm's RepeatAugSampler
        loader.sampler.set_epoch(epoch)
    if seed is not None:
        s = (seed * 100003 + epoch) * 4096 + dist.rank()
        torch.manual_seed(s)
        random.seed(s)
        np.random.seed(s % 2 ** 32)
