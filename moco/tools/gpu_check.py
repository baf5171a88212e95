"""The GPU check of README "Speed": one command that measures, in a fixed time, what only a GPU can show.

    python -m moco.tools.gpu_check                  # on the GPU machine: everything below in --budget-min minutes
    python -m moco.tools.gpu_check --dry-run        # the same parts on CPU, tiny (CI: tests/test_gpu_check.py)
    make gpu-check-prepare CIFAR_TAR=PATH    # here, once: the CIFAR-10 tarball into .gpu_data/ (git-ignored)

Parts, in this order, each time-boxed (its own timeout, derived from the budget, so that a slow part
cannot eat the next; a part that fails or times out is recorded and the next one runs):
 1. tests      the CUDA-only tests (python -m pytest tests/test_gpu.py; the compile test in a second run)
 2. bench      python -m moco.tools.bench: vit_small:256 resnet50:256 vit_base:128 at 224 px, reference and ours,
               synthetic and end to end from 2,048 ImageNet-sized JPEGs (--fullsize-jpegs, made in the
               background while the tests run); img/s, TFLOP/s, fraction of 790 TFLOP/s, peak GiB, vs ref
    monitors   python -m moco.tools.bench --monitors: our vit_small step without the gradient monitors and with them
               at print frequency 10 and 1
    pipeline   python -m moco.tools.bench --pipeline: the reference pipeline's two-view transform per core against
               the original release's (bit-identical views checked first), and the loader at -j 1 and 8
    profile    only when a target is missed: torch.profiler's top operations of a few steps of ours
    bench_compiled  the same models, ours with torch.compile, synthetic input
 3. cifar      CIFAR-10 ResNet-18 (CONFIG.md recipe, --fast, memory pipeline), kNN every 20 epochs: a short
               calibration run (4 epochs) measures start-up, epoch and kNN times; then main_moco.py runs
               200 epochs if they fit in the time left, else as many as fit; prints the projected
               200-epoch wall time; curves.png by python -m moco.tools.plot
 4. cifar_ref  if time remains: the same for 50 epochs (or as many as fit) with the original numerics
               (--amp fp16 --data-pipeline reference), to compare kNN with the fast path at equal epochs
Then summary.md (a table, printed last). Results, each written as soon as it exists, in one flat folder
(--out; default $OUT if set, else output/gpu_check), at most 8 files, since the device tool returns no
more: summary.md results.json parts.log bench.json profile.txt cifar_log.txt cifar_ref_log.txt curves.png.
Everything else (data, JPEGs, run folders, checkpoints) goes to --work-dir.

The device call (python3 there has torch 2.11, torchvision 0.26, timm, tensorboard, matplotlib, pytest;
no network; the CIFAR-10 tarball travels as the carried, git-ignored .gpu_data/):

    here, once:  make gpu-check-prepare CIFAR_TAR=PATH
    run(command="PYTHONUNBUFFERED=1 python3 -m moco.tools.gpu_check --budget-min 9",
        carry=[".gpu_data"], timeout_s=600)

The budget (9 min = 540 s) ends ~60 s before timeout_s; the machine's start (1-2 min) comes on top, so
one such call fits the 15 minutes of device time a task gets. Later calls can take one part at a
time, e.g. --parts cifar --budget-min 9, or --parts cifar,cifar_ref --cifar-epochs 50 for the fast and
original numerics at the same schedule.

Budget plan (share of --budget-min, the longest a part may take; what a part does not use goes to the
later ones): tests 18%, bench 22%, monitors 4%, pipeline 7%, profile 6%, bench_compiled 12%, cifar the
rest (25% kept for it in any case), cifar_ref what cifar leaves (at least 60 s, or it is skipped), 3%
kept for the summary. At 9 min: tests <= 97 s, bench <= 119 s, monitors <= 22 s, pipeline <= 38 s,
profile <= 32 s, bench_compiled <= 65 s, cifar >= 151 s
(calibration ~30 s included; at an assumed 3-5 s per epoch, some 25-40 epochs in the worst case, all
that the earlier parts leave otherwise).

--dry-run: the same parts and command lines on CPU with tiny stand-ins, so that every command, flag and
file name is exercised: tests/test_gpu.py with MOCO_GPU_TESTS_ON_CPU=1; bench --tiny at 16 px with two
tiny models (the first alone for the profile and the compiled row), batch 4, 1+1 steps, 24 fullsize
JPEGs, the pipeline on 8 JPEGs at -j 1, the aot_eager compile backend (inductor's C++ build takes minutes on a CPU), the profile always;
CIFAR from a tarball of 80 + 40 images of the shipped demo data, resnet10_w32 at batch 16, calibration
3 epochs, then 4 and 2 epochs with kNN every 2; --amp auto instead of --amp fp16 (fp16 needs CUDA; on
CUDA auto is fp16 with a GradScaler, the same); no --gpu 0; one thread per process; a 30-minute budget
(a limit only: the parts take what they need, 3-6 minutes on 2 shared cores).
"""
import argparse
import datetime
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time

from moco.run_record import write_text_atomic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PARTS = ('tests', 'bench', 'monitors', 'pipeline', 'profile', 'bench_compiled', 'cifar', 'cifar_ref')
SHARE = {'tests': 0.18, 'bench': 0.22, 'monitors': 0.04, 'pipeline': 0.07, 'profile': 0.06,
         'bench_compiled': 0.12}   # the longest a part may take, x budget
RESERVE = {'cifar': 0.25}          # kept for this part by the parts before it, x budget
TAIL = 0.03                        # kept for the summary, x budget
MIN_SECONDS = {'tests': 20, 'bench': 20, 'monitors': 10, 'pipeline': 20, 'profile': 15, 'bench_compiled': 30,
               'cifar': 45, 'cifar_ref': 60}
KILL_GRACE_S = 10                  # SIGTERM, then SIGKILL (main_moco.py saves and exits on SIGTERM)
PLOT_RESERVE_S = 20                # kept after a CIFAR run for python -m moco.tools.plot
FIT_MARGIN = 0.05                  # a CIFAR run is sized to 95% of the time it has

