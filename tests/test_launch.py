"""moco/launch.py: the run folder's lock (a second run on a folder is refused; a dead holder leaves no
stale lock), and the one-line fatal errors."""
import subprocess
import sys

import pytest

from moco import launch
from moco.errors import UserError
from moco.launch import OutputDirLock


def test_a_second_run_on_a_locked_folder_is_refused_and_the_lock_goes_with_the_process(tmp_path):
    folder = tmp_path / 'run'
    with OutputDirLock(str(folder), 'pretraining'):
        with pytest.raises(UserError, match='another pretraining run is using .*run right now'):
            OutputDirLock(str(folder), 'pretraining').__enter__()
        holder = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
    assert not folder.exists()   # created for the run, left empty: removed
    # a process that holds the lock and dies (kill -9) leaves nothing stale behind
    code = (f'import fcntl, os, time; os.makedirs({str(folder)!r}, exist_ok=True); fd = os.open({str(folder)!r}, '
            'os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX); print("locked", flush=True); time.sleep(60)')
    holder.kill()
    holder = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == 'locked'
    with pytest.raises(UserError, match='another pretraining run'):
        OutputDirLock(str(folder), 'pretraining').__enter__()
    holder.kill()
    holder.wait()
    with OutputDirLock(str(folder), 'pretraining'):
        pass


def test_fatal_errors_are_one_line():
    wrapped = UserError('Caught UserError in DataLoader worker process 0.\nOriginal Traceback (most recent call '
                        'last):\n  File "x.py", line 1\nmoco.UserError: unreadable image a.jpg: broken')
    assert launch.fatal_error(wrapped) == (2, 'unreadable image a.jpg: broken')
    gloo = RuntimeError('[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:1: '
                        'Connection reset by peer. This is typically caused by ...\nmore')
    code, msg = launch.fatal_error(gloo)
    assert code == 1 and '\n' not in msg and msg.count('Connection reset by peer') == 1 and 'pair.cc' not in msg
    assert launch.fatal_error(RuntimeError('shape mismatch')) is None   # bugs keep their traceback
    assert launch.fatal_error(ValueError('Connection reset by peer')) is None


def test_start_run_turns_on_cudnn_benchmark_as_the_original(tmp_path):
    """The original's main_moco.py and main_lincls.py set cudnn.benchmark (the fastest convolution
    algorithms for each input shape); every program opens with start_run."""
    import argparse

    import torch
    torch.backends.cudnn.benchmark = False
    args = argparse.Namespace(output_dir=str(tmp_path / 'out'), stop_signals='none', gpu=None, distributed=False,
                              rank=0, world_size=1, seed=None, lr=0.1, batch_size=8, epochs=1, warmup_epochs=0,
                              multiprocessing_distributed=False, local_rank=0, workers=0)
    launch.start_run(args, 'test', hold_output=False)
    assert torch.backends.cudnn.benchmark


def test_gpu_without_a_gpu_says_how_to_run_on_the_cpu(monkeypatch):
    import argparse

    import torch
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    with pytest.raises(UserError, match='leave out --gpu to run on the CPU'):
        launch.launch(lambda args: None, argparse.Namespace(gpu=0))


def test_stop_request_answers_from_the_steps_all_reduce_or_one_step_late(monkeypatch):
    """With several processes, the pretraining loop's check (``agreed(deferred=True)``) makes no sync of
    its own: it returns the answer ``settle``d by the step's all-reduce, else the answer of the
    asynchronous all-reduce of the previous call; the synchronous check takes in whatever is pending."""
    from moco import dist

    class Deferred:   # dist.DeferredAnyTrue of a run whose other processes never received a signal
        def __init__(self):
            self.pending = None

        def exchange(self, flag):
            previous, self.pending = self.drain(), flag
            return previous

        def drain(self):
            previous, self.pending = bool(self.pending), None
            return previous
    syncs = []
    monkeypatch.setattr(dist, 'world_size', lambda: 2)
    monkeypatch.setattr(dist, 'DeferredAnyTrue', Deferred)
    monkeypatch.setattr(dist, 'any_true', lambda flag: syncs.append(flag) or flag)
    stop = launch.StopRequest(names=())
    stop.settle(True)                    # another process received a signal: the step's all-reduce says so
    assert stop.agreed(deferred=True) and not syncs
    assert not stop.agreed(deferred=True)                        # nothing settled: deferred, nothing pending
    stop.received = 'TERM'
    assert not stop.agreed(deferred=True) and stop.agreed(deferred=True) and not syncs   # one call late
    assert stop.agreed() and syncs == [True]                    # synchronous: an all-reduce now
    stop.received = None
    stop.agreed(deferred=True)
    stop.received = 'TERM'
    stop.agreed(deferred=True)           # pending: True
    stop.received = None
    assert stop.agreed() and syncs[-1] is True                  # the synchronous check takes it in
    stop.settle(True)
    assert stop.agreed() and not stop.agreed()                  # a settled answer is used once


def test_deferred_any_true_answers_one_call_late(tmp_path):
    """dist.DeferredAnyTrue in a real (one-process) gloo group: each call returns the previous flag."""
    import torch.distributed as tdist

    from moco import dist
    tdist.init_process_group('gloo', init_method=f'file://{tmp_path}/store', world_size=1, rank=0)
    try:
        deferred = dist.DeferredAnyTrue()
        assert [deferred.exchange(f) for f in (True, False, False, True)] == [False, True, False, False]
        assert deferred.drain() is True and deferred.drain() is False
    finally:
        tdist.destroy_process_group()
