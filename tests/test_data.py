"""Augmentations (the paper's appendix), dataset errors, kNN classifier and the CPU all-reduce BatchNorm at world size 1."""
import os
import random

import pytest
import torch
import torch.nn as nn
import torchvision.transforms as T
from PIL import Image, ImageFilter

import moco.dist
import moco.errors
from moco.data.folder import image_folder
from moco.data.views import (IMAGENET_MEAN, IMAGENET_STD, GaussianBlur, Solarize, TwoCropsTransform, eval_transform,
                             lincls_train_transform, pretrain_transform)
from moco.knn import knn_classify
from moco.norm import AllReduceBatchNorm, convert_sync_batchnorm


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

def test_image_folder_reads_tiny_folder(tiny_folder):
    ds = image_folder(tiny_folder, 'train', eval_transform(32))
    assert len(ds) == 40 and len(ds.classes) == 10
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and 0 <= y < 10


def test_image_folder_missing_raises_user_error(tmp_path):
    with pytest.raises(moco.errors.UserError) as exc:
        image_folder(str(tmp_path), 'train', None)
    msg = str(exc.value)
    assert '\n' not in msg and os.path.join(str(tmp_path), 'train') in msg


@pytest.mark.parametrize('with_class_dir', [False, True])
def test_image_folder_empty_raises_user_error(tmp_path, with_class_dir):
    os.makedirs(tmp_path / 'val')
    if with_class_dir:
        os.makedirs(tmp_path / 'val' / 'cat')      # a class folder without images
    with pytest.raises(moco.errors.UserError) as exc:
        image_folder(str(tmp_path), 'val', None)
    msg = str(exc.value)
    assert '\n' not in msg and msg.strip() and 'val' in msg


# ---------------------------------------------------------------- kNN

def test_knn_two_separated_clusters():
    gen = torch.Generator().manual_seed(0)
    centers = torch.tensor([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0]])
    train = torch.cat([centers[0] + 0.3 * torch.randn(10, 3, generator=gen),
                       centers[1] + 0.3 * torch.randn(10, 3, generator=gen)])
    labels = torch.tensor([0] * 10 + [1] * 10)
    test = torch.cat([centers[0] + 0.3 * torch.randn(5, 3, generator=gen),
                      centers[1] + 0.3 * torch.randn(5, 3, generator=gen)])
    expected = torch.tensor([0] * 5 + [1] * 5)
    for k in (1, 5, 200):
        assert torch.equal(knn_classify(train, labels, test, num_classes=2, k=k), expected)
    # chunking does not change the answer
    assert torch.equal(knn_classify(train, labels, test, num_classes=2, k=5, chunk=3), expected)


def _unit(angle_deg):
    a = torch.tensor(angle_deg, dtype=torch.float32) * torch.pi / 180
    return torch.stack([a.cos(), a.sin()])


def test_knn_weighting_by_exp_similarity_decides():
    # one class-1 neighbour at similarity 1.0, two class-0 neighbours at similarity cos(36.87 deg) = 0.8
    train = torch.stack([_unit(0.0), _unit(36.8699), _unit(-36.8699)])
    labels = torch.tensor([1, 0, 0])
    test = _unit(0.0)[None]
    # T = 0.1: e^10 > 2 e^8 -> class 1 wins despite being outnumbered
    assert knn_classify(train, labels, test, num_classes=2, k=3, T=0.1).tolist() == [1]
    # T = 1: e^1 < 2 e^0.8 -> the majority wins
    assert knn_classify(train, labels, test, num_classes=2, k=3, T=1.0).tolist() == [0]


def test_knn_k_limits_voters_and_features_need_not_be_normalised():
    # nearest: class 1 (sim 0.99); next two: class 0 (sim 0.98)
    train = torch.stack([_unit(8.1096), _unit(11.4783), _unit(-11.4783)])
    labels = torch.tensor([1, 0, 0])
    test = _unit(0.0)[None]
    assert knn_classify(train, labels, test, num_classes=2, k=1, T=1.0).tolist() == [1]
    assert knn_classify(train, labels, test, num_classes=2, k=3, T=1.0).tolist() == [0]
    scaled = train * torch.tensor([[100.0], [0.01], [3.0]])     # cosine similarity ignores the scale
    assert knn_classify(scaled, labels, test * 42, num_classes=2, k=1, T=1.0).tolist() == [1]
    assert knn_classify(scaled, labels, test * 42, num_classes=2, k=3, T=1.0).tolist() == [0]


# ---------------------------------------------------------------- AllReduceBatchNorm at world size 1

@pytest.mark.parametrize('bn_cls,shape', [(nn.BatchNorm2d, (4, 3, 5, 5)), (nn.BatchNorm1d, (6, 3))])
def test_allreduce_bn_world_size_1_equals_batchnorm(bn_cls, shape):
    assert not moco.dist.is_initialized() and moco.dist.world_size() == 1
    torch.manual_seed(0)
    ref = bn_cls(3, momentum=0.2)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-0.5, 0.5)
    ours = AllReduceBatchNorm(3, momentum=0.2)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(*shape) * 2 + 1
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ref(xa), ours(xb)
    assert torch.equal(ya, yb)
    g = torch.randn(*shape)
    ya.backward(g)
    yb.backward(g)
    assert torch.equal(xa.grad, xb.grad)
    assert torch.equal(ref.weight.grad, ours.weight.grad) and torch.equal(ref.bias.grad, ours.bias.grad)
    for k, v in ref.state_dict().items():
        assert torch.equal(v, ours.state_dict()[k]), k
    assert ours.num_batches_tracked.item() == 1
    ref.eval()
    ours.eval()
    assert torch.equal(ref(x), ours(x))


def test_convert_sync_batchnorm_cpu_keeps_parameters_and_keys():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(36, 5),
                          nn.BatchNorm1d(5, affine=False))
    keys = list(model.state_dict())
    bn_weight = model[1].weight
    converted = convert_sync_batchnorm(model, torch.device('cpu'))
    assert list(converted.state_dict()) == keys
    assert isinstance(converted[1], AllReduceBatchNorm) and isinstance(converted[4], AllReduceBatchNorm)
    assert converted[1].weight is bn_weight and converted[4].weight is None
    assert not any(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d) for m in converted.modules())