PEAK_TFLOPS = 790                  # bf16 matmul measured on an H200 (README "Speed")
GPU_MODELS = ('vit_small:256', 'resnet50:256', 'vit_base:128')
DRY_MODELS = ('resnet18_cifar:4', 'vit_tiny_patch4:4')   # the profile and the compiled rows: the first only
# README "Speed": targets for our step on one H200 (synthetic input), and end to end >= 0.9 x our step
TARGETS = {('vit_small', 256): {'images_per_s': 3300, 'peak_gib': 17.0},
           ('resnet50', 256): {'images_per_s': 2200},
           ('vit_base', 128): {'images_per_s': 1400}}
FILES_VS_STEP = 0.9

# CONFIG.md, "CIFAR-10 / CIFAR-100 (32 px)": ResNet-18 with the CIFAR stem (kNN every 20 epochs here)
CIFAR_RECIPE = ['-a', 'resnet18_cifar', '--image-size', '32', '--no-blur', '--crop-min', '0.08',
                '-b', '512', '--warmup-epochs', '10', '--lr', '0.6', '--wd', '1e-6', '--optimizer', 'lars',
                '--moco-t', '0.2', '--moco-m', '0.99', '--moco-m-cos', '--moco-mlp-dim', '4096', '--channels-last']
FAST = ['--fast', '--data-pipeline', 'memory']                  # bf16 autocast, in-memory views
ORIGINAL = ['--amp', 'fp16', '--data-pipeline', 'reference']    # the original's numerics
DRY_CIFAR = {'-a': 'resnet10_w32', '-b': '16', '--moco-mlp-dim': '64', '--moco-dim': '32'}
DRY_PER_CLASS = {'train': 8, 'val': 4}
CARRIED_TAR = '.gpu_data/cifar10-jpeg.tar.xz'   # where make gpu-check-prepare puts it (git-ignored, carried)
RESULT_FILES = ('summary.md', 'results.json', 'parts.log', 'bench.json', 'profile.txt', 'cifar_log.txt',
                'cifar_ref_log.txt', 'curves.png')


# ---------------------------------------------------------------- the arithmetic (pure functions, tested)

def part_timeout(part, budget_s, elapsed_s, parts, override=None):
    """Seconds ``part`` may run when it starts ``elapsed_s`` into the budget: its share of the budget
    (``override`` instead, if given), but never into the reserves of the parts after it in ``parts``
    nor the tail kept for the summary; 0 when nothing is left."""
    left = budget_s * (1 - TAIL) - elapsed_s
    later = parts[parts.index(part) + 1:] if part in parts else ()
    left -= sum(RESERVE.get(p, 0) * budget_s for p in later)
    cap = override if override is not None else (SHARE[part] * budget_s if part in SHARE else None)
    return max(0.0, left if cap is None else min(cap, left))


def knn_evaluations(epochs, knn_freq):
    """kNN evaluations main_moco.py makes after epochs (every knn_freq epochs and after the last one;
    the one before training is part of its start-up)."""
    if knn_freq <= 0 or epochs <= 0:
        return 0
    return epochs // knn_freq + (1 if epochs % knn_freq else 0)


def run_seconds(epochs, cal, knn_freq):
    """Projected wall time of a run of ``epochs`` from a calibration (see ``calibrate``)."""
    return (cal['startup_s'] + cal['first_epoch_extra_s'] + epochs * cal['epoch_s']
            + knn_evaluations(epochs, knn_freq) * cal['knn_s'] + cal['exit_s'])


def fit_epochs(available_s, cal, knn_freq, target, margin=FIT_MARGIN):
    """The most epochs (<= target) whose projected wall time fits in (1 - margin) x available_s; 0 if none."""
    limit = available_s * (1 - margin)
    epochs = target
    while epochs > 0 and run_seconds(epochs, cal, knn_freq) > limit:
        epochs -= 1
    return epochs


def calibrate(t_launch, line_times, t_exit):
    """Times of a calibration run of E >= 3 epochs with the kNN monitor at start and after epoch E only,
    from when its log.txt lines appeared: line_times[0] the kNN before training, line_times[k] the end
    of epoch k (the last one with its kNN). Epochs 2..E-1 are the steady epoch time; the first epoch's
    excess over it is warm-up (cuDNN autotuning, first allocations); the last epoch's is the kNN."""
    if len(line_times) < 4:
        raise ValueError(f'a calibration needs the kNN line and >= 3 epochs, got {len(line_times)} lines')
    durations = [b - a for a, b in zip(line_times[:-1], line_times[1:])]   # epochs 1..E
    steady = durations[1:-1]
    epoch_s = sum(steady) / len(steady)
    return {'startup_s': line_times[0] - t_launch, 'epoch_s': epoch_s,
            'first_epoch_extra_s': max(0.0, durations[0] - epoch_s), 'knn_s': max(0.0, durations[-1] - epoch_s),
            'exit_s': max(0.0, t_exit - line_times[-1])}


def missed_targets(rows, dry_run=False):
    """Models whose eager 'ours' row misses its README target (img/s, peak GiB; files >= 0.9 x synthetic),
    each with the reasons. The dry run's tiny models have no target: all are 'missed' (the profile runs)."""
    ours = {(r['model'], r['batch'], r['input']): r for r in rows if r['config'] == 'ours'}
    missed = {}
    for (model, batch, inp), r in ours.items():
        if inp != 'synthetic':
            continue
        reasons = []
        target = TARGETS.get((model, batch))
        if target is None:
            if dry_run:
                reasons.append('dry run (no target)')
        else:
            if r['images_per_s'] < target['images_per_s']:
                reasons.append(f"{r['images_per_s']:.0f} < {target['images_per_s']} img/s")
            if 'peak_gib' in target and r['peak_gib'] is not None and r['peak_gib'] > target['peak_gib']:
                reasons.append(f"{r['peak_gib']:.1f} > {target['peak_gib']} GiB")
        files = ours.get((model, batch, 'files'))
        if files is not None and target is not None and files['images_per_s'] < FILES_VS_STEP * r['images_per_s']:
            reasons.append(f"files {files['images_per_s']:.0f} < {FILES_VS_STEP} x step")
        if reasons:
            missed[f'{model}:{batch}'] = reasons
    return missed


