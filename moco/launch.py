"""How the programs start, stop and exit: the launch modes, stop signals (a preemption warning), exit
codes, and the opening every program shares (``start_run``).

Launch modes (the PyTorch ImageNet example's, plus the ones it lacks):
  * one process, CPU or one GPU, no process group          python main_moco.py [--gpu 0] DIR
  * one spawned process per local GPU (one on a CPU host)  --multiprocessing-distributed
  * several nodes                                         ... --world-size N --rank R --dist-url tcp://HOST:PORT
  * torchrun (env:// with RANK, WORLD_SIZE, LOCAL_RANK)      torchrun --nproc_per_node=K main_moco.py DIR
The process group itself and the collectives are moco/dist.py.
"""
import atexit
import errno
import fcntl
import functools
import multiprocessing
import os
import signal
import sys
from typing import NamedTuple, Optional

import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from moco import cli, dist
from moco.errors import UserError, first_line
from moco.schedules import scaled_lr

EXIT_STOPPED = 75   # EX_TEMPFAIL: stopped on request (a preemption warning) with a resumable checkpoint


class Stopped(Exception):
    """The run stopped on a stop signal after saving: one line, exit code EXIT_STOPPED."""


class StopRequest:
    """Stop signals (SIGTERM and SIGUSR1 by default: what SLURM, Kubernetes and torchrun send before they
    take a job away). The handler only notes the signal; the training loop asks ``agreed()`` after each
    step, and since every process asks at the same step and they agree through one all-reduce, all of
    them stop after the same step, even when the signal reached only one. A second signal changes
    nothing (the save in progress goes on).

    The all-reduce need not be a sync of its own: the pretraining step folds this process's flag into the
    all-reduce it makes anyway (``Amp.backward_step``), which ``settle``s the answer; a step without one
    asks ``agreed(deferred=True)``: an asynchronous all-reduce whose answer is read one step later."""

    def __init__(self, names=('TERM', 'USR1')):
        self.received = None
        self.names = tuple(names)
        self._settled = None    # the answer of an all-reduce this step already made (``settle``)
        self._deferred = None   # a dist.DeferredAnyTrue once ``agreed(deferred=True)`` asked without one
        for name in self.names:
            signal.signal(getattr(signal, 'SIG' + name), self._note)

    def _note(self, signum, frame):
        if self.received is None:
            self.received = signal.Signals(signum).name
            print(f'{self.received} received: stopping after this step', file=sys.stderr, flush=True)

    @property
    def flag(self):
        """Whether this process received a stop signal (what it contributes to ``agreed``)."""
        return self.received is not None

    def settle(self, agreed):
        """The answer of an all-reduce of every process's ``flag`` made this step (the same on every
        process): the next ``agreed()`` returns it without a collective of its own."""
        self._settled = bool(agreed)

    def agreed(self, deferred=False):
        """Whether any process received a stop signal (the same answer on every process). One process:
        its own flag, no collective. Several: one all-reduce and a host read now (taking in any answer
        still pending); with ``deferred`` (the pretraining loop, after each step), no sync of its own: the
        ``settle``d answer of this step when there is one, else the answer of the asynchronous all-reduce
        started at the previous such call (this call's flag is answered at the next one: a signal stops
        every process one step later, all after the same step)."""
        settled, self._settled = self._settled, None
        if dist.world_size() == 1:
            return self.flag
        if deferred and settled is not None:
            return settled
        if deferred:
            if self._deferred is None:
                self._deferred = dist.DeferredAnyTrue()
            return self._deferred.exchange(self.flag)
        pending = self._deferred.drain() if self._deferred is not None else False
        return dist.any_true(self.flag or settled or pending)

    def describe(self):
        return self.received or 'a stop signal (on another process)'


def add_stop_signals_arg(group, saved):
    """``--stop-signals`` of the training scripts; ``saved`` says what a stop keeps."""
    group.add_argument('--stop-signals', default='TERM,USR1', metavar='SIGNALS',
                       help=f'signals on which every process finishes its step and the run exits with code '
                            f"{EXIT_STOPPED}, {saved} (a preemption warning, CONFIG.md); 'none': the default actions")


def stop_request(args):
    """The StopRequest of ``args.stop_signals`` (None for 'none'); call after ``init_process``."""
    names = stop_signal_names(args.stop_signals)
    return StopRequest(names) if names else None


def stop_after_step(stop, what, save=None, deferred=False):
    """Raise Stopped when any process received a stop signal (the same answer on every process), after
    ``save()`` when given. In a distributed run: one all-reduce and a host read per call, unless the
    answer was ``settle``d this step or ``deferred`` (``StopRequest.agreed``)."""
    if stop is not None and stop.agreed(deferred):
        if save is not None:
            save()
        raise Stopped(f'{stop.describe()} {what}; to continue, run the same command with --resume auto')


