"""MoCo v3's two asymmetric views on PIL images (the reference pipeline), and the evaluation views.

The definition comes first: ``original_pretrain_transform``, the original release's two op lists as its
main_moco.py writes them (torchvision ops on PIL images, with its own GaussianBlur and Solarize of
moco/loader.py; the paper's appendix, after BYOL):

    RandomResizedCrop(size, scale=(crop_min, 1)) -> ColorJitter(0.4, 0.4, 0.2, 0.1) with p 0.8
    -> RandomGrayscale(p 0.2) -> GaussianBlur(sigma ~ U[0.1, 2], PIL's radius) with p 1.0 / 0.1
    -> Solarize(128) with p 0 / 0.2 -> RandomHorizontalFlip -> ToTensor -> Normalize(ImageNet)

Beside it, its equal: ``pil_pretrain_transform`` (``PilView``), what the reference pipeline runs. The same
random parameters (the same calls, in the same order, on the same generators: python's ``random`` for the
blur's sigma, torch for the rest) and the original's bytes; only how the bytes are computed differs
(README "Speed"): the colour jitter and the blur by moco/data/pil_ops.py; a view made gray stays one
channel through blur, solarize and flip (its tensor repeats that channel without a copy; the batch is made
of three); and a view leaves the loader worker as uint8 (H, W, 3): ToTensor + Normalize run where the
batch goes, by looking up the float32 values torchvision's ops give each byte (``ToFloat``), so a quarter
of the bytes cross the worker queues and the PCIe bus. Tested against the definition, view by view, byte
for byte and draw for draw (tests/test_data_views.py).
"""
import math
import random
import threading

import numpy as np
import torch
import torchvision.transforms as transforms
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter, ImageOps

from moco.data import pil_ops

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TwoViews:
    """Both views of one image, [view 1, view 2] (the original's ``TwoCropsTransform``)."""

    def __init__(self, view1, view2):
        self.view1, self.view2 = view1, view2

    def __call__(self, img):
        return [self.view1(img), self.view2(img)]


# ----------------------------------------------------------------------------------- the definition
class GaussianBlur:
    """The original's blur (its moco/loader.py, from SimCLR): sigma ~ U[sigma_min, sigma_max] from python's
    random, as PIL's radius."""

    def __init__(self, sigma=(.1, 2.)):
        self.sigma = sigma

    def __call__(self, x):
        sigma = random.uniform(self.sigma[0], self.sigma[1])
        return x.filter(ImageFilter.GaussianBlur(radius=sigma))


class Solarize:
    """The original's solarize (its moco/loader.py, from BYOL): PIL's, threshold 128."""

    def __call__(self, x):
        return ImageOps.solarize(x)


def original_pretrain_transform(image_size=224, crop_min=0.08, blur=True):
    """The definition of the two views: the original's augmentation1 and augmentation2, as its main_moco.py
    writes them, float32 (3, size, size) each. ``blur=False`` (``--no-blur``, not in the original): its
    lists without the blur op."""
    normalize = transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    # follow BYOL's augmentation recipe: https://arxiv.org/abs/2006.07733
    augmentation1 = [
        transforms.RandomResizedCrop(image_size, scale=(crop_min, 1.)),
        transforms.RandomApply([
            transforms.ColorJitter(0.4, 0.4, 0.2, 0.1)  # not strengthened
        ], p=0.8),
        transforms.RandomGrayscale(p=0.2),
        transforms.RandomApply([GaussianBlur([.1, 2.])], p=1.0),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        normalize
    ]
    augmentation2 = [
        transforms.RandomResizedCrop(image_size, scale=(crop_min, 1.)),
        transforms.RandomApply([
            transforms.ColorJitter(0.4, 0.4, 0.2, 0.1)  # not strengthened
        ], p=0.8),
        transforms.RandomGrayscale(p=0.2),
        transforms.RandomApply([GaussianBlur([.1, 2.])], p=0.1),
        transforms.RandomApply([Solarize()], p=0.2),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        normalize
    ]
    if not blur:
        augmentation1, augmentation2 = ([t for t in aug if not _is_blur(t)] for aug in (augmentation1, augmentation2))
    return TwoViews(transforms.Compose(augmentation1), transforms.Compose(augmentation2))


def _is_blur(t):
    return isinstance(t, transforms.RandomApply) and isinstance(t.transforms[0], GaussianBlur)