def unpack_command(tar, partial, dest, use_tar=True):
    """Unpack tar into the (empty) folder partial, then rename it dest: complete or absent. GNU tar with
    xz where both exist, else Python's tarfile."""
    if use_tar:
        return ['sh', '-c', f'tar -xJf {shlex.quote(tar)} -C {shlex.quote(partial)} && '
                            f'mv {shlex.quote(partial)} {shlex.quote(dest)}']
    return [sys.executable, '-c', f'import os, tarfile; tarfile.open({tar!r}).extractall({partial!r}, filter="data"); '
                                  f'os.replace({partial!r}, {dest!r})']


def find_split_folder(path):
    """path if it holds train/ and val/, else the first folder that does at most two levels below path's
    parent, the unpacked tarball (whose top folder may be named otherwise); path if none does."""
    def ok(p):
        return os.path.isdir(os.path.join(p, 'train')) and os.path.isdir(os.path.join(p, 'val'))
    if ok(path):
        return path
    base = os.path.dirname(path)
    for root, dirs, _ in os.walk(base):
        if ok(root):
            return root
        dirs.sort()
        if root.count(os.sep) - base.count(os.sep) >= 2:
            dirs[:] = []
    return path


def with_flags(args, overrides):
    """args with each flag of overrides set to its value (replaced where present, else appended)."""
    args = list(args)
    for flag, value in overrides.items():
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    return args


# ---------------------------------------------------------------- running things, time-boxed

