"""The random parameters of the two views made by the in-memory and GPU pipelines
(``moco.data.tensor_views.sample_two_views``), checked directly against MoCo v3's augmentation (the paper's
appendix, after BYOL; the reference PIL pipeline of moco/data/views.py declares the same numbers,
tests/test_data_views.py), and a pixel-level check that ``after_crop`` applies each op exactly to the
images whose flag is set, in the reference order.

Sampler: N = 50,000 images per view. Each probability is within 0.01 of its value (the standard
deviation of a frequency is at most 0.0023 at this N: 0.01 is over 4 sigma); each uniform range stays
inside its bounds and comes within 0.5% of its width of both ends, and each quarter of it holds 25% of
the draws within 0.01; the order of the four colour adjustments is a uniformly drawn permutation
(each of the 24 within 0.005 of 1/24: over 5 sigma); neighbouring images, the two views of an image
and the different parameters of one image are independent (every correlation below 0.025: over 5
sigma of the 1/sqrt(N) = 0.0045 of independent draws). These bounds are met by any seed with
overwhelming probability, not by this seed alone, and fail for each mutation of the view
parameters that ``tests/tools/mutate.py`` applies (``-k views:``).
"""
import itertools

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from moco.data import tensor_views as ta
from moco.data.views import IMAGENET_MEAN, IMAGENET_STD

N = 50_000
P_TOL, QUARTER_TOL, ORDER_TOL, CORR_TOL = 0.01, 0.01, 0.005, 0.025

# MoCo v3's two views (the paper's appendix; moco/data/views.py)
COMMON = dict(jitter=0.8, gray=0.2, flip=0.5)
VIEWS = [dict(COMMON, blur=1.0, solarize=0.0), dict(COMMON, blur=0.1, solarize=0.2)]
RANGES = dict(brightness=(0.6, 1.4), contrast=(0.6, 1.4), saturation=(0.8, 1.2), hue=(-0.1, 0.1),
              sigma=(0.1, 2.0))
# torchvision ColorJitter's order indices (``ColorJitter.get_params``: fn_idx = randperm(4))
JITTER_INDEX = ('brightness', 'contrast', 'saturation', 'hue')
CROP_SCALE_MAX, CROP_RATIO = 1.0, (3 / 4, 4 / 3)
SIDE = 1000     # a large image: pixel rounding moves a crop's area and aspect ratio by under 0.4%


@pytest.fixture(scope='module')
def views():
    return ta.sample_two_views(N, SIDE, SIDE, crop_min=0.08, blur=True, generator=torch.Generator().manual_seed(0))


def _corr(a, b):
    a, b = a.double(), b.double()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()).clamp(min=1e-30))


def _scalar_fields(p):
    """Every parameter of a view as one number per image (the order as its permutation's index)."""
    perms = {perm: i for i, perm in enumerate(itertools.permutations(range(4)))}
    fields = {k: v for k, v in p.items() if v.dim() == 1}
    fields['order'] = torch.tensor([perms[tuple(row)] for row in p['order'].tolist()])
    fields['area'] = p['h'] * p['w']
    fields['aspect'] = torch.log(p['w'].double() / p['h'].double())
    return fields


@pytest.mark.parametrize('view', [0, 1])
def test_each_probability(views, view):
    p = views[view]
    for name, prob in VIEWS[view].items():
        assert p[name].dtype == torch.bool and p[name].shape == (N,), name
        freq = p[name].double().mean().item()
        if prob in (0.0, 1.0):
            assert freq == prob, (name, freq)
        else:
            assert abs(freq - prob) < P_TOL, (name, freq, prob)


@pytest.mark.parametrize('view', [0, 1])
def test_each_range_is_uniform_between_its_bounds(views, view):
    p = views[view]
    for name, (low, high) in RANGES.items():
        x = p[name].double()
        width = high - low
        assert x.min() >= low and x.max() <= high, (name, x.min(), x.max())
        assert x.min() < low + 0.005 * width and x.max() > high - 0.005 * width, (name, x.min(), x.max())
        quarters = torch.histc(x, bins=4, min=low, max=high) / N
        assert (quarters - 0.25).abs().max() < QUARTER_TOL, (name, quarters)