def _end_loader_workers():
    """At exit, end the data-loading workers still running (after an error): they ignore SIGTERM
    (``moco.data.sampler.ignore_stop_signals``), so multiprocessing's own exit handler, which terminates and then joins
    them, would wait forever."""
    workers = [p for p in multiprocessing.active_children() if p.daemon]
    if workers:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)   # the DataLoader's handler would report them as failed
        for p in workers:
            p.kill()



def stop_signal_names(value):
    """--stop-signals: 'TERM,USR1' -> ('TERM', 'USR1'); 'none' -> ()."""
    if value.strip().lower() in ('', 'none'):
        return ()
    names = tuple(n.strip().upper().removeprefix('SIG') for n in value.split(','))
    for n in names:
        if not hasattr(signal, 'SIG' + n) or n in ('KILL', 'STOP'):
            raise UserError(f'--stop-signals: {n} is not a signal that can be caught (e.g. TERM,USR1 or none)')
    return names


def add_run_args(parser, output_dir, output_help, resume_help, stop_keeps, seed=None,
                 seed_help='seed for initializing training; makes CPU runs (and resumes) repeatable'):
    """The flags every program shares: the run folder (--output-dir, --resume, -p, --stop-signals,
    --seed) and the launch (``add_distributed_args``). Returns the run folder's group, for the
    program's own flags of that kind."""
    g = parser.add_argument_group('run folder, checkpoints and monitoring')
    g.add_argument('--output-dir', default=output_dir, type=cli.path, help=f'{output_help} (default: {output_dir})')
    g.add_argument('--resume', default='', type=cli.path, metavar='PATH', help=resume_help)
    g.add_argument('-p', '--print-freq', default=10, type=int, metavar='N', help='print frequency (default: 10)')
    add_stop_signals_arg(g, stop_keeps)
    g.add_argument('--seed', default=seed, type=int, help=seed_help)
    add_distributed_args(parser)
    return g


def add_distributed_args(parser):
    g = parser.add_argument_group('distributed (same flags as the PyTorch ImageNet example)')
    g.add_argument('--world-size', default=-1, type=int,
                   help='number of NODES for distributed training (the process count is nodes x GPUs '
                        'with --multiprocessing-distributed)')
    g.add_argument('--rank', default=-1, type=int, help='node rank for distributed training')
    g.add_argument('--dist-url', default='tcp://localhost:10001', type=str,
                   help='url used to set up distributed training; under torchrun env:// is used')
    g.add_argument('--dist-backend', default='nccl', type=str,
                   help="distributed backend; falls back to gloo (with a log line) when there is no GPU")
    g.add_argument('--gpu', default=None, type=int,
                   help='GPU id to use: one process on that GPU, no process group')
    g.add_argument('--dist-timeout', default=30., type=float, metavar='MIN',
                   help='minutes a collective may wait for a silent process before the job fails (default: 30); '
                        'a process that dies is noticed at once')
    g.add_argument('--multiprocessing-distributed', action='store_true',
                   help='spawn one process per GPU on this node (one CPU process when there is no GPU); '
                        'the batch size and workers are divided among all processes')
    return g


def torchrun_env():
    """(rank, world_size, local_rank) when launched by torchrun (or any env:// launcher), else None."""
    if 'RANK' in os.environ and 'WORLD_SIZE' in os.environ:
        return int(os.environ['RANK']), int(os.environ['WORLD_SIZE']), int(os.environ.get('LOCAL_RANK', 0))
    return None


def slurm_env():
    """(rank, world_size, local_rank) for one process per task of a multi-task SLURM step
    (``srun python main_moco.py --dist-url tcp://HOST:PORT ...``), else None."""
    if int(os.environ.get('SLURM_NTASKS', 1)) > 1 and 'SLURM_PROCID' in os.environ:
        return int(os.environ['SLURM_PROCID']), int(os.environ['SLURM_NTASKS']), int(os.environ.get('SLURM_LOCALID', 0))
    return None


