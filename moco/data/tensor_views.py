"""MoCo v3's two views, computed batch-wise on tensors (the GPU, or the CPU): the same ops, order,
probabilities and ranges as the reference PIL path of ``moco/data/views.py`` (the paper's appendix, after
BYOL), each sample with its own random parameters.

    RandomResizedCrop(size, scale=(crop_min, 1))  -> ColorJitter(0.4, 0.4, 0.2, 0.1) with p 0.8, the four
    adjustments in a random order per sample -> RandomGrayscale(0.2) -> GaussianBlur(sigma in [0.1, 2])
    with p 1.0 / 0.1 -> Solarize(128) with p 0 / 0.2 -> HorizontalFlip(0.5) -> Normalize

The images are a uint8 batch of one size (the in-memory pipeline, moco/data/memory.py) or a list of
images of different sizes (the GPU pipeline, moco/data/gpu.py): both pipelines call ``two_views``, and
only the crop-and-resize (``resized_crop``) differs between the two forms.

Parameters are drawn on the CPU from a torch.Generator (so a seeded run is repeatable and resumable)
and the ops run where the images are. The decisions (which ops run at all, kernel sizes) are read from
the CPU copy; the arithmetic uses a device copy sent in one transfer (``params_to``), so making a view
never waits for the GPU. Each op equals torchvision's tensor op for the same parameters
(tests/test_data_tensor_views.py states the tolerances); against the PIL path the difference is PIL's
rounding to 8 bits after every op, and for the blur PIL's box-filter approximation of a Gaussian.
"""
import math

import torch
import torch.nn.functional as F

from moco.data.device_loader import to_device_async
from moco.data.views import IMAGENET_MEAN, IMAGENET_STD

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)   # torchvision's rgb_to_grayscale


# ---------------------------------------------------------------- parameters

