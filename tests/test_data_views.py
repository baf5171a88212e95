"""moco/data/views.py: the PIL views (``pil_pretrain_transform``) are the definition's, the original release's,
byte for byte and draw for draw.

The definition is the original's op list as its main_moco.py writes it (``original_pretrain_transform``:
torchvision ops on PIL images; here behind torchvision's ImageFolder loader), and its numbers are the
paper's (checked on the ops themselves). For each image and seed both views, made float by ``ToFloat``,
must equal the definition's float views exactly, and the torch and
python random states afterwards must be the original's (so a changed number or order of draws fails
even where the pixels happen to agree). Images: JPEGs of ImageNet's sizes in both orientations cut
from a photograph, and files in the modes a folder holds (L, CMYK, palette, RGBA, EXIF-rotated).
"""
import io
import os
import random

import pytest
import torch
import torchvision.transforms as T
from PIL import Image, ImageFilter, ImageOps

from moco.data import views
from moco.data.folder import SafeImageFolder, load_rgb
from moco.data.views import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ToFloat,
    eval_transform,
    lincls_train_transform,
    original_pretrain_transform,
    pil_pretrain_transform,
    random_resized_crop_params,
)
from moco.tools.bench_pipeline import cut_jpegs, original_loader, photo_files

TO_FLOAT = ToFloat()


@pytest.fixture(scope='module')
def photo_jpegs(tmp_path_factory):
    """16 JPEG files' bytes: ImageNet's 8 common sizes, landscape and portrait, cut from a photograph."""
    root = cut_jpegs(str(tmp_path_factory.mktemp('jpegs')), photo_files()[:1], n=16)
    folder = os.path.join(root, 'train', 'photos')
    return [open(os.path.join(folder, f), 'rb').read() for f in sorted(os.listdir(folder))]


def _seeded(seed, fn, *args):
    torch.manual_seed(seed)
    random.seed(seed)
    out = fn(*args)
    return out, torch.get_rng_state(), random.getstate()


def _assert_views_are_the_originals(data, seeds, image_size=224, crop_min=0.08, blur=True, where=''):
    ours = pil_pretrain_transform(image_size, crop_min, blur=blur)
    original = original_pretrain_transform(image_size, crop_min, blur=blur)
    for seed in seeds:
        expected, torch_state, py_state = _seeded(seed, original, original_loader(data))
        got, our_torch_state, our_py_state = _seeded(seed, ours, load_rgb(where, data))
        for k, (e, g) in enumerate(zip(expected, got)):
            assert g.dtype == torch.uint8 and g.shape == (image_size, image_size, 3)
            floats = TO_FLOAT(g[None])[0]
            assert floats.dtype == torch.float32 and torch.equal(floats, e), \
                f'{where} seed {seed} view {k + 1}: {(floats != e).sum().item()} values differ'
        assert torch.equal(our_torch_state, torch_state), f'{where} seed {seed}: torch draws differ'
        assert our_py_state == py_state, f'{where} seed {seed}: python random draws differ'


def test_views_are_the_originals_on_photographs(photo_jpegs):
    for k, data in enumerate(photo_jpegs):
        _assert_views_are_the_originals(data, range(k * 7, k * 7 + 7), where=f'jpeg {k}')


@pytest.mark.slow
def test_views_are_the_originals_for_many_seeds(photo_jpegs):
    for k, data in enumerate(photo_jpegs):
        _assert_views_are_the_originals(data, range(1000 + k * 60, 1000 + k * 60 + 60), where=f'jpeg {k}')


@pytest.mark.parametrize('image_size, crop_min, blur', [(64, 0.2, True), (32, 0.08, False), (128, 0.5, True)])
def test_views_are_the_originals_at_other_settings(photo_jpegs, image_size, crop_min, blur):
    for k, data in enumerate(photo_jpegs[:6]):
        _assert_views_are_the_originals(data, range(5), image_size, crop_min, blur, where=f'jpeg {k}')


