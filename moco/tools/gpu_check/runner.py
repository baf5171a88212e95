"""The time-box runner: starts a command in its own process group with its output in a file, copies that
output into parts.log as it comes, stops the group at its deadline, and keeps a ``JobRecord`` of it."""
import os
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass, field
from typing import Optional

from .settings import KILL_GRACE_S, ROOT


@dataclass
class JobRecord:
    """One command the check ran: when, where its output went, how it ended."""
    name: str
    command: list
    output_path: str
    start: float
    end: Optional[float] = None          # when it was seen to have exited (or was stopped)
    returncode: Optional[int] = None
    status: Optional[str] = None         # 'ok', 'failed (rc N)' or 'timeout', once waited for
    copied: int = 0                      # bytes of its output already copied into parts.log
    process: Optional[subprocess.Popen] = field(default=None, repr=False, compare=False)

    @property
    def seconds(self):
        return self.end - self.start

    def read_output(self):
        with open(self.output_path, errors='replace') as f:
            return f.read()


def job_env(dry):
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    if dry:   # tiny work on a few shared cores: one thread each, sleeping while they wait
        env.update(OMP_NUM_THREADS='1', OMP_WAIT_POLICY='PASSIVE', CUDA_VISIBLE_DEVICES='')
        env['MOCO_GPU_TESTS_ON_CPU'] = '1'
    return env


def tail(output, n=15):
    """The last n lines of output, indented for the console."""
    lines = output.strip().splitlines()[-n:]
    return '\n'.join('    | ' + line for line in lines)


def kill_group(pid):
    try:   # whatever it left behind in its process group
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class Runner:
    """Runs commands from the repository root, each time-boxed, their output in work_dir/NAME.out and copied
    into ``log`` (parts.log); jobs started in the background are watched while the others run."""

    def __init__(self, log, work_dir, dry):
        self.log = log
        self.work_dir = work_dir
        self.dry = dry
        self.background = {}   # name -> JobRecord

    def write_log(self, text):
        self.log.write(text)
        self.log.flush()

    def start(self, cmd, name, env=None):
        """Start cmd in its own process group, its output in work_dir/name.out."""
        output_path = os.path.join(self.work_dir, f'{name}.out')
        out = open(output_path, 'w')
        self.write_log(f'$ {shlex.join(cmd)}\n')
        process = subprocess.Popen(cmd, cwd=ROOT, env=env or job_env(self.dry), stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        out.close()
        return JobRecord(name, list(cmd), output_path, time.time(), process=process)

    def start_background(self, name, cmd, job_name):
        """Start a preparation that runs while the parts do; ``wait_background`` collects it."""
        self.background[name] = self.start(cmd, job_name)

    def follow(self, job):
        """Copy what the job printed since the last call into parts.log."""
        with open(job.output_path, 'rb') as f:
            f.seek(job.copied)
            data = f.read()
        if data:
            job.copied += len(data)
            self.write_log(data.decode(errors='replace'))

    def stop(self, job, first=signal.SIGTERM):
        """first (SIGTERM: main_moco.py saves and exits; SIGINT: pytest runs its clean-ups, which stop the runs it
        started in their own sessions) to the process group, then SIGKILL."""
        pid = job.process.pid
        for sig, wait in ((first, KILL_GRACE_S), (signal.SIGKILL, 5)):
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                return
            try:
                job.process.wait(wait)
                if sig != signal.SIGKILL:   # its workers too, if the leader left any behind
                    try:
                        os.killpg(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                return
            except subprocess.TimeoutExpired:
                pass

    def wait(self, job, timeout, on_poll=None, first_signal=signal.SIGTERM):
        """Wait for the job for at most timeout seconds (then stop it); 'ok', 'failed (rc N)' or 'timeout'."""
        deadline = time.time() + timeout
        status = None
        while status is None:
            status = self.poll_once(job, deadline, first_signal)
            self.follow(job)
            if on_poll is not None:
                on_poll()
            self.poll_background()
        job.end = job.end or time.time()
        job.returncode, job.status = job.process.returncode, status
        self.write_log(f'-> {status} after {job.seconds:.1f} s\n')
        return status

    def poll_once(self, job, deadline, first_signal):
        """Wait a quarter of a second for the job: its status if it ended or was stopped now, else None."""
        try:
            rc = job.process.wait(timeout=0.25)
        except subprocess.TimeoutExpired:
            if time.time() > deadline:
                self.stop(job, first_signal)
                return 'timeout'
            return None
        kill_group(job.process.pid)
        return 'ok' if rc == 0 else f'failed (rc {rc})'

    def poll_background(self):
        """Note when background jobs end (their durations in the log are then their own)."""
        for job in self.background.values():
            if job.end is None and job.process.poll() is not None:
                job.end = time.time()

    def run(self, cmd, name, timeout, on_poll=None, env=None, first_signal=signal.SIGTERM):
        """Start cmd and wait for it, time-boxed; its JobRecord (status set)."""
        job = self.start(cmd, name, env)
        self.wait(job, timeout, on_poll, first_signal)
        return job

    def wait_background(self, name, timeout, note):
        """Wait for a background job (``note`` its outcome, once); True when it succeeded or there is none."""
        job = self.background.get(name)
        if job is None:
            return True
        if job.status is None:
            self.wait(job, timeout)
            note(f'{name} preparation: {job.status} ({job.seconds:.0f} s)')
        return job.status == 'ok'

    def stop_unused_background(self, note):
        """Stop background jobs still running (nothing is left running behind the check)."""
        for name, job in self.background.items():
            if job.end is None:
                self.stop(job)
                note(f'{name} preparation stopped (unused)')