def launch(worker, args):
    """Run ``worker(args)`` in every process the flags and environment ask for.

    Sets on args: ``distributed``, ``rank`` (global), ``world_size`` (processes), ``local_rank``,
    ``gpu`` (None on CPU).
    """
    if args.gpu is not None and not torch.cuda.is_available():
        raise UserError(f'--gpu {args.gpu} was given but this machine has no CUDA GPU; leave out --gpu to run on the '
                        'CPU')
    if args.gpu is not None and args.gpu >= torch.cuda.device_count():
        raise UserError(f'--gpu {args.gpu} was given but only {torch.cuda.device_count()} GPU(s) are visible')

    env = torchrun_env()
    if env is None and not args.multiprocessing_distributed and args.world_size == -1:
        env = slurm_env()
        if env is not None and args.dist_url == 'env://':
            raise UserError('under SLURM pass --dist-url tcp://HOST:PORT (the first node of the job)')
    elif env is not None:
        args.dist_url = 'env://'
    if env is not None:  # torchrun or srun: one process per rank was already started for us
        args.rank, args.world_size, args.local_rank = env
        args.distributed = True
        args.multiprocessing_distributed = False
        if torch.cuda.is_available():
            args.gpu = args.local_rank
        return worker(args)

    if args.dist_url == 'env://' and args.world_size == -1:
        args.world_size = int(os.environ.get('WORLD_SIZE', 1))
    args.distributed = args.world_size > 1 or args.multiprocessing_distributed
    if args.world_size == -1:
        args.world_size = 1
    if args.rank == -1:
        args.rank = 0
    if args.rank >= args.world_size:
        raise UserError(f'--rank {args.rank} must be smaller than --world-size {args.world_size}')

    if args.multiprocessing_distributed:
        procs_per_node = torch.cuda.device_count() or 1
        args.world_size = procs_per_node * args.world_size
        context = mp.spawn(_spawned_worker, nprocs=procs_per_node, args=(procs_per_node, worker, args), join=False)

        def forward(signum, frame):  # a stop signal sent to this process alone reaches every worker
            for p in context.processes:
                if p.is_alive():
                    os.kill(p.pid, signum)
        for name in stop_signal_names(getattr(args, 'stop_signals', 'none')):
            signal.signal(getattr(signal, 'SIG' + name), forward)
        while not context.join():
            pass
    else:
        args.local_rank = 0
        if args.gpu is None and torch.cuda.is_available():
            args.gpu = 0
        return worker(args)


# Messages of the failures a process sees when another process of the job (or a data-loading worker)
# died or became unreachable: reported in one line, not as a traceback of the collective that noticed.
_PEER_FAILURES = ('Connection reset by peer', 'Connection closed by peer', 'Broken pipe',
                  'Socket Timeout', 'Timed out waiting', 'timed out', 'NCCL communicator was aborted',
                  'DataLoader worker (pid')


def fatal_error(e):
    """(exit code, one-line message) for an exception that should not print a traceback, else None."""
    if isinstance(e, Stopped):
        return EXIT_STOPPED, str(e)
    if isinstance(e, UserError):
        msg = str(e)
        if 'Original Traceback' in msg:  # re-raised by the DataLoader from a worker: keep the last line
            msg = msg.strip().splitlines()[-1].split('Error: ', 1)[-1]
        return 2, msg
    text = str(e)
    if isinstance(e, (RuntimeError, tdist.DistError)) and any(p in text for p in _PEER_FAILURES):
        detail = first_line(e, limit=None).split('] ', 1)[-1][:200]  # drop the source location gloo puts first
        return 1, (f'another process of the job, or a data-loading worker, died or became unreachable '
                   f'({detail}); stopping. Checkpoints already written are intact: restart every process '
                   'with --resume auto')
    return None


_AT_END = []


@functools.cache   # once a process
def _register_exit_handler():
    """``_end_loader_workers`` at exit; registered after multiprocessing's own handler (which is
    registered when it is imported), so it runs before it."""
    atexit.register(_end_loader_workers)


def at_end(release):
    """Call ``release()`` when the run of this process ends, however it ends (``run``): e.g. the run
    folder's lock, so that several runs in one process (tests) do not hold each other's."""
    _AT_END.append(release)


def _release_all():
    while _AT_END:
        _AT_END.pop()()


def run(worker, args):
    """``launch`` for a script's ``main``: a UserError becomes one line on stderr and exit code 2, a
    failed or unreachable peer one line and exit code 1, a spawned worker that failed makes this
    process exit with its code. Returns the worker's result when it ran in this process."""
    handlers = {n: signal.getsignal(n) for n in (signal.SIGTERM, signal.SIGUSR1)}
    _register_exit_handler()
    try:
        return launch(worker, args)
    except mp.ProcessExitedException as e:  # the worker already said why
        sys.exit(e.exit_code or 1)
    except KeyboardInterrupt:
        _release_all()
        _exit_interrupted(args)
    except Exception as e:
        _release_all()   # before a fatal error's os._exit skips the finally below
        _exit_if_fatal(e)
        raise
    finally:  # a StopRequest's handlers end with the run (tests run several in one process)
        _release_all()
        for n, handler in handlers.items():
            signal.signal(n, handler)


