"""The batch-wise tensor augmentations (moco/data/tensor_views.py) op by op against torchvision's tensor ops
given the same parameters.

Tolerances (float32, images in [0, 1]): 2e-5 for the colour ops, grayscale and solarize; 1e-5 for
crops (bilinear, antialiased when shrinking). The blur is PIL's box approximation of a Gaussian, not
torchvision's Gaussian kernel: it is checked against a plain per-pixel loop of PIL's algorithm here, and
against PIL itself, like every op, in tests/test_data_views_vs_pil.py."""
import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from moco.data import tensor_views as ta


def _images(n=6, size=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g)


def test_crop_parameters_are_valid_and_follow_the_ranges():
    """Scale (0.08, 1) and aspect ratio (3/4, 4/3) as RandomResizedCrop's, sides rounded to whole pixels:
    each box is the rounding of one with an area and a ratio inside the ranges, and the ranges' ends
    are reached."""
    g = torch.Generator().manual_seed(0)
    top, left, h, w = ta.sample_crops(20000, 32, 48, (0.08, 1.), generator=g)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 32).all() and (left + w <= 48).all()
    hf, wf = h.double(), w.double()
    # w = round(sqrt(area * r)), h = round(sqrt(area / r)): r lies in [(w - .5) / (h + .5), (w + .5) / (h - .5)]
    # and area in [(w - .5)(h - .5), (w + .5)(h + .5)]; both intervals must meet the ranges
    assert ((wf - .5) / (hf + .5) <= 4 / 3).all() and ((wf + .5) / (hf - .5) >= 3 / 4).all()
    area = 32 * 48
    assert ((wf - .5) * (hf - .5) <= area).all() and ((wf + .5) * (hf + .5) >= 0.08 * area).all()
    # on a large image rounding is below 0.4%: the ends of both ranges are reached, not passed
    top, left, h, w = ta.sample_crops(20000, 1000, 1000, (0.08, 1.), generator=g)
    ratio, frac = w.double() / h.double(), (h * w).double() / 1000 ** 2
    assert 3 / 4 * 0.996 < ratio.min() < 3 / 4 * 1.004 and 4 / 3 * 0.996 < ratio.max() < 4 / 3 * 1.004
    assert 0.08 * 0.995 < frac.min() < 0.08 * 1.01 and 0.99 < frac.max() <= 1.0
    # impossible areas: every sample falls back to torchvision's central crop
    top, left, h, w = ta.sample_crops(5, 10, 30, (2., 3.), generator=g)      # ratio 3 > 4/3: clamp
    assert h.tolist() == [10] * 5 and w.tolist() == [round(10 * 4 / 3)] * 5
    assert left.tolist() == [(30 - 13) // 2] * 5 and top.tolist() == [0] * 5


def test_upscaling_crops_equal_torchvision_bilinear():
    x = _images(size=20)
    top, left = torch.tensor([0, 3, 5, 10, 2, 0]), torch.tensor([0, 1, 7, 4, 9, 0])
    h, w = torch.tensor([20, 12, 9, 10, 11, 16]), torch.tensor([20, 15, 13, 8, 11, 16])
    ours = ta.resized_crop(x, top, left, h, w, 24)
    for k in range(len(x)):
        ref = TF.resized_crop(x[k], int(top[k]), int(left[k]), int(h[k]), int(w[k]), [24, 24], antialias=True)
        assert torch.allclose(ours[k], ref, atol=1e-5), k


def test_shrinking_crops_equal_torchvision_antialiasing():
    x = torch.nn.functional.interpolate(_images(n=3, size=24), size=96, mode='bilinear')  # smooth images
    top, left, h, w = torch.tensor([0, 10, 20]), torch.tensor([0, 30, 5]), torch.tensor([96, 64, 70]), \
        torch.tensor([96, 60, 80])
    ours = ta.resized_crop(x, top, left, h, w, 32)
    for k in range(3):
        ref = TF.resized_crop(x[k], int(top[k]), int(left[k]), int(h[k]), int(w[k]), [32, 32], antialias=True)
        assert torch.allclose(ours[k], ref, atol=1e-5), k


@pytest.mark.parametrize('name, ours, reference, low, high', [
    ('brightness', ta.adjust_brightness, TF.adjust_brightness, 0.6, 1.4),
    ('contrast', ta.adjust_contrast, TF.adjust_contrast, 0.6, 1.4),
    ('saturation', ta.adjust_saturation, TF.adjust_saturation, 0.8, 1.2),
    ('hue', ta.adjust_hue, TF.adjust_hue, -0.1, 0.1)])


def test_colour_ops_equal_torchvision(name, ours, reference, low, high):
    x = _images(n=8)
    factors = torch.linspace(low, high, 8)
    out = ours(x, factors)
    for k in range(8):
        assert torch.allclose(out[k], reference(x[k], float(factors[k])), atol=2e-5), (name, k)


def test_jitter_order_is_per_sample():
    x = _images(n=4)
    p = dict(jitter=torch.tensor([True, True, True, False]),
             order=torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2], [0, 1, 2, 3]]),
             brightness=torch.tensor([1.3, 0.7, 1.1, 1.4]), contrast=torch.tensor([0.6, 1.4, 0.9, 1.0]),
             saturation=torch.tensor([1.2, 0.8, 1.1, 1.0]), hue=torch.tensor([0.1, -0.05, 0.02, 0.0]))
    out = ta.color_jitter(x, p)
    refs = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    names = ['brightness', 'contrast', 'saturation', 'hue']
    for k in range(3):
        y = x[k]
        for op in p['order'][k].tolist():
            y = refs[op](y, float(p[names[op]][k]))
        assert torch.allclose(out[k], y, atol=2e-5), k
    assert torch.equal(out[3], x[3])   # no jitter drawn for this one


