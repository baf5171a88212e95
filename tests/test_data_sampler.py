"""moco/data/sampler.py: the epoch's order shared among processes and resumable mid-epoch; views that do
not depend on the number of loader workers."""


import torch

from helpers import assert_identical, broken_folder
from moco.data.folder import SafeImageFolder, image_folder
from moco.data.sampler import EpochDataset, EpochSampler, make_loader, start_epoch
from moco.data.views import pretrain_transform


def test_sampler_partitions_the_epoch_and_resumes_mid_epoch():
    full = list(EpochSampler(21, 4, shuffle=True, drop_last=True, seed=7))
    shards = [EpochSampler(21, 2, shuffle=True, drop_last=True, seed=7, rank=r, world_size=2) for r in (0, 1)]
    parts = [list(s) for s in shards]
    assert sorted(i for p in parts for i, _ in p) == sorted(i for i, _ in full[:20])   # 20: drop_last
    assert sorted(s for p in parts for _, s in p) == sorted(s for _, s in full[:20])   # same views per image
    shards[0].set_epoch(0, skip_batches=2)
    assert list(shards[0]) == parts[0][4:] and len(shards[0]) == 6
    shards[0].set_epoch(1)
    assert list(shards[0]) != parts[0]


def test_views_do_not_depend_on_the_number_of_workers(tiny_folder):
    ds = image_folder(tiny_folder, 'train', pretrain_transform(8))
    batches = []
    for workers in (0, 2):
        loader = make_loader(ds, 8, workers, shuffle=True, drop_last=True, seed=1)
        start_epoch(loader, 3, skip_batches=1)
        batches.append(next(iter(loader)))
    assert_identical(batches[0][0], batches[1][0])
    assert_identical(batches[0][1], batches[1][1])


def test_loader_workers_stay_up_between_epochs(tiny_folder):
    """Worker start-up (a fork, the transform's tables) is paid once per run, not once per epoch."""
    ds = image_folder(tiny_folder, 'train', pretrain_transform(8))
    loader = make_loader(ds, 8, 1, shuffle=True, drop_last=True, seed=1)
    pids = []
    for epoch in range(2):
        start_epoch(loader, epoch)
        first = [batch[0] for batch in loader]
        pids.append([w.pid for w in loader._iterator._workers])
        assert len(first) == len(ds) // 8
    assert pids[0] == pids[1] and all(p is not None for p in pids[0])


def test_epoch_dataset_reads_an_image_folder_with_load_and_any_other_dataset_by_index(tmp_path):
    """A SafeImageFolder's item says whether the drawn file was replaced (``load``); any other dataset,
    even one with a ``load`` of its own, is read by index with nothing skipped."""
    class Other(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return torch.full((1,), float(i)), i

        def load(self, i):
            raise AssertionError('not an image folder: read by index')

    assert [EpochDataset(Other())[(i, 0)][1:] for i in range(2)] == [(0, 0), (1, 0)]
    folder = SafeImageFolder(str(broken_folder(tmp_path / 'data')))
    assert [EpochDataset(folder)[(i, 0)][2] for i in range(5)] == [0, 1, 1, 1, 0]   # 1: replaced
