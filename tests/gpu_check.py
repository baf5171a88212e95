"""GPU acceptance run: the CUDA tests, the training-step benchmark and a short CIFAR-10 pretraining on one
GPU, each time-boxed inside one budget, their results in one folder (README "Speed").

    python tests/gpu_check.py --budget-min 9 --cifar-tar cifar10-jpeg.tar.xz    # on a CUDA machine
    python tests/gpu_check.py --dry-run       # the same parts on CPU, tiny (CI: tests/test_gpu_check.py)

Parts, in this order (--parts picks some). Each may take its share of --budget-min (cifar: what is left);
one that fails or runs out of time is recorded and stopped, and the next one runs:
  tests   python -m pytest tests/test_gpu.py, the compile test in a second run
  bench   python -m moco.tools.bench: the reference-style step against ours for vit_small:256, resnet50:256
          and vit_base:128 at 224 px, synthetic and end to end from ImageNet-sized JPEGs: img/s, TFLOP/s,
          share of --peak-tflops, peak memory (torch.cuda.max_memory_allocated)
  steps   our step plain, with --grad-checkpointing and with --micro-batch 64 (ViTs only): s/step and peak
          memory; for the plain step, the host syncs per step in a torch.profiler trace of 3 steps
          (cudaStreamSynchronize/cudaDeviceSynchronize/cudaEventSynchronize calls, device-to-host copies)
  memory  python -m moco.tools.memory for each steps row: its estimate against the measured peak
  cifar   main_moco.py with CONFIG.md's CIFAR-10 ResNet-18 recipe (--fast, in-memory views), --cifar-epochs
          (200) with kNN every 10, stopped when its time is up (SIGTERM: it saves and exits); epochs done,
          kNN by epoch, the projected wall time of all epochs; curves.png by python -m moco.tools.plot
--cifar-tar: a CIFAR-10 JPEG tarball (cifar10/{train,val}/<class>/*.jpg, or a folder of that layout),
by default .gpu_data/cifar10-jpeg.tar.xz (git-ignored); unpacked into --work-dir.

Results in --out (default $OUT if set, else output/gpu_check), written as they come: results.json,
summary.md (printed last), check.log (every command and its output), bench.json, cifar_log.txt,
curves.png. Exit code 0 when every part succeeded or was skipped, else 1.

--dry-run: tiny models at 16 px, a step or two, CIFAR-10 from a tarball of a few shipped demo images
(resnet10_w32, 2 epochs), on CPU with one thread per process and the CUDA tests on CPU
(MOCO_GPU_TESTS_ON_CPU=1), so that every command, flag and file name is exercised.
"""
import argparse
import datetime
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:   # run as a script: moco from the repository root
    sys.path.insert(0, ROOT)

PY = sys.executable
SHARE = {'tests': 0.20, 'bench': 0.25, 'steps': 0.10, 'memory': 0.08}   # x budget; cifar gets the rest
TAIL = 0.03                # x budget, kept for the summary
KILL_GRACE_S = 10          # the first signal, then SIGKILL
PLOT_S = 20                # kept at the end of the cifar part for the plot
RESULT_FILES = ('results.json', 'summary.md', 'check.log', 'bench.json', 'cifar_log.txt', 'curves.png')
CIFAR_TAR = os.path.join('.gpu_data', 'cifar10-jpeg.tar.xz')
CIFAR_RECIPE = ['-a', 'resnet18_cifar', '--image-size', '32', '--no-blur', '--crop-min', '0.08',
                '-b', '512', '--warmup-epochs', '10', '--lr', '0.6', '--wd', '1e-6', '--optimizer', 'lars',
                '--moco-t', '0.2', '--moco-m', '0.99', '--moco-m-cos', '--moco-mlp-dim', '4096', '--channels-last',
                '--fast', '--data-pipeline', 'memory']   # CONFIG.md "CIFAR-10 / CIFAR-100"
DRY_RECIPE = {'-a': 'resnet10_w32', '-b': '16', '--moco-mlp-dim': '64'}
# (GPU, dry run): models of the bench and of the steps part, warm-up and timed steps, image size
BENCH_MODELS = (['vit_small:256', 'resnet50:256', 'vit_base:128'], ['resnet18_cifar:4', 'vit_tiny_patch4:4'])
STEP_MODELS = (['vit_small:256', 'resnet50:256'], ['vit_tiny_patch4:4', 'resnet18_cifar:4'])
STEPS = ({'warmup': 3, 'steps': 10, 'size': 224, 'micro': 64}, {'warmup': 1, 'steps': 2, 'size': 16, 'micro': 2})