def _encoded(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_views_are_the_originals_for_every_image_mode(photo_jpegs):
    photo = Image.open(io.BytesIO(photo_jpegs[0])).convert('RGB')
    exif = Image.Exif()
    exif[0x0112] = 6   # EXIF orientation "rotate 90": neither pipeline applies it
    palette = photo.convert('P', palette=Image.Palette.ADAPTIVE, colors=64)
    files = {'gray jpeg': _encoded(photo.convert('L'), 'JPEG', quality=90),
             'cmyk jpeg': _encoded(photo.convert('CMYK'), 'JPEG', quality=90),
             'palette png': _encoded(palette, 'PNG'),
             'palette png with transparency': _encoded(palette, 'PNG', transparency=3),
             'rgba png': _encoded(photo.convert('RGBA'), 'PNG'),
             'exif-rotated jpeg': _encoded(photo, 'JPEG', quality=90, exif=exif),
             'tall thin jpeg': _encoded(photo.resize((40, 500)), 'JPEG')}   # RandomResizedCrop's fallback
    for name, data in files.items():
        _assert_views_are_the_originals(data, range(4), where=name)


# ------------------------------------------------------------------------------- the pieces
def test_crop_params_are_torchvisions():
    rrc = T.RandomResizedCrop(224, scale=(0.08, 1.))
    for width, height in ((500, 375), (375, 500), (224, 224), (31, 900), (900, 31), (1, 1), (3, 2)):
        img = Image.new('RGB', (width, height))
        for seed in range(30):
            torch.manual_seed(seed)
            expected, state = rrc.get_params(img, rrc.scale, rrc.ratio), torch.get_rng_state()
            torch.manual_seed(seed)
            assert random_resized_crop_params(width, height, (0.08, 1.)) == expected, (width, height, seed)
            assert torch.equal(torch.get_rng_state(), state)


def test_probabilities_compare_as_torch_compares_a_float32_draw():
    """The views compare python floats where torchvision compares ``torch.rand(1)`` with p: the same answer for
    every draw, including the one draw that could differ, a draw equal to p rounded to float32."""
    from moco.data.views import _float32
    for p in (0.8, 0.2, 0.1, 0.5, 1.0, 0.7, 0.3):
        p32 = torch.tensor([p], dtype=torch.float32)
        for draw in (p32, torch.nextafter(p32, torch.zeros(1)), torch.nextafter(p32, torch.ones(1))):
            x = draw.item()
            assert (not p < draw) == (x <= _float32(p)), p   # RandomApply
            assert bool(draw < p) == (x < _float32(p)), p    # RandomGrayscale, RandomHorizontalFlip


def _reference_float(views):
    """ToTensor + Normalize of each uint8 view (H, W, 3) as torchvision computes them."""
    normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    return torch.stack([normalize(T.ToTensor()(Image.fromarray(v.numpy()))) for v in views])


def test_to_float_is_totensor_and_normalize():
    every_value = torch.arange(256, dtype=torch.uint8).repeat(3, 1).T.reshape(16, 16, 3)   # each byte, each channel
    rng = torch.Generator().manual_seed(0)
    views = torch.cat([every_value[None], torch.randint(0, 256, (3, 16, 16, 3), dtype=torch.uint8, generator=rng)])
    expected = _reference_float(views)
    arithmetic = TO_FLOAT(views)   # on the CPU: torchvision's own float32 ops
    lookup = TO_FLOAT.lookup(views)   # elsewhere (CUDA): the table of those ops' values
    for got in (arithmetic, lookup):
        assert got.shape == (4, 3, 16, 16) and got.dtype == torch.float32 and torch.equal(got, expected)
    assert arithmetic.is_contiguous(memory_format=torch.channels_last)


def test_pretrain_views_are_uint8_and_asymmetric(photo_jpegs):
    img = load_rgb('photo', photo_jpegs[1])
    tf = pil_pretrain_transform(image_size=32, crop_min=0.2)
    views = tf(img)
    assert [(v.shape, v.dtype) for v in views] == [((32, 32, 3), torch.uint8)] * 2
    assert not torch.equal(views[0], views[1])
    v1, v2 = tf.view1, tf.view2
    assert (v1.blur_p, v1.solarize_p, v2.blur_p, v2.solarize_p) == (1.0, 0.0, 0.1, 0.2)
    assert v1.scale == v2.scale == (0.2, 1.)
    no_blur = pil_pretrain_transform(image_size=32, blur=False)
    assert (no_blur.view1.blur_p, no_blur.view2.blur_p, no_blur.view2.solarize_p) == (0., 0., 0.2)


def _ops(view):
    """A view's ops as (name, numbers) pairs: RandomApply as its op's, with its p."""
    ops = []
    for t in view.transforms:
        p = None
        if isinstance(t, T.RandomApply):
            (t,), p = t.transforms, t.p
        if isinstance(t, T.RandomResizedCrop):
            ops.append(('crop', (tuple(t.size), tuple(t.scale), tuple(t.ratio), t.interpolation)))
        elif isinstance(t, T.ColorJitter):
            ops.append(('jitter', (p, tuple(t.brightness), tuple(t.contrast), tuple(t.saturation), tuple(t.hue))))
        elif isinstance(t, T.RandomGrayscale):
            ops.append(('gray', (t.p,)))
        elif isinstance(t, views.GaussianBlur):
            ops.append(('blur', (p, tuple(t.sigma))))
        elif isinstance(t, views.Solarize):
            ops.append(('solarize', (p,)))
        elif isinstance(t, T.RandomHorizontalFlip):
            ops.append(('flip', (t.p,)))
        elif isinstance(t, T.ToTensor):
            ops.append(('to_tensor', ()))
        elif isinstance(t, T.Normalize):
            ops.append(('normalize', (tuple(t.mean), tuple(t.std))))
        else:
            raise AssertionError(f'an op the paper does not list: {t!r}')
    return ops


@pytest.mark.parametrize('image_size, crop_min, blur', [(224, 0.08, True), (64, 0.2, True), (32, 0.08, False)])
def test_the_definition_is_the_papers_op_list(image_size, crop_min, blur):
    """The definition the views are tested against: the paper's appendix (BYOL's recipe), op by op, in order,
    with its probabilities and ranges; ``blur=False`` (--no-blur) only drops the blur."""
    crop = ('crop', ((image_size, image_size), (crop_min, 1.), (3 / 4, 4 / 3), T.InterpolationMode.BILINEAR))
    common = [crop, ('jitter', (0.8, (0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1))), ('gray', (0.2,))]
    tail = [('flip', (0.5,)), ('to_tensor', ()), ('normalize', ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))]
    blur1, blur2 = ([('blur', (1.0, (.1, 2.)))], [('blur', (0.1, (.1, 2.)))]) if blur else ([], [])
    definition = original_pretrain_transform(image_size, crop_min, blur=blur)
    assert _ops(definition.view1) == common + blur1 + tail
    assert _ops(definition.view2) == common + blur2 + [('solarize', (0.2,))] + tail


