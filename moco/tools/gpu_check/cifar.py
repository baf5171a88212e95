"""The CIFAR-10 parts: a short calibration run of main_moco.py measures start-up, epoch and kNN times, the
run then gets as many epochs (up to its target) as fit in the time left, and curves.png plots the runs."""
import json
import os
import shlex
import shutil
import time
from dataclasses import dataclass, field
from typing import Optional

from moco.run_record import write_text_atomic

from .budget import calibrate, fit_epochs, median_plain_epoch_s, run_seconds
from .commands import cifar_cmd, plot_cmd
from .data import find_split_folder
from .runner import tail
from .settings import FAST, ORIGINAL, PLOT_RESERVE_S

FULL_EPOCHS = 200   # the projected wall time is that of the CONFIG.md schedule
LABELS = {'cifar': 'fast (--fast, bf16, memory)', 'cifar_ref': 'original numerics (fp16, reference)'}


@dataclass
class LogWatch:
    """Follows a run's log.txt: each complete line's json record and when it appeared; copies the lines to
    copy_to (if set) as they come."""
    path: str
    copy_to: Optional[str] = None
    records: list = field(default_factory=list)
    line_times: list = field(default_factory=list)

    def poll(self):
        try:
            with open(self.path) as f:
                data = f.read()
        except OSError:
            return
        complete = data[:data.rfind('\n') + 1]
        lines = [line for line in complete.splitlines() if line.strip()]
        if len(lines) > len(self.records):
            now = time.time()
            for line in lines[len(self.records):]:
                self.records.append(parse_record(line))
                self.line_times.append(now)
            if self.copy_to:
                write_text_atomic(self.copy_to, complete)


def parse_record(line):
    try:
        return json.loads(line)
    except ValueError:
        return {}


def train(check, cmd, name, run_dir, timeout, copy_to=None):
    """Run main_moco.py in a fresh run_dir (its log.txt appends), watching its log; the job and the watch."""
    shutil.rmtree(run_dir, ignore_errors=True)
    job = check.runner.start(cmd, name)
    watch = LogWatch(os.path.join(run_dir, 'log.txt'), copy_to)
    check.runner.wait(job, timeout, watch.poll)
    watch.poll()
    return job, watch


def run_cifar_ref(check, timeout, record):
    """The same with the original numerics (--amp fp16 --data-pipeline reference)."""
    return run_cifar(check, timeout, record, ref=True)


def run_cifar(check, timeout, record, ref=False):
    """CIFAR-10 ResNet-18 (CONFIG.md), fast numerics, or the original's with ref: calibration, then the run of
    as many epochs as fit, then the curves."""
    deadline = time.time() + timeout
    if check.cifar_data is None:
        return 'skipped (no CIFAR-10 data)'
    if not check.runner.wait_background('cifar', max(1.0, deadline - time.time()), check.note):
        return 'failed (unpacking CIFAR-10)'
    check.cifar_data = find_split_folder(check.cifar_data)
    check.results['cifar_data'] = check.cifar_data
    name, numerics = ('cifar_ref', ORIGINAL) if ref else ('cifar', FAST)
    target = check.args.cifar_ref_epochs if ref else check.args.cifar_epochs
    record['numerics'] = ' '.join(numerics)
    status, cal = calibration_run(check, name, numerics, deadline, record)
    if cal is None:
        return status
    epochs, full = size_run(check, name, cal, target, deadline, record)
    if epochs == 0:
        record['result'] = 'no epoch fits in the time left'
        return 'skipped (no epoch fits)'
    status = training_run(check, name, numerics, epochs, deadline, record, cal, full)
    plot_curves(check, name, deadline, record)
    return status


def calibration_run(check, name, numerics, deadline, record):
    """A short run with the kNN monitor at start and end only; (status, calibration) or (status, None)."""
    cal_epochs = 3 if check.dry else 4
    cal_dir = os.path.join(check.work, f'{name}_calibration')
    cmd = cifar_cmd(numerics, cal_epochs, cal_epochs, cal_dir, check.cifar_data, dry=check.dry)
    job, watch = train(check, cmd, f'{name}_calibration', cal_dir, deadline - time.time() - PLOT_RESERVE_S)
    output = job.read_output()
    if job.status != 'ok':
        print(tail(output), flush=True)
        return f'calibration {job.status}', None
    cal = calibrate(job.start, watch.line_times, job.end)
    record['calibration'] = {k: round(v, 2) for k, v in cal.items()}
    record['calibration_s'] = round(job.seconds, 1)
    record['precision'] = next((line.split(':', 1)[1].strip() for line in output.splitlines()
                                if line.startswith('precision:')), None)
    record['pipeline_line'] = next((line.strip() for line in output.splitlines() if 'data pipeline)' in line), None)
    return job.status, cal


