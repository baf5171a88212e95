"""The batch-wise tensor augmentations (moco/tensor_aug.py) op by op against torchvision's tensor ops
given the same parameters, and the in-memory data pipeline (moco/memory_data.py).

Tolerances (float32, images in [0, 1]): 2e-5 for the colour ops, grayscale, solarize and the blur;
1e-5 for crops that upscale (bilinear); shrinking crops average points instead of torchvision's
antialiasing filter: mean absolute difference below 0.02, max below 0.15. The PIL path of the
reference pipeline differs further by PIL's 8-bit rounding after each op (not tested here)."""
import math
import os

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from moco import tensor_aug as ta
from moco.data import EpochSampler, start_epoch
from moco.dist import UserError
from moco.memory_data import InMemoryLoader


def _images(n=6, size=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g)


def test_crop_parameters_are_valid_and_follow_the_ranges():
    g = torch.Generator().manual_seed(0)
    top, left, h, w = ta.sample_crops(20000, 32, 48, (0.08, 1.), generator=g)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 32).all() and (left + w <= 48).all()
    frac = (h * w).float() / (32 * 48)
    assert frac.min() > 0.05 and frac.max() <= 1.0
    aspect = w.float() / h.float()
    assert aspect.min() > 3 / 4 * 0.8 and aspect.max() < 4 / 3 * 1.25      # rounding to whole pixels
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


def test_shrinking_crops_are_close_to_torchvision_antialiasing():
    x = torch.nn.functional.interpolate(_images(n=3, size=24), size=96, mode='bilinear')  # smooth images
    top, left, h, w = torch.tensor([0, 10, 20]), torch.tensor([0, 30, 5]), torch.tensor([96, 64, 70]), \
        torch.tensor([96, 60, 80])
    ours = ta.resized_crop(x, top, left, h, w, 32)
    for k in range(3):
        ref = TF.resized_crop(x[k], int(top[k]), int(left[k]), int(h[k]), int(w[k]), [32, 32], antialias=True)
        diff = (ours[k] - ref).abs()
        assert diff.mean() < 0.02 and diff.max() < 0.15, (k, diff.mean(), diff.max())


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


def test_grayscale_solarize_and_blur_equal_torchvision():
    x = _images(n=4)
    assert torch.allclose(ta.grayscale(x), TF.rgb_to_grayscale(x), atol=2e-5)
    assert torch.equal(ta.solarize(x), TF.solarize(x, threshold=128 / 255))
    sigma = torch.tensor([0.1, 0.7, 1.3, 2.0])
    out = ta.gaussian_blur(x, sigma)
    size = 2 * math.ceil(3 * 2.0) + 1
    for k in range(4):
        ref = TF.gaussian_blur(x[k], [size, size], [float(sigma[k])] * 2)
        assert torch.allclose(out[k], ref, atol=2e-5), k


def test_two_views_match_the_reference_pipeline_statistics(tiny_folder):
    """Whole views: shapes, and per-channel mean and std over many views close to the PIL pipeline's
    (the same distribution of crops, colours and flips)."""
    from moco.data import image_folder, pretrain_transform
    ds = image_folder(tiny_folder, 'train', pretrain_transform(16, blur=True))
    raw = torch.stack([TF.pil_to_tensor(Image.open(p).convert('RGB')) for p, _ in ds.samples])
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    ours, ref = [[], []], [[], []]
    for _ in range(30):
        v1, v2 = ta.two_views(raw, 16, blur=True, generator=g)
        ours[0].append(v1)
        ours[1].append(v2)
        for i in range(len(ds)):
            a, b = ds[i][0]
            ref[0].append(a[None])
            ref[1].append(b[None])
    for view in (0, 1):
        o, r = torch.cat(ours[view]), torch.cat(ref[view])
        assert o.shape[1:] == r.shape[1:] == (3, 16, 16)
        # sampling noise of 1,200 views of 40 images: about 0.03 on the mean (normalised units); a wrong
        # op or probability (no normalisation, solarize always, no grayscale) moves these far more
        assert torch.allclose(o.mean(dim=(0, 2, 3)), r.mean(dim=(0, 2, 3)), atol=0.1), view
        assert torch.allclose(o.std(dim=(0, 2, 3)), r.std(dim=(0, 2, 3)), rtol=0.08), view