@pytest.mark.parametrize('view', [0, 1])
def test_jitter_order_is_a_uniform_random_permutation(views, view):
    order = views[view]['order']
    assert order.shape == (N, 4)
    assert torch.equal(order.sort(1).values, torch.arange(4).expand(N, 4))       # a permutation each
    counts = torch.bincount(_scalar_fields(views[view])['order'], minlength=24).double() / N
    assert len(counts) == 24 and (counts - 1 / 24).abs().max() < ORDER_TOL, counts


@pytest.mark.parametrize('crop_min', [0.08, 0.3])
def test_crop_scale_and_aspect_ratio(crop_min):
    """Area fraction uniform in (crop_min, 1) before torchvision's rejection of boxes that do not fit,
    aspect ratio in (3/4, 4/3); both ends of each range reached (up to rounding to whole pixels)."""
    p = ta.sample_two_views(N, SIDE, SIDE, crop_min=crop_min, generator=torch.Generator().manual_seed(1))
    for v in p:
        top, left, h, w = v['top'], v['left'], v['h'], v['w']
        assert (top >= 0).all() and (left >= 0).all() and (top + h <= SIDE).all() and (left + w <= SIDE).all()
        area = (h * w).double() / SIDE ** 2
        assert area.min() > crop_min * 0.995 and area.min() < crop_min * 1.01, area.min()
        assert area.max() <= CROP_SCALE_MAX and area.max() > 0.99, area.max()
        ratio = w.double() / h.double()
        assert ratio.min() > CROP_RATIO[0] * 0.996 and ratio.min() < CROP_RATIO[0] * 1.004, ratio.min()
        assert ratio.max() < CROP_RATIO[1] * 1.004 and ratio.max() > CROP_RATIO[1] * 0.996, ratio.max()
        # the box's position is uniform over the places it fits
        rel = top.double() / (SIDE - h).clamp(min=1).double()
        assert abs(rel.mean().item() - 0.5) < 0.01 and rel.min() == 0 and rel.max() == 1


def test_images_views_and_parameters_are_independent(views):
    fields = [_scalar_fields(p) for p in views]
    crop = {'top', 'left', 'h', 'w', 'area', 'aspect'}    # tied to each other by the box
    for view, f in enumerate(fields):
        varying = {k: v for k, v in f.items() if v.double().std() > 0}
        assert set(varying) >= set(RANGES) | {'jitter', 'gray', 'flip', 'order'} | crop
        for name, x in varying.items():
            # neighbouring images of a batch (one draw shared by several images would correlate them)
            assert abs(_corr(x[:-1], x[1:])) < CORR_TOL, (view, name)
            # the two views of an image
            y = fields[1 - view][name]
            if view == 0 and y.double().std() > 0:
                assert abs(_corr(x, y)) < CORR_TOL, ('views', name)
        # the parameters of one image
        for (a, x), (b, y) in itertools.combinations(varying.items(), 2):
            if not (a in crop and b in crop):
                assert abs(_corr(x, y)) < CORR_TOL, (view, a, b)


def test_without_blur_neither_view_blurs():
    p1, p2 = ta.sample_two_views(1000, 32, 32, blur=False, generator=torch.Generator().manual_seed(0))
    assert not p1['blur'].any() and not p2['blur'].any()
    assert not p1['solarize'].any() and 0.1 < p2['solarize'].double().mean() < 0.3


def test_batches_of_one_generator_are_not_repeated():
    g = torch.Generator().manual_seed(0)
    a, b = ta.sample_two_views(64, 32, 32, generator=g), ta.sample_two_views(64, 32, 32, generator=g)
    assert not torch.equal(a[0]['brightness'], b[0]['brightness'])
    assert not torch.equal(a[0]['brightness'], a[1]['brightness'])