def part_limit(name, budget_s, elapsed_s):
    """Seconds part ``name`` may run when it starts ``elapsed_s`` into the budget: its share, never beyond
    the budget less the tail (cifar, without a share: all that is left); 0 when nothing is left. The
    shares add up to less than the whole, so that the parts before cifar always leave it the rest."""
    left = budget_s * (1 - TAIL) - elapsed_s
    return max(0.0, min(left, SHARE[name] * budget_s) if name in SHARE else left)


class Check:
    def __init__(self, args):
        self.args, self.dry, self.t0 = args, args.dry_run, time.time()
        self.out, self.work = args.out, args.work_dir
        os.makedirs(self.work, exist_ok=True)
        os.makedirs(self.out, exist_ok=True)
        for name in RESULT_FILES:   # a rerun into the same folder starts clean
            if os.path.isfile(os.path.join(self.out, name)):
                os.remove(os.path.join(self.out, name))
        self.workers = 1 if self.dry else min(16, os.cpu_count() or 1)   # data loader workers
        self.env = dict(os.environ, PYTHONUNBUFFERED='1')
        if self.dry:   # tiny work on a few shared cores: one thread each; the CUDA tests on the CPU
            self.env.update(OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='', MOCO_GPU_TESTS_ON_CPU='1')
        self.results = {'started': datetime.datetime.now().isoformat(timespec='seconds'),
                        'command': [PY, 'tests/gpu_check.py'] + (sys.argv[1:] if args.argv is None else args.argv),
                        'dry_run': self.dry, 'budget_s': args.budget_min * 60, 'parts': {}}

    def note(self, text):
        line = f'[{time.time() - self.t0:6.1f} s] {text}'
        print(line, flush=True)
        self.log(line + '\n')

    def log(self, text):
        with open(os.path.join(self.out, 'check.log'), 'a') as f:
            f.write(text)

    def save(self):
        with open(os.path.join(self.out, 'results.json'), 'w') as f:
            json.dump(self.results, f, indent=1)
        with open(os.path.join(self.out, 'summary.md'), 'w') as f:
            f.write(summary(self.results, self.args.parts, self.out))

    def run(self, name, cmd, limit, first_signal=signal.SIGTERM, on_poll=None):
        """cmd from the repository root in its own process group, stopped after ``limit`` seconds (first_signal,
        then SIGKILL); its output into check.log. Returns (status: 'ok', 'failed (rc N)' or 'timeout', output)."""
        path = os.path.join(self.work, f'{name}.out')
        with open(path, 'w') as f:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        tic, status = time.time(), None
        while status is None:
            try:
                rc = proc.wait(timeout=0.5)
                status = 'ok' if rc == 0 else f'failed (rc {rc})'
            except subprocess.TimeoutExpired:
                if time.time() > tic + limit:
                    status = 'timeout'
                    for sig in (first_signal, signal.SIGKILL):
                        try:
                            os.killpg(proc.pid, sig)
                            proc.wait(KILL_GRACE_S)
                        except (ProcessLookupError, subprocess.TimeoutExpired):
                            pass
            if on_poll is not None:
                on_poll()
        try:   # whatever it left behind in its group
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        with open(path, errors='replace') as f:
            output = f.read()
        self.log(f'$ {shlex.join(cmd)}\n{output}-> {status} after {time.time() - tic:.1f} s\n\n')
        return status, output


def read_json(path, default):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


# ---------------------------------------------------------------- the parts: part(check, limit, record) -> status

def part_tests(check, limit, record):
    """tests/test_gpu.py; the compile test (minutes of compilation) in a run of its own."""
    deadline, statuses = time.time() + limit, []
    for label, selection in (('tests', 'not compiled'), ('tests_compiled', 'compiled')):
        cmd = [PY, '-m', 'pytest', '-v', '-rs', '-p', 'no:cacheprovider', 'tests/test_gpu.py', '-k', selection]
        # SIGINT: pytest's clean-ups stop the runs its tests started
        status, output = check.run(label, cmd, max(1.0, deadline - time.time()), signal.SIGINT)
        status = 'ok' if status == 'failed (rc 5)' else status   # rc 5: no test selected
        lines = [line.strip('= ') for line in output.splitlines() if re.search(r'(passed|failed|skipped|error)', line)]
        record[label] = lines[-1] if lines else status
        statuses.append(status)
    record['result'] = '; '.join(record[label] for label in ('tests', 'tests_compiled'))
    return next((s for s in statuses if s != 'ok'), 'ok')


