"""The order of an epoch and the seed of every image's views: functions of (seed, epoch, position)
only, so neither the number of loader workers nor of processes, nor a resume in the middle of an
epoch, changes any view. The reference loader (``make_loader``) and the device pipelines share them.
"""
import random
import signal

import numpy as np
import torch

from moco import dist
from moco.data.folder import SafeImageFolder


def sample_seed(seed, epoch, position):
    """Seed of the augmentation of the image at ``position`` of the shuffled epoch: a function of
    (seed, epoch, position) only, so neither the number of loader workers nor of processes, nor a
    resume in the middle of an epoch, changes any view."""
    return ((seed * 1_000_003 + epoch) * 100_000_007 + position) % (2 ** 63)


class EpochSampler(torch.utils.data.Sampler):
    """This process's share of an epoch of ``n`` items (all processes'), as ``(index, sample_seed)`` pairs.

    The order is a permutation drawn from (seed, epoch) and split among processes as DistributedSampler
    does (every world_size-th position, from the rank); it can start after ``skip_batches`` batches,
    to resume in the middle of an epoch.
    """

    def __init__(self, n, batch_size, shuffle, drop_last, seed, rank=0, world_size=1):
        self.n, self.batch_size, self.shuffle, self.drop_last = n, batch_size, shuffle, drop_last
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.skip_batches = 0, 0

    def set_epoch(self, epoch, skip_batches=0):
        self.epoch, self.skip_batches = epoch, skip_batches

    def _positions(self):
        if self.drop_last:
            total = self.n // self.world_size * self.world_size
        else:  # pad by wrapping around, so that every process gets the same number
            total = -(-self.n // self.world_size) * self.world_size
        return range(self.rank, total, self.world_size)

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        positions = self._positions()[self.skip_batches * self.batch_size:]
        for pos in positions:
            yield order[pos % self.n], sample_seed(self.seed, self.epoch, pos)

    def __len__(self):
        return max(0, len(self._positions()) - self.skip_batches * self.batch_size)


class EpochDataset(torch.utils.data.Dataset):
    """Wraps a dataset for an EpochSampler: item ``(index, seed)`` is ``(sample, target, skipped)``
    with every random op of the transform drawn from ``seed`` (torch and python RNGs). A SafeImageFolder
    gives its ``load(index)`` (``skipped``: 1 when the file was unreadable and replaced); any other dataset
    ``(sample, target)`` with ``skipped`` 0."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.counts_skips = isinstance(dataset, SafeImageFolder)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        in_main_process = torch.utils.data.get_worker_info() is None
        state = (torch.get_rng_state(), random.getstate()) if in_main_process else None
        torch.default_generator.manual_seed(seed)   # the CPU stream the transforms draw from (torch.manual_seed
        random.seed(seed)                            # also seeds CUDA's: 100x slower, and unused here)
        try:
            if self.counts_skips:
                return self.dataset.load(index)
            sample, target = self.dataset[index]
            return sample, target, 0
        finally:
            if state is not None:  # leave the training process's own random streams alone
                torch.set_rng_state(state[0])
                random.setstate(state[1])


def shared_seed(seed=None):
    """``seed``, or (when None) a random one drawn on rank 0 and shared by all processes."""
    if seed is not None:
        return seed
    value = torch.tensor([random.SystemRandom().randrange(2 ** 31)])
    if dist.world_size() > 1:
        value = value.to(dist.collective_device())
        torch.distributed.broadcast(value, src=0)
    return int(value.item())


def epoch_sampler(n, batch_size, shuffle, drop_last, seed=None):
    """This process's EpochSampler over n items (a shared random seed when ``seed`` is None)."""
    return EpochSampler(n, batch_size, shuffle, drop_last, shared_seed(seed), dist.rank(), dist.world_size())


def ignore_stop_signals(worker_id=None):
    """``worker_init_fn`` of the data loaders: a loader worker outlives SIGTERM/SIGUSR1 sent to the whole
    process group, so that the training process can finish its step and save (the workers end with it)."""
    for name in ('SIGTERM', 'SIGUSR1'):
        signal.signal(getattr(signal, name), signal.SIG_IGN)


def make_loader(dataset, batch_size, workers, shuffle, drop_last, seed=None, pin_memory=False):
    """DataLoader over this process's share of ``dataset`` yielding ``(samples, targets, skipped)``.

    Call ``start_epoch`` before each epoch. Order and augmentations are a function of (seed, epoch)
    only (a shared random seed when None: ``loader.sampler.seed``, saved in checkpoints).
    """
    sampler = epoch_sampler(len(dataset), batch_size, shuffle, drop_last, seed)
    return torch.utils.data.DataLoader(EpochDataset(dataset), batch_size=batch_size, sampler=sampler,
                                       num_workers=workers, pin_memory=pin_memory, drop_last=drop_last,
                                       persistent_workers=workers > 0, worker_init_fn=ignore_stop_signals)


def start_epoch(loader, epoch, seed=None, skip_batches=0):
    """Set the epoch of the loader (and the batches of it already done, when resuming mid-epoch).
    With a seed, also reseed this process's own random streams (dropout, drop-path, mixup) from
    (seed, epoch, rank), so a run resumed at an epoch boundary repeats an uninterrupted one."""
    if isinstance(loader.sampler, EpochSampler):
        loader.sampler.set_epoch(epoch, skip_batches)
    elif hasattr(loader.sampler, 'set_epoch'):  # e.g. timm's RepeatAugSampler
        loader.sampler.set_epoch(epoch)
    if seed is not None:
        s = (seed * 100003 + epoch) * 4096 + dist.rank()
        torch.manual_seed(s)
        random.seed(s)
        np.random.seed(s % 2 ** 32)
