"""moco/data/pipelines.py: every pretraining loader gives its image count one way (``num_images``), and
the reference pipeline counts unreadable files once each."""
import pytest
import torch

from moco.data import pipelines

CPU = torch.device('cpu')


@pytest.mark.parametrize('pipeline', pipelines.RESOLVED)
def test_every_loader_counts_its_images_one_way(tiny_folder, pipeline):
    """``num_images``: the images of root/train (all processes'); the batches per epoch follow from it."""
    loader = pipelines.pretrain_loader(pipeline, tiny_folder, 8, CPU, 16, seed=0)
    assert loader.num_images == 40           # conftest's tiny_folder: 4 images of each of 10 classes
    assert len(loader) == loader.num_images // 8


@pytest.mark.parametrize('workers', [0, 2])
def test_two_unreadable_files_in_a_row_are_counted_twice_not_three_times(tmp_path, workers):
    """The reference pipeline's ``skipped``, summed over an epoch as the training loop does, is the number of
    unreadable files drawn: two broken JPEGs in a row (the first passes over both to the next good file)
    are 2, with and without loader workers, every epoch."""
    from helpers import jpeg_bytes
    folder = tmp_path / 'train' / 'c'
    folder.mkdir(parents=True)
    good = jpeg_bytes(size=(24, 24))
    for name in ('0_good', '1_good', '2_good', '3_good', '5_good'):
        (folder / f'{name}.jpg').write_bytes(good)
    (folder / '4a_fake.jpg').write_text('this is text')
    (folder / '4b_truncated.jpg').write_bytes(good[:len(good) // 3])
    loader = pipelines.pretrain_loader('reference', str(tmp_path), 7, CPU, 8, seed=5, workers=workers)
    counts = []
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        counts.append(sum(int(skipped.sum()) for _, _, skipped in loader))
    del loader   # its persistent workers end now (they ignore SIGTERM: one left at exit would hang pytest)
    assert counts == [2, 2]
