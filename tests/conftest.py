import os
import socket
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from moco import demo_data  # noqa: E402


@pytest.fixture(scope='session')
def tiny_folder(tmp_path_factory):
    """Real CIFAR-10 JPEGs from the shipped demo data: train/ 4 per class, val/ 2 per class (10 classes)."""
    return demo_data.extract(str(tmp_path_factory.mktemp('tiny')), per_class={'train': 4, 'val': 2})


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]
