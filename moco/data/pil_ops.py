"""The two costliest PIL operations of the MoCo v3 views, computed faster with the same bytes.

Hue (torchvision's ``adjust_hue`` on a PIL image): PIL converts RGB to HSV, torchvision adds an 8-bit
shift to H, PIL converts back. Each conversion is a function of a pixel's three bytes, so two tables
of 2^24 entries, made once by PIL itself from every colour, replace the two conversions by two
lookups (``adjust_hue``). The tables take 128 MB, made in about a second before the loader workers
start; forked workers share them (they are only read).

Gaussian blur (``ImageFilter.GaussianBlur(radius=sigma)``): Pillow blurs with three box filters of a
fractional radius along x, then three along y, each rounded to 8 bits; every step is integer
arithmetic once the radius and the two weights are known. ``gaussian_blur`` computes the radius and
weights with Pillow's own float32 steps and the passes with numpy over the whole image at once, where
Pillow walks one row at a time. It is used only where it is checked to give PIL's bytes on this
machine (``blur_matches_pil``); elsewhere the blur is PIL's.

Both are tested against PIL on every colour and on real photographs (tests/test_data_pil_ops.py).
"""
import functools
import platform

import numpy as np
from PIL import Image, ImageFilter

# ------------------------------------------------------------------------------------------- hue
_CHUNK = 1 << 20   # colours converted at a time (a 1024 x 1024 image): little memory beyond the tables


@functools.cache
def hue_tables():
    """(rgb_to_hsv, hsv_to_rgb), each 2^24 uint32, made with PIL's own conversions of every colour.

    rgb_to_hsv is indexed by r | g << 8 | b << 16 (a pixel's RGBX bytes read as a little-endian
    uint32, X masked off) and holds h << 24 | s << 16 | v << 8, so that adding a hue shift d << 24
    wraps H modulo 256 (as torchvision's uint8 addition does) and a shift right by 8 gives the index
    h << 16 | s << 8 | v of hsv_to_rgb, which holds the pixel's RGBX bytes."""
    rgb_to_hsv = np.empty(2 ** 24, np.uint32)
    hsv_to_rgb = np.empty(2 ** 24, np.uint32)
    side = int(_CHUNK ** 0.5)
    for start in range(0, 2 ** 24, _CHUNK):
        index = np.arange(start, start + _CHUNK, dtype=np.uint32)
        rgbx = Image.frombuffer('RGBX', (side, side), index, 'raw', 'RGBX', 0, 1)   # bytes r, g, b, (x)
        hsv = np.frombuffer(rgbx.convert('HSV').tobytes(), np.uint8).reshape(-1, 3)
        packed = rgb_to_hsv[start:start + _CHUNK].view(np.uint8).reshape(-1, 4)
        packed[:, 0] = 0
        packed[:, 1:] = hsv[:, ::-1]   # bytes 0, v, s, h
        every_hsv = np.ascontiguousarray(index.view(np.uint8).reshape(-1, 4)[:, 2::-1])   # h, s, v of the index
        rgb = Image.frombytes('HSV', (side, side), every_hsv).convert('RGB')
        hsv_to_rgb[start:start + _CHUNK] = np.frombuffer(rgb.tobytes('raw', 'RGBX'), np.uint32)
    return rgb_to_hsv, hsv_to_rgb


def hue_shift(hue_factor):
    """The 8-bit shift torchvision's PIL ``adjust_hue`` adds to H: int32 truncation, then wrapped to uint8."""
    return int(np.int32(hue_factor * 255).astype(np.uint8))


def adjust_hue(img, hue_factor):
    """torchvision's ``F.adjust_hue(img, hue_factor)`` of an RGB PIL image, with the same bytes."""
    rgb_to_hsv, hsv_to_rgb = hue_tables()
    index = np.frombuffer(img.tobytes('raw', 'RGBX'), np.uint32) & np.uint32(0xFFFFFF)
    hsv = rgb_to_hsv.take(index)
    hsv += np.uint32(hue_shift(hue_factor) << 24)   # wraps modulo 2^32: H modulo 256
    hsv >>= 8
    return Image.frombytes('RGB', img.size, hsv_to_rgb.take(hsv), 'raw', 'RGBX')


# ------------------------------------------------------------------------------------------ blur
_f32 = np.float32
MIN_SIDE = 8   # smaller images go to PIL (its edge handling changes when a side is under 2 radius + 2)


def box_radius(sigma, passes=3):
    """Pillow's ``_gaussian_blur_radius`` (Gwosdek et al. 2011) for ``ImageFilter.GaussianBlur(sigma)``,
    with its float32 and double steps: the fractional radius of the box filters."""
    radius = _f32(sigma)   # PIL parses the radius as a C float
    sigma2 = _f32(radius * radius) / _f32(passes)
    length = _f32(np.sqrt(12.0 * np.float64(sigma2) + 1.0))
    whole = _f32(np.floor((np.float64(length) - 1.0) / 2.0))
    frac = (_f32(2) * whole + _f32(1)) * (whole * (whole + _f32(1)) - _f32(3) * sigma2)
    frac = frac / (_f32(6) * (sigma2 - (whole + _f32(1)) * (whole + _f32(1))))
    return _f32(whole + frac)