# ---------------------------------------------------------------- each op where its flag is set
def _reference_view(x, p, k, blur_radius):
    """Image k's view built op by op in the reference pipeline's order, with torchvision's ops for the
    colour ops, grayscale, solarize and flip (each equal to tensor_views', tests/test_data_tensor_views.py) and
    tensor_views' blur (tested against PIL's in tests/test_data_views_vs_pil.py)."""
    y = x[k]
    if p['jitter'][k]:
        for index in p['order'][k].tolist():
            name = JITTER_INDEX[index]
            op = {'brightness': TF.adjust_brightness, 'contrast': TF.adjust_contrast,
                  'saturation': TF.adjust_saturation, 'hue': TF.adjust_hue}[name]
            y = op(y, float(p[name][k]))
    if p['gray'][k]:
        y = TF.rgb_to_grayscale(y, num_output_channels=3)
    if p['blur'][k]:
        y = ta.gaussian_blur(y[None], p['sigma'][k:k + 1], blur_radius)[0]
    if p['solarize'][k]:
        y = TF.solarize(y, threshold=128 / 255)
    if p['flip'][k]:
        y = TF.horizontal_flip(y)
    return TF.normalize(y, list(IMAGENET_MEAN), list(IMAGENET_STD))


def test_after_crop_applies_each_op_exactly_where_its_flag_is_set():
    n = 48
    g = torch.Generator().manual_seed(3)
    x = torch.rand(n, 3, 8, 8, generator=g)
    p = ta.sample_view_params(n, 8, 8, 0.08, blur_p=0.5, solarize_p=0.5, generator=g)
    for flag in ('jitter', 'gray', 'blur', 'solarize', 'flip'):
        assert 0 < p[flag].sum() < n, flag                      # both cases occur
    jittered = p['jitter']
    for position in range(4):                                    # every op at every position of the order
        assert set(p['order'][jittered, position].tolist()) == {0, 1, 2, 3}
    out = ta.after_crop(x.clone(), p)
    radius = ta.blur_radius(p['sigma'])
    for k in range(n):
        ref = _reference_view(x, p, k, radius)
        flags = {f: bool(p[f][k]) for f in VIEWS[0]}
        assert torch.allclose(out[k], ref, atol=1e-4), (k, flags, (out[k] - ref).abs().max())
    # and each flag matters: flipping it changes the image
    for flag in ('jitter', 'gray', 'blur', 'solarize', 'flip'):
        q = dict(p)
        q[flag] = ~p[flag]
        other = ta.after_crop(x.clone(), q)
        assert ((other - out).abs().amax(dim=(1, 2, 3)) > 1e-3).float().mean() > 0.9, flag


def test_memory_pipeline_views_are_the_sampled_views(monkeypatch):
    """``two_views`` (the in-memory pipeline) crops and augments with ``sample_two_views``'s parameters,
    drawn with its crop_min and blur."""
    calls = _spy(monkeypatch)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 20, 20), dtype=torch.uint8, generator=g)
    for crop_min, blur in ((0.08, True), (0.3, False)):
        calls.clear()
        v1, v2 = ta.two_views(images, 8, crop_min=crop_min, blur=blur, generator=torch.Generator().manual_seed(5))
        [(args, p)] = calls
        assert args == (6, 20, 20, crop_min, blur)
        x = images.float() / 255
        for got, q in zip((v1, v2), p):
            crops = ta.resized_crop(x, q['top'], q['left'], q['h'], q['w'], 8)
            assert torch.equal(got, ta.after_crop(crops, q))


def _spy(monkeypatch):
    """Record the arguments and results of every ``tensor_views.sample_two_views`` call."""
    calls = []
    real = ta.sample_two_views

    def spy(n, height, width, crop_min=0.08, blur=True, generator=None):
        p = real(n, height, width, crop_min, blur, generator)
        calls.append(((n, height if isinstance(height, int) else tuple(height.tolist()),
                       width if isinstance(width, int) else tuple(width.tolist()), crop_min, blur), p))
        return p
    monkeypatch.setattr(ta, 'sample_two_views', spy)
    return calls


def test_the_loaders_pass_crop_min_and_blur(tiny_folder, monkeypatch):
    from moco.data.pipelines import pretrain_loader
    from moco.data.sampler import start_epoch
    calls = _spy(monkeypatch)
    for pipeline in ('memory', 'gpu'):
        for crop_min, blur in ((0.08, True), (0.3, False)):
            calls.clear()
            loader = pretrain_loader(pipeline, tiny_folder, 8, torch.device('cpu'), 16, crop_min, blur=blur, seed=0)
            start_epoch(loader, 0)
            next(iter(loader))
            assert len(calls) == 1 and calls[0][0][0] == 8 and calls[0][0][3:] == (crop_min, blur), (pipeline, calls)
