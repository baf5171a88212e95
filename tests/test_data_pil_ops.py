"""moco/data/pil_ops.py: hue, blur, blends and solarize give PIL's (torchvision's) bytes, on every colour,
every byte and on photographs.

Hue: both tables against PIL's conversions of all 2^24 colours and all 2^24 HSV triples, and
``adjust_hue`` against torchvision's ``F.adjust_hue`` on an image holding each colour once, for shifts
of both signs (the uint8 wrap of H) and zero (PIL's HSV round trip alone is not the identity): with
every table entry checked, that covers every shift the views can draw. Blur: ``gaussian_blur`` against PIL's
``GaussianBlur`` on crops of a photograph, gray and RGB, for random sigmas over the views' range and the
sigmas where Pillow's box radius changes from 0 to 1 pixel, on images of many shapes. Brightness,
contrast and saturation against torchvision's on images holding every byte in each channel and on photo
crops, for factors on both sides of Pillow's blend branches (0, 1 and their float32 neighbours).
"""
import platform
import random

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter, ImageOps

from moco.data import pil_ops

SIDE = 4096


@pytest.fixture(scope='module')
def every_colour():
    """A 4096 x 4096 RGB image whose pixel n has r = n & 255, g = n >> 8 & 255, b = n >> 16."""
    n = np.arange(2 ** 24, dtype=np.uint32)
    rgb = np.stack([n & 255, n >> 8 & 255, n >> 16], axis=-1).astype(np.uint8).reshape(SIDE, SIDE, 3)
    return Image.fromarray(rgb)


def test_hue_tables_are_pils_conversions_of_every_colour(every_colour):
    rgb_to_hsv, hsv_to_rgb = pil_ops.hue_tables()
    hsv = np.asarray(every_colour.convert('HSV')).reshape(-1, 3)   # pixel n: colour r | g << 8 | b << 16
    packed = rgb_to_hsv.view(np.uint8).reshape(-1, 4)
    assert np.array_equal(packed[:, 3:0:-1], hsv) and not packed[:, 0].any()   # bytes 0, v, s, h
    n = np.arange(2 ** 24, dtype=np.uint32)   # every (h, s, v) = (n >> 16, n >> 8 & 255, n & 255)
    every_hsv = np.stack([n >> 16, n >> 8 & 255, n & 255], axis=-1).astype(np.uint8)
    rgb = np.asarray(Image.frombytes('HSV', (SIDE, SIDE), every_hsv.tobytes()).convert('RGB')).reshape(-1, 3)
    assert np.array_equal(hsv_to_rgb.view(np.uint8).reshape(-1, 4)[:, :3], rgb)


def test_hue_is_torchvisions_on_every_colour(every_colour):
    """With the tables exact, what is left is the shift: both signs (H wraps modulo 256) and zero."""
    for factor in (-0.1, -0.003, 0.1):   # shifts 231, 0 (from a negative factor), 25
        expected = np.asarray(TF.adjust_hue(every_colour, factor))
        got = np.asarray(pil_ops.adjust_hue(every_colour, factor))
        assert got.shape == expected.shape
        wrong = int((got != expected).any(axis=-1).sum())
        assert wrong == 0, f'hue factor {factor}: {wrong} of 2^24 colours differ'


def test_hue_shift_wraps_as_torchvision():
    for f in (-0.1, -0.0039, -0.004, 0.0, 0.0039, 0.004, 0.1, 0.5, -0.5):
        assert pil_ops.hue_shift(f) == int(np.int32(f * 255).astype(np.uint8))
    assert pil_ops.hue_shift(-0.1) == 256 - 25 and pil_ops.hue_shift(0.1) == 25


# ---------------------------------------------------------------------------------------- blur
@pytest.fixture(scope='module')
def photo():
    """matplotlib's sample photograph (512 x 600), RGB."""
    from moco.tools.bench_pipeline import photo_files
    return Image.open(photo_files()[0]).convert('RGB')


def _crops(photo, n, rng, sizes=((224, 224),)):
    out = []
    for k in range(n):
        w, h = sizes[k % len(sizes)]
        x, y = rng.randint(0, photo.width - w), rng.randint(0, photo.height - h)
        out.append(photo.crop((x, y, x + w, y + h)))
    return out


def _check_blur(images, sigmas):
    for img in images:
        for sigma in sigmas:
            expected = np.asarray(img.filter(ImageFilter.GaussianBlur(radius=sigma)))
            pixels = np.asarray(img)
            got = pil_ops.gaussian_blur(pixels.reshape(*pixels.shape[:2], -1), sigma)
            assert np.array_equal(got.reshape(expected.shape), expected), \
                f'{img.mode} {img.size} sigma {sigma!r}: {(got.reshape(expected.shape) != expected).sum()} bytes differ'


# the sigmas where Pillow's box radius reaches 1 pixel (sqrt 2), and the range's ends
EDGE_SIGMAS = (0.1, 1.4142134, 1.4142135, 1.4142136, 1.4142137, 2 ** 0.5, 1.999999, 2.0)


