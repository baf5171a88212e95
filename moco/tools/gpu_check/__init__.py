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
JPEGs, the pipeline on 8 JPEGs at -j 1, the aot_eager compile backend (inductor's C++ build takes minutes
on a CPU), the profile always;
CIFAR from a tarball of 80 + 40 images of the shipped demo data, resnet10_w32 at batch 16, calibration
3 epochs, then 4 and 2 epochs with kNN every 2; --amp auto instead of --amp fp16 (fp16 needs CUDA; on
CUDA auto is fp16 with a GradScaler, the same); no --gpu 0; one thread per process; a 30-minute budget
(a limit only: the parts take what they need, 3-6 minutes on 2 shared cores).

The package: settings.py (the numbers above, the CIFAR-10 recipe, the result files), budget.py (the
time and epoch arithmetic), commands.py (the command lines), runner.py (each command time-boxed, a
JobRecord per job), data.py (the background preparation), parts.py (PARTS: one function per part) with
cifar.py (the CIFAR-10 parts), summary.py (results.json -> summary.md), check.py (the parts in order)
and cli.py (the flags).
"""
from .budget import calibrate, fit_epochs, knn_evaluations, part_timeout, run_seconds
from .check import Check, run_check, run_part
from .cli import get_args, main, parse_parts, parse_timeouts
from .commands import bench_cmd, cifar_cmd, with_flags
from .data import dry_tarball, find_split_folder, unpack_command
from .parts import PARTS
from .runner import JobRecord, Runner
from .settings import (
    CARRIED_TAR,
    CIFAR_RECIPE,
    DRY_CIFAR,
    DRY_MODELS,
    DRY_PER_CLASS,
    FAST,
    FILES_VS_STEP,
    FIT_MARGIN,
    GPU_MODELS,
    KILL_GRACE_S,
    MIN_SECONDS,
    ORIGINAL,
    PEAK_TFLOPS,
    PLOT_RESERVE_S,
    RESERVE,
    RESULT_FILES,
    ROOT,
    SHARE,
    TAIL,
    TARGETS,
)
from .summary import render_summary
from .targets import missed_targets

__all__ = ['CARRIED_TAR', 'CIFAR_RECIPE', 'DRY_CIFAR', 'DRY_MODELS', 'DRY_PER_CLASS', 'FAST', 'FILES_VS_STEP',
           'FIT_MARGIN', 'GPU_MODELS', 'KILL_GRACE_S', 'MIN_SECONDS', 'ORIGINAL', 'PARTS', 'PEAK_TFLOPS',
           'PLOT_RESERVE_S', 'RESERVE', 'RESULT_FILES', 'ROOT', 'SHARE', 'TAIL', 'TARGETS',
           'Check', 'JobRecord', 'Runner', 'bench_cmd', 'calibrate', 'cifar_cmd', 'dry_tarball', 'find_split_folder',
           'fit_epochs', 'get_args', 'knn_evaluations', 'main', 'missed_targets', 'parse_parts', 'parse_timeouts',
           'part_timeout', 'render_summary', 'run_check', 'run_part', 'run_seconds', 'unpack_command', 'with_flags']
