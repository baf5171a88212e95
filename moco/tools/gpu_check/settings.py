"""The GPU check's fixed numbers: the budget plan, the benchmark's models and README "Speed" targets, the
CIFAR-10 recipe of CONFIG.md, the dry run's stand-ins and the result files."""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
# ROOT: the repository root (moco/tools/gpu_check/settings.py is four levels below it); commands run there

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
