"""The parts of the check, one function each: ``part(check, timeout, record) -> status``, where ``record``
is the part's entry of results.json (filled as it goes) and the status 'ok', 'skipped ...', 'timeout',
'failed ...'. ``PARTS`` lists them in the order they run (the CIFAR-10 parts are in cifar.py)."""
import json
import os
import signal
import time

from . import commands
from .cifar import run_cifar, run_cifar_ref
from .runner import tail
from .settings import PEAK_TFLOPS
from .targets import missed_targets


def print_tail_if_failed(job):
    if job.status != 'ok':
        print(tail(job.read_output()), flush=True)


def read_json(path, default):
    """The json in path; default if it is missing or not (yet) complete."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


# ---------------------------------------------------------------- tests

def pytest_summary(output):
    """pytest's last line ('3 passed, 1 skipped in 9.1s'), or None."""
    return next((line.strip('= ') for line in reversed(output.splitlines())
                 if ' in ' in line and ('passed' in line or 'failed' in line or 'skipped' in line
                                        or 'deselected' in line or 'error' in line)), None)


def run_tests(check, timeout, record):
    """tests/test_gpu.py, the compile test in a second run."""
    deadline = time.time() + timeout
    runs, summaries, status = [], [], 'ok'
    for label, selection in (('tests', 'not compiled'), ('tests_compile', 'compiled')):
        left = deadline - time.time()
        if left <= 1:
            status = 'timeout'
            break
        job = check.runner.run(commands.tests_cmd(selection), label, left, first_signal=signal.SIGINT)
        st, output = job.status, job.read_output()
        if st == 'failed (rc 5)':   # pytest: no test selected (renamed?)
            st = 'ok (no test selected)'
        summary = pytest_summary(output)
        summaries.append(summary or st)
        runs.append({'k': selection, 'status': st, 'summary': summary})
        if not st.startswith('ok'):
            status = st
            print(tail(output), flush=True)
    record['runs'] = runs
    record['result'] = '; '.join(str(s) for s in summaries)
    return status


# ---------------------------------------------------------------- the benchmark

def merge_bench(check, key, path):
    """The rows of a bench run's json (if written yet) into check.bench_rows[key] and bench.json."""
    data = read_json(path, None)
    if data is None:
        return
    check.bench_rows[key] = data['rows']
    check.results['device'] = data.get('device', check.results.get('device'))
    rows = [r for k in ('bench', 'bench_compiled') for r in check.bench_rows.get(k, [])]
    check.write_json('bench.json', {'device': data.get('device'), 'torch': data.get('torch'),
                                    'image_size': data.get('image_size'), 'peak_tflops': PEAK_TFLOPS, 'rows': rows})


def run_bench_rows(check, key, cmd, out_json, timeout):
    """Run a bench command writing out_json, its rows merged as they are written; the job and the rows."""
    job = check.runner.run(cmd, key, timeout, on_poll=lambda: merge_bench(check, key, out_json))
    merge_bench(check, key, out_json)
    print_tail_if_failed(job)
    return job, check.bench_rows.get(key, [])


def run_bench(check, timeout, record):
    """Reference and ours, synthetic and end to end from the fullsize JPEGs (made in the background)."""
    deadline = time.time() + timeout
    if not check.runner.wait_background('fullsize', timeout, check.note):
        return 'failed (making the fullsize JPEGs)'
    out_json = os.path.join(check.work, 'bench_eager.json')
    cmd = commands.eager_bench_cmd(out_json, check.fullsize, dry=check.dry)
    job, rows = run_bench_rows(check, 'bench', cmd, out_json, deadline - time.time())
    record['rows'] = len(rows)
    record['result'] = f'{len(rows)} row(s)'
    return job.status


def run_bench_compiled(check, timeout, record):
    """Ours with torch.compile, synthetic input."""
    out_json = os.path.join(check.work, 'bench_compiled.json')
    job, rows = run_bench_rows(check, 'bench_compiled', commands.compiled_bench_cmd(out_json, dry=check.dry),
                               out_json, timeout)
    record['result'] = f'{len(rows)} row(s)'
    return job.status


def run_profile(check, timeout, record):
    """torch.profiler's top operations of ours for the models that missed a target (the dry run: always)."""
    missed = missed_targets(check.bench_rows.get('bench', []), check.dry)
    record['missed'] = missed
    if not missed:
        record['result'] = 'no bench row missed its target' if check.bench_rows.get('bench') else 'no bench rows'
        return 'skipped'
    models = list(missed)[:1] if check.dry else list(missed)
    cmd = commands.profile_cmd(os.path.join(check.work, 'bench_profile.json'), models,
                               os.path.join(check.out, 'profile.txt'), dry=check.dry)
    job = check.runner.run(cmd, 'profile', timeout)
    record['result'] = 'profiled ' + ', '.join(models)
    print_tail_if_failed(job)
    return job.status


# ---------------------------------------------------------------- the gradient monitors and the input pipeline

def run_monitors(check, timeout, record):
    """The cost of the gradient monitors: a step without them, and with them at -p 10 and -p 1."""
    out_json = os.path.join(check.work, 'monitors.json')
    job = check.runner.run(commands.monitors_cmd(out_json, dry=check.dry), 'monitors', timeout)
    rows = read_json(out_json, {}).get('rows', [])
    record['rows'] = rows
    if rows:
        r = rows[0]
        record['result'] = (f"{r['model']}: s/step {r['seconds_per_step_none']:.4f} without, "
                            f"{r['seconds_per_step_p10'] / r['seconds_per_step_none'] - 1:+.1%} at -p 10, "
                            f"{r['seconds_per_step_p1'] / r['seconds_per_step_none'] - 1:+.1%} at -p 1")
    print_tail_if_failed(job)
    return job.status


def run_pipeline(check, timeout, record):
    """The reference pipeline against the original release's: identical views, transform and loader rates."""
    out_json = os.path.join(check.work, 'pipeline.json')
    job = check.runner.run(commands.pipeline_cmd(out_json, dry=check.dry), 'pipeline', timeout)
    data = read_json(out_json, {'rows': []})
    record.update(rows=data['rows'], identical_views=data.get('identical_views'), cpu=data.get('cpu'))
    transform = {r['config']: r for r in data['rows'] if r['kind'] == 'transform'}
    if 'ours' in transform:
        record['result'] = (f"views identical: {data.get('identical_views')}; ours "
                            f"{transform['ours']['vs_original']:.2f}x the original per core")
    print_tail_if_failed(job)
    return job.status


# the parts in the order they run; the budget each may take is budget.part_timeout's
PARTS = {'tests': run_tests, 'bench': run_bench, 'monitors': run_monitors, 'pipeline': run_pipeline,
         'profile': run_profile, 'bench_compiled': run_bench_compiled, 'cifar': run_cifar, 'cifar_ref': run_cifar_ref}
