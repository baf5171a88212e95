"""One GPU check: its state (``Check``), the parts run in order each with its time box (``run_part``), and
the end (nothing left running, results.json and summary.md written, the summary printed last)."""
import datetime
import json
import os
import subprocess
import sys
import time

from moco.run_record import write_text_atomic

from . import data
from .budget import part_timeout
from .parts import PARTS
from .runner import Runner
from .settings import MIN_SECONDS, RESULT_FILES, ROOT
from .summary import render_summary


class Check:
    """What the parts share: the arguments, parts.log and the runner, results.json as it grows, the bench rows,
    the prepared data (set by data.prepare) and the CIFAR-10 runs done."""

    def __init__(self, args):
        self.args = args
        self.dry = args.dry_run
        self.t0 = time.time()
        self.out = args.out
        self.work = args.work_dir
        os.makedirs(self.out, exist_ok=True)
        os.makedirs(self.work, exist_ok=True)
        for name in RESULT_FILES:   # a rerun into the same folder starts clean
            if os.path.exists(os.path.join(self.out, name)):
                os.remove(os.path.join(self.out, name))
        self.log = open(os.path.join(self.out, 'parts.log'), 'a')
        self.runner = Runner(self.log, self.work, self.dry)
        self.parts = [p for p in PARTS if p in args.parts]
        self.results = {'started': datetime.datetime.now().isoformat(timespec='seconds'),
                        'command': [sys.executable, '-m', 'moco.tools.gpu_check'] + sys.argv[1:],
                        'dry_run': self.dry, 'budget_s': args.budget_min * 60, 'parts': {}}
        self.bench_rows = {}
        self.fullsize = self.cifar_data = None
        self.cifar_runs = []

    def elapsed(self):
        return time.time() - self.t0

    def note(self, text):
        line = f'[{self.elapsed():6.1f} s] {text}'
        print(line, flush=True)
        self.runner.write_log(line + '\n')

    def write_json(self, name, obj):
        write_text_atomic(os.path.join(self.out, name), json.dumps(obj, indent=1))

    def summary(self):
        return render_summary(self.results, self.parts, self.bench_rows, self.elapsed())

    def save(self):
        self.write_json('results.json', self.results)
        write_text_atomic(os.path.join(self.out, 'summary.md'), self.summary())


def run_part(check, name):
    """Run part ``name`` within its time box (or skip it when too little is left); record how it went."""
    override = check.args.part_timeout.get(name)
    timeout = part_timeout(name, check.args.budget_min * 60, check.elapsed(), check.parts, override)
    record = check.results['parts'].setdefault(name, {})
    record['timeout_s'] = round(timeout, 1)
    if timeout < MIN_SECONDS[name] and override is None and not check.dry:
        record.update(status=f'skipped (only {timeout:.0f} s left)', seconds=0)
        check.note(f'{name}: {record["status"]}')
        check.save()
        return
    check.note(f'{name}: starting, at most {timeout:.0f} s')
    tic = time.time()
    try:
        status = PARTS[name](check, timeout, record)
    except Exception as e:   # noqa: BLE001 (a broken part must not stop the others)
        status = f'error: {type(e).__name__}: {e}'
    record['status'] = status
    record['seconds'] = round(time.time() - tic, 1)
    result = f' ({record["result"]})' if record.get('result') else ''
    check.note(f'{name}: {status} in {record["seconds"]:.0f} s{result}')
    check.save()


def describe_device(results, dry):
    """torch's version and the device's name (the dry run: the CPU) into results."""
    try:
        import torch
        results['torch'] = torch.__version__
        results['device'] = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not dry \
            else f'CPU ({os.cpu_count()} cores)'
    except Exception as e:   # noqa: BLE001
        results['device'] = f'unknown ({e})'


def git_commit():
    try:
        commit = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return commit.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def start(check):
    """Record what runs where, then start the data preparation."""
    describe_device(check.results, check.dry)
    if not check.dry and check.results['device'].startswith('CPU'):
        check.note('warning: no CUDA device; this is not a GPU measurement (use --dry-run on CPU)')
    check.results['git_commit'] = git_commit()
    check.note(f"gpu_check: {check.results['device']}, torch {check.results.get('torch')}, budget "
               f"{check.args.budget_min:.1f} min, parts {','.join(check.parts)}; results in {check.out}")
    check.save()
    data.prepare(check)


def finish(check):
    """Stop what still runs, write the results, print the summary; the exit code (1: a part did not succeed)."""
    check.runner.stop_unused_background(check.note)
    check.results['seconds'] = round(check.elapsed(), 1)
    check.save()
    check.log.close()
    extra = sorted(set(os.listdir(check.out)) - set(RESULT_FILES))
    if extra:
        print(f'warning: unexpected files in {check.out}: {extra}')
    print('\n' + check.summary(), flush=True)
    failed = [n for n, p in check.results['parts'].items() if not p.get('status', '').startswith(('ok', 'skipped'))]
    return 1 if failed else 0


def run_check(check):
    start(check)
    for name in check.parts:
        run_part(check, name)
    return finish(check)