def part_bench(check, limit, record):
    """python -m moco.tools.bench: reference and ours, synthetic and from JPEG files; rows into bench.json."""
    dry, out = check.dry, os.path.join(check.out, 'bench.json')
    cmd = [PY, '-m', 'moco.tools.bench', '--models', *BENCH_MODELS[dry], '--configs', 'reference', 'ours',
           '--peak-tflops', str(check.args.peak_tflops), '--warmup', '1' if dry else '5',
           '--steps', '1' if dry else '15', '-j', str(check.workers), '--fullsize-jpegs',
           os.path.join(check.work, 'jpegs'), '--fullsize-count', '24' if dry else '512', '--out', out]
    cmd += ['--tiny', '--image-size', '16'] if dry else []
    status, _ = check.run('bench', cmd, limit)   # bench.json is rewritten after every row: a timeout keeps them
    rows = read_json(out, {}).get('rows', [])
    record['result'] = f'{len(rows)} row(s)'
    return status


def probe(model, dry, out):
    """The steps part's measurement (python tests/gpu_check.py --probe ARCH:BATCH): our step (as
    moco.tools.bench's, synthetic input) plain, with --grad-checkpointing and with --micro-batch; s/step, peak
    GiB; the plain step's host syncs in a profiler trace. Rows into ``out`` (json), rewritten after each."""
    import torch

    from moco.microbatch import refusal
    arch, batch = model.split(':')[0], int(model.split(':')[1])
    cuda = torch.cuda.is_available()
    rows = []
    for mode in ['plain', 'grad_checkpointing'] + ([] if refusal(arch) else ['micro_batch']):
        row = time_step(arch, batch, mode, torch.device('cuda' if cuda else 'cpu'), **STEPS[dry])
        row['vs_plain'] = row['seconds_per_step'] / rows[0]['seconds_per_step'] if rows else 1.0
        rows.append(row)
        with open(out, 'w') as f:
            json.dump({'device': torch.cuda.get_device_name() if cuda else 'CPU', 'rows': rows}, f, indent=1)
        print(json.dumps(row), flush=True)
        if cuda:
            torch.cuda.empty_cache()


def time_step(arch, batch, mode, device, warmup, steps, size, micro):
    import torch
    from torch.profiler import ProfilerActivity, profile

    from moco.microbatch import MicroBatchStep
    from moco.recompute import enable_grad_checkpointing
    from moco.tools.bench import Runner
    cuda = device.type == 'cuda'
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    runner = Runner(arch, batch, size, device, ours=True)
    if mode == 'grad_checkpointing':
        enable_grad_checkpointing(runner.model)
    pieces = MicroBatchStep(runner.model, micro) if mode == 'micro_batch' else None
    x1, x2 = (torch.randn(batch, 3, size, size, device=device).to(memory_format=runner.memory_format) for _ in '12')

    def step():
        with runner.amp.autocast():
            loss = runner.model(x1, x2, 0.99) if pieces is None else pieces(x1, x2, 0.99)
        runner.amp.backward_step(loss, runner.optimizer, backward=pieces and pieces.backward)
    for _ in range(warmup):
        step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    tic = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    seconds = (time.perf_counter() - tic) / steps
    row = dict(model=arch, batch=batch, image_size=size, mode=mode, precision=runner.amp.precision,
               micro_batch=micro if pieces else 0, seconds_per_step=seconds, images_per_s=batch / seconds,
               peak_gib=torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None)
    if mode == 'plain':   # the host syncs of 3 steps (CUDA only: on the CPU nothing waits)
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            for _ in range(3):
                step()
            sync()
        counts = {e.key: e.count for e in prof.key_averages()}
        waits = sum(counts.get(f'cuda{k}Synchronize', 0) for k in ('Stream', 'Event'))
        copies = sum(n for k, n in counts.items() if k.startswith('Memcpy DtoH'))
        row.update(syncs_per_step=waits / 3 if cuda else None, dtoh_copies_per_step=copies / 3 if cuda else None)
    return row