class Check:
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
        self.parts = [p for p in PARTS if p in args.parts]
        self.results = {'started': datetime.datetime.now().isoformat(timespec='seconds'),
                        'command': [sys.executable, '-m', 'moco.tools.gpu_check'] + sys.argv[1:],
                        'dry_run': self.dry, 'budget_s': args.budget_min * 60, 'parts': {}}
        self.bench_rows = {}
        self.background = {}
        self.cifar_runs = []

    # -- bookkeeping
    def elapsed(self):
        return time.time() - self.t0

    def note(self, text):
        line = f'[{self.elapsed():6.1f} s] {text}'
        print(line, flush=True)
        self.log.write(line + '\n')
        self.log.flush()

    def write_json(self, name, data):
        write_text_atomic(os.path.join(self.out, name), json.dumps(data, indent=1))

    def save(self):
        self.write_json('results.json', self.results)
        write_text_atomic(os.path.join(self.out, 'summary.md'), self.summary())

    def env(self, **extra):
        env = dict(os.environ, PYTHONUNBUFFERED='1')
        if self.dry:   # tiny work on a few shared cores: one thread each, sleeping while they wait
            env.update(OMP_NUM_THREADS='1', OMP_WAIT_POLICY='PASSIVE', CUDA_VISIBLE_DEVICES='')
            env['MOCO_GPU_TESTS_ON_CPU'] = '1'
        env.update(extra)
        return env

    def start(self, cmd, name, env=None):
        """Start cmd in its own process group, its output in work/name.out."""
        out_path = os.path.join(self.work, f'{name}.out')
        out = open(out_path, 'w')
        self.log.write(f'$ {shlex.join(cmd)}\n')
        self.log.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env or self.env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        out.close()
        proc.out_path, proc.copied, proc.t_launch = out_path, 0, time.time()
        return proc

    def follow(self, proc):
        """Copy what proc printed since the last call into parts.log."""
        with open(proc.out_path, 'rb') as f:
            f.seek(proc.copied)
            data = f.read()
        if data:
            proc.copied += len(data)
            self.log.write(data.decode(errors='replace'))
            self.log.flush()

    def stop(self, proc, first=signal.SIGTERM):
        """first (SIGTERM: main_moco.py saves and exits; SIGINT: pytest runs its clean-ups, which stop the runs it
        started in their own sessions) to the process group, then SIGKILL."""
        for sig, wait in ((first, KILL_GRACE_S), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(wait)
                if sig != signal.SIGKILL:   # its workers too, if the leader left any behind
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                return
            except subprocess.TimeoutExpired:
                pass

    def wait(self, proc, timeout, on_poll=None, first_signal=signal.SIGTERM):
        """Wait for proc for at most timeout seconds (then stop it); 'ok', 'failed (rc N)' or 'timeout'."""
        deadline = time.time() + timeout
        status = None
        while status is None:
            try:
                rc = proc.wait(timeout=0.25)
                status = 'ok' if rc == 0 else f'failed (rc {rc})'
                try:   # whatever it left behind in its process group
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            except subprocess.TimeoutExpired:
                if time.time() > deadline:
                    self.stop(proc, first_signal)
                    status = 'timeout'
            self.follow(proc)
            if on_poll is not None:
                on_poll()
            self.poll_background()
        proc.t_exit = getattr(proc, 't_exit', None) or time.time()
        self.log.write(f'-> {status} after {proc.t_exit - proc.t_launch:.1f} s\n')
        self.log.flush()
        return status

    def poll_background(self):
        """Note when background jobs end (their durations in the log are then their own)."""
        for proc in self.background.values():
            if getattr(proc, 't_exit', None) is None and proc.poll() is not None:
                proc.t_exit = time.time()

    def run(self, cmd, name, timeout, on_poll=None, env=None, first_signal=signal.SIGTERM):
        proc = self.start(cmd, name, env)
        status = self.wait(proc, timeout, on_poll, first_signal)
        with open(proc.out_path, errors='replace') as f:
            output = f.read()
        return status, output, proc

    def tail(self, output, n=15):
        lines = output.strip().splitlines()[-n:]
        return '\n'.join('    | ' + line for line in lines)

    # -- background preparation (CPU work while the tests run)
    def prepare(self):
        fullsize = os.path.join(self.work, 'fullsize')
        self.fullsize = fullsize
        if any(p in self.parts for p in ('bench', 'profile', 'bench_compiled')):
            cmd = [sys.executable, '-m', 'moco.tools.bench', '--fullsize-jpegs', fullsize, '--prepare-only',
                   '--fullsize-count', str(24 if self.dry else 2048)]
            self.background['fullsize'] = self.start(cmd, 'prepare_fullsize')
        self.cifar_data = None
        if not any(p in self.parts for p in ('cifar', 'cifar_ref')):
            return
        if self.args.cifar_dir:
            self.cifar_data = self.args.cifar_dir
            return
        tar = self.args.cifar_tar
        if self.dry and tar is None:
            tar = self.dry_tarball()
        if tar is None:
            carried = os.path.join(ROOT, CARRIED_TAR)
            tar = carried if os.path.isfile(carried) else None
        if tar is None:
            self.note('no CIFAR-10 tarball (--cifar-tar, or make gpu-check-prepare): the CIFAR parts will be skipped')
            return
        dest = os.path.join(self.work, 'data')   # not a run folder's name: runs are removed before they start
        if os.path.isdir(dest):   # unpacked by an earlier check on this machine
            self.cifar_data = find_split_folder(os.path.join(dest, 'cifar10'))
            self.note(f'CIFAR-10: reusing {self.cifar_data}')
            return
        partial = dest + '.partial'
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
        cmd = unpack_command(tar, partial, dest, use_tar=bool(shutil.which('tar') and shutil.which('xz')))
        shutil.rmtree(dest, ignore_errors=True)
        self.background['cifar'] = self.start(cmd, 'unpack_cifar')
        self.cifar_data = os.path.join(dest, 'cifar10')

    def dry_tarball(self):
        """A CIFAR-10-shaped tarball (cifar10/{train,val}/<class>/*.jpg) of a few shipped demo images."""
        from moco import demo_data
        path = os.path.join(self.work, 'dry_cifar10-jpeg.tar.xz')
        if os.path.isfile(path):
            return path
        src = demo_data.extract(os.path.join(self.work, 'dry_src'), per_class=DRY_PER_CLASS)
        with tarfile.open(path + '.tmp', 'w:xz') as tar:
            for split in ('train', 'val'):
                tar.add(os.path.join(src, split), arcname=f'cifar10/{split}')
        os.replace(path + '.tmp', path)
        return path

    def background_done(self, name, timeout):
        """Wait for a background job; True when it succeeded."""
        proc = self.background.get(name)
        if proc is None:
            return True
        if getattr(proc, 'status', None) is None:
            proc.status = self.wait(proc, timeout)
            self.note(f'{name} preparation: {proc.status} ({proc.t_exit - proc.t_launch:.0f} s)')
        return proc.status == 'ok'

    # -- the parts
    def part(self, name, fn):
        override = self.args.part_timeout.get(name)
        timeout = part_timeout(name, self.args.budget_min * 60, self.elapsed(), self.parts, override)
        record = self.results['parts'].setdefault(name, {})
        record['timeout_s'] = round(timeout, 1)
        if timeout < MIN_SECONDS[name] and override is None and not self.dry:
            record.update(status=f'skipped (only {timeout:.0f} s left)', seconds=0)
            self.note(f'{name}: {record["status"]}')
            self.save()
            return
        self.note(f'{name}: starting, at most {timeout:.0f} s')
        tic = time.time()
        try:
            status = fn(timeout, record)
        except Exception as e:   # noqa: BLE001 (a broken part must not stop the others)
            status = f'error: {type(e).__name__}: {e}'
        record['status'] = status
        record['seconds'] = round(time.time() - tic, 1)
        result = f' ({record["result"]})' if record.get('result') else ''
        self.note(f'{name}: {status} in {record["seconds"]:.0f} s{result}')
        self.save()

    def part_tests(self, timeout, record):
        deadline = time.time() + timeout
        runs, summaries, status = [], [], 'ok'
        for label, k in (('tests', 'not compiled'), ('tests_compile', 'compiled')):
            left = deadline - time.time()
            if left <= 1:
                status = 'timeout'
                break
            cmd = [sys.executable, '-m', 'pytest', '-v', '-rs', '-p', 'no:cacheprovider', 'tests/test_gpu.py', '-k', k]
            st, output, _ = self.run(cmd, label, left, first_signal=signal.SIGINT)
            if st == 'failed (rc 5)':   # pytest: no test selected (renamed?)
                st = 'ok (no test selected)'
            summary = next((line.strip('= ') for line in reversed(output.splitlines())
                            if ' in ' in line and ('passed' in line or 'failed' in line or 'skipped' in line
                                                   or 'deselected' in line or 'error' in line)), None)
            summaries.append(summary or st)
            runs.append({'k': k, 'status': st, 'summary': summary})
            if not st.startswith('ok'):
                status = st
                print(self.tail(output), flush=True)
        record['runs'] = runs
        record['result'] = '; '.join(str(s) for s in summaries)
        return status

    def bench_cmd(self, out_json, configs, inputs=None):
        models = (DRY_MODELS if configs != ['ours_compiled'] else DRY_MODELS[:1]) if self.dry else GPU_MODELS
        cmd = [sys.executable, '-m', 'moco.tools.bench', '--models', *models, '--configs', *configs,
               '--peak-tflops', str(PEAK_TFLOPS), '-j', str(1 if self.dry else min(16, os.cpu_count() or 1)),
               '--warmup', str(1 if self.dry else 5), '--steps', str(1 if self.dry else 20), '--out', out_json]
        if self.dry:
            cmd += ['--tiny', '--image-size', '16']
        if inputs:
            cmd += ['--inputs', *inputs]
        return cmd

    def merge_bench(self, key, path):
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            return
        self.bench_rows[key] = data['rows']
        self.results['device'] = data.get('device', self.results.get('device'))
        rows = [r for k in ('bench', 'bench_compiled') for r in self.bench_rows.get(k, [])]
        self.write_json('bench.json', {'device': data.get('device'), 'torch': data.get('torch'),
                                       'image_size': data.get('image_size'), 'peak_tflops': PEAK_TFLOPS,
                                       'rows': rows})

    def part_bench(self, timeout, record):
        deadline = time.time() + timeout
        if not self.background_done('fullsize', timeout):
            return 'failed (making the fullsize JPEGs)'
        out_json = os.path.join(self.work, 'bench_eager.json')
        cmd = self.bench_cmd(out_json, ['reference', 'ours']) + ['--fullsize-jpegs', self.fullsize]
        status, output, _ = self.run(cmd, 'bench', deadline - time.time(),
                                     on_poll=lambda: self.merge_bench('bench', out_json))
        self.merge_bench('bench', out_json)
        rows = self.bench_rows.get('bench', [])
        record['rows'] = len(rows)
        record['result'] = f'{len(rows)} row(s)'
        if status != 'ok':
            print(self.tail(output), flush=True)
        return status

    def part_monitors(self, timeout, record):
        out_json = os.path.join(self.work, 'monitors.json')
        models = DRY_MODELS[1:] if self.dry else ('vit_small:256',)
        cmd = [sys.executable, '-m', 'moco.tools.bench', '--monitors', '--models', *models, '--out', out_json,
               '--warmup', '1' if self.dry else '3', '--steps', '2' if self.dry else '20']
        if self.dry:
            cmd += ['--tiny', '--image-size', '16']
        status, output, _ = self.run(cmd, 'monitors', timeout)
        try:
            with open(out_json) as f:
                rows = json.load(f)['rows']
        except (OSError, ValueError, KeyError):
            rows = []
        record['rows'] = rows
        if rows:
            r = rows[0]
            record['result'] = (f"{r['model']}: s/step {r['seconds_per_step_none']:.4f} without, "
                                f"{r['seconds_per_step_p10'] / r['seconds_per_step_none'] - 1:+.1%} at -p 10, "
                                f"{r['seconds_per_step_p1'] / r['seconds_per_step_none'] - 1:+.1%} at -p 1")
        if status != 'ok':
            print(self.tail(output), flush=True)
        return status

    def part_pipeline(self, timeout, record):
        out_json = os.path.join(self.work, 'pipeline.json')
        cmd = [sys.executable, '-m', 'moco.tools.bench', '--pipeline', '--out', out_json]
        cmd += ['--loader-rounds', '1']
        cmd += (['--images', '8', '--rounds', '1', '--loader-workers', '1', '--loader-batch', '4'] if self.dry else
                ['--images', '96', '--rounds', '2', '--loader-workers', '1', str(min(8, os.cpu_count() or 1))])
        status, output, _ = self.run(cmd, 'pipeline', timeout)
        try:
            with open(out_json) as f:
                data = json.load(f)
        except (OSError, ValueError):
            data = {'rows': []}
        record.update(rows=data['rows'], identical_views=data.get('identical_views'), cpu=data.get('cpu'))
        transform = {r['config']: r for r in data['rows'] if r['kind'] == 'transform'}
        if 'ours' in transform:
            record['result'] = (f"views identical: {data.get('identical_views')}; ours "
                                f"{transform['ours']['vs_original']:.2f}x the original per core")
        if status != 'ok':
            print(self.tail(output), flush=True)
        return status

    def part_profile(self, timeout, record):
        missed = missed_targets(self.bench_rows.get('bench', []), self.dry)
        record['missed'] = missed
        if not missed:
            record['result'] = 'no bench row missed its target' if self.bench_rows.get('bench') else 'no bench rows'
            return 'skipped'
        out_json = os.path.join(self.work, 'bench_profile.json')
        cmd = self.bench_cmd(out_json, ['ours'], ['synthetic']) + ['--profile', os.path.join(self.out, 'profile.txt')]
        cmd = with_flags(cmd, {'--warmup': '1' if self.dry else '3', '--steps': '1' if self.dry else '5'})
        models = list(missed)[:1] if self.dry else list(missed)
        cmd[cmd.index('--models') + 1:cmd.index('--configs')] = models
        status, output, _ = self.run(cmd, 'profile', timeout)
        record['result'] = 'profiled ' + ', '.join(models)
        if status != 'ok':
            print(self.tail(output), flush=True)
        return status

    def part_bench_compiled(self, timeout, record):
        out_json = os.path.join(self.work, 'bench_compiled.json')
        cmd = self.bench_cmd(out_json, ['ours_compiled'], ['synthetic']) + \
            ['--compile-backend', 'aot_eager' if self.dry else 'inductor']
        status, output, _ = self.run(cmd, 'bench_compiled', timeout,
                                     on_poll=lambda: self.merge_bench('bench_compiled', out_json))
        self.merge_bench('bench_compiled', out_json)
        rows = self.bench_rows.get('bench_compiled', [])
        record['result'] = f'{len(rows)} row(s)'
        if status != 'ok':
            print(self.tail(output), flush=True)
        return status

    # -- CIFAR
    def cifar_cmd(self, numerics, epochs, knn_freq, output_dir):
        recipe = with_flags(CIFAR_RECIPE, DRY_CIFAR) if self.dry else list(CIFAR_RECIPE)
        numerics = with_flags(numerics, {'--amp': 'auto'}) if self.dry and '--amp' in numerics else numerics
        workers = 1 if self.dry else min(16, os.cpu_count() or 1)
        cmd = [sys.executable, 'main_moco.py', *recipe, *numerics, '--epochs', str(epochs), '--knn-freq', str(knn_freq),
               '--keep-checkpoints', '1', '-p', '20', '-j', str(workers), '--output-dir', output_dir]
        if not self.dry:
            cmd += ['--gpu', '0']
        return cmd + [self.cifar_data]

    def watch(self, proc, run_dir, copy_to):
        """on_poll: note when each log.txt line appears and copy log.txt into the results."""
        path = os.path.join(run_dir, 'log.txt')
        proc.records, proc.line_times = [], []

        def poll():
            try:
                with open(path) as f:
                    data = f.read()
            except OSError:
                return
            complete = data[:data.rfind('\n') + 1]
            lines = [line for line in complete.splitlines() if line.strip()]
            if len(lines) > len(proc.records):
                now = time.time()
                for line in lines[len(proc.records):]:
                    try:
                        proc.records.append(json.loads(line))
                    except ValueError:
                        proc.records.append({})
                    proc.line_times.append(now)
                if copy_to:
                    write_text_atomic(copy_to, complete)
        return poll

    def cifar_run(self, cmd, name, run_dir, timeout, copy_to=None):
        shutil.rmtree(run_dir, ignore_errors=True)   # a fresh run (log.txt appends)
        proc = self.start(cmd, name)
        poll = self.watch(proc, run_dir, copy_to)
        status = self.wait(proc, timeout, poll)
        poll()
        with open(proc.out_path, errors='replace') as f:
            proc.output = f.read()
        return status, proc

    def part_cifar(self, timeout, record, ref=False):
        deadline = time.time() + timeout
        if self.cifar_data is None:
            return 'skipped (no CIFAR-10 data)'
        if not self.background_done('cifar', max(1.0, deadline - time.time())):
            return 'failed (unpacking CIFAR-10)'
        self.cifar_data = find_split_folder(self.cifar_data)
        self.results['cifar_data'] = self.cifar_data
        a = self.args
        name = 'cifar_ref' if ref else 'cifar'
        numerics = ORIGINAL if ref else FAST
        target = a.cifar_ref_epochs if ref else a.cifar_epochs
        knn_freq = a.knn_freq
        cal_epochs = 3 if self.dry else 4
        record['numerics'] = ' '.join(numerics)
        # 1. calibration: start-up, epoch and kNN times
        cal_dir = os.path.join(self.work, f'{name}_calibration')
        cmd = self.cifar_cmd(numerics, cal_epochs, cal_epochs, cal_dir)
        status, proc = self.cifar_run(cmd, f'{name}_calibration', cal_dir, deadline - time.time() - PLOT_RESERVE_S)
        if status != 'ok':
            print(self.tail(proc.output), flush=True)
            return f'calibration {status}'
        cal = calibrate(proc.t_launch, proc.line_times, proc.t_exit)
        record['calibration'] = {k: round(v, 2) for k, v in cal.items()}
        record['calibration_s'] = round(proc.t_exit - proc.t_launch, 1)
        record['precision'] = next((line.split(':', 1)[1].strip() for line in proc.output.splitlines()
                                    if line.startswith('precision:')), None)
        record['pipeline_line'] = next((line.strip() for line in proc.output.splitlines()
                                        if 'data pipeline)' in line), None)
        full = 200 if not self.dry else target
        record['projected_full_s'] = round(run_seconds(full, cal, knn_freq), 1)
        record['projected_full_epochs'] = full
        available = deadline - time.time() - PLOT_RESERVE_S
        epochs = fit_epochs(available, cal, knn_freq, target)
        record.update(target_epochs=target, available_s=round(available, 1), epochs=epochs,
                      projected_s=round(run_seconds(epochs, cal, knn_freq), 1) if epochs else None)
        self.note(f'{name}: calibration {cal["epoch_s"]:.2f} s/epoch, start-up {cal["startup_s"]:.1f} s, kNN '
                  f'{cal["knn_s"]:.1f} s; projected {full} epochs: {record["projected_full_s"] / 60:.1f} min; '
                  f'{available:.0f} s left: {epochs} of {target} epochs fit')
        self.save()
        if epochs == 0:
            record['result'] = 'no epoch fits in the time left'
            return 'skipped (no epoch fits)'
        # 2. the run
        run_dir = os.path.join(self.work, name)
        cmd = self.cifar_cmd(numerics, epochs, knn_freq, run_dir)
        record['command'] = shlex.join(cmd)
        status, proc = self.cifar_run(cmd, name, run_dir, max(1.0, deadline - time.time() - PLOT_RESERVE_S),
                                      copy_to=os.path.join(self.out, f'{name}_log.txt'))
        self.summarise_run(record, proc, cal, knn_freq, full)
        if status != 'ok':
            print(self.tail(proc.output), flush=True)
        # 3. curves of both runs
        self.cifar_runs.append(name)
        runs = [(n, os.path.join(self.work, n)) for n in self.cifar_runs
                if os.path.isfile(os.path.join(self.work, n, 'log.txt'))]   # this check's runs only
        if runs:
            labels = ['fast (--fast, bf16, memory)' if n == 'cifar' else 'original numerics (fp16, reference)'
                      for n, _ in runs]
            plot = [sys.executable, '-m', 'moco.tools.plot', *[d for _, d in runs], '--labels', *labels,
                    '--title', 'CIFAR-10 (JPEG), ResNet-18, MoCo v3', '--out', os.path.join(self.out, 'curves.png')]
            plot_status, output, _ = self.run(plot, f'{name}_plot', max(10.0, deadline - time.time()))
            record['plot'] = plot_status
        return status

    def summarise_run(self, record, proc, cal, knn_freq, full):
        recs = proc.records
        epochs = [r for r in recs if r.get('epoch', 0) > 0 and 'train_loss' in r]
        knn = [(r['epoch'], r['knn_top1']) for r in recs if 'knn_top1' in r]
        record['epochs_done'] = epochs[-1]['epoch'] if epochs else 0
        record['knn'] = knn
        record['final_loss'] = epochs[-1]['train_loss'] if epochs else None
        record['wall_s'] = round(proc.t_exit - proc.t_launch, 1)
        times = proc.line_times
        plain = [b - a for a, b, r in zip(times[:-1], times[1:], recs[1:]) if 'knn_top1' not in r]
        if len(plain) > 1:
            plain = sorted(plain[1:])   # not the first epoch (warm-up)
            epoch_s = plain[len(plain) // 2]
            measured = dict(cal, epoch_s=epoch_s, startup_s=times[0] - proc.t_launch)
            record['measured_epoch_s'] = round(epoch_s, 3)
            record['projected_full_s_measured'] = round(run_seconds(full, measured, knn_freq), 1)
        knn_text = f"kNN {knn[-1][1]:.2f} at epoch {knn[-1][0]}" if knn else 'no kNN'
        record['result'] = (f"{record['epochs_done']}/{record['epochs']} epochs, {knn_text}, "
                            f"{record['wall_s'] / 60:.1f} min; projected {full} epochs "
                            f"{record.get('projected_full_s_measured', record['projected_full_s']) / 60:.1f} min")

    # -- the summary
    def summary(self):
        r = self.results
        lines = [f"# GPU check ({'dry run on CPU' if self.dry else r.get('device', '?')})", '',
                 f"Started {r['started']}; {r.get('device', '?')}; torch {r.get('torch', '?')}; budget "
                 f"{r['budget_s'] / 60:.1f} min; {self.elapsed():.0f} s so far. Command: `{shlex.join(r['command'])}`",
                 '', '| part | status | seconds (limit) | result |', '|---|---|---|---|']
        for name in self.parts:
            p = r['parts'].get(name)
            if p is None:
                lines.append(f'| {name} | not reached | | |')
                continue
            lines.append(f"| {name} | {p.get('status', 'running')} | {p.get('seconds', '')} ({p.get('timeout_s', '')}) "
                         f"| {p.get('result', '')} |")
        rows = [row for k in ('bench', 'bench_compiled') for row in self.bench_rows.get(k, [])]
        if rows:
            ref = {(x['model'], x['batch'], x['input']): x['images_per_s'] for x in rows if x['config'] == 'reference'}
            lines += ['', f'Bench (python -m moco.tools.bench; TFLOP/s of the model step; peak {PEAK_TFLOPS} TFLOP/s):', '',
                      '| model | batch | input | config | precision | img/s | TFLOP/s | of peak | peak GiB | vs ref '
                      '| target |', '|---|---|---|---|---|---|---|---|---|---|---|']
            for x in rows:
                vs = x['images_per_s'] / ref[(x['model'], x['batch'], x['input'])] \
                    if (x['model'], x['batch'], x['input']) in ref else None
                target = TARGETS.get((x['model'], x['batch']))
                met = ''
                if target and x['config'] != 'reference' and x['input'] == 'synthetic':
                    ok = x['images_per_s'] >= target['images_per_s'] and (
                        'peak_gib' not in target or x['peak_gib'] is None or x['peak_gib'] <= target['peak_gib'])
                    met = f"{'met' if ok else 'missed'} (>= {target['images_per_s']})"
                inp = x['input'] + (f"/{x['pipeline']}" if x.get('pipeline') else '')
                lines.append(f"| {x['model']} | {x['batch']} | {inp} | {x['config']} | {x['precision']} | "
                             f"{x['images_per_s']:.0f} | {x['model_tflops']:.1f} | {x['fraction_of_peak']:.1%} | "
                             f"{'-' if x['peak_gib'] is None else round(x['peak_gib'], 1)} | "
                             f"{'' if vs is None else f'{vs:.2f}x'} | {met} |")
        pipeline = r['parts'].get('pipeline', {}).get('rows')
        if pipeline:
            lines += ['', f"Reference pipeline (python -m moco.tools.bench --pipeline; {r['parts']['pipeline'].get('cpu')}; "
                          f"views identical to the original's: {r['parts']['pipeline'].get('identical_views')}):", '',
                      '| row | config | img/s | of the original / of the transform alone |', '|---|---|---|---|']
            for x in pipeline:
                if x['kind'] == 'transform':
                    lines.append(f"| transform, 1 core | {x['config']} | {x['images_per_s_per_core']:.1f} | "
                                 f"{x['vs_original']:.2f}x |")
                elif x['kind'] == 'loader':
                    lines.append(f"| loader, -j {x['workers']} | {x['config']} | {x['images_per_s']:.1f} | "
                                 f"{x['of_transform_alone']:.0%} |")
                else:
                    lines.append(f"| {x['kind']} on {x.get('device')} | {x['config']} | {x['images_per_s']:.1f} | |")
        for name in ('cifar', 'cifar_ref'):
            p = r['parts'].get(name, {})
            if 'calibration' not in p:
                continue
            c = p['calibration']
            lines += ['', f"CIFAR-10 {name} ({p.get('numerics')}; precision {p.get('precision')}; "
                          f"{p.get('pipeline_line')}):",
                      f"calibration ({p.get('calibration_s')} s): start-up {c['startup_s']} s (with the first kNN), "
                      f"{c['epoch_s']} s/epoch, first epoch +{c['first_epoch_extra_s']} s, kNN {c['knn_s']} s; "
                      f"projected {p.get('projected_full_epochs')} epochs: "
                      f"{p.get('projected_full_s', 0) / 60:.1f} min; "
                      f"{p.get('epochs')} of {p.get('target_epochs')} epochs fit in {p.get('available_s')} s "
                      f"(projected {p.get('projected_s')} s)."]
            if 'epochs_done' in p:
                measured = 'too few epochs to measure the epoch time again' if 'measured_epoch_s' not in p else \
                    (f"measured {p['measured_epoch_s']} s/epoch, projected {p.get('projected_full_epochs')} epochs "
                     f"from it: {p['projected_full_s_measured'] / 60:.1f} min")
                lines.append(f"run: {p['epochs_done']} epochs in {p['wall_s']} s; {measured}; final loss "
                             f"{p.get('final_loss')}; kNN top-1 by epoch: "
                             + ', '.join(f'{e}: {v:.2f}' for e, v in p['knn']))
                lines.append(f"command: `{p.get('command')}`")
        fast, ref = r['parts'].get('cifar', {}), r['parts'].get('cifar_ref', {})
        if ref.get('knn') and fast.get('knn'):
            e_ref, k_ref = ref['knn'][-1]
            at = [(e, v) for e, v in fast['knn'] if e <= e_ref]
            if at:
                e_fast, k_fast = at[-1]
                lines += ['', f"fast vs original numerics: kNN {k_fast:.2f} (fast, epoch {e_fast} of "
                              f"{fast.get('epochs')}) vs {k_ref:.2f} (original, epoch {e_ref} of {ref.get('epochs')}); "
                              'equal schedules only when both runs have the same --epochs']
        return '\n'.join(lines) + '\n'

    def main(self):
        try:
            import torch
            self.results['torch'] = torch.__version__
            self.results['device'] = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not self.dry \
                else f'CPU ({os.cpu_count()} cores)'
        except Exception as e:   # noqa: BLE001
            self.results['device'] = f'unknown ({e})'
        if not self.dry and self.results['device'].startswith('CPU'):
            self.note('warning: no CUDA device; this is not a GPU measurement (use --dry-run on CPU)')
        try:
            commit = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=ROOT, capture_output=True, text=True, timeout=10)
            self.results['git_commit'] = commit.stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            self.results['git_commit'] = None
        self.note(f"gpu_check: {self.results['device']}, torch {self.results.get('torch')}, budget "
                  f"{self.args.budget_min:.1f} min, parts {','.join(self.parts)}; results in {self.out}")
        self.save()
        self.prepare()
        fns = {'tests': self.part_tests, 'bench': self.part_bench, 'monitors': self.part_monitors,
               'pipeline': self.part_pipeline,
               'profile': self.part_profile,
               'bench_compiled': self.part_bench_compiled, 'cifar': self.part_cifar,
               'cifar_ref': lambda timeout, record: self.part_cifar(timeout, record, ref=True)}
        for name in self.parts:
            self.part(name, fns[name])
        for name, proc in self.background.items():   # nothing left running behind us
            if getattr(proc, 't_exit', None) is None:
                self.stop(proc)
                self.note(f'{name} preparation stopped (unused)')
        self.results['seconds'] = round(self.elapsed(), 1)
        self.save()
        self.log.close()
        extra = sorted(set(os.listdir(self.out)) - set(RESULT_FILES))
        if extra:
            print(f'warning: unexpected files in {self.out}: {extra}')
        print('\n' + self.summary(), flush=True)
        failed = [n for n, p in self.results['parts'].items()
                  if not (p.get('status', '').startswith(('ok', 'skipped')))]
        return 1 if failed else 0


def parse_timeouts(text):
    out = {}
    for item in filter(None, (text or '').split(',')):
        name, _, seconds = item.partition('=')
        if name not in PARTS:
            raise argparse.ArgumentTypeError(f'unknown part {name!r} (parts: {", ".join(PARTS)})')
        out[name] = float(seconds)
    return out


def parse_parts(text):
    parts = [p for p in text.split(',') if p]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise argparse.ArgumentTypeError(f'unknown part(s) {unknown} (parts: {", ".join(PARTS)})')
    return parts


def get_args(argv=None):
    p = argparse.ArgumentParser(prog='python -m moco.tools.gpu_check', description=__doc__.splitlines()[0])
    p.add_argument('--dry-run', action='store_true', help='the same parts on CPU with tiny stand-ins (CI)')
    p.add_argument('--budget-min', type=float, default=None,
                   help='minutes for all parts (default 9; dry run 30: a limit only, its parts take what they need)')
    p.add_argument('--parts', type=parse_parts, default=list(PARTS),
                   help=f'comma-separated, of {",".join(PARTS)} (default: all)')
    p.add_argument('--part-timeout', type=parse_timeouts, default={}, metavar='PART=S,...',
                   help='seconds for a part instead of its share of the budget')
    p.add_argument('--out', default=None, help='results folder (default: $OUT if set, else output/gpu_check, '
                                               'dry run output/gpu_check_dry)')
    p.add_argument('--work-dir', default=None,
                   help='data, JPEGs, run folders (default /tmp/moco_gpu_check, dry run /tmp/moco_gpu_check_dry)')
    p.add_argument('--cifar-tar', default=None,
                   help=f'CIFAR-10 JPEG tarball (default: {CARRIED_TAR}; dry run: one made '
                        'from the shipped demo data)')
    p.add_argument('--cifar-dir', default=None, help='an unpacked CIFAR-10 folder with train/ and val/ (no tarball)')
    p.add_argument('--cifar-epochs', type=int, default=None,
                   help='epochs of the fast run if they fit (default 200; dry 4)')
    p.add_argument('--cifar-ref-epochs', type=int, default=None,
                   help='epochs of the original-numerics run if they fit (default 50; dry 2)')
    p.add_argument('--knn-freq', type=int, default=None, help='kNN every N epochs (default 20; dry 2)')
    args = p.parse_args(argv)
    dry = args.dry_run
    args.budget_min = args.budget_min or (30.0 if dry else 9.0)
    args.out = args.out or (os.path.join(ROOT, 'output', 'gpu_check_dry') if dry else
                            os.environ.get('OUT') or os.path.join(ROOT, 'output', 'gpu_check'))
    args.work_dir = args.work_dir or ('/tmp/moco_gpu_check_dry' if dry else '/tmp/moco_gpu_check')
    args.cifar_epochs = args.cifar_epochs or (4 if dry else 200)
    args.cifar_ref_epochs = args.cifar_ref_epochs or (2 if dry else 50)
    args.knn_freq = args.knn_freq or (2 if dry else 20)
    for name in ('out', 'work_dir', 'cifar_tar', 'cifar_dir'):
        if getattr(args, name):
            setattr(args, name, os.path.abspath(getattr(args, name)))
    return args


def main(argv=None):
    return Check(get_args(argv)).main()


if __name__ == '__main__':
    sys.exit(main())
