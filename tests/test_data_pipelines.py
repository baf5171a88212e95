"""moco/data/pipelines.py: 'auto' is resolved in one place, ``pretrain_loader`` takes the resolved name,
and every pretraining loader gives its image count one way (``num_images``)."""
import pytest
import torch

from moco.data import pipelines

CPU = torch.device('cpu')


def test_a_resolved_name_resolves_to_itself_without_reading_the_folder(tmp_path):
    for name in pipelines.RESOLVED:
        for fast in (False, True):
            assert pipelines.resolve(name, CPU, str(tmp_path / 'missing'), fast=fast) == name
            assert pipelines.resolve(pipelines.resolve(name, CPU, None, fast), CPU, None, fast) == name


def test_pretrain_loader_takes_only_a_resolved_name(tiny_folder):
    with pytest.raises(ValueError, match='resolve'):
        pipelines.pretrain_loader('auto', tiny_folder, 8, CPU, 16)


@pytest.mark.parametrize('pipeline', pipelines.RESOLVED)
def test_every_loader_counts_its_images_one_way(tiny_folder, pipeline):
    """``num_images``: the images of root/train (all processes'); the batches per epoch follow from it."""
    loader = pipelines.pretrain_loader(pipeline, tiny_folder, 8, CPU, 16, seed=0)
    assert loader.num_images == 40           # conftest's tiny_folder: 4 images of each of 10 classes
    assert len(loader) == loader.num_images // 8