def part_steps(check, limit, record):
    deadline, status = time.time() + limit, 'ok'
    record['rows'] = []
    for model in STEP_MODELS[check.dry]:
        out = os.path.join(check.work, f'steps_{model.replace(":", "_")}.json')
        st, _ = check.run(f'steps_{model}', [PY, 'tests/gpu_check.py', '--probe', model, '--out', out] +
                          ['--dry-run'] * check.dry, max(1.0, deadline - time.time()))
        record['rows'] += read_json(out, {}).get('rows', [])
        status = st if status == 'ok' else status
    rows = {(r['model'], r['mode']): r for r in record['rows']}
    record['result'] = '; '.join(f"{m} {k}: {r['vs_plain']:.2f}x" for (m, k), r in rows.items() if k != 'plain')
    plain = rows.get((STEP_MODELS[check.dry][0].split(':')[0], 'plain'), {})
    if plain.get('syncs_per_step') is not None:
        record['result'] += f"; {plain['syncs_per_step']:.1f} syncs/step"
    return status


def part_memory(check, limit, record):
    """python -m moco.tools.memory's estimate for each row of the steps part, against its measured peak."""
    import importlib.util
    if importlib.util.find_spec('moco.tools.memory') is None:
        return 'skipped (no moco.tools.memory)'
    rows = check.results['parts'].get('steps', {}).get('rows', [])
    if not rows:
        return 'skipped (no steps rows)'
    deadline, status, record['rows'] = time.time() + limit, 'ok', []
    for r in rows:
        vit = r['model'].startswith('vit')
        cmd = [PY, '-m', 'moco.tools.memory', '-a', r['model'], '-b', str(r['batch']), '--gpus', '1',
               '--amp', r['precision'], '--optimizer', 'adamw' if vit else 'lars', '--image-size', str(r['image_size'])]
        cmd += ['--grad-checkpointing'] if r['mode'] == 'grad_checkpointing' else []
        cmd += ['--micro-batch', str(r['micro_batch'])] if r['micro_batch'] else []
        st, output = check.run(f"memory_{r['model']}_{r['mode']}", cmd, max(1.0, deadline - time.time()))
        found = re.search(r'peak ([\d.]+) GiB', output)
        estimate = float(found.group(1)) if found else None
        record['rows'].append(dict(model=r['model'], mode=r['mode'], estimate_gib=estimate, measured_gib=r['peak_gib']))
        r['estimate_gib'] = estimate
        status = st if status == 'ok' else status
    record['result'] = 'GiB estimated/measured: ' + '; '.join(
        f"{x['model']} {x['mode']} {x['estimate_gib']}/{x['measured_gib'] and round(x['measured_gib'], 1)}"
        for x in record['rows'])
    return status


def cifar_folder(check, given):
    """The unpacked CIFAR-10 folder (with train/ and val/), or None without a tarball. The dry run makes one."""
    if given is None and check.dry:
        from moco import demo_data
        src = demo_data.extract(os.path.join(check.work, 'dry_src'), per_class={'train': 8, 'val': 4})
        given = os.path.join(check.work, 'dry_cifar10.tar.xz')
        with tarfile.open(given, 'w:xz') as tar:
            for split in ('train', 'val'):
                tar.add(os.path.join(src, split), arcname=f'cifar10/{split}')
    given = given or os.path.join(ROOT, CIFAR_TAR)
    if not os.path.exists(given):
        return None
    dest = given
    if os.path.isfile(given):
        dest = os.path.join(check.work, 'cifar_' + re.sub(r'\W', '_', os.path.basename(given)))
        if not os.path.isdir(dest):
            with tarfile.open(given) as tar:
                tar.extractall(dest + '.partial', **({'filter': 'data'} if hasattr(tarfile, 'data_filter') else {}))
            os.replace(dest + '.partial', dest)
    for root, dirs, _ in os.walk(dest):
        if 'train' in dirs and 'val' in dirs:
            return root
        dirs.sort()
    return dest


