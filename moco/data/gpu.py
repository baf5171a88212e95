"""The GPU data path for full-size JPEG folders such as ImageNet (``--data-pipeline gpu``).

Loader workers only read files: a JPEG's bytes travel to the training process as they are, and the
batch is decoded there at once on the GPU (nvJPEG, through TorchCodec's ``decode_jpeg`` where TorchCodec
is installed, else torchvision's, which torchvision 0.29 deprecates in TorchCodec's favour). Both
views are then made on the device by ``moco.data.tensor_views.two_views``, the in-memory pipeline's
code, given the batch as a list (the images differ in size): each image's random resized crop is
resized on its own, and the crops of the batch go through the rest of the view together (colour
jitter, grayscale, blur, solarize, flip, normalise; same order, probabilities and ranges as the
reference PIL path).

What the GPU decoder should not or cannot take goes the CPU way, with the reference path's own
decoder (PIL, ``moco.data.folder.load_rgb``): files that are not JPEGs, CMYK/YCCK JPEGs (decoded by the
workers), and any JPEG the GPU decoder rejects (decoded in the training process). An image nobody
can decode is reported once and replaced by the next readable file in the folder's order, the rule of
every pipeline (``SafeImageFolder.load``; ``--strict-data``: a one-line error instead).

On CUDA the batches are made two ahead in a thread on their own CUDA stream (moco/data/device_loader.py),
so that decoding and augmenting overlap the training step and its one host sync.
Without CUDA the same code runs on the CPU, the workers decoding (what the tests exercise).
Order and randomness are the in-memory pipeline's: the order is ``EpochSampler``'s (a function of
seed and epoch, resumable mid-epoch) and each batch's view parameters come from its first sample
seed, so a seeded run is repeatable for any number of workers.
"""
import functools

import torch
from torchvision.transforms.functional import pil_to_tensor

from moco.data import tensor_views
from moco.data.device_loader import DeviceLoader, to_device_async
from moco.data.folder import BadImage, image_folder, load_rgb
from moco.data.sampler import ignore_stop_signals

JPEG_START = b'\xff\xd8'
_SOF_MARKERS = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}   # start-of-frame (not DHT, JPG, DAC)


def jpeg_components(data):
    """Colour components of a JPEG from its frame header (1 gray, 3 YCbCr, 4 CMYK/YCCK), or None when the
    bytes are not a JPEG whose header can be read."""
    if data[:2] != JPEG_START:
        return None
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:              # fill byte
            i += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
        elif marker in _SOF_MARKERS:    # length (2) precision (1) height (2) width (2) components (1)
            return data[i + 9] if i + 9 < len(data) else None
        else:
            i += 2 + int.from_bytes(data[i + 2:i + 4], 'big')
    return None


@functools.cache
def jpeg_decoder(prefer='torchcodec'):
    """(library name, decode): ``decode(data, device)`` turns one 1-d uint8 CPU tensor of JPEG bytes, or a
    list of them (on CUDA one batched nvJPEG call), into uint8 RGB (3, H, W) on ``device``. TorchCodec's
    decoder when it is installed and ``prefer`` is 'torchcodec', else torchvision.io's."""
    if prefer == 'torchcodec':
        try:
            from torchcodec.decoders import decode_jpeg as torchcodec_decode
            return 'torchcodec', lambda data, device: torchcodec_decode(data, mode='RGB', device=device)
        except (ImportError, OSError, RuntimeError):   # not installed, or its native library does not load
            pass
    import warnings

    from torchvision.io import ImageReadMode, decode_jpeg

    def decode(data, device):
        with warnings.catch_warnings():   # torchvision 0.29's deprecation notice, once per call otherwise
            warnings.simplefilter('ignore', DeprecationWarning)
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    return 'torchvision', decode


def _bytes_tensor(data):
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


class EncodedFiles(torch.utils.data.Dataset):
    """Item ``(index, seed)`` of an EpochSampler -> ``(payload, target, index, seed)``: the payload is a
    JPEG's bytes (1-d uint8) for the GPU, else the image decoded here on the CPU (3-d uint8, C x H x W),
    or a BadImage when nothing can read it. ``decode_all``: decode every file here (no GPU)."""

    def __init__(self, samples, decode_all=False):
        self.samples, self.decode_all = samples, decode_all

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key):
        index, seed = key
        path, target = self.samples[index]
        try:
            with open(path, 'rb') as f:
                data = f.read()
            if not self.decode_all and jpeg_components(data) in (1, 3):
                return _bytes_tensor(data), target, index, seed
            return pil_to_tensor(load_rgb(path, data)), target, index, seed
        except OSError as e:
            return BadImage(f'{path}: {e.strerror or e}'), target, index, seed
        except BadImage as e:
            return e, target, index, seed