def size_run(check, name, cal, target, deadline, record):
    """The epochs that fit in the time left (and the full schedule's projection); (epochs, full epochs)."""
    knn_freq = check.args.knn_freq
    full = target if check.dry else FULL_EPOCHS
    record['projected_full_s'] = round(run_seconds(full, cal, knn_freq), 1)
    record['projected_full_epochs'] = full
    available = deadline - time.time() - PLOT_RESERVE_S
    epochs = fit_epochs(available, cal, knn_freq, target)
    record.update(target_epochs=target, available_s=round(available, 1), epochs=epochs,
                  projected_s=round(run_seconds(epochs, cal, knn_freq), 1) if epochs else None)
    check.note(f'{name}: calibration {cal["epoch_s"]:.2f} s/epoch, start-up {cal["startup_s"]:.1f} s, kNN '
               f'{cal["knn_s"]:.1f} s; projected {full} epochs: {record["projected_full_s"] / 60:.1f} min; '
               f'{available:.0f} s left: {epochs} of {target} epochs fit')
    check.save()
    return epochs, full


def training_run(check, name, numerics, epochs, deadline, record, cal, full):
    """The run itself, its log.txt copied into the results as it grows; its status."""
    run_dir = os.path.join(check.work, name)
    cmd = cifar_cmd(numerics, epochs, check.args.knn_freq, run_dir, check.cifar_data, dry=check.dry)
    record['command'] = shlex.join(cmd)
    job, watch = train(check, cmd, name, run_dir, max(1.0, deadline - time.time() - PLOT_RESERVE_S),
                       copy_to=os.path.join(check.out, f'{name}_log.txt'))
    summarise_run(record, job, watch, cal, check.args.knn_freq, full)
    if job.status != 'ok':
        print(tail(job.read_output()), flush=True)
    return job.status


def summarise_run(record, job, watch, cal, knn_freq, full):
    """Epochs done, kNN by epoch, final loss, wall time, and the full schedule projected from the epoch time
    measured in the run itself."""
    epochs = [r for r in watch.records if r.get('epoch', 0) > 0 and 'train_loss' in r]
    knn = [(r['epoch'], r['knn_top1']) for r in watch.records if 'knn_top1' in r]
    record['epochs_done'] = epochs[-1]['epoch'] if epochs else 0
    record['knn'] = knn
    record['final_loss'] = epochs[-1]['train_loss'] if epochs else None
    record['wall_s'] = round(job.seconds, 1)
    epoch_s = median_plain_epoch_s(watch.line_times, watch.records)
    if epoch_s is not None:
        measured = dict(cal, epoch_s=epoch_s, startup_s=watch.line_times[0] - job.start)
        record['measured_epoch_s'] = round(epoch_s, 3)
        record['projected_full_s_measured'] = round(run_seconds(full, measured, knn_freq), 1)
    knn_text = f"kNN {knn[-1][1]:.2f} at epoch {knn[-1][0]}" if knn else 'no kNN'
    record['result'] = (f"{record['epochs_done']}/{record['epochs']} epochs, {knn_text}, "
                        f"{record['wall_s'] / 60:.1f} min; projected {full} epochs "
                        f"{record.get('projected_full_s_measured', record['projected_full_s']) / 60:.1f} min")


def plot_curves(check, name, deadline, record):
    """curves.png of this check's CIFAR-10 runs so far (python -m moco.tools.plot)."""
    check.cifar_runs.append(name)
    runs = [n for n in check.cifar_runs if os.path.isfile(os.path.join(check.work, n, 'log.txt'))]
    if not runs:
        return
    cmd = plot_cmd([os.path.join(check.work, n) for n in runs], [LABELS[n] for n in runs],
                   os.path.join(check.out, 'curves.png'))
    record['plot'] = check.runner.run(cmd, f'{name}_plot', max(10.0, deadline - time.time())).status
