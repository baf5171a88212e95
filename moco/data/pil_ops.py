"""The costliest PIL operations of the MoCo v3 views, computed faster with the same bytes.

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

Brightness, contrast and saturation (torchvision's ``adjust_*`` of a PIL image are Pillow's ImageEnhance):
each is ``Image.blend`` of the image with a "degenerate" image, and Pillow's blend computes each output
byte from the two input bytes alone. Against a constant image (brightness: black; contrast: the gray of
the mean) an output byte is a function of the input byte, so where Pillow's blend is slow (factors
above 1, where it clips every byte) the same blend of a 256-byte ramp makes a table for ``Image.point``.
The ops are called directly, without ImageEnhance's and torchvision's wrappers.

All are tested against PIL and torchvision on every colour, every byte or real photographs
(tests/test_data_pil_ops.py).
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


# ---------------------------------------------------------------------------------------- blends
_RAMP = Image.frombytes('L', (256, 1), bytes(range(256)))


def blend_with_gray(level, img, factor):
    """``Image.blend(Image.new('RGB', img.size, (level,) * 3), img, factor)`` of an RGB image, the same bytes:
    Pillow's own blend in [0, 1]; beyond, where Pillow clips each byte in a slow loop, a table of what that
    blend gives each byte, made by the same blend of a ramp."""
    if 0 <= factor <= 1:
        return Image.blend(Image.new('RGB', img.size, (level,) * 3), img, factor)
    table = Image.blend(Image.new('L', (256, 1), level), _RAMP, factor).tobytes()
    return img.point(list(table) * 3)


def adjust_brightness(img, factor):
    """torchvision's ``F.adjust_brightness`` of an RGB PIL image (``ImageEnhance.Brightness``: a blend with black)."""
    return blend_with_gray(0, img, factor)


def adjust_contrast(img, factor):
    """torchvision's ``F.adjust_contrast`` of an RGB PIL image (``ImageEnhance.Contrast``): a blend with the gray
    of the rounded mean of its L channel, that mean summed from the histogram with numpy instead of in Python
    (the same integers, the same division)."""
    histogram = np.array(img.convert('L').histogram(), dtype=np.int64)
    mean = int(int(histogram @ np.arange(256)) / int(histogram.sum()) + 0.5)
    return blend_with_gray(mean, img, factor)


def adjust_saturation(img, factor):
    """torchvision's ``F.adjust_saturation`` of an RGB PIL image (``ImageEnhance.Color``: a blend with its L
    channel made RGB)."""
    gray = img.convert('L')
    return Image.blend(Image.merge('RGB', (gray, gray, gray)), img, factor)   # merge: convert('RGB')'s bytes, sooner


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
    extended by its edge pixels, three passes along x, then three along y. One uint32 buffer with
    margins on all sides and a second one to write into (the two swap after each pass), so that no
    pass reads what it writes and nothing is copied between the x and the y passes."""
    r, ww, fw = box_weights(box_radius(sigma))
    ww, fw, half = np.uint32(ww), np.uint32(fw), np.uint32(1 << 23)
    margin = r + 1
    height, width, channels = pixels.shape
    shape = (height + 2 * margin, width + 2 * margin, channels)
    src, dst = np.empty(shape, np.uint32), np.empty(shape, np.uint32)
    src[margin:-margin, margin:-margin] = pixels
    row = shape[1] * channels
    near = np.empty(height * row, np.uint32)
    for axis in (1, 0):
        if axis == 1:   # along x: the image's rows, each with its own margins; neighbours a pixel apart
            begin, end, step = margin * row, (margin + height) * row, channels
        else:           # along y: all rows (the side margins are left stale); neighbours a row apart
            begin, end, step = 0, src.size, row
        lo, hi = begin + margin * step, end - margin * step
        box = near[:hi - lo]
        for _ in range(3):
            _extend_edges(src, axis, margin)
            flat_src, out = src.reshape(-1), dst.reshape(-1)[lo:hi]

            def shifted(k):   # the pixels k steps further along the axis (k < 0: before)
                return flat_src[lo + k * step:hi + k * step]  # noqa: B023 (called in this iteration)
            if r == 0:   # r is 0 or 1 for sigma up to 2 (2 would start at sigma 2.45)
                np.multiply(shifted(0), ww, out=box)
            else:
                np.add(shifted(-1), shifted(1), out=box)
                box += shifted(0)
                for k in range(2, r + 1):
                    box += shifted(-k)
                    box += shifted(k)
                box *= ww
            np.add(shifted(-margin), shifted(margin), out=out)
            out *= fw
            out += box
            out += half
            out >>= 24
            src, dst = dst, src
    return src[margin:-margin, margin:-margin].astype(np.uint8)


def _extend_edges(padded, axis, margin):
    """Fill the margins of ``padded`` along ``axis`` with copies of the edge pixels (along x, only in the
    image's rows)."""
    if axis == 1:
        rows = slice(margin, -margin)
        padded[rows, :margin] = padded[rows, margin:margin + 1]
        padded[rows, -margin:] = padded[rows, -margin - 1:-margin]
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
    """PIL's ``ImageOps.solarize`` (threshold 128) of a uint8 array: values >= 128 become 255 - value, which for a
    byte is value XOR 255 (the mask 0 or 255 is -(value >> 7) in uint8; ``np.where`` takes 30 times longer)."""
    flipped = pixels >> 7
    np.negative(flipped, out=flipped)
    flipped ^= pixels
    return flipped