def part_cifar(check, limit, record):
    deadline = time.time() + limit
    data = cifar_folder(check, check.args.cifar_tar)
    if data is None:
        return f'skipped (no CIFAR-10 tarball: --cifar-tar PATH, or {CIFAR_TAR})'
    run_dir, epochs, knn_freq = os.path.join(check.work, 'cifar'), check.args.cifar_epochs, 1 if check.dry else 10
    shutil.rmtree(run_dir, ignore_errors=True)
    recipe = list(CIFAR_RECIPE)
    for flag, value in (DRY_RECIPE.items() if check.dry else ()):
        recipe[recipe.index(flag) + 1] = value
    cmd = [PY, 'main_moco.py', *recipe, '--epochs', str(epochs), '--knn-freq', str(knn_freq), '--keep-checkpoints',
           '1', '-p', '20', '-j', str(check.workers), '--output-dir', run_dir]
    cmd += ([] if check.dry else ['--gpu', '0']) + [data]
    record.update(command=shlex.join(cmd), data=data)
    log_txt, line_times = os.path.join(run_dir, 'log.txt'), []

    def watch():   # when each line of log.txt appears (the kNN at start, then one per epoch)
        if os.path.isfile(log_txt):
            with open(log_txt) as f:
                n = f.read().count('\n')
            line_times.extend([time.time()] * (n - len(line_times)))
    tic = time.time()
    status, _ = check.run('cifar', cmd, max(1.0, deadline - time.time() - PLOT_S), on_poll=watch)
    watch()
    if not os.path.isfile(log_txt):
        return status
    shutil.copy(log_txt, os.path.join(check.out, 'cifar_log.txt'))
    with open(log_txt) as f:
        records = [json.loads(line) for line in f if line.strip()]
    done = max([r['epoch'] for r in records if 'train_loss' in r], default=0)
    knn = [(r['epoch'], round(r['knn_top1'], 2)) for r in records if 'knn_top1' in r]
    record.update(epochs_done=done, knn=knn, final_loss=records[-1].get('train_loss'),
                  wall_s=round(time.time() - tic, 1))
    record['result'] = f'{done}/{epochs} epochs' + (f', kNN {knn[-1][1]} at epoch {knn[-1][0]}' if knn else '')
    if done and len(line_times) > done:   # start-up (to the first kNN), then the epochs at the rate measured
        per_epoch = (line_times[done] - line_times[0]) / done
        minutes = round((line_times[0] - tic + epochs * per_epoch) / 60, 1)
        record.update(epoch_s=round(per_epoch, 2), projected_min=minutes)
        record['result'] += f', {per_epoch:.1f} s/epoch: {epochs} epochs in ~{minutes} min'
    check.run('plot', [PY, '-m', 'moco.tools.plot', run_dir, '--out', os.path.join(check.out, 'curves.png'),
                       '--title', 'CIFAR-10, ResNet-18, MoCo v3'], max(5.0, deadline - time.time()))
    return 'ok' if status == 'ok' or (status == 'timeout' and done) else status   # stopped on time: expected


PARTS = {'tests': part_tests, 'bench': part_bench, 'steps': part_steps, 'memory': part_memory, 'cifar': part_cifar}


# ---------------------------------------------------------------- the summary and the run

def summary(results, parts, out):
    lines = [f"# GPU check ({'dry run, ' if results['dry_run'] else ''}{results.get('device')}, torch "
             f"{results.get('torch')})", '', f"{results['started']}, budget {results['budget_s'] / 60:g} min, "
             f"commit {results.get('git_commit')}: `{shlex.join(results['command'])}`", '',
             '| part | status | seconds (limit) | result |', '|---|---|---|---|']
    for name in parts:
        p = results['parts'].get(name, {})
        lines.append(f"| {name} | {p.get('status', 'not reached')} | {p.get('seconds', '')} ({p.get('limit_s', '')}) "
                     f"| {p.get('result', '')} |")
    bench = read_json(os.path.join(out, 'bench.json'), {}).get('rows', [])
    if bench:
        lines += ['', '| bench | input | config | precision | img/s | TFLOP/s | of peak | peak GiB | vs ref |',
                  '|---|---|---|---|---|---|---|---|---|']
        lines += [f"| {r['model']}:{r['batch']} | {r['input']} | {r['config']} | {r['precision']} | "
                  f"{r['images_per_s']:.0f} | {r['model_tflops']:.1f} | {r['fraction_of_peak']:.1%} | "
                  f"{'-' if r['peak_gib'] is None else round(r['peak_gib'], 1)} | "
                  f"{'-' if r['vs_reference'] is None else round(r['vs_reference'], 2)} |" for r in bench]
    steps = results['parts'].get('steps', {}).get('rows', [])
    if steps:
        lines += ['', '| step | mode | s/step | vs plain | peak GiB | estimate GiB | syncs/step | DtoH copies/step |',
                  '|---|---|---|---|---|---|---|---|']
        lines += [f"| {r['model']}:{r['batch']} | {r['mode']} | {r['seconds_per_step']:.4f} | {r['vs_plain']:.2f} | "
                  + ' | '.join('-' if r.get(k) is None else f'{r[k]:.1f}'
                               for k in ('peak_gib', 'estimate_gib', 'syncs_per_step', 'dtoh_copies_per_step')) + ' |'
                  for r in steps]
    return '\n'.join(lines) + '\n'


