"""Meters, progress lines with an ETA, accuracy, and the run's logs (TensorBoard + JSON lines).

Values may be given as tensors: they are turned into numbers only when a line is printed, so the
training step does not wait for the GPU on every iteration.
References: facebookresearch/mae util/misc.py (MetricLogger, SmoothedValue).
"""
import datetime
import json
import os
import time
from collections import defaultdict, deque

import torch

from moco import dist


class SmoothedValue:
    """Windowed median/average and a global average of a series of values."""

    def __init__(self, window_size=20, fmt='{median:.4f} (median of the last {window}; epoch mean {global_avg:.4f})'):
        self._pending = []  # (value, n) not yet turned into python numbers
        self.deque = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt
        self.window = window_size

    def update(self, value, n=1):
        self._pending.append((value.detach() if torch.is_tensor(value) else value, n))

    def _sync(self):
        if not self._pending:
            return
        values = [v for v, _ in self._pending]
        if any(torch.is_tensor(v) for v in values):
            values = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=_device_of(values))
                                  for v in values]).float().tolist()
        for v, (_, n) in zip(values, self._pending):
            self.deque.append(float(v))
            self.count += n
            self.total += float(v) * n
        self._pending = []

    @property
    def median(self):
        self._sync()
        return float(torch.tensor(list(self.deque)).median()) if self.deque else 0.

    @property
    def avg(self):
        self._sync()
        return sum(self.deque) / len(self.deque) if self.deque else 0.

    @property
    def global_avg(self):
        self._sync()
        return self.total / max(self.count, 1)

    @property
    def value(self):
        self._sync()
        return self.deque[-1] if self.deque else 0.

    def __str__(self):
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg, value=self.value,
                               window=min(self.window, len(self.deque)))


def _device_of(values):
    for v in values:
        if torch.is_tensor(v):
            return v.device
    return 'cpu'


class MetricLogger:
    def __init__(self, delimiter='  '):
        self.meters = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, n=1, **kwargs):
        for k, v in kwargs.items():
            self.meters[k].update(v, n)

    def add_meter(self, name, meter):
        self.meters[name] = meter

    def __str__(self):
        return self.delimiter.join(f'{name}: {meter}' for name, meter in self.meters.items())

    def global_averages(self):
        return {k: m.global_avg for k, m in self.meters.items()}

    def log_every(self, iterable, print_freq, header='', total=None, start=0, images_per_step=None, steps_after=0):
        """Yield from iterable; every print_freq steps print the step (1-based, out of the epoch's),
        the meters, seconds per step (and of it waiting for data), img/s with ``images_per_step``, and
        the time left in this epoch and, with ``steps_after`` steps still to come after it, in the run.
        ``start``: steps of the epoch already done before (a resumed epoch); ``total``: steps left."""
        total = len(iterable) if total is None else total
        began = end = time.time()
        iter_time, data_time = SmoothedValue(fmt='{avg:.3f}'), SmoothedValue(fmt='{avg:.3f}')
        width = len(str(total + start))
        for i, obj in enumerate(iterable):
            data_time.update(time.time() - end)
            yield obj
            iter_time.update(time.time() - end)
            if i % print_freq == 0 or i == total - 1:
                left = total - i - 1
                eta = _duration(iter_time.global_avg * left)
                if steps_after:
                    eta += f' (run: {_duration(iter_time.global_avg * (left + steps_after))})'
                speed = f'  {images_per_step / iter_time.global_avg:.1f} img/s' if images_per_step else ''
                mem = ''
                if torch.cuda.is_available() and torch.cuda.is_initialized():
                    mem = f'  max mem: {torch.cuda.max_memory_allocated() / 2 ** 30:.1f} GiB'
                print(f'{header} [{start + i + 1:>{width}}/{total + start}]  eta: {eta}  {self}  '
                      f's/step: {iter_time} (data {data_time}){speed}{mem}', flush=True)
            end = time.time()
        took = time.time() - began
        print(f'{header} took {_duration(took)} ({took / max(total, 1):.3f} s / step)', flush=True)


def accuracy(output, target, topk=(1,)):
    """Top-k accuracies in percent of the predictions of ``output`` for ``target``."""
    with torch.no_grad():
        maxk = max(topk)
        _, pred = output.topk(maxk, 1, True, True)
        correct = pred.t().eq(target.view(1, -1))                   # (maxk, N)
        return [correct[:k].reshape(-1).float().sum() * (100.0 / target.size(0)) for k in topk]


def _duration(seconds):
    return str(datetime.timedelta(seconds=int(seconds)))


class RunLog:
    """Rank 0's record of a run: TensorBoard scalars and one JSON line per epoch in log.txt.

    TensorBoard tags are ``train/<name>`` and ``val/<name>`` in every script (``group``); log.txt counts
    epochs from 1 (its ``epoch`` is the number of epochs done), as the progress lines do."""

    def __init__(self, output_dir, enabled=None):
        self.enabled = dist.is_main_process() if enabled is None else enabled
        self.output_dir = output_dir
        self.writer = None
        if self.enabled:
            os.makedirs(output_dir, exist_ok=True)
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=os.path.join(output_dir, 'tensorboard'))

    def scalars(self, step, group='train', **values):
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(f'{group}/{k}', float(v), step)

    def epoch(self, record):
        if self.enabled:
            with open(os.path.join(self.output_dir, 'log.txt'), 'a') as f:
                f.write(json.dumps(record) + '\n')
            if self.writer is not None:
                self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()