def box_weights(radius):
    """Pillow's ``ImagingHorizontalBoxBlur`` weights for a fractional radius: (whole radius r, weight ww of
    the 2r + 1 pixels of the box, weight fw of the two next ones), in units of 2^-24."""
    whole = int(radius)
    ww = int(_f32(2 ** 24) / (radius * _f32(2) + _f32(1)))
    return whole, ww, (2 ** 24 - (2 * whole + 1) * ww) // 2


def gaussian_blur(pixels, sigma):
    """``ImageFilter.GaussianBlur(radius=sigma)`` of a uint8 image (H, W, C), as uint8 (H, W, C): each
    pass is out = (ww * sum of the 2r + 1 nearest + fw * (the next two) + 2^23) >> 24, the image
    extended by its edge pixels, three passes along x, then three along y."""
    r, ww, fw = box_weights(box_radius(sigma))
    ww, fw = np.uint32(ww), np.uint32(fw)
    margin = r + 1
    height, width, channels = pixels.shape
    out = pixels
    for axis in (1, 0):   # x, then y
        padded = np.empty((height + 2 * margin * (axis == 0), width + 2 * margin * (axis == 1), channels), np.uint32)
        inner = (slice(None), slice(margin, margin + width)) if axis == 1 else (slice(margin, margin + height),)
        padded[inner] = out
        _extend_edges(padded, axis, margin)
        flat = padded.reshape(-1)
        step = channels if axis == 1 else width * channels   # neighbours along the axis, in the flat array
        lo, hi = margin * step, flat.size - margin * step

        def shifted(k):   # the pixels k steps further along the axis (k < 0: before)
            return flat[lo + k * step:hi + k * step]  # noqa: B023 (called in this iteration)
        near = np.empty(hi - lo, np.uint32)
        for _ in range(3):
            np.copyto(near, shifted(0))
            for k in range(1, r + 1):   # r is 0 or 1 for sigma up to 2 (2 would start at sigma 2.45)
                near += shifted(-k)
                near += shifted(k)
            near *= ww
            result = shifted(0)   # written in place: numpy buffers the overlapping reads below
            np.add(shifted(-margin), shifted(margin), out=result)
            result *= fw
            result += near
            result += np.uint32(1 << 23)
            result >>= 24
            _extend_edges(padded, axis, margin)   # the rows' own margins came out wrong: extended again
        out = padded[inner]
    return out.astype(np.uint8)


def _extend_edges(padded, axis, margin):
    """Fill the margins of ``padded`` along ``axis`` with copies of the edge pixels."""
    if axis == 1:
        padded[:, :margin] = padded[:, margin:margin + 1]
        padded[:, -margin:] = padded[:, -margin - 1:-margin]
    else:
        padded[:margin] = padded[margin:margin + 1]
        padded[-margin:] = padded[-margin - 1:-margin]


@functools.cache
def blur_matches_pil():
    """Whether ``gaussian_blur`` gives PIL's bytes here, checked once per process on a noise image for
    sigmas across the range of the views (both box radii). Pillow's radius is float32 arithmetic that a
    build using fused multiply-adds may round differently, so outside x86-64 the blur stays PIL's."""
    if platform.machine().lower() not in ('x86_64', 'amd64'):
        return False
    rng = np.random.default_rng(0)
    probe = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)
    image = Image.fromarray(probe)
    sigmas = [float(s) for s in np.linspace(0.1, 2.0, 39)] + [1.41421, 1.41422, 1.9999]
    return all(np.array_equal(gaussian_blur(probe, s), np.asarray(image.filter(ImageFilter.GaussianBlur(radius=s))))
               for s in sigmas)


def blur(pixels, sigma):
    """PIL's ``GaussianBlur(radius=sigma)`` of a uint8 array (H, W, 3) or (H, W, 1): ``gaussian_blur`` where
    it is PIL's bytes, else PIL itself."""
    if min(pixels.shape[:2]) >= MIN_SIDE and blur_matches_pil():
        return gaussian_blur(pixels, sigma)
    image = Image.fromarray(pixels if pixels.shape[2] == 3 else pixels[..., 0])
    return np.array(image.filter(ImageFilter.GaussianBlur(radius=sigma))).reshape(pixels.shape)


def solarize(pixels):
    """PIL's ``ImageOps.solarize`` (threshold 128) of a uint8 array: values >= 128 become 255 - value."""
    return np.where(pixels < 128, pixels, 255 - pixels)
