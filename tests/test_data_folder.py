"""moco/data/folder.py: image folders with one-line errors, every image mode as RGB, and the one rule for
an unreadable file (reported once, replaced by the next readable one, or an error with --strict-data)."""
import os
import warnings

import pytest

from helpers import broken_folder
from moco.data.folder import SafeImageFolder, image_folder, load_rgb
from moco.data.views import eval_transform, pretrain_transform
from moco.errors import UserError


def test_every_image_mode_becomes_rgb(odd_images):
    expected = {'rgb.jpg': None, 'cmyk.jpg': None, 'gray.jpg': (128, 128, 128), 'rgba.png': (10, 20, 30),
                'palette.png': (250, 5, 5), 'gray16.png': (127, 127, 127), 'one_pixel.png': (0, 255, 0)}
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # e.g. PIL's "Palette images with Transparency" warning
        for name, rgb in expected.items():
            path = next(odd_images.rglob(name))
            img = load_rgb(str(path))
            assert img.mode == 'RGB', name
            if rgb is not None:
                assert img.getpixel((0, 0)) == rgb, name
    cmyk = load_rgb(str(odd_images / 'a' / 'cmyk.jpg')).getpixel((0, 0))
    assert cmyk[0] > 200 and cmyk[1] < 60 and cmyk[2] < 60, cmyk   # CMYK (0, 255, 255, 0) is red


def test_unreadable_images_are_replaced_reported_once_and_counted(tmp_path, capsys):
    ds = SafeImageFolder(str(broken_folder(tmp_path / 'train')), pretrain_transform(8))
    got = [ds.load(i)[2] for i in range(len(ds))]
    # a bad file is replaced by the next readable one, and counted once (not 3 + 2 + 1 files passed over)
    assert got == [0, 1, 1, 1, 0]
    ds.load(1)
    err = capsys.readouterr().err
    for name in ('1_truncated.jpg', '2_text.jpg', '3_empty.jpg'):
        assert err.count(name) == 1, err    # once per file and process
    assert err.count('warning: skipping unreadable image') == 3


def test_strict_data_makes_an_unreadable_image_an_error(tmp_path):
    ds = SafeImageFolder(str(broken_folder(tmp_path / 'train')), pretrain_transform(8), strict=True)
    ds.load(0)
    with pytest.raises(UserError, match='1_truncated.jpg'):
        ds.load(1)


def test_a_folder_of_broken_files_is_an_error(tmp_path):
    (tmp_path / 'train' / 'c').mkdir(parents=True)
    for i in range(60):
        (tmp_path / 'train' / 'c' / f'{i}.jpg').write_bytes(b'junk')
    ds = image_folder(str(tmp_path), 'train', None)
    with pytest.raises(UserError, match='consecutive unreadable images'):
        ds.load(0)


def test_class_folders_without_images_are_an_error(tmp_path):
    (tmp_path / 'train' / 'c').mkdir(parents=True)
    (tmp_path / 'train' / 'c' / 'README.txt').write_text('no images here')
    with pytest.raises(UserError, match='no images in'):
        image_folder(str(tmp_path), 'train', None)


def test_image_folder_reads_tiny_folder(tiny_folder):
    ds = image_folder(tiny_folder, 'train', eval_transform(32))
    assert len(ds) == 40 and len(ds.classes) == 10
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and 0 <= y < 10


def test_image_folder_missing_raises_user_error(tmp_path):
    with pytest.raises(UserError) as exc:
        image_folder(str(tmp_path), 'train', None)
    msg = str(exc.value)
    assert '\n' not in msg and os.path.join(str(tmp_path), 'train') in msg


@pytest.mark.parametrize('with_class_dir', [False, True])
def test_image_folder_empty_raises_user_error(tmp_path, with_class_dir):
    os.makedirs(tmp_path / 'val')
    if with_class_dir:
        os.makedirs(tmp_path / 'val' / 'cat')      # a class folder without images
    with pytest.raises(UserError) as exc:
        image_folder(str(tmp_path), 'val', None)
    msg = str(exc.value)
    assert '\n' not in msg and msg.strip() and 'val' in msg


@pytest.mark.parametrize('hidden_folder', [False, True])
def test_an_empty_folder_names_both_layouts(tmp_path, hidden_folder):
    """Images without class folders are allowed: an empty train/ says so, not only 'class folder'."""
    (tmp_path / 'train').mkdir()
    if hidden_folder:
        (tmp_path / 'train' / '.cache').mkdir()     # not a class
    (tmp_path / 'train' / 'notes.txt').write_text('no images')
    with pytest.raises(UserError) as exc:
        image_folder(str(tmp_path), 'train', None)
    msg, path = str(exc.value), os.path.join(str(tmp_path), 'train')
    assert '\n' not in msg and 'class folder' not in msg
    assert f'no images in {path}' in msg and f'{path}/<image>' in msg and f'{path}/<class>/<image>' in msg