def run_check(args):
    check = Check(args)
    r = check.results
    try:
        import torch
        r['torch'] = torch.__version__
        r['device'] = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not check.dry else \
            f'CPU, {os.cpu_count()} cores'
    except Exception as e:   # noqa: BLE001
        r['device'] = f'unknown ({e})'
    git = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True, text=True)
    r['git_commit'] = git.stdout.strip() or None
    check.note(f"GPU check on {r['device']}, budget {args.budget_min:g} min, parts {','.join(args.parts)}; results "
               f"in {check.out}" + ('' if check.dry or 'CPU' not in r['device'] else ' (no CUDA device!)'))
    for name in args.parts:
        limit = part_limit(name, args.budget_min * 60, time.time() - check.t0)
        record = r['parts'][name] = {'limit_s': round(limit)}
        check.note(f'{name}: at most {limit:.0f} s')
        tic = time.time()
        try:
            record['status'] = PARTS[name](check, limit, record) if limit >= 5 else 'skipped (no time left)'
        except Exception as e:   # noqa: BLE001 (a broken part must not stop the others)
            record['status'] = f'error: {type(e).__name__}: {e}'
        record['seconds'] = round(time.time() - tic, 1)
        check.note(f"{name}: {record['status']} in {record['seconds']:.0f} s; {record.get('result', '')}")
        check.save()
    r['seconds'] = round(time.time() - check.t0, 1)
    check.save()
    print('\n' + summary(r, args.parts, check.out), flush=True)
    return 0 if all(p['status'].startswith(('ok', 'skipped')) for p in r['parts'].values()) else 1


def get_args(argv=None):
    p = argparse.ArgumentParser(prog='python tests/gpu_check.py', description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog='\n'.join(__doc__.splitlines()[2:]))
    p.add_argument('--dry-run', action='store_true', help='the same parts on CPU, tiny')
    p.add_argument('--budget-min', type=float, default=None, help='minutes for all parts (default 9; dry run 30)')
    p.add_argument('--parts', default=','.join(PARTS), help=f'comma-separated, of {",".join(PARTS)} (default all)')
    p.add_argument('--cifar-tar', default=None, help=f'CIFAR-10 JPEG tarball or folder (default {CIFAR_TAR})')
    p.add_argument('--cifar-epochs', type=int, default=None, help='epochs of the CIFAR-10 run (default 200; dry 2)')
    p.add_argument('--peak-tflops', type=float, default=790, help="the GPU's bf16 matmul peak (H200: ~790)")
    p.add_argument('--out', default=None, help='results folder (default $OUT if set, else output/gpu_check)')
    p.add_argument('--work-dir', default=None, help='data and run folders (default /tmp/moco_gpu_check)')
    p.add_argument('--probe', default=None, metavar='ARCH:BATCH', help="the steps part's measurement of one model")
    args = p.parse_args(argv)
    args.argv = argv
    args.parts = [x for x in args.parts.split(',') if x]
    if set(args.parts) - set(PARTS):
        p.error(f'unknown part(s) {sorted(set(args.parts) - set(PARTS))} (parts: {",".join(PARTS)})')
    args.budget_min = args.budget_min or (30.0 if args.dry_run else 9.0)
    args.cifar_epochs = args.cifar_epochs or (2 if args.dry_run else 200)
    default_out = os.path.join(ROOT, 'output', 'gpu_check_dry' if args.dry_run else 'gpu_check')
    args.out = os.path.abspath(args.out or (not args.dry_run and os.environ.get('OUT')) or default_out)
    args.work_dir = os.path.abspath(args.work_dir or '/tmp/moco_gpu_check' + '_dry' * args.dry_run)
    args.cifar_tar = args.cifar_tar and os.path.abspath(args.cifar_tar)
    return args


def main(argv=None):
    args = get_args(argv)
    if args.probe:
        return probe(args.probe, args.dry_run, args.out) or 0
    return run_check(args)


if __name__ == '__main__':
    sys.exit(main())
