"""The GPU data pipeline (moco/data/gpu.py), run on the CPU: the same code decodes and augments on a GPU.

Decoding: TorchCodec's and torchvision's JPEG decoders give PIL's pixels exactly (all libjpeg-turbo on
the CPU), and every file they refuse takes PIL's path. Crops: equal to torchvision's tensor
resized_crop (1e-5); against PIL's resize of the reference path the difference is PIL's 8-bit
rounding (at most 1/255 after rounding ours). The ops after the crop are tensor_views', tested in
test_data_tensor_views.py; the random parameters of the views in test_data_view_params.py."""
import io

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from helpers import broken_folder, jpeg_bytes
from moco.data import tensor_views as ta
from moco.data.folder import BadImage, load_rgb
from moco.data.gpu import EncodedFiles, GpuJpegLoader, decode_on_device, jpeg_components, jpeg_decoder
from moco.data.sampler import start_epoch
from moco.errors import UserError

CPU = torch.device('cpu')


def test_jpeg_components_reads_the_frame_header():
    assert jpeg_components(jpeg_bytes()) == 3
    assert jpeg_components(jpeg_bytes('L')) == 1
    assert jpeg_components(jpeg_bytes('CMYK', color=(0, 255, 255, 0))) == 4
    buf = io.BytesIO()
    Image.new('RGB', (20, 20), (1, 2, 3)).save(buf, 'JPEG', progressive=True)
    assert jpeg_components(buf.getvalue()) == 3
    buf = io.BytesIO()
    Image.new('RGB', (4, 4)).save(buf, 'PNG')
    for not_a_jpeg in (buf.getvalue(), b'', b'\xff\xd8', b'\xff\xd8\x00\x00 garbage', b'<html>'):
        assert jpeg_components(not_a_jpeg) is None


def _decoder(library):
    decoder = jpeg_decoder(library)
    if decoder[0] != library:
        pytest.skip(f'{library} is not installed')
    return decoder


@pytest.mark.parametrize('decode_all, library', [(False, 'torchcodec'), (False, 'torchvision'), (True, None)],
                         ids=['jpeg-bytes-to-device-torchcodec', 'jpeg-bytes-to-device-torchvision',
                              'decoded-in-workers'])
def test_every_file_decodes_to_the_reference_pixels(odd_images, tmp_path, decode_all, library):
    """Both routes (bytes decoded in the training process by either library, or everything decoded in
    the workers) give exactly the reference path's RGB pixels; unreadable files come back as BadImage."""
    decoder = _decoder(library) if library else None
    samples = [(str(p), 0) for p in sorted(odd_images.rglob('*')) if p.suffix in ('.jpg', '.png')]
    samples += [(str(p), 1) for p in sorted(broken_folder(tmp_path / 'broken').rglob('*.jpg'))]
    files = EncodedFiles(samples, decode_all=decode_all)
    payloads = [files[(i, 0)][0] for i in range(len(samples))]
    kinds = {path.rsplit('/', 1)[1]: (p.dim() if torch.is_tensor(p) else 'bad') for (path, _), p in
             zip(samples, payloads)}
    if not decode_all:  # only RGB and gray JPEG bytes travel to the device; CMYK and PNG are decoded on the CPU
        assert kinds['rgb.jpg'] == kinds['gray.jpg'] == kinds['0_good.jpg'] == kinds['1_truncated.jpg'] == 1
        assert kinds['cmyk.jpg'] == kinds['rgba.png'] == kinds['gray16.png'] == 3
    assert kinds['2_text.jpg'] == kinds['3_empty.jpg'] == 'bad'
    images = decode_on_device(payloads, [p for p, _ in samples], CPU, decoder)
    for (path, _), image in zip(samples, images):
        try:
            expected = TF.pil_to_tensor(load_rgb(path))
        except BadImage:
            assert isinstance(image, BadImage) and path in str(image), path
            continue
        assert image.dtype == torch.uint8 and torch.equal(image, expected), path