def test_the_definitions_blur_and_solarize_are_pils():
    img = Image.new('RGB', (16, 16))
    img.putdata([(i * 16 % 256, i % 256, 255 - i % 256) for i in range(256)])
    assert views.Solarize()(img).tobytes() == ImageOps.solarize(img, 128).tobytes()
    random.seed(3)
    radius = random.uniform(0.1, 2.0)
    random.seed(3)
    assert views.GaussianBlur([.1, 2.])(img).tobytes() == img.filter(ImageFilter.GaussianBlur(radius)).tobytes()


# ------------------------------------------------------------------------------- eval views
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


def test_lincls_train_transform(photo_jpegs):
    tf = lincls_train_transform(32)
    assert isinstance(tf.transforms[0], T.RandomResizedCrop) and tuple(tf.transforms[0].scale) == (0.08, 1.0)
    assert isinstance(tf.transforms[1], T.RandomHorizontalFlip)
    assert tf(load_rgb('photo', photo_jpegs[0])).shape == (3, 32, 32)


def test_odd_images_go_through_the_pretraining_views(odd_images):
    ds = SafeImageFolder(str(odd_images), pil_pretrain_transform(16, blur=True))
    assert len(ds) == 7                                    # notes.txt is not an image
    for i in range(len(ds)):
        views, _, skipped = ds.load(i)
        assert skipped == 0 and [(v.shape, v.dtype) for v in views] == [((16, 16, 3), torch.uint8)] * 2