def sample_crops(n, height, width, scale, ratio=(3 / 4, 4 / 3), generator=None):
    """RandomResizedCrop.get_params for n samples at once: (top, left, h, w) int tensors.

    ``height`` and ``width``: ints (one size for all), or (n,) int tensors (each image its own size).
    Ten attempts per sample as torchvision makes them (area fraction uniform in ``scale``, log aspect
    ratio uniform); the first that fits is kept, else the central crop with the ratio clamped.
    """
    height = torch.as_tensor(height, dtype=torch.long).expand(n)
    width = torch.as_tensor(width, dtype=torch.long).expand(n)
    area = (height * width)[:, None]
    target = area * torch.empty(n, 10).uniform_(scale[0], scale[1], generator=generator)
    log_r = torch.empty(n, 10).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = torch.exp(log_r)
    w = torch.round(torch.sqrt(target * aspect)).long()
    h = torch.round(torch.sqrt(target / aspect)).long()
    ok = (w > 0) & (w <= width[:, None]) & (h > 0) & (h <= height[:, None])
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.zeros(n, dtype=torch.long))
    w = w.gather(1, first[:, None])[:, 0]
    h = h.gather(1, first[:, None])[:, 0]
    # fallback: the central crop of the whole image with the ratio clamped into range
    in_ratio = width.double() / height.double()
    too_tall, too_wide = in_ratio < min(ratio), in_ratio > max(ratio)
    fw = torch.where(too_wide, torch.round(height.double() * max(ratio)).long(), width)
    fh = torch.where(too_tall, torch.round(width.double() / min(ratio)).long(), height)
    found = ok.any(1)
    w = torch.where(found, w, fw)
    h = torch.where(found, h, fh)
    u = torch.rand(n, 2, generator=generator)
    top = torch.where(found, torch.minimum((u[:, 0] * (height - h + 1)).long(), height - 1), (height - h) // 2)
    left = torch.where(found, torch.minimum((u[:, 1] * (width - w + 1)).long(), width - 1), (width - w) // 2)
    return top, left, h, w


def sample_view_params(n, height, width, crop_min, blur_p, solarize_p, generator=None):
    """Every random choice of one view for n images (CPU tensors)."""
    def coin(p):
        return torch.rand(n, generator=generator) < p
    top, left, h, w = sample_crops(n, height, width, (crop_min, 1.), generator=generator)
    return dict(
        top=top, left=left, h=h, w=w,
        jitter=coin(0.8),
        order=torch.argsort(torch.rand(n, 4, generator=generator), dim=1),   # a random permutation each
        brightness=torch.empty(n).uniform_(0.6, 1.4, generator=generator),
        contrast=torch.empty(n).uniform_(0.6, 1.4, generator=generator),
        saturation=torch.empty(n).uniform_(0.8, 1.2, generator=generator),
        hue=torch.empty(n).uniform_(-0.1, 0.1, generator=generator),
        gray=coin(0.2),
        blur=coin(blur_p),
        sigma=torch.empty(n).uniform_(0.1, 2.0, generator=generator),
        solarize=coin(solarize_p),
        flip=coin(0.5),
    )


# ---------------------------------------------------------------- ops (float images in [0, 1], (N, 3, H, W))

def resize_weights(start, length, size, full, device=None):
    """(N, size, full) matrices that resize [start, start + length) of an axis of ``full`` pixels to
    ``size`` pixels: bilinear with antialiasing, the weights of PIL's resize (and torchvision's
    ``antialias=True``): a triangle filter widened by the scale when shrinking, truncated at the crop's
    edges and renormalised. Pixels outside the crop get weight 0, so each row depends on its own box
    only, never on the other images of the batch."""
    start = start.to(device, torch.float64)[:, None, None]
    length = length.to(device, torch.float64)[:, None, None]
    scale = length / size                                          # input pixels per output pixel
    support = torch.clamp(scale, min=1.)                           # the filter's half-width
    centre = start + scale * (torch.arange(size, device=device, dtype=torch.float64)[None, :, None] + 0.5)
    j = torch.arange(full, device=device, dtype=torch.float64)[None, None, :] + 0.5
    w = torch.clamp(1 - (j - centre).abs() / support, min=0)
    w = torch.where((j > start) & (j < start + length), w, torch.zeros((), dtype=w.dtype, device=device))
    return (w / w.sum(2, keepdim=True)).float()


def resized_crop(images, top, left, h, w, size):
    """Each image cropped to its box and resized to size x size as PIL resizes the cropped image
    (bilinear, antialiased when shrinking): float in [0, 1] (N, C, size, size). The one crop-and-resize
    of the in-memory and GPU pipelines; an image's result does not depend on the rest of its batch.

    ``images``: a float batch in [0, 1] (N, C, H, W), images of one size (the in-memory pipeline): two
    batched matrix products, ``Wy @ x @ Wx^T`` with ``resize_weights``' matrices; the boxes may be on
    the images' device. Or a list of uint8 images (C, H_i, W_i) of different sizes (the GPU pipeline's
    decoded JPEGs): one antialiased bilinear ``F.interpolate`` per image, whose kernel computes the same
    weights (PIL's; equal within 1e-5, tested), since the matrices would need building per image on
    the device, several launches each; the boxes are CPU tensors, read in one host copy."""
    if isinstance(images, torch.Tensor):
        _, _, height, width = images.shape
        wy = resize_weights(top, h, size, height, images.device).to(images.dtype)        # (N, S, H)
        wx = resize_weights(left, w, size, width, images.device).to(images.dtype)        # (N, S, W)
        return torch.matmul(torch.matmul(wy[:, None], images), wx[:, None].transpose(2, 3))
    boxes = torch.stack([top, left, h, w], 1).tolist()   # one host copy for the whole batch
    out = torch.empty(len(images), images[0].shape[0], size, size, device=images[0].device)
    for i, (image, (t, le, hh, ww)) in enumerate(zip(images, boxes)):
        crop = image[None, :, t:t + hh, le:le + ww].float()
        out[i] = F.interpolate(crop, size=(size, size), mode='bilinear', align_corners=False, antialias=True)[0]
    return out.div_(255)


def _per_sample(factor, images):
    return factor.to(images.device, images.dtype).view(-1, 1, 1, 1)


def grayscale(images):
    r, g, b = images.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def adjust_brightness(images, factor):
    return (images * _per_sample(factor, images)).clamp(0, 1)


def adjust_contrast(images, factor):
    mean = grayscale(images).mean(dim=(1, 2, 3), keepdim=True)
    f = _per_sample(factor, images)
    return (f * images + (1 - f) * mean).clamp(0, 1)


def adjust_saturation(images, factor):
    f = _per_sample(factor, images)
    return (f * images + (1 - f) * grayscale(images)).clamp(0, 1)


def _rgb_to_hsv(img):  # torchvision.transforms.v2.functional._color._rgb_to_hsv
    r, g, b = img.unbind(1)
    maxc, _ = img.max(dim=1)
    minc, _ = img.min(dim=1)
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    cr_divisor = torch.where(eqc, ones, cr)
    rc, gc, bc = ((maxc - r) / cr_divisor, (maxc - g) / cr_divisor, (maxc - b) / cr_divisor)
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = hr + hg + hb
    h = torch.fmod((h / 6.0 + 1.0), 1.0)
    return torch.stack((h, s, maxc), dim=1)


def _hsv_to_rgb(img):  # torchvision.transforms.v2.functional._color._hsv_to_rgb
    h, s, v = img.unbind(1)
    h6 = h * 6
    i = torch.floor(h6)
    f = h6 - i
    i = i.to(dtype=torch.int32)
    sxv = s * v
    p = (v - sxv).clamp_(0.0, 1.0)
    q = (v - sxv * f).clamp_(0.0, 1.0)
    t = (v - sxv + sxv * f).clamp_(0.0, 1.0)
    i.remainder_(6)
    vpqt = torch.stack((v, p, q, t), dim=1)
    select = _constant(_HSV_SELECT, img.device, torch.long)
    idx = select[:, i]                                          # (3, N, H, W)
    return vpqt.gather(1, idx.permute(1, 0, 2, 3))


def adjust_hue(images, factor):
    hsv = _rgb_to_hsv(images)
    h = (hsv[:, 0] + _per_sample(factor, images)[:, 0]) % 1.0
    return _hsv_to_rgb(torch.stack((h, hsv[:, 1], hsv[:, 2]), dim=1))


def box_radius(sigma, passes=3):
    """The fractional box radius with which PIL approximates a Gaussian of standard deviation ``sigma``
    by ``passes`` box blurs (Pillow's ``_gaussian_blur_radius``; Gwosdek et al. 2011), in float32 as PIL."""
    sigma2 = sigma.float() ** 2 / passes
    box_len = torch.sqrt(12 * sigma2 + 1)
    whole = torch.floor((box_len - 1) / 2)
    frac = (2 * whole + 1) * (whole * (whole + 1) - 3 * sigma2) / (6 * (sigma2 - (whole + 1) ** 2))
    return whole + frac


def blur_radius(sigma):
    """Half-width of the kernels of ``gaussian_blur`` for these sigmas (sigma: a CPU tensor)."""
    return int(box_radius(sigma).max()) + 1


def gaussian_blur(images, sigma, radius=None, passes=3):
    """Per-sample Gaussian blur as PIL's ``ImageFilter.GaussianBlur(radius=sigma)`` computes it: three
    box blurs of fractional radius r along x, then three along y; each box averages the 2 floor(r) + 1
    nearest pixels and the next one on each side with weight r - floor(r), and the image is extended
    by repeating its edge pixels. Differs from PIL only by PIL's rounding to 8 bits after each pass.
    ``radius``: the kernels' half-width (default: ``blur_radius``)."""
    if radius is None:
        radius = blur_radius(sigma)
    r = box_radius(sigma).to(images.device, torch.float64)[:, None]
    whole = torch.floor(r)
    x = torch.arange(-radius, radius + 1, device=images.device, dtype=torch.float64).abs()[None]
    k = torch.where(x <= whole, 1., torch.where(x == whole + 1, r - whole, 0.)) / (2 * r + 1)   # (N, K)
    n, c, hgt, wid = images.shape
    kc = k.to(images.dtype).repeat_interleave(c, dim=0)         # one kernel per (sample, channel)
    out = images.reshape(1, n * c, hgt, wid)
    for weight, pad in ((kc[:, None, None, :], (radius, radius, 0, 0)), (kc[:, None, :, None], (0, 0, radius, radius))):
        for _ in range(passes):
            out = F.conv2d(F.pad(out, pad, mode='replicate'), weight, groups=n * c)
    return out.reshape(n, c, hgt, wid)


def solarize(images):
    """PIL's solarize at threshold 128: pixels >= 128/255 are inverted."""
    return torch.where(images >= 128 / 255, 1 - images, images)


def _where(mask, new, old):
    return torch.where(mask.to(old.device).view(-1, 1, 1, 1), new, old)


def _apply(mask, d_mask, images, op, *factors):
    """``op(images, *factors)`` for the samples where ``mask`` (CPU) is true, the images unchanged
    elsewhere; ``d_mask``: the mask on the images' device. The ops are per sample, so on the CPU, where
    arithmetic is the cost, only the selected samples are computed (a colour jitter then costs about a
    quarter of computing each of its four ops on the whole batch at each of the four positions); on a
    GPU the whole batch is computed and selected with ``torch.where``, which needs no index from the host."""
    if images.device.type == 'cpu':
        index = mask.nonzero()[:, 0]
        return images.index_copy(0, index, op(images[index], *(f[index] for f in factors)))
    return _where(d_mask, op(images, *factors), images)


_HSV_SELECT = ((0, 2, 1, 1, 3, 0), (3, 0, 0, 2, 1, 1), (1, 1, 3, 0, 0, 2))
_constants = {}


def _constant(values, device, dtype):
    """A small constant tensor, sent to each device once (not once per batch)."""
    key = (values, str(device), dtype)
    if key not in _constants:
        _constants[key] = torch.tensor(values, dtype=dtype).to(device)
    return _constants[key]


def params_to(p, device):
    """The view parameters ``p`` (CPU tensors, one row per sample) on ``device``, sent in one transfer
    (pinned, asynchronous) instead of one per tensor."""
    if device.type == 'cpu':
        return p
    return _unpack(p, to_device_async(_pack(p), device))


def _pack(p):
    """All parameters as the columns of one float64 tensor (it holds the ints and float32s exactly)."""
    return torch.cat([v.reshape(len(v), -1).to(torch.float64) for v in p.values()], 1)


def _unpack(p, packed):
    out, col = {}, 0
    for k, v in p.items():
        width = v[0].numel() if v.dim() > 1 else 1
        out[k] = packed[:, col:col + width].reshape(v.shape).to(v.dtype)
        col += width
    return out


JITTER_OPS = (('brightness', adjust_brightness), ('contrast', adjust_contrast),
              ('saturation', adjust_saturation), ('hue', adjust_hue))


def color_jitter(images, p, d=None):
    """torchvision ColorJitter with per-sample factors and order; samples with p['jitter'] false pass.
    ``d``: ``p`` on the images' device (decisions are read from ``p``, the arithmetic uses ``d``)."""
    d = p if d is None else d
    for position in range(4):
        for op_index, (name, op) in enumerate(JITTER_OPS):
            mask = p['jitter'] & (p['order'][:, position] == op_index)
            if mask.any():
                d_mask = d['jitter'] & (d['order'][:, position] == op_index)
                images = _apply(mask, d_mask, images, op, d[name])
    return images


def normalize(images):
    mean = _constant(IMAGENET_MEAN, images.device, images.dtype).view(1, 3, 1, 1)
    std = _constant(IMAGENET_STD, images.device, images.dtype).view(1, 3, 1, 1)
    return (images - mean) / std


def view(images, size, p):
    """One augmented, normalised view of ``images``, a float batch in [0, 1] (N, 3, H, W) or a list of
    uint8 images (3, H_i, W_i) (as ``resized_crop`` takes them)."""
    batch = isinstance(images, torch.Tensor)
    d = params_to(p, images.device if batch else images[0].device)
    box = d if batch else p     # the per-image crops read their boxes on the host, from the CPU copy
    x = resized_crop(images, box['top'], box['left'], box['h'], box['w'], size)
    return after_crop(x, p, d)


def after_crop(x, p, d=None):
    """Every op of a view after the random resized crop, on the crops (N, 3, size, size) in [0, 1].
    ``d``: ``p`` on the device (default: sent now)."""
    d = params_to(p, x.device) if d is None else d
    x = color_jitter(x, p, d)
    if p['gray'].any():
        x = _apply(p['gray'], d['gray'], x, lambda y: grayscale(y).expand_as(y))
    if p['blur'].any():
        radius = blur_radius(p['sigma'])
        x = _apply(p['blur'], d['blur'], x, lambda y, sigma: gaussian_blur(y, sigma, radius), d['sigma'])
    if p['solarize'].any():
        x = _apply(p['solarize'], d['solarize'], x, solarize)
    x = _where(d['flip'], x.flip(3), x)
    return normalize(x)


def sample_two_views(n, height, width, crop_min=0.08, blur=True, generator=None):
    """The parameters of MoCo v3's two views (``sample_view_params`` of each): view 1 blur p 1.0, view 2
    blur p 0.1 and solarize p 0.2 (``blur=False``: no blur in either). Sizes as ``sample_crops``."""
    return [sample_view_params(n, height, width, crop_min, 1.0 if blur else 0., 0., generator),
            sample_view_params(n, height, width, crop_min, 0.1 if blur else 0., 0.2, generator)]


def two_views(images_uint8, size, crop_min=0.08, blur=True, generator=None):
    """MoCo v3's two views of uint8 images on any device: a batch (N, 3, H, W) of one size (the in-memory
    pipeline), or a list of images (3, H_i, W_i) of different sizes on one device (the GPU pipeline)."""
    if isinstance(images_uint8, torch.Tensor):
        images = images_uint8.float() / 255
        n, _, h, w = images.shape
    else:
        images, n = images_uint8, len(images_uint8)
        h = torch.tensor([im.shape[1] for im in images])
        w = torch.tensor([im.shape[2] for im in images])
    return [view(images, size, p) for p in sample_two_views(n, h, w, crop_min, blur, generator)]