def test_per_image_resized_crops_equal_torchvision_and_round_to_pil():
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
              for h, w in ((40, 60), (17, 13), (100, 80), (24, 24))]
    top, left = torch.tensor([3, 0, 10, 0]), torch.tensor([5, 2, 0, 0])
    h, w = torch.tensor([30, 17, 90, 24]), torch.tensor([50, 9, 70, 24])
    ours = ta.resized_crop(images, top, left, h, w, 20)         # shrinks, stretches and keeps sizes
    assert ours.shape == (4, 3, 20, 20) and ours.dtype == torch.float32
    for k, image in enumerate(images):
        box = int(top[k]), int(left[k]), int(h[k]), int(w[k])
        ref = TF.resized_crop(image.float(), *box, [20, 20], antialias=True) / 255
        assert torch.allclose(ours[k], ref, atol=1e-5), k
        pil = Image.fromarray(image.permute(1, 2, 0).numpy()).crop((box[1], box[0], box[1] + box[3], box[0] + box[2]))
        pil = TF.pil_to_tensor(pil.resize((20, 20), Image.BILINEAR)).float()
        assert (torch.round(ours[k] * 255) - pil).abs().max() <= 1, k


def test_crops_of_images_of_different_sizes():
    """Per-image sizes: every box inside its own image; with one size, the scalar call's boxes exactly."""
    g = torch.Generator().manual_seed(1)
    heights = torch.randint(1, 500, (3000,), generator=g)
    widths = torch.randint(1, 500, (3000,), generator=g)
    top, left, h, w = ta.sample_crops(3000, heights, widths, (0.08, 1.), generator=g)
    assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (top + h <= heights).all() and (left + w <= widths).all()
    same = ta.sample_crops(50, torch.full((50,), 37), torch.full((50,), 90), (0.08, 1.),
                           generator=torch.Generator().manual_seed(2))
    scalar = ta.sample_crops(50, 37, 90, (0.08, 1.), generator=torch.Generator().manual_seed(2))
    assert all(torch.equal(a, b) for a, b in zip(same, scalar))


def _epoch(loader, epoch, skip_batches=0):
    start_epoch(loader, epoch, skip_batches=skip_batches)
    return list(loader)


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for (va, ya, sa), (vb, yb, sb) in zip(a, b):
        assert torch.equal(va[0], vb[0]) and torch.equal(va[1], vb[1]) and torch.equal(ya, yb) and torch.equal(sa, sb)


def test_gpu_loader_is_deterministic_and_resumes_mid_epoch(tiny_folder):
    def loader(**kw):
        return GpuJpegLoader(tiny_folder, 'train', 8, CPU, 16, seed=5, **kw)
    full = _epoch(loader(), 1)
    assert len(full) == 5
    views, targets, skipped = full[0]
    assert [v.shape for v in views] == [(8, 3, 16, 16)] * 2 and targets.shape == (8,) and skipped.sum() == 0
    assert not torch.equal(views[0], views[1])
    # neither the number of workers nor where the JPEGs are decoded changes a pixel
    _assert_same_batches(full, _epoch(loader(workers=2), 1))
    _assert_same_batches(full, _epoch(loader(decode_in_workers=False), 1))
    _assert_same_batches(full[3:], _epoch(loader(), 1, skip_batches=3))
    _assert_same_batches(full, _epoch(loader(prefetch=2), 1))         # made ahead in a thread (CUDA's default)
    other = _epoch(loader(), 2)
    assert not torch.equal(other[0][0][0], full[0][0][0])
    # the labels follow the images: the sampler's order of the folder's targets
    order = [i for i, _ in loader().sampler]
    assert torch.cat([t for _, t, _ in _epoch(loader(), 0)]).tolist() == \
        [loader().folder.targets[i] for i in order[:40]]


