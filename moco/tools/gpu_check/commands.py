"""The command lines the GPU check runs, as pure functions of what they need (``dry``: the tiny CPU
stand-ins of --dry-run). Run from the repository root."""
import os
import sys

from .settings import CIFAR_RECIPE, DRY_CIFAR, DRY_MODELS, GPU_MODELS, PEAK_TFLOPS

BENCH = [sys.executable, '-m', 'moco.tools.bench']
TINY = ['--tiny', '--image-size', '16']


def with_flags(args, overrides):
    """args with each flag of overrides set to its value (replaced where present, else appended)."""
    args = list(args)
    for flag, value in overrides.items():
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    return args


def loader_workers(dry, most=16):
    return 1 if dry else min(most, os.cpu_count() or 1)


def tests_cmd(selection):
    """The CUDA-only tests whose names match pytest's -k ``selection``."""
    return [sys.executable, '-m', 'pytest', '-v', '-rs', '-p', 'no:cacheprovider', 'tests/test_gpu.py', '-k', selection]


def fullsize_jpegs_cmd(folder, dry=False):
    """Makes the ImageNet-sized JPEGs of the end-to-end bench rows (in the background)."""
    return BENCH + ['--fullsize-jpegs', folder, '--prepare-only', '--fullsize-count', str(24 if dry else 2048)]


def bench_cmd(out_json, configs, inputs=None, *, dry=False):
    """python -m moco.tools.bench of the models for ``configs`` (the compiled row: the first dry model only)."""
    models = (DRY_MODELS if configs != ['ours_compiled'] else DRY_MODELS[:1]) if dry else GPU_MODELS
    cmd = BENCH + ['--models', *models, '--configs', *configs, '--peak-tflops', str(PEAK_TFLOPS),
                   '-j', str(loader_workers(dry)), '--warmup', str(1 if dry else 5), '--steps', str(1 if dry else 20),
                   '--out', out_json]
    if dry:
        cmd += TINY
    if inputs:
        cmd += ['--inputs', *inputs]
    return cmd


def eager_bench_cmd(out_json, fullsize_folder, *, dry=False):
    """Reference and ours, synthetic and end to end from the fullsize JPEGs."""
    return bench_cmd(out_json, ['reference', 'ours'], dry=dry) + ['--fullsize-jpegs', fullsize_folder]


def profile_cmd(out_json, models, profile_txt, *, dry=False):
    """A few profiled steps of ours on synthetic input for ``models``."""
    cmd = bench_cmd(out_json, ['ours'], ['synthetic'], dry=dry) + ['--profile', profile_txt]
    cmd = with_flags(cmd, {'--warmup': '1' if dry else '3', '--steps': '1' if dry else '5'})
    cmd[cmd.index('--models') + 1:cmd.index('--configs')] = list(models)
    return cmd


def compiled_bench_cmd(out_json, *, dry=False):
    """Ours with torch.compile on synthetic input (aot_eager in the dry run: inductor's C++ build takes minutes
    on a CPU)."""
    return bench_cmd(out_json, ['ours_compiled'], ['synthetic'], dry=dry) + \
        ['--compile-backend', 'aot_eager' if dry else 'inductor']


def monitors_cmd(out_json, *, dry=False):
    """Our vit_small step without the gradient monitors and with them at print frequency 10 and 1."""
    models = DRY_MODELS[1:] if dry else ('vit_small:256',)
    cmd = BENCH + ['--monitors', '--models', *models, '--out', out_json,
                   '--warmup', '1' if dry else '3', '--steps', '2' if dry else '20']
    return cmd + TINY if dry else cmd


def pipeline_cmd(out_json, *, dry=False):
    """The reference pipeline's two-view transform per core against the original's, and the loader."""
    cmd = BENCH + ['--pipeline', '--out', out_json, '--loader-rounds', '1']
    return cmd + (['--images', '8', '--rounds', '1', '--loader-workers', '1', '--loader-batch', '4'] if dry else
                  ['--images', '96', '--rounds', '2', '--loader-workers', '1', str(min(8, os.cpu_count() or 1))])


def cifar_cmd(numerics, epochs, knn_freq, output_dir, data, *, dry=False):
    """main_moco.py with the CONFIG.md CIFAR-10 recipe (tiny in the dry run, --amp auto for fp16, which needs
    CUDA) and the ``numerics`` flags."""
    recipe = with_flags(CIFAR_RECIPE, DRY_CIFAR) if dry else list(CIFAR_RECIPE)
    numerics = with_flags(numerics, {'--amp': 'auto'}) if dry and '--amp' in numerics else numerics
    cmd = [sys.executable, 'main_moco.py', *recipe, *numerics, '--epochs', str(epochs), '--knn-freq', str(knn_freq),
           '--keep-checkpoints', '1', '-p', '20', '-j', str(loader_workers(dry)), '--output-dir', output_dir]
    if not dry:
        cmd += ['--gpu', '0']
    return cmd + [data]


def plot_cmd(run_dirs, labels, out_png):
    """The kNN and loss curves of the CIFAR-10 runs."""
    return [sys.executable, '-m', 'moco.tools.plot', *run_dirs, '--labels', *labels,
            '--title', 'CIFAR-10 (JPEG), ResNet-18, MoCo v3', '--out', out_png]
