"""Data sets and transforms of end-to-end fine-tuning and transfer learning.

  imagenet (or any folder)  DIR/train/<class>/*, DIR/val/<class>/*
  cifar10, cifar100         DIR/train/<class>/* and DIR/val (or DIR/test)/<class>/*, or torchvision's
                            pickled files in DIR (``--download`` fetches them)
  flowers                   Oxford Flowers-102: DIR/jpg/image_%05d.jpg, DIR/imagelabels.mat, DIR/setid.mat;
                            train = trnid + valid (2,040 images), test = tstid (6,149), 102 classes
  pets                      Oxford-IIIT Pets: DIR/images/<name>.jpg, DIR/annotations/{trainval,test}.txt
                            (lines "<name> <class 1..37> <species> <breed>"), 37 classes

Transforms: ``transfer`` is the one of the original release's transfer/datasets.py
(RandomResizedCrop(scale 0.05-1) + flip; eval Resize(256/224 x size) + CenterCrop), ``deit`` is DeiT's
(timm's RandAugment pipeline with random erasing; eval with bicubic resizing).
References: facebookresearch/moco-v3 transfer/{datasets,oxford_flowers_dataset,oxford_pets_dataset}.py;
facebookresearch/deit datasets.py.
"""
import os
import struct
import zlib

import numpy as np
import torchvision.datasets as tv_datasets
import torchvision.transforms as T
from PIL import Image
from timm.data import auto_augment, create_transform
from torch.utils.data import Dataset

from moco.data import image_folder
from moco.data.views import IMAGENET_MEAN, IMAGENET_STD
from moco.errors import UserError, first_line

DATA_SETS = ('imagenet', 'cifar10', 'cifar100', 'flowers', 'pets')


# ---- transforms ----

