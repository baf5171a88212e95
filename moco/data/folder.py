"""Image folders as the scripts read them: class folders of images (or images alone), any image mode
PIL reads, and one rule for an unreadable file, shared by every pipeline: it is reported once and
replaced by the next readable file in the folder's order (``SafeImageFolder.load``), or with
``--strict-data`` it is a one-line error.
"""
import io
import os
import sys

import numpy as np
import torchvision.datasets as datasets
from PIL import Image

from moco.errors import UserError, first_line


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
            return img if img.mode == 'RGB' else img.convert('RGB')   # (convert would copy an RGB image)
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

    ``load(i)`` returns ``(sample, target, skipped)``, ``skipped`` 1 when file ``i`` was unreadable and
    replaced, else 0: summed over the indices an epoch draws (each once), it is the number of unreadable
    files drawn, each counted once, also when it was passed over while replacing another (two broken
    files in a row are 2, not 1 + 2).
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
            return sample, target, int(skipped > 0)
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
                    f'val/ with: python -m moco.tools.split_folder {root} NEW_FOLDER')
        raise UserError(f'data folder not found: {path} ({hint})')
    if is_unlabelled_folder(path):
        return UnlabelledImageFolder(path, transform, strict=strict)
    if not _has_class_folders(path):   # neither images nor class folders (images alone are allowed)
        extensions = ', '.join(datasets.folder.IMG_EXTENSIONS)
        raise UserError(f'no images in {path} (expected {path}/<image> or {path}/<class>/<image>; '
                        f'extensions read: {extensions})')
    try:
        return SafeImageFolder(path, transform, strict=strict)
    except (FileNotFoundError, RuntimeError) as e:  # class folders without images in them
        raise UserError(f'no images in {path}: {first_line(e, None)}') from None