def test_grayscale_and_solarize_equal_torchvision():
    x = _images(n=4)
    assert torch.allclose(ta.grayscale(x), TF.rgb_to_grayscale(x), atol=2e-5)
    assert torch.equal(ta.solarize(x), TF.solarize(x, threshold=128 / 255))


def _pil_box_blur_line(line, r):
    """One pass of Pillow's fractional box blur (BoxBlur.c) over a 1-d float line, edges repeated."""
    whole, n = int(r), len(line)
    out = []
    for i in range(n):
        at = lambda j: line[min(max(j, 0), n - 1)]  # noqa: E731
        total = sum(at(i + j) for j in range(-whole, whole + 1)) + (r - whole) * (at(i - whole - 1) + at(i + whole + 1))
        out.append(total / (2 * r + 1))
    return out


def test_blur_is_pils_three_box_passes_per_axis():
    """gaussian_blur against a per-pixel loop of PIL's algorithm: the fractional box radius of Pillow's
    _gaussian_blur_radius, three passes along x then three along y, edge pixels repeated."""
    x = _images(n=3, size=9)
    sigma = torch.tensor([0.1, 1.3, 2.0])
    out = ta.gaussian_blur(x, sigma)
    for k in range(3):
        s2 = float(sigma[k]) ** 2 / 3
        whole = math.floor((math.sqrt(12 * s2 + 1) - 1) / 2)
        r = whole + (2 * whole + 1) * (whole * (whole + 1) - 3 * s2) / (6 * (s2 - (whole + 1) ** 2))
        assert abs(r - float(ta.box_radius(sigma[k:k + 1]))) < 1e-5
        img = x[k].double().tolist()
        for c in range(3):
            rows = img[c]
            for _ in range(3):
                rows = [_pil_box_blur_line(row, r) for row in rows]
            cols = [list(col) for col in zip(*rows)]
            for _ in range(3):
                cols = [_pil_box_blur_line(col, r) for col in cols]
            ref = torch.tensor(cols, dtype=torch.float32).t()
            assert torch.allclose(out[k, c], ref, atol=1e-5), (k, c)


def test_view_parameters_survive_the_one_transfer_packing():
    """params_to sends all parameters in one float64 tensor on CUDA: every value and dtype comes back."""
    p = ta.sample_view_params(50, torch.randint(5, 300, (50,)), torch.randint(5, 300, (50,)), 0.08, 0.5, 0.2,
                              torch.Generator().manual_seed(0))
    back = ta._unpack(p, ta._pack(p))
    assert back.keys() == p.keys()
    for k in p:
        assert back[k].dtype == p[k].dtype and torch.equal(back[k], p[k]), k


@pytest.mark.parametrize('name', ['brightness', 'hue'])
def test_cpu_subset_path_equals_the_whole_batch_path(name):
    """On the CPU an op runs on the selected samples only; the result must be the GPU path's (the op on
    the whole batch, then selected with torch.where), bit for bit."""
    torch.manual_seed(0)
    images = torch.rand(12, 3, 8, 8)
    factor = torch.empty(12).uniform_(-0.1, 0.1) if name == 'hue' else torch.empty(12).uniform_(0.6, 1.4)
    mask = torch.rand(12) < 0.5
    op = dict(ta.JITTER_OPS)[name]
    subset = ta._apply(mask, mask, images, op, factor)
    assert torch.equal(subset, ta._where(mask, op(images, factor), images))
    assert torch.equal(subset[~mask], images[~mask]) and not torch.equal(subset[mask], images[mask])