# ----------------------------------------------------------------------------------- its equal, faster
JITTER = transforms.ColorJitter(0.4, 0.4, 0.2, 0.1)   # not strengthened (the release's comment)
RATIO = (3. / 4., 4. / 3.)   # RandomResizedCrop's default aspect ratios
LOG_RATIO = torch.log(torch.tensor(RATIO)).tolist()   # float32, as get_params computes them
HUE_TABLES_MIN_SIZE = 96   # smaller views keep PIL's hue: its tables would cost more than they save


def normalize():
    return transforms.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)


def _float32(p):
    """A probability as torch compares it with a float32 draw: rounded to float32 (a python float holds that
    value exactly, so comparing python floats gives torch's answer)."""
    return float(np.float32(p))


class _Scratch(threading.local):
    """One-element tensors to draw into, made once per thread. torch makes ``torch.rand(1)`` as
    ``torch.empty(1).uniform_(0, 1)`` and ``torch.randint(low, high, (1,))`` as
    ``torch.empty(1, dtype=torch.int64).random_(low, high)``, so drawing into these gives the same numbers
    from the same generator, for half the cost of a new tensor each time."""

    def __init__(self):
        self.float = torch.empty(1)
        self.long = torch.empty(1, dtype=torch.int64)


_SCRATCH = _Scratch()


def _uniform(low, high):
    """``torch.empty(1).uniform_(low, high)`` as a python float (exact: a float32 value)."""
    return _SCRATCH.float.uniform_(low, high).item()


def _draw():
    """``torch.rand(1)`` as a python float, cheaper to compare than the tensor."""
    return _uniform(0, 1)


def _randint(low, high):
    """``torch.randint(low, high, size=(1,))`` as a python int."""
    return _SCRATCH.long.random_(low, high).item()


APPLY_JITTER, GRAYSCALE = _float32(0.8), _float32(0.2)