def decode_on_device(payloads, paths, device, decoder=None):
    """Decode a batch's payloads (see EncodedFiles) on ``device``: uint8 images (3, H, W) or BadImage.
    ``decoder``: a ``jpeg_decoder()`` (default: TorchCodec's where installed)."""
    decode = (decoder or jpeg_decoder())[1]
    images = [p.to(device, non_blocking=True) if isinstance(p, torch.Tensor) and p.dim() == 3 else p
              for p in payloads]
    jpegs = [i for i, p in enumerate(payloads) if isinstance(p, torch.Tensor) and p.dim() == 1]
    if not jpegs:
        return images
    if device.type == 'cuda':
        # torchvision's CUDA decoder writes its output from a private stream that does not wait for the
        # current one (pytorch/vision PR 9606), into memory this stream may have freed with work still
        # queued on it: let that work finish first (in the data thread, this stalls nothing else; kept
        # for TorchCodec's decoder too, whose stream handling is not checked on a GPU yet)
        torch.cuda.current_stream(device).synchronize()
    try:  # one batched call: nvJPEG decodes the batch together
        decoded = decode([payloads[i] for i in jpegs], device)
    except (RuntimeError, ValueError):  # some file of the batch is rejected: decode one by one
        decoded = [None] * len(jpegs)
    for i, image in zip(jpegs, decoded):
        if not _is_rgb(image):
            image = _decode_one(payloads[i], paths[i], device, decode)
        images[i] = image
    return images


def _is_rgb(image):
    return image is not None and image.dim() == 3 and image.shape[0] == 3   # shapes only: no sync


def _decode_one(data, path, device, decode):
    try:
        image = decode(data, device)
        if _is_rgb(image):
            return image
    except (RuntimeError, ValueError):
        pass
    try:  # the reference path's decoder reads some files libjpeg/nvJPEG refuse
        return pil_to_tensor(load_rgb(path, data.numpy().tobytes())).to(device)
    except BadImage as e:
        return e


class GpuJpegLoader(DeviceLoader):
    """The GPU pipeline as a loader (see DeviceLoader). ``decode_in_workers`` (default: without CUDA)
    decodes every file in the workers on the CPU."""

    def __init__(self, root, split, batch_size, device, image_size, crop_min=0.08, blur=True, seed=None,
                 workers=0, strict=False, decode_in_workers=None, prefetch=None):
        self.folder = image_folder(root, split, None, strict=strict)
        super().__init__(len(self.folder), batch_size, device, seed, prefetch)
        self.image_size, self.crop_min, self.blur = image_size, crop_min, blur
        if decode_in_workers is None:
            decode_in_workers = self.device.type != 'cuda'
        self.files = torch.utils.data.DataLoader(
            EncodedFiles(self.folder.samples, decode_all=decode_in_workers), batch_size=batch_size,
            sampler=self.sampler, num_workers=workers, collate_fn=list, drop_last=True,
            pin_memory=self.device.type == 'cuda', prefetch_factor=4 if workers else None,
            worker_init_fn=ignore_stop_signals)

    def _batches(self):
        for items in self.files:
            payloads, targets, indices, seeds = zip(*items)
            paths = [self.folder.samples[i][0] for i in indices]
            images = decode_on_device(payloads, paths, self.device)
            images, targets, skipped = self._replace_unreadable(images, list(targets), indices)
            generator = torch.Generator().manual_seed(seeds[0])
            views = tensor_views.two_views(images, self.image_size, self.crop_min, self.blur, generator)
            yield views, to_device_async(torch.tensor(targets), self.device), skipped

    def _replace_unreadable(self, images, targets, indices):
        """An unreadable image (and its label) is replaced as in every pipeline: by the next readable file
        in the folder's order (``SafeImageFolder.load``, here decoded on the CPU)."""
        skipped = torch.zeros(len(images), dtype=torch.long)
        for k, image in enumerate(images):
            if isinstance(image, BadImage):   # reported (once) by ``load``, which reads the file again
                replacement, targets[k], skipped[k] = self.folder.load(indices[k])
                images[k] = pil_to_tensor(replacement).to(self.device)
        return images, targets, skipped