def transfer_transform(train, size):
    """The original transfer recipe's augmentation (no RandAugment, no random erasing)."""
    if train:
        ops = [T.RandomResizedCrop((size, size), scale=(0.05, 1.0)), T.RandomHorizontalFlip()]
    else:
        ops = [T.Resize(int((256 / 224) * size)), T.CenterCrop(size)]
    return T.Compose(ops + [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def _posterize(img, bits_to_keep, **__):
    """timm's posterize, with 0 bits kept giving the black image that Pillow gave until version 11: the
    DeiT policy (``rand-m9-mstd0.5-inc1``) draws magnitudes up to 10, i.e. 0 bits, for about one image in
    800, and Pillow 11+ raises 'bits must be between or equal to 1 and 8' there."""
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return _timm_posterize(img, bits_to_keep)


_timm_posterize = auto_augment.posterize
for _name, _op in list(auto_augment.NAME_TO_OP.items()):
    if _op is _timm_posterize:
        auto_augment.NAME_TO_OP[_name] = _posterize


def deit_transform(train, size, args):
    """DeiT's augmentation: timm's training pipeline (RandomResizedCrop, flip, RandAugment, random
    erasing; RandomCrop(pad 4) at 32 px and below), and a bicubic Resize(256/224 x size) + CenterCrop."""
    if train:
        transform = create_transform(input_size=size, is_training=True, color_jitter=args.color_jitter,
                                     auto_augment=args.aa, interpolation=args.train_interpolation,
                                     re_prob=args.reprob, re_mode=args.remode, re_count=args.recount,
                                     mean=IMAGENET_MEAN, std=IMAGENET_STD)
        if size <= 32:  # as DeiT: no random-resized crop on tiny images
            transform.transforms[0] = T.RandomCrop(size, padding=4)
        return transform
    return T.Compose([T.Resize(int((256 / 224) * size), interpolation=T.InterpolationMode.BICUBIC),
                      T.CenterCrop(size), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


# ---- data sets ----

def build_dataset(name, root, train, transform, download=False):
    """(dataset, number of classes) of a split (train=True: the training split, else the test split)."""
    if name == 'imagenet':
        ds = image_folder(root, 'train' if train else 'val', transform)
        return ds, len(ds.classes)
    if name in ('cifar10', 'cifar100'):
        if os.path.isdir(os.path.join(root, 'train')):  # ImageFolder layout
            split = 'train' if train else next((s for s in ('val', 'test') if os.path.isdir(os.path.join(root, s))),
                                               'val')
            ds = image_folder(root, split, transform)
            return ds, len(ds.classes)
        cls = tv_datasets.CIFAR10 if name == 'cifar10' else tv_datasets.CIFAR100
        try:
            ds = cls(root, train=train, transform=transform, download=download)
        except RuntimeError as e:  # "Dataset not found or corrupted. You can use download=True ..."
            raise UserError(f'{name} not found in {root}: {first_line(e, None)} (or use the layout '
                            f'{root}/train/<class>/*, {root}/val/<class>/*)') from None
        return ds, len(ds.classes)
    if name == 'flowers':
        return Flowers(root, train, transform), Flowers.NUM_CLASSES
    if name == 'pets':
        return Pets(root, train, transform), Pets.NUM_CLASSES
    raise UserError(f'unknown data set {name!r}; choose one of {", ".join(DATA_SETS)}')


class _ImageList(Dataset):
    """Images given as (path, target) pairs; RGB, then the transform."""

    def __init__(self, samples, transform):
        self.samples = samples
        self.transform = transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, target = self.samples[index]
        with open(path, 'rb') as f:
            img = Image.open(f).convert('RGB')
        return (self.transform(img) if self.transform is not None else img), target


def _require(path):
    if not os.path.exists(path):
        raise UserError(f'not found: {path}')
    return path


class Flowers(_ImageList):
    """Oxford Flowers-102 (Nilsback & Zisserman 2008) from the files of its home page.

    Not torchvision's ``Flowers102``: it reads ``DIR/flowers-102/`` (another meaning of DIR than the
    recipes' in transfer/README.md), needs scipy for the two .mat files, and checks their MD5, so a
    test cannot build a small folder of that layout (it answers "Dataset not found or corrupted"). The
    .mat reader below is the part of scipy this needs; ``Pets`` follows for the same layout reason."""
    NUM_CLASSES = 102

    def __init__(self, root, train, transform=None):
        labels = _mat_vector(_require(os.path.join(root, 'imagelabels.mat')), 'labels')  # 1..102, by image id
        setid = os.path.join(root, 'setid.mat')
        ids = (np.concatenate([_mat_vector(_require(setid), 'trnid'), _mat_vector(setid, 'valid')]) if train
               else _mat_vector(_require(setid), 'tstid'))
        folder = _require(os.path.join(root, 'jpg'))
        samples = []
        for i in ids.astype(np.int64):
            if not 1 <= i <= len(labels):
                raise UserError(f'{setid}: image id {i} has no label in imagelabels.mat')
            samples.append((os.path.join(folder, f'image_{i:05d}.jpg'), int(labels[i - 1]) - 1))
        super().__init__(samples, transform)


class Pets(_ImageList):
    """Oxford-IIIT Pets (Parkhi et al. 2012): trainval.txt for training, test.txt for testing."""
    NUM_CLASSES = 37

    def __init__(self, root, train, transform=None):
        split = _require(os.path.join(root, 'annotations', 'trainval.txt' if train else 'test.txt'))
        folder = _require(os.path.join(root, 'images'))
        samples = []
        with open(split) as f:
            for n, line in enumerate(f, 1):
                fields = line.split()
                if not fields or fields[0].startswith('#'):
                    continue
                if len(fields) < 2 or not fields[1].isdigit():
                    raise UserError(f'{split}:{n}: expected "<name> <class id> <species> <breed id>"')
                samples.append((os.path.join(folder, fields[0] + '.jpg'), int(fields[1]) - 1))
        super().__init__(samples, transform)


# ---- a minimal reader of MATLAB level-5 .mat files (numeric arrays only) ----

_MI_TYPES = {1: 'i1', 2: 'u1', 3: 'i2', 4: 'u2', 5: 'i4', 6: 'u4', 7: 'f4', 9: 'f8', 12: 'i8', 13: 'u8'}
_MX_CLASSES = {6: 'f8', 7: 'f4', 8: 'i1', 9: 'u1', 10: 'i2', 11: 'u2', 12: 'i4', 13: 'u4', 14: 'i8', 15: 'u8'}
_MI_MATRIX, _MI_COMPRESSED = 14, 15


def read_mat(path):
    """{name: numpy array} of the real numeric matrices of a MATLAB 5/7 .mat file (what the Flowers
    split and label files hold); other variables (cells, structs, text, complex) are skipped.
    Stands in for ``scipy.io.loadmat`` so that scipy is not needed."""
    with open(path, 'rb') as f:
        data = f.read()
    if len(data) < 128 or not data.startswith(b'MATLAB 5.0 MAT-file'):
        raise UserError(f'{path} is not a MATLAB 5/7 .mat file (v4 and v7.3/HDF5 files are not supported)')
    endian = '<' if data[126:128] == b'IM' else '>'
    arrays = {}
    _read_elements(data[128:], endian, arrays, path)
    return arrays


def _elements(buf, endian):
    """(type, payload) of each data element of buf (normal and small-format tags)."""
    pos = 0
    while pos + 8 <= len(buf):
        mtype, nbytes = struct.unpack(endian + 'II', buf[pos:pos + 8])
        if mtype >> 16:  # small element: size and type share the first 4 bytes, data in the next 4
            mtype, nbytes = mtype & 0xFFFF, mtype >> 16
            yield mtype, buf[pos + 4:pos + 4 + nbytes]
            pos += 8
            continue
        yield mtype, buf[pos + 8:pos + 8 + nbytes]
        pos += 8 + nbytes + (0 if mtype == _MI_COMPRESSED else -nbytes % 8)


def _read_elements(buf, endian, arrays, path):
    for mtype, payload in _elements(buf, endian):
        if mtype == _MI_COMPRESSED:
            try:
                payload = zlib.decompress(payload)
            except zlib.error as e:
                raise UserError(f'{path}: corrupt compressed variable ({e})') from None
            _read_elements(payload, endian, arrays, path)
        elif mtype == _MI_MATRIX:
            parts = list(_elements(payload, endian))
            if len(parts) < 4:
                continue
            flags = struct.unpack(endian + 'I', parts[0][1][:4])[0]
            cls, is_complex = flags & 0xFF, bool(flags & 0x800)
            if cls not in _MX_CLASSES or is_complex or parts[3][0] not in _MI_TYPES:
                continue
            dims = np.frombuffer(parts[1][1], dtype=endian + 'i4')
            name = parts[2][1].decode('ascii', 'replace')
            values = np.frombuffer(parts[3][1], dtype=endian + _MI_TYPES[parts[3][0]])
            arrays[name] = values.astype(_MX_CLASSES[cls]).reshape(tuple(dims), order='F')


def _mat_vector(path, name):
    arrays = read_mat(path)
    if name not in arrays:
        raise UserError(f'{path} holds no numeric variable {name!r} (found: {", ".join(sorted(arrays)) or "none"})')
    return arrays[name].reshape(-1)
