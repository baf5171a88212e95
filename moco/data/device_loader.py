"""What the two device pipelines (moco/data/memory.py, moco/data/gpu.py) share: the reference
loader's sampler (order a function of seed and epoch, sharded over processes, resumable mid-epoch) and,
on CUDA, batches made ahead in a thread on their own stream, so that the step's host sync does not
leave the GPU idle while the next views are launched."""
import queue
import threading
from contextlib import nullcontext

import torch

from moco.data.sampler import epoch_sampler


class DeviceLoader:
    """Iterable over ``([view1, view2], targets, skipped)`` batches like the reference loader, with
    ``.sampler`` an EpochSampler (so ``start_epoch`` and checkpoints work unchanged) over ``n`` images,
    ``num_images``. Subclasses yield the batches from ``_batches()``; ``prefetch`` (default: 2 with
    CUDA, else 0) makes that many ahead in a thread."""

    def __init__(self, n, batch_size, device, seed=None, prefetch=None):
        self.device, self.batch_size = torch.device(device), batch_size
        self.prefetch = (2 if self.device.type == 'cuda' else 0) if prefetch is None else prefetch
        self.sampler = epoch_sampler(n, batch_size, shuffle=True, drop_last=True, seed=seed)

    @property
    def num_images(self):
        """The images of the data set (of all processes), the count every pretraining loader gives this
        way (read from the sampler, which draws each epoch from them)."""
        return self.sampler.n

    def __len__(self):
        return len(self.sampler) // self.batch_size

    def __iter__(self):
        if self.prefetch:
            return ahead_in_thread(self._batches(), self.device, self.prefetch)
        return self._batches()

    def _batches(self):
        raise NotImplementedError


def to_device_async(cpu_tensor, device):
    """Copy a CPU tensor to the device without waiting for the device (a plain ``.to('cuda')`` of
    pageable memory waits for the stream's queued work)."""
    if device.type != 'cuda':
        return cpu_tensor.to(device)
    return cpu_tensor.pin_memory().to(device, non_blocking=True)


_END = object()


def ahead_in_thread(batches, device, depth):
    """Iterate ``batches`` (a generator of ``(views, targets, skipped)``) ``depth`` items ahead in a
    thread; on CUDA the thread works on its own stream, and each batch is handed over with an event the
    consumer's stream waits for. Errors of the thread are raised in the consumer."""
    cuda = device.type == 'cuda'
    stream = torch.cuda.Stream(device) if cuda else None
    handoff = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item):
        while not stop.is_set():
            try:
                handoff.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def work():
        try:
            if cuda and device.index is not None:
                torch.cuda.set_device(device)   # a new thread starts on GPU 0
            with torch.cuda.stream(stream) if cuda else nullcontext():
                for batch in batches:
                    event = None
                    if cuda:
                        event = torch.cuda.Event()
                        event.record(stream)
                    if not put((batch, event)):
                        return
        except BaseException as e:  # noqa: B036 (handed to the consumer, which raises it)
            put((e, None))
            return
        put((_END, None))

    thread = threading.Thread(target=work, name='gpu-data', daemon=True)
    thread.start()
    try:
        while True:
            batch, event = handoff.get()
            if batch is _END:
                return
            if isinstance(batch, BaseException):
                raise batch
            if cuda:
                consumer = torch.cuda.current_stream(device)
                consumer.wait_event(event)
                views, targets, _ = batch
                for x in (*views, targets):   # made on the thread's stream, used and freed on this one
                    x.record_stream(consumer)
            yield batch
    finally:
        stop.set()
        thread.join(timeout=10)