def test_gpu_loader_views_are_the_sampled_views(tiny_folder, monkeypatch):
    """Each batch's two views are its images (PIL's pixels), cropped with ``resized_crop`` and augmented
    by ``tensor_views.after_crop`` with the parameters ``sample_two_views`` drew for the batch, with the
    loader's crop_min and blur (the parameters themselves: tests/test_data_view_params.py)."""
    calls = []
    real = ta.sample_two_views

    def spy(n, height, width, crop_min=0.08, blur=True, generator=None):
        calls.append((n, crop_min, blur, real(n, height, width, crop_min, blur, generator)))
        return calls[-1][-1]
    monkeypatch.setattr(ta, 'sample_two_views', spy)
    loader = GpuJpegLoader(tiny_folder, 'train', 8, CPU, 16, crop_min=0.3, blur=False, seed=0)
    batches = _epoch(loader, 0)
    order = [i for i, _ in loader.sampler]
    assert len(calls) == len(batches) == 5
    for b, ((views, targets, _), (n, crop_min, blur, params)) in enumerate(zip(batches, calls)):
        assert (n, crop_min, blur) == (8, 0.3, False)
        indices = order[b * 8:(b + 1) * 8]
        images = [TF.pil_to_tensor(load_rgb(loader.folder.samples[i][0])) for i in indices]
        assert targets.tolist() == [loader.folder.targets[i] for i in indices]
        for got, p in zip(views, params):
            expected = ta.after_crop(ta.resized_crop(images, p['top'], p['left'], p['h'], p['w'], 16), p)
            assert torch.equal(got, expected), b


@pytest.mark.parametrize('decode_in_workers', [False, True])
def test_unreadable_files_are_replaced_by_the_next_readable_file(tmp_path, capsys, decode_in_workers):
    """The rule of every pipeline (SafeImageFolder.load): an unreadable file is replaced by the next
    readable file in the folder's order, and each replaced file is counted once."""
    root = tmp_path / 'data'
    broken_folder(root / 'train')
    loader = GpuJpegLoader(str(root), 'train', 5, CPU, 8, seed=0, decode_in_workers=decode_in_workers)
    good = TF.pil_to_tensor(load_rgb(str(root / 'train' / 'c' / '4_good.jpg')))
    for epoch in range(3):
        views, targets, skipped = _epoch(loader, epoch)[0]
        assert views[0].shape == (5, 3, 8, 8) and torch.isfinite(views[0]).all()
        order = [i for i, _ in loader.sampler]
        # 0_good and 4_good are kept; 1_truncated, 2_text and 3_empty are each replaced (by 4_good): 1 each
        assert skipped.tolist() == [(0, 1, 1, 1, 0)[i] for i in order]
    images = loader.folder
    assert all(torch.equal(TF.pil_to_tensor(images.load(i)[0]), good) for i in (1, 2, 3))
    err = capsys.readouterr().err
    for name in ('1_truncated.jpg', '2_text.jpg', '3_empty.jpg'):
        assert err.count(name) == 1, err        # reported once per file and process
    strict = GpuJpegLoader(str(root), 'train', 5, CPU, 8, seed=0, strict=True)
    with pytest.raises(UserError, match='unreadable image .*without --strict-data'):
        _epoch(strict, 0)


def test_a_batch_of_only_unreadable_files_is_a_user_error(tmp_path):
    (tmp_path / 'train' / 'c').mkdir(parents=True)
    for i in range(4):
        (tmp_path / 'train' / 'c' / f'{i}.jpg').write_text('not a jpeg')
    for prefetch in (0, 1):     # also raised in the consumer when the batch is made in a thread
        with pytest.raises(UserError, match='unreadable images'):
            _epoch(GpuJpegLoader(str(tmp_path), 'train', 4, CPU, 8, seed=0, prefetch=prefetch), 0)


def test_a_decoder_answer_that_is_not_rgb_takes_the_pil_path(tiny_folder):
    """Should the batched decoder hand back a one-channel image (or raise), the file is decoded again."""
    samples = GpuJpegLoader(tiny_folder, 'train', 4, CPU, 8).folder.samples[:3]
    payloads = [EncodedFiles(samples)[(i, 0)][0] for i in range(3)]
    real = jpeg_decoder()[1]

    def gray_batch(data, device):
        if isinstance(data, list):
            return [real(d, device)[:1] for d in data]      # one channel: wrong
        raise RuntimeError('nvjpeg says no')
    images = decode_on_device(payloads, [p for p, _ in samples], CPU, ('broken', gray_batch))
    for (path, _), image in zip(samples, images):
        assert torch.equal(image, TF.pil_to_tensor(load_rgb(path)))
