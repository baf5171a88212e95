"""Datasets, the asymmetric augmentations of MoCo v3 (the BYOL recipe) and loaders.

This is the reference PIL/torchvision path: the same ops, order and parameters as the original
release, so its randomness and pixels are the original's.
"""
import os
import random

import torch
import torchvision.datasets as datasets
import torchvision.transforms as transforms
from PIL import ImageFilter, ImageOps

from moco import dist
from moco.dist import UserError

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


def image_folder(root, split, transform):
    """ImageFolder of root/split with one-line errors for a missing or empty folder."""
    path = os.path.join(root, split)
    if not os.path.isdir(path):
        raise UserError(f'data folder not found: {path} (expected {root}/{split}/<class>/<image>)')
    try:
        return datasets.ImageFolder(path, transform)
    except (FileNotFoundError, RuntimeError) as e:  # no class folders, or no images in them
        raise UserError(f'no images in {path}: {str(e).splitlines()[0]}') from None


def make_loader(dataset, batch_size, workers, shuffle, drop_last, seed=None, pin_memory=False):
    """DataLoader with a DistributedSampler when a process group exists. Call ``start_epoch`` before
    each epoch."""
    generator = torch.Generator() if seed is not None else None
    sampler = None
    if dist.world_size() > 1:  # the same seed on every rank, so the shards partition the data
        sampler = torch.utils.data.distributed.DistributedSampler(
            dataset, shuffle=shuffle, drop_last=drop_last, seed=seed or 0)
    elif shuffle:
        sampler = torch.utils.data.RandomSampler(dataset, generator=generator)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, pin_memory=pin_memory,
        drop_last=drop_last, generator=generator)


def start_epoch(loader, epoch, seed=None):
    """Shuffle for this epoch; with a seed, make everything random in the epoch (order, worker seeds,
    main-process augmentation) a function of (seed, epoch) only, so a resumed run repeats an
    uninterrupted one exactly."""
    if isinstance(loader.sampler, torch.utils.data.distributed.DistributedSampler):
        loader.sampler.set_epoch(epoch)
    if seed is not None:
        s = (seed * 100003 + epoch) * 4096 + dist.rank()  # each rank its own augmentation stream
        loader.generator.manual_seed(s)
        torch.manual_seed(s)
        random.seed(s)
