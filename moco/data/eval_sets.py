"""The kNN monitor's two sets (``knn_sets``, moco/knn.py): the training images as memory and the held-out
ones to classify, read through the evaluation view of the reference path, or, for a run on the in-memory
pipeline, the images it already holds on the device (``DecodedImages``: the same features bit for bit at
the images' own size, tested; resized to a smaller training size with torchvision's tensor resize).
"""
import torch
import torchvision.transforms.v2.functional as TF

from moco.data.device_loader import to_device_async
from moco.data.folder import image_folder
from moco.data.memory import InMemoryLoader, decode_folder
from moco.data.tensor_views import normalize
from moco.data.views import SMALL_EVAL_SIDE, eval_transform
from moco.errors import UserError


class DecodedImages:
    """A decoded folder as the kNN monitor reads it: uint8 images (N, 3, S, S) on the device, whose eval
    view is the image normalised (``eval_transform`` at S px is the identity before ToTensor)."""

    def __init__(self, images, targets):
        self.images, self.targets = images, targets

    def __len__(self):
        return len(self.images)

    def batches(self, indices, batch_size):
        for start in range(0, len(indices), batch_size):
            index = to_device_async(torch.tensor(indices[start:start + batch_size]), self.images.device)
            yield normalize(self.images[index].float() / 255), self.targets[index]


def train_eval_set(loader, root, image_size, strict=False):
    """root/train through the evaluation view (or the in-memory pipeline's decoded images at a small
    size): what the label-free monitors read in a folder without labels."""
    if isinstance(loader, InMemoryLoader):
        size = tuple(loader.images.shape[2:])
        if size[0] == size[1] and (size[0] == image_size or image_size <= SMALL_EVAL_SIDE):
            return DecodedImages(eval_resize(loader.images, image_size), loader.targets)
    return image_folder(root, 'train', eval_transform(image_size), strict=strict)


def knn_sets(loader, root, image_size, workers=0, strict=False):
    """(train, val) sets of the kNN monitor: root/train and root/val through the reference eval view or,
    when ``loader`` is the in-memory pipeline's, its decoded images (see ``_decoded_sets``)."""
    if isinstance(loader, InMemoryLoader) and (decoded := _decoded_sets(loader, root, image_size, workers, strict)):
        return decoded
    return [image_folder(root, split, eval_transform(image_size), strict=strict) for split in ('train', 'val')]


def eval_resize(images, image_size):
    """The in-memory eval view of square uint8 images (N, 3, S, S) at ``image_size``: the images
    themselves at S = image_size; else resized whole, bilinear with antialiasing (torchvision's tensor
    resize, rounded to uint8), as ``eval_transform`` resizes small images with PIL (equal up to rounding;
    identical on the demo's CIFAR-10 images at 24 px)."""
    if images.shape[-1] == image_size:
        return images
    return TF.resize(images, [image_size, image_size], antialias=True)


def _decoded_sets(loader, root, image_size, workers=0, strict=False):
    """(train, val) DecodedImages for a run on the memory pipeline: the training images it already holds
    and root/val decoded once, both through ``eval_resize``; None when the images are not square or the
    run is not at a small size (then the monitor reads them through the reference eval view)."""
    size = tuple(loader.images.shape[2:])
    if size[0] != size[1] or (size[0] != image_size and image_size > SMALL_EVAL_SIDE):
        return None
    try:
        val_images, val_targets, skipped = decode_folder(root, 'val', workers, strict)
    except UserError:  # no val/, or images of several sizes: the reference path says what is wrong
        return None
    if tuple(val_images.shape[2:]) != size:
        return None
    if skipped:
        print(f'{skipped} unreadable image(s) replaced while decoding {root}/val')
    device = loader.images.device
    return (DecodedImages(eval_resize(loader.images, image_size), loader.targets),
            DecodedImages(eval_resize(val_images.to(device), image_size), val_targets.to(device)))
