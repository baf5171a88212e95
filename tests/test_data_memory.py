"""moco/data/memory.py: the in-memory pipeline's order, resume and determinism, its one-size rule, and
unreadable images replaced when the folder is decoded."""

import os

import pytest
import torch
from PIL import Image

from helpers import broken_folder
from moco.data.memory import InMemoryLoader
from moco.data.sampler import EpochSampler, start_epoch
from moco.errors import UserError


def test_memory_pipeline_replaces_unreadable_images_when_it_decodes(tmp_path, capsys):
    """--data-pipeline memory decodes the folder once: each unreadable file is replaced by the next
    readable one there, reported once, and the number replaced is printed; --strict-data: an error."""
    from moco.data.memory import InMemoryLoader
    root = tmp_path / 'data'
    broken_folder(root / 'train')
    loader = InMemoryLoader(str(root), 'train', 5, torch.device('cpu'), 8, seed=0)
    assert len(loader.images) == 5 and loader.images.shape[1:] == (3, 10, 12)
    good = loader.images[0]
    assert all(torch.equal(image, good) for image in loader.images)      # both good files are the same image
    captured = capsys.readouterr()
    assert '3 unreadable image(s) replaced while decoding' in captured.out     # the three broken files
    for name in ('1_truncated.jpg', '2_text.jpg', '3_empty.jpg'):
        assert captured.err.count(name) == 1, captured.err
    with pytest.raises(UserError, match='1_truncated.jpg'):
        InMemoryLoader(str(root), 'train', 5, torch.device('cpu'), 8, seed=0, strict=True)


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