INTERRUPTED = 130   # the shell's code for a command ended by Ctrl-C (128 + SIGINT)


def _exit_interrupted(args):
    """Ctrl-C: one line saying what is kept and how to go on, exit code 130."""
    where = getattr(args, 'output_dir', None)
    sys.stdout.flush()
    print(f'interrupted: the checkpoints already written{f" in {where}" if where else ""} are intact; to continue, '
          'run the same command with --resume auto', file=sys.stderr, flush=True)
    os._exit(INTERRUPTED)


def _exit_if_fatal(e):
    known = fatal_error(e)
    if known is not None:
        sys.stdout.flush()
        print(f'{"stopped" if known[0] == EXIT_STOPPED else "error"}: {known[1]}', file=sys.stderr, flush=True)
        os._exit(known[0]) if dist.is_initialized() else sys.exit(known[0])


def _spawned_worker(local_rank, procs_per_node, worker, args):
    args.local_rank = local_rank
    args.rank = args.rank * procs_per_node + local_rank
    args.gpu = local_rank if torch.cuda.is_available() else None
    try:
        worker(args)
    except KeyboardInterrupt:   # the parent says it once
        os._exit(INTERRUPTED)
    except Exception as e:  # one line, not a traceback from every child
        _release_all()
        _exit_if_fatal(e)
        raise
    finally:
        _release_all()


def hold_output_dir(folder, program):
    """Lock the run folder (``OutputDirLock``) until this process's run ends (``at_end``)."""
    lock = OutputDirLock(folder, program).__enter__()
    at_end(lambda: lock.__exit__(None, None, None))
    return lock


class OutputDirLock:
    """An exclusive lock on a run folder for the life of the run (``flock`` on the folder itself: nothing
    is written, the kernel releases it when the process ends however it ends, so a crashed run leaves no
    stale lock). A second run on the same folder is a one-line error at once. Taken by rank 0; a folder
    it created for the run is removed again if the run ends before writing anything into it."""

    def __init__(self, folder, program):
        self.folder, self.program, self.fd, self.created = folder, program, None, False

    def __enter__(self):
        if not dist.is_main_process():
            return self
        if not os.path.isdir(self.folder):
            try:
                os.makedirs(self.folder)
                self.created = True
            except FileExistsError:
                pass
            except OSError as e:
                raise UserError(f'cannot create --output-dir {self.folder}: {e.strerror}') from None
        self.fd = os.open(self.folder, os.O_RDONLY)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(self.fd)
            self.fd = None
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise UserError(f'another {self.program} run is using {self.folder} right now: wait for it to end, or '
                                'choose another --output-dir') from None
            # a file system without locks (some network ones): run unlocked
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)   # releases the lock
            self.fd = None
        if self.created:
            try:
                os.rmdir(self.folder)   # only if the run left it empty
            except OSError:
                pass
        return False


class Run(NamedTuple):
    """What ``start_run`` gives a program: this process's device, its StopRequest (or None), the base lr
    as given and the total batch (``args.lr`` and ``args.batch_size`` are then per process, scaled)."""
    device: torch.device
    stop: Optional[StopRequest]
    base_lr: float
    total_batch: int


def start_run(args, program, hold_output=True, reference_batch=256):
    """The opening every program shares, in this order: the output folder checked, the stop signals
    checked (a wrong name fails before anything starts), this process's device and process group,
    ``cudnn.benchmark`` on (as the original), the run folder locked for the run's life (not for a mere
    evaluation: ``hold_output=False``), stop signals armed, a warning for a schedule shorter than its
    warm-up, and the batch shared among the processes with the lr scaled linearly by the total batch over
    ``reference_batch`` (the original's convention)."""
    cli.require_output_folder(args.output_dir)
    stop_signal_names(args.stop_signals)
    device = dist.init_process(args)
    # as the original's main_moco.py and main_lincls.py (and DeiT's main.py): cuDNN times its convolution
    # algorithms for each new input shape once and keeps the fastest (no effect on CPU)
    torch.backends.cudnn.benchmark = True
    if hold_output:
        hold_output_dir(args.output_dir, program)
    stop = stop_request(args)
    if getattr(args, 'warmup_epochs', None) is not None:
        cli.warn_short_schedule(args.epochs, args.warmup_epochs)
    base_lr, total_batch = args.lr, dist.share_batch(args)
    args.lr = scaled_lr(base_lr, total_batch, reference_batch=reference_batch)
    return Run(device, stop, base_lr, total_batch)