def random_resized_crop_params(width, height, scale, log_ratio=LOG_RATIO):
    """``transforms.RandomResizedCrop.get_params`` (top, left, h, w) for the default aspect ratios: the same
    torch draws in the same order and the same arithmetic, without its per-call tensors (``log_ratio`` is
    computed once)."""
    area = height * width
    for _ in range(10):
        target_area = area * _uniform(scale[0], scale[1])
        aspect_ratio = _SCRATCH.float.uniform_(log_ratio[0], log_ratio[1]).exp_().item()   # exp in float32
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            return _randint(0, height - h + 1), _randint(0, width - w + 1), h, w
    in_ratio = width / height   # ten misses (very elongated images): torchvision's central crop
    if in_ratio < min(RATIO):
        w, h = width, int(round(width / min(RATIO)))
    elif in_ratio > max(RATIO):
        w, h = int(round(height * max(RATIO))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class PilView:
    """One view of ``original_pretrain_transform`` on a PIL image, its bytes as uint8 (size, size, 3) (``ToFloat``
    makes them the definition's float32 view); MoCo v3's two views differ only in blur_p and solarize_p
    (``blur_p = 0``: no blur op at all, as ``--no-blur`` removes it)."""

    def __init__(self, size, crop_min, blur_p, solarize_p):
        self.size, self.scale = size, (crop_min, 1.)
        self.blur_p, self.solarize_p = blur_p, solarize_p
        self.blur_at, self.solarize_at = _float32(blur_p), _float32(solarize_p)   # as torch compares them
        self.hue_tables = size >= HUE_TABLES_MIN_SIZE
        if self.hue_tables:
            pil_ops.hue_tables()   # made now, before the loader workers fork and share them

    def __call__(self, img):
        i, j, h, w = random_resized_crop_params(img.width, img.height, self.scale, LOG_RATIO)
        img = img.crop((j, i, j + w, i + h)).resize((self.size, self.size), Image.BILINEAR)   # TF.resized_crop
        # torchvision's draws: RandomApply runs its op unless p < torch.rand(1); RandomGrayscale and
        # RandomHorizontalFlip act if torch.rand(1) < p
        if _draw() <= APPLY_JITTER:
            img = self.color_jitter(img)
        if _draw() < GRAYSCALE:   # PIL's L, as torchvision computes it, kept one channel
            img = img.convert('L')
        # the draws in the original's order; the flip is made first, on the PIL image (cheaper than on the
        # array, and the same bytes: blur and solarize treat left and right alike)
        sigma = random.uniform(0.1, 2.0) if self.blur_p > 0 and _draw() <= self.blur_at else None
        solarize = self.solarize_p > 0 and _draw() <= self.solarize_at
        if _draw() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = np.asarray(img).reshape(self.size, self.size, -1)
        if sigma is not None:
            pixels = pil_ops.blur(pixels, sigma)
        if solarize:
            pixels = pil_ops.solarize(pixels)
        view = torch.from_numpy(pixels if pixels.flags.writeable else pixels.copy())
        return view.expand(self.size, self.size, 3)   # a gray view's one channel, seen three times (no copy)

    def color_jitter(self, img):
        # ColorJitter.get_params: the order of the four ops, then their factors, each from [low, high]
        order = torch.randperm(4).tolist()
        brightness, contrast, saturation, hue = (_uniform(*JITTER.brightness), _uniform(*JITTER.contrast),
                                                 _uniform(*JITTER.saturation), _uniform(*JITTER.hue))
        for op in order:
            if op == 0:
                img = pil_ops.adjust_brightness(img, brightness)
            elif op == 1:
                img = pil_ops.adjust_contrast(img, contrast)
            elif op == 2:
                img = pil_ops.adjust_saturation(img, saturation)
            else:
                img = pil_ops.adjust_hue(img, hue) if self.hue_tables else TF.adjust_hue(img, hue)
        return img


def pil_pretrain_transform(image_size=224, crop_min=0.08, blur=True):
    """``original_pretrain_transform``'s equal, the reference pipeline's views: the same draws and bytes, each
    view uint8 (size, size, 3) (``ToFloat`` makes them the original's float32 input). View 1: blur p 1.0, no
    solarize. View 2: blur p 0.1, solarize p 0.2 (paper appendix, BYOL). ``blur=False`` drops the blur from
    both views (small-image recipes)."""
    return TwoViews(PilView(image_size, crop_min, blur_p=1.0 if blur else 0., solarize_p=0.),
                    PilView(image_size, crop_min, blur_p=0.1 if blur else 0., solarize_p=0.2))


pretrain_transform = pil_pretrain_transform   # the former name (tests/test_data_folder.py, tests/test_data_sampler.py)


class ToFloat:
    """ToTensor + Normalize of a batch of uint8 views (N, H, W, 3), where the batch is: (N, 3, H, W) float32
    in channels-last memory, the original's input bit for bit. On the CPU by torchvision's own float32
    ops (ToTensor's division by 255, Normalize's subtraction and division per channel); elsewhere by
    looking each byte up in a table of the values those CPU ops give it, since CUDA divides by a
    constant through its reciprocal, which can differ in the last bit."""

    def __init__(self):
        self.mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        every_byte = torch.arange(256, dtype=torch.uint8).view(1, 1, 256, 1).expand(1, 1, 256, 3)
        self.table = self.arithmetic(every_byte)[0, :, 0].contiguous()   # (3, 256)
        self._tables = {}

    def __call__(self, views):
        return self.arithmetic(views) if views.device.type == 'cpu' else self.lookup(views)

    def arithmetic(self, views):
        return views.permute(0, 3, 1, 2).float().div_(255).sub_(self.mean).div_(self.std)

    def lookup(self, views):
        key = str(views.device)
        if key not in self._tables:   # sent to each device once
            self._tables[key] = (self.table.reshape(-1).to(views.device),
                                 (torch.arange(3, dtype=torch.int32) * 256).to(views.device))
        table, offsets = self._tables[key]
        index = views.to(torch.int32) + offsets
        return table.index_select(0, index.reshape(-1)).view(views.shape).permute(0, 3, 1, 2)


SMALL_EVAL_SIDE = 64   # images evaluated at up to this size are resized whole (CIFAR, STL-10), not centre-cropped


def eval_transform(image_size=224):
    """Resize(256) + CenterCrop(224) at ImageNet scale; at <= 64 px images are resized to the size."""
    resize = image_size if image_size <= SMALL_EVAL_SIDE else int(round(image_size * 256 / 224))
    return transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(image_size),
                               transforms.ToTensor(), normalize()])


def lincls_train_transform(image_size=224):
    return transforms.Compose([transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip(),
                               transforms.ToTensor(), normalize()])