def test_blur_is_pils_on_photographs(photo):
    rng = random.Random(0)
    crops = _crops(photo, 6, rng)
    sigmas = [rng.uniform(0.1, 2.0) for _ in range(40)] + list(EDGE_SIGMAS)
    _check_blur(crops[:3], sigmas)
    _check_blur([c.convert('L') for c in crops[3:]], sigmas)


@pytest.mark.slow
def test_blur_is_pils_for_many_sigmas(photo):
    rng = random.Random(1)
    _check_blur(_crops(photo, 4, rng), [rng.uniform(0.1, 2.0) for _ in range(600)])


def test_blur_is_pils_on_any_shape(photo):
    rng = random.Random(2)
    shapes = ((8, 8), (9, 13), (13, 9), (32, 17), (64, 64), (100, 7), (7, 100), (301, 200))
    images = _crops(photo, len(shapes), rng, sizes=shapes)
    sigmas = [0.3, 1.0, 1.5, 2.0]
    _check_blur([im for im in images if min(im.size) >= pil_ops.MIN_SIDE], sigmas)
    for img in images:   # blur() itself: numpy or PIL, always PIL's bytes
        for sigma in sigmas:
            expected = np.asarray(img.filter(ImageFilter.GaussianBlur(radius=sigma)))
            assert np.array_equal(pil_ops.blur(np.asarray(img), sigma), expected)


def test_blur_below_min_side_is_pils():
    rng = np.random.default_rng(0)
    for shape in ((1, 1, 3), (3, 5, 3), (7, 7, 1), (4, 30, 3)):
        pixels = rng.integers(0, 256, shape, dtype=np.uint8)
        image = Image.fromarray(pixels if shape[2] == 3 else pixels[..., 0])
        expected = np.asarray(image.filter(ImageFilter.GaussianBlur(radius=1.2))).reshape(shape)
        assert np.array_equal(pil_ops.blur(pixels, 1.2), expected)


@pytest.mark.skipif(platform.machine().lower() not in ('x86_64', 'amd64'), reason='the numpy blur is used on x86-64')
def test_numpy_blur_is_in_use_here():
    assert pil_ops.blur_matches_pil()


def test_box_weights_sum_to_one():
    for sigma in np.linspace(0.1, 2.0, 200):
        r, ww, fw = pil_ops.box_weights(pil_ops.box_radius(float(sigma)))
        if abs(sigma - 2 ** 0.5) > 1e-6:   # a box of 1 pixel and fractions of its neighbours, then of 3
            assert r == (0 if sigma < 2 ** 0.5 else 1)
        assert 2 ** 24 - 1 <= (2 * r + 1) * ww + 2 * fw <= 2 ** 24 and fw >= 0


def test_solarize_is_pils():
    values = np.arange(256, dtype=np.uint8).reshape(16, 16, 1)
    expected = np.asarray(ImageOps.solarize(Image.fromarray(values[..., 0])))
    assert np.array_equal(pil_ops.solarize(values)[..., 0], expected)


def test_hue_of_photo_crops_is_torchvisions(photo):
    rng = random.Random(3)
    for crop in _crops(photo, 4, rng):
        for _ in range(3):
            f = float(torch.empty(1).uniform_(-0.1, 0.1))
            assert np.array_equal(np.asarray(pil_ops.adjust_hue(crop, f)), np.asarray(TF.adjust_hue(crop, f)))


def _every_byte_images():
    """Images holding every byte in each channel: a 256 x 256 gradient of (r, g) pairs at a few blues, and
    images of one colour (the contrast's mean at its extremes)."""
    r, g = np.meshgrid(np.arange(256, dtype=np.uint8), np.arange(256, dtype=np.uint8))
    images = [Image.fromarray(np.stack([r, g, np.full_like(r, b)], axis=2)) for b in (0, 77, 255)]
    images.append(Image.fromarray(np.stack([r, g.T, 255 - r], axis=2)))
    return images + [Image.new('RGB', (16, 16), c) for c in ((0, 0, 0), (255, 255, 255), (3, 200, 90))]


# factors across the jitter's ranges, the edges of Pillow's blend branches, and float32 neighbours of 1
BLEND_FACTORS = (0., 0.5, 0.6, 0.8, 0.95, 0.99999994, 1., 1.0000001, 1.00001, 1.07, 1.2, 1.4, 1.5, 2.)


@pytest.mark.parametrize('ours, theirs', [(pil_ops.adjust_brightness, TF.adjust_brightness),
                                          (pil_ops.adjust_contrast, TF.adjust_contrast),
                                          (pil_ops.adjust_saturation, TF.adjust_saturation)],
                         ids=['brightness', 'contrast', 'saturation'])
def test_blends_are_torchvisions(photo, ours, theirs):
    rng = random.Random(4)
    images = _every_byte_images() + _crops(photo, 3, rng) + [crop.resize((96, 96)) for crop in _crops(photo, 2, rng)]
    factors = list(BLEND_FACTORS) + [rng.uniform(0.6, 1.4) for _ in range(30)]
    for k, img in enumerate(images):
        for factor in factors:
            assert ours(img, factor).tobytes() == theirs(img, factor).tobytes(), (k, factor)