def test_memory_loader_order_resume_and_determinism(tiny_folder):
    loader = InMemoryLoader(tiny_folder, 'train', 8, torch.device('cpu'), 16, seed=3)
    assert len(loader) == 5 and loader.images.dtype == torch.uint8
    start_epoch(loader, 2)
    full = list(loader)
    sampler = EpochSampler(40, 8, True, True, seed=3)
    sampler.set_epoch(2)
    expected = torch.tensor([i for i, _ in sampler])
    assert torch.equal(torch.cat([t for _, t, _ in full]), loader.targets[expected])
    start_epoch(loader, 2, skip_batches=3)
    resumed = list(loader)
    assert len(resumed) == 2
    for (va, ta_, _), (vb, tb, _) in zip(full[3:], resumed):
        assert torch.equal(va[0], vb[0]) and torch.equal(va[1], vb[1]) and torch.equal(ta_, tb)
    ahead = InMemoryLoader(tiny_folder, 'train', 8, torch.device('cpu'), 16, seed=3, prefetch=2)  # CUDA's way
    start_epoch(ahead, 2)
    made_ahead = list(ahead)
    assert len(made_ahead) == len(full)
    for (va, ta_, _), (vb, tb, _) in zip(full, made_ahead):
        assert torch.equal(va[0], vb[0]) and torch.equal(va[1], vb[1]) and torch.equal(ta_, tb)


def test_memory_pipeline_refuses_mixed_sizes(tmp_path):
    for i, size in enumerate((8, 8, 12)):
        os.makedirs(tmp_path / 'train' / 'c', exist_ok=True)
        Image.new('RGB', (size, size)).save(tmp_path / 'train' / 'c' / f'{i}.png')
    with pytest.raises(UserError, match='one size'):
        InMemoryLoader(str(tmp_path), 'train', 2, torch.device('cpu'), 8)


def test_knn_monitor_reads_the_decoded_images_like_the_eval_transform(tiny_folder):
    """The memory pipeline's kNN monitor (no PIL at each evaluation) gives the reference path's
    features bit for bit when the images have the crop size (CIFAR at 32 px), else falls back."""
    from moco.data import eval_transform, image_folder
    from moco.knn import extract_features
    from moco.memory_data import knn_sets_in_memory
    from moco.models import BackboneFeatures, build_moco
    loader = InMemoryLoader(tiny_folder, 'train', 8, torch.device('cpu'), 32, seed=0)
    in_memory = knn_sets_in_memory(loader, tiny_folder, 32)
    reference = [image_folder(tiny_folder, split, eval_transform(32)) for split in ('train', 'val')]
    torch.manual_seed(0)
    backbone = BackboneFeatures(build_moco('resnet18_cifar', 16, 32).base_encoder).eval()
    for ours, ref in zip(in_memory, reference):
        f_ours, y_ours = extract_features(backbone, ours, torch.device('cpu'), batch_size=16)
        f_ref, y_ref = extract_features(backbone, ref, torch.device('cpu'), batch_size=16)
        assert torch.equal(y_ours, y_ref) and torch.equal(f_ours, f_ref)
    assert knn_sets_in_memory(loader, tiny_folder, 24) is None        # another crop size: the eval transform


def test_view_parameters_survive_the_one_transfer_packing():
    """params_to sends all parameters in one float64 tensor on CUDA: every value and dtype comes back."""
    p = ta.sample_view_params(50, torch.randint(5, 300, (50,)), torch.randint(5, 300, (50,)), 0.08, 0.5, 0.2,
                              torch.Generator().manual_seed(0))
    back = ta._unpack(p, ta._pack(p))
    assert back.keys() == p.keys()
    for k in p:
        assert back[k].dtype == p[k].dtype and torch.equal(back[k], p[k]), k
