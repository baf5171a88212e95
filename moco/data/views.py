"""The asymmetric augmentations of MoCo v3 (the BYOL recipe) on PIL images, and the evaluation views.

This is the reference path: the same PIL/torchvision ops, order and parameters as the original
release, so its randomness and pixels are the original's.
"""
import random

import torchvision.transforms as transforms
from PIL import ImageFilter, ImageOps

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


SMALL_EVAL_SIDE = 64   # images evaluated at up to this size are resized whole (CIFAR, STL-10), not centre-cropped


def eval_transform(image_size=224):
    """Resize(256) + CenterCrop(224) at ImageNet scale; at <= 64 px images are resized to the size."""
    resize = image_size if image_size <= SMALL_EVAL_SIDE else int(round(image_size * 256 / 224))
    return transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(image_size),
                               transforms.ToTensor(), normalize()])


def lincls_train_transform(image_size=224):
    return transforms.Compose([transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip(),
                               transforms.ToTensor(), normalize()])
