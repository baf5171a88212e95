"""moco/data/views.py: MoCo v3's two PIL views (the paper's appendix), the eval and probe views, and
odd images through the pretraining views."""
import os
import random

import pytest
import torch
import torchvision.transforms as T
from PIL import Image, ImageFilter

from moco.data.folder import SafeImageFolder
from moco.data.views import (IMAGENET_MEAN, IMAGENET_STD, GaussianBlur, Solarize, TwoCropsTransform, eval_transform,
                             lincls_train_transform, pretrain_transform)


@pytest.fixture(scope='module')
def image(tiny_folder):
    folder = os.path.join(tiny_folder, 'train', 'airplane')
    path = os.path.join(folder, sorted(os.listdir(folder))[0])
    return Image.open(path).convert('RGB')


# ---------------------------------------------------------------- augmentation
def _random_apply_p(compose, op_type):
    """Probabilities of the RandomApply wrappers holding an op of ``op_type``."""
    return [t.p for t in compose.transforms
            if isinstance(t, T.RandomApply) and any(isinstance(op, op_type) for op in t.transforms)]


def _check_common_ops(view, size, crop_min):
    ops = view.transforms
    rrc = ops[0]
    assert isinstance(rrc, T.RandomResizedCrop)
    assert tuple(rrc.size) == (size, size)
    assert tuple(rrc.scale) == (crop_min, 1.0)
    assert rrc.ratio == pytest.approx((3 / 4, 4 / 3))
    cj = ops[1]
    assert isinstance(cj, T.RandomApply) and cj.p == 0.8 and len(cj.transforms) == 1
    jitter = cj.transforms[0]
    assert isinstance(jitter, T.ColorJitter)
    assert jitter.brightness == pytest.approx((0.6, 1.4))
    assert jitter.contrast == pytest.approx((0.6, 1.4))
    assert jitter.saturation == pytest.approx((0.8, 1.2))
    assert jitter.hue == pytest.approx((-0.1, 0.1))
    assert isinstance(ops[2], T.RandomGrayscale) and ops[2].p == 0.2
    assert isinstance(ops[-3], T.RandomHorizontalFlip) and ops[-3].p == 0.5
    assert isinstance(ops[-2], T.ToTensor)
    assert isinstance(ops[-1], T.Normalize)
    assert tuple(ops[-1].mean) == IMAGENET_MEAN == (0.485, 0.456, 0.406)
    assert tuple(ops[-1].std) == IMAGENET_STD == (0.229, 0.224, 0.225)


def _blur_op(view):
    for t in view.transforms:
        if isinstance(t, T.RandomApply):
            for op in t.transforms:
                if isinstance(op, GaussianBlur):
                    return op
    return None


def test_pretrain_transform_two_views_shapes(image):
    tf = pretrain_transform(image_size=32, crop_min=0.2)
    assert isinstance(tf, TwoCropsTransform)
    views = tf(image)
    assert isinstance(views, list) and len(views) == 2
    for v in views:
        assert v.shape == (3, 32, 32) and v.dtype == torch.float32
    assert not torch.equal(views[0], views[1])
    big = pretrain_transform()(image)
    assert [v.shape for v in big] == [(3, 224, 224)] * 2


def test_pretrain_views_are_asymmetric():
    tf = pretrain_transform(image_size=224, crop_min=0.08)
    v1, v2 = tf.transform1, tf.transform2
    for v in (v1, v2):
        _check_common_ops(v, 224, 0.08)
    # view 1: blur always, never solarize
    assert _random_apply_p(v1, GaussianBlur) == [1.0]
    assert _random_apply_p(v1, Solarize) == []
    assert not any(isinstance(t, Solarize) for t in v1.transforms)
    # view 2: blur p 0.1, solarize p 0.2
    assert _random_apply_p(v2, GaussianBlur) == [0.1]
    assert _random_apply_p(v2, Solarize) == [0.2]
    # order as in the original: crop, jitter, grayscale, blur, [solarize], flip, tensor, normalise
    assert len(v1.transforms) == 7 and len(v2.transforms) == 8
    assert isinstance(v2.transforms[3].transforms[0], GaussianBlur)
    assert isinstance(v2.transforms[4].transforms[0], Solarize)
    for v in (v1, v2):
        assert tuple(_blur_op(v).sigma) == (0.1, 2.0)


def test_crop_min_is_passed():
    tf = pretrain_transform(image_size=64, crop_min=0.2)
    for v in (tf.transform1, tf.transform2):
        _check_common_ops(v, 64, 0.2)


def test_blur_false_drops_blur():
    tf = pretrain_transform(image_size=32, blur=False)
    assert _random_apply_p(tf.transform1, GaussianBlur) == []
    assert _random_apply_p(tf.transform2, GaussianBlur) == []
    assert _random_apply_p(tf.transform1, Solarize) == []
    assert _random_apply_p(tf.transform2, Solarize) == [0.2]
    for v in (tf.transform1, tf.transform2):
        _check_common_ops(v, 32, 0.08)


def test_gaussian_blur_uses_pil_radius_uniform_in_range(image):
    random.seed(123)
    out = GaussianBlur()(image)
    random.seed(123)
    sigma = random.uniform(0.1, 2.0)
    ref = image.filter(ImageFilter.GaussianBlur(radius=sigma))
    assert out.tobytes() == ref.tobytes()
    assert out.tobytes() != image.tobytes()


def test_solarize_threshold_128():
    img = Image.new('L', (3, 1))
    img.putdata([127, 128, 200])
    assert list(Solarize()(img).tobytes()) == [127, 127, 55]


def test_eval_transform_sizes():
    tf = eval_transform(224)
    resize = [t for t in tf.transforms if isinstance(t, T.Resize)][0]
    crop = [t for t in tf.transforms if isinstance(t, T.CenterCrop)][0]
    assert resize.size == 256 and tuple(crop.size) == (224, 224)
    img = Image.new('RGB', (300, 200), (120, 30, 200))
    assert tf(img).shape == (3, 224, 224)
    small = eval_transform(32)
    assert small(img).shape == (3, 32, 32)
    assert isinstance(small.transforms[-1], T.Normalize)


def test_lincls_train_transform(image):
    tf = lincls_train_transform(32)
    assert isinstance(tf.transforms[0], T.RandomResizedCrop) and tuple(tf.transforms[0].scale) == (0.08, 1.0)
    assert isinstance(tf.transforms[1], T.RandomHorizontalFlip)
    assert tf(image).shape == (3, 32, 32)


# ---------------------------------------------------------------- datasets


# ---------------------------------------------------------------- kNN


# ---------------------------------------------------------------- AllReduceBatchNorm at world size 1
def test_odd_images_go_through_the_pretraining_views(odd_images):
    ds = SafeImageFolder(str(odd_images), pretrain_transform(16, blur=True))
    assert len(ds) == 7                                    # notes.txt is not an image
    for i in range(len(ds)):
        views, _, skipped = ds.load(i)
        assert skipped == 0 and [v.shape for v in views] == [(3, 16, 16)] * 2
