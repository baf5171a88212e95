"""pytest's hooks and the shared fixtures; the plain helpers the tests import are in tests/helpers.py."""
import numpy as np
import pytest
import torch
from PIL import Image

from helpers import jpeg_bytes
from moco import demo_data


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: a test that launches the scripts or several processes, or trains '
                                       'for a while; `make test-fast` (pytest -m "not slow") leaves it out')


def pytest_collection_modifyitems(items):
    for item in items:   # the demo's end-to-end run (its file marks nothing itself)
        if item.module.__name__ == 'test_demo':
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    """The test machine's 2 cores may be shared with parallel runs: one thread is several times faster
    than two fighting over them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='session')
def tiny_folder(tmp_path_factory):
    """Real CIFAR-10 JPEGs from the shipped demo data: train/ 4 per class, val/ 2 per class (10 classes)."""
    return demo_data.extract(str(tmp_path_factory.mktemp('tiny')), per_class={'train': 4, 'val': 2})


@pytest.fixture
def odd_images(tmp_path):
    """One file of each awkward kind a real folder holds, in class folders."""
    root = tmp_path / 'odd' / 'train'
    (root / 'a').mkdir(parents=True)
    (root / 'b').mkdir()
    (root / 'a' / 'rgb.jpg').write_bytes(jpeg_bytes())
    (root / 'a' / 'cmyk.jpg').write_bytes(jpeg_bytes('CMYK', color=(0, 255, 255, 0)))
    (root / 'a' / 'gray.jpg').write_bytes(jpeg_bytes('L'))
    Image.new('RGBA', (9, 9), (10, 20, 30, 0)).save(root / 'a' / 'rgba.png')
    pal = Image.new('P', (9, 9), 1)
    pal.putpalette([0, 0, 0, 250, 5, 5] + [0] * 762)
    pal.save(root / 'b' / 'palette.png', transparency=0)
    Image.fromarray(np.full((9, 9), 32767, dtype=np.uint16)).save(root / 'b' / 'gray16.png')  # 32767/65535 of white
    Image.new('RGB', (1, 1), (0, 255, 0)).save(root / 'b' / 'one_pixel.png')      # far smaller than the crop
    (root / 'b' / 'notes.txt').write_text('not an image: ignored by extension')
    return root
