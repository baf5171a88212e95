"""Which tests notice a wrong implementation? Applies, one at a time, small mutations of the code to a
copy of the working tree, runs there the tests that should notice, and reports for each whether they
fail (caught) or pass (missed).

    .venv/bin/python tests/tools/mutate.py              # every mutation (about 6 minutes on 2 cores)
    .venv/bin/python tests/tools/mutate.py -k views:    # the views only (about 4 minutes)
    .venv/bin/python tests/tools/mutate.py -k hue       # the mutations whose name contains 'hue'

Groups: 'views' (the random parameters and ops of the in-memory and GPU pipelines, moco/data/tensor_views.py,
and the reference pipeline's, moco/data/views.py and pil_ops.py), 'step' (bf16, moco/amp.py), 'bench'
(moco/tools/bench.py), 'dist' (what each process reads and decides with two processes) and 'faults'
(foreign checkpoints, a dying peer under torchrun). Exit status 0 when every mutation is caught, 1
when one is missed or no longer applies (its source text changed: update the mutation). Not a test
itself: pytest does not collect tests/tools/.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TA, GPU, MEM = 'moco/data/tensor_views.py', 'moco/data/gpu.py', 'moco/data/memory.py'
DATA, SAMPLER = 'moco/data/views.py', 'moco/data/sampler.py'
AMP, DIST, BENCH, CKPT = 'moco/amp.py', 'moco/dist.py', 'moco/tools/bench.py', 'moco/checkpoint.py'
PIL_OPS, LAUNCH = 'moco/data/pil_ops.py', 'moco/launch.py'

VIEW_TESTS = ('tests/test_data_view_params.py', 'tests/test_data_tensor_views.py', 'tests/test_data_memory.py',
              'tests/test_data_gpu.py::test_gpu_loader_views_are_the_sampled_views')
REFERENCE_TESTS = ('tests/test_data_views.py',)
PIL_OPS_TESTS = ('tests/test_data_pil_ops.py',)
BF16_TEST = ('tests/test_fast_step.py::test_bf16_autocast_step_is_close_to_float32',)
BENCH_TESTS = ('tests/test_bench.py::test_step_flops_count_forward_and_backward_per_image',
               'tests/test_bench.py::test_step_flops_of_a_real_model_are_per_image',
               'tests/test_bench.py::test_reference_and_ours_are_the_documented_configurations',
               'tests/test_bench.py::test_timed_counts_only_the_timed_steps')
NONFINITE_TEST = ('tests/test_distributed.py::test_a_nonfinite_loss_on_one_process_skips_the_step_on_every_process',)
PAIRING_TESTS = ('tests/test_distributed.py::test_each_image_is_read_as_with_one_process',)
FOREIGN_TEST = ('tests/test_cli_faults.py::test_foreign_and_wrong_arch_checkpoints_are_one_line_errors',)
TORCHRUN_TEST = ('tests/test_cli_faults.py::test_torchrun_job_ends_when_a_worker_dies',)

JITTER_ORDER = 'order=torch.argsort(torch.rand(n, 4, generator=generator), dim=1)'
GRAY_OP = "    if p['gray'].any():\n        x = _apply(p['gray'], d['gray'], x, lambda y: grayscale(y).expand_as(y))\n"
BLUR_OP = ("    if p['blur'].any():\n        radius = blur_radius(p['sigma'])\n"
           "        x = _apply(p['blur'], d['blur'], x, lambda y, sigma: gaussian_blur(y, sigma, radius), "
           "d['sigma'])\n")
SOLARIZE_OP = "    if p['solarize'].any():\n        x = _apply(p['solarize'], d['solarize'], x, solarize)\n"
JITTER_OP = '    x = color_jitter(x, p, d)\n'

# name, file, [(old, new), ...] (each ``old`` must occur exactly once in the file), the tests to run
MUTATIONS = [
    ('views: grayscale never drawn', TA, [('gray=coin(0.2)', 'gray=coin(0.0)')], VIEW_TESTS),
    ('views: grayscale p 0.5', TA, [('gray=coin(0.2)', 'gray=coin(0.5)')], VIEW_TESTS),
    ('views: grayscale op skipped', TA, [("    if p['gray'].any():", '    if False:')], VIEW_TESTS),
    ('views: colour jitter never drawn', TA, [('jitter=coin(0.8)', 'jitter=coin(0.0)')], VIEW_TESTS),
    ('views: colour jitter always applied', TA, [('jitter=coin(0.8)', 'jitter=coin(1.0)')], VIEW_TESTS),
    ('views: colour jitter op skipped', TA, [(JITTER_OP, '    pass\n')], VIEW_TESTS),
    ('views: flip never drawn', TA, [('flip=coin(0.5)', 'flip=coin(0.0)')], VIEW_TESTS),
    ('views: flip op skipped', TA, [("    x = _where(d['flip'], x.flip(3), x)\n", '    pass\n')], VIEW_TESTS),
    ('views: flip upside down', TA, [('x.flip(3)', 'x.flip(2)')], VIEW_TESTS),
    ('views: hue never drawn', TA, [('hue=torch.empty(n).uniform_(-0.1, 0.1, generator=generator)',
                                     'hue=torch.zeros(n)')], VIEW_TESTS),
    ('views: hue op skipped', TA, [("('hue', adjust_hue))", "('hue', lambda images, factor: images))")],
     VIEW_TESTS),
    ('views: hue range halved', TA, [('uniform_(-0.1, 0.1,', 'uniform_(-0.05, 0.05,')], VIEW_TESTS),
    ('views: brightness range (0.8, 1.2)', TA, [('brightness=torch.empty(n).uniform_(0.6, 1.4,',
                                                 'brightness=torch.empty(n).uniform_(0.8, 1.2,')], VIEW_TESTS),
    ('views: saturation range (0.6, 1.4)', TA, [('saturation=torch.empty(n).uniform_(0.8, 1.2,',
                                                 'saturation=torch.empty(n).uniform_(0.6, 1.4,')], VIEW_TESTS),
    ('views: blur sigma range (0.1, 1.0)', TA, [('sigma=torch.empty(n).uniform_(0.1, 2.0,',
                                                 'sigma=torch.empty(n).uniform_(0.1, 1.0,')], VIEW_TESTS),
    ('views: jitter order fixed', TA, [(JITTER_ORDER, 'order=torch.arange(4).repeat(n, 1)')], VIEW_TESTS),
    ('views: jitter order one per batch', TA, [(JITTER_ORDER,
                                                'order=torch.randperm(4, generator=generator).repeat(n, 1)')],
     VIEW_TESTS),
    ('views: jitter order ignored by the op', TA, [("(p['order'][:, position] == op_index)", '(position == op_index)'),
                                                   ("(d['order'][:, position] == op_index)", '(position == op_index)')],
     VIEW_TESTS),
    ('views: a jitter factor shared by the batch', TA, [
        ('contrast=torch.empty(n).uniform_(0.6, 1.4, generator=generator)',
         'contrast=torch.empty(1).uniform_(0.6, 1.4, generator=generator).expand(n)')], VIEW_TESTS),
    ('views: coins shared by the batch', TA, [('return torch.rand(n, generator=generator) < p',
                                               'return (torch.rand(1, generator=generator) < p).expand(n)')],
     VIEW_TESTS),
    ('views: crop_min 0.5', TA, [('sample_crops(n, height, width, (crop_min, 1.)',
                                  'sample_crops(n, height, width, (0.5, 1.)')], VIEW_TESTS),
    ('views: crop_min ignored by sample_two_views', TA, [
        ('sample_view_params(n, height, width, crop_min, 1.0 if blur',
         'sample_view_params(n, height, width, 0.08, 1.0 if blur'),
        ('sample_view_params(n, height, width, crop_min, 0.1 if blur',
         'sample_view_params(n, height, width, 0.08, 0.1 if blur')], VIEW_TESTS),
    ('views: aspect ratio (0.6, 1.67)', TA, [('ratio=(3 / 4, 4 / 3)', 'ratio=(0.6, 1.67)')], VIEW_TESTS),
    ('views: solarize in view 1', TA, [('1.0 if blur else 0., 0., generator', '1.0 if blur else 0., 0.2, generator')],
     VIEW_TESTS),
    ('views: view 2 blur p 0.5', TA, [('0.1 if blur else 0., 0.2, generator', '0.5 if blur else 0., 0.2, generator')],
     VIEW_TESTS),
    ('views: blur kept without blur', TA, [('0.1 if blur else 0., 0.2, generator', '0.1, 0.2, generator')],
     VIEW_TESTS),
    ('views: grayscale before jitter', TA, [(JITTER_OP + GRAY_OP, GRAY_OP + JITTER_OP)], VIEW_TESTS),
    ('views: solarize before blur', TA, [(BLUR_OP + SOLARIZE_OP, SOLARIZE_OP + BLUR_OP)], VIEW_TESTS),
    ('views: no normalisation', TA, [('    return normalize(x)\n\n\ndef sample_two_views',
                                      '    return x\n\n\ndef sample_two_views')], VIEW_TESTS),
    ('views: memory pipeline ignores crop_min', TA, [('sample_two_views(n, h, w, crop_min, blur, generator)',
                                                      'sample_two_views(n, h, w, 0.08, blur, generator)')],
     VIEW_TESTS),
    ('views: memory loader always blurs', MEM, [('self.crop_min, self.blur, generator)',
                                                 'self.crop_min, True, generator)')], VIEW_TESTS),
    ('views: GPU pipeline ignores crop_min', GPU, [('self.image_size, self.crop_min, self.blur, generator)',
                                                    'self.image_size, 0.08, self.blur, generator)')], VIEW_TESTS),
    ('views: GPU loader always blurs', GPU, [('self.image_size, self.crop_min, self.blur, generator)',
                                              'self.image_size, self.crop_min, True, generator)')], VIEW_TESTS),
    ('views: reference grayscale p 0.5', DATA, [('_float32(0.8), _float32(0.2)', '_float32(0.8), _float32(0.5)')],
     REFERENCE_TESTS),
    ('views: reference without hue', DATA, [('JITTER = transforms.ColorJitter(0.4, 0.4, 0.2, 0.1)',
                                             'JITTER = transforms.ColorJitter(0.4, 0.4, 0.2, 0.)')], REFERENCE_TESTS),
    ('views: reference never flips', DATA, [('        if _draw() < 0.5:\n', '        if _draw() < 0.:\n')],
     REFERENCE_TESTS),
    ('views: reference probabilities compared in float64', DATA, [('    return float(np.float32(p))\n',
                                                                   '    return float(p)\n')], REFERENCE_TESTS),
    ('views: reference brightness and saturation ranges swapped', DATA, [
        ('(_uniform(*JITTER.brightness), _uniform(*JITTER.contrast),',
         '(_uniform(*JITTER.saturation), _uniform(*JITTER.contrast),'),
        ('_uniform(*JITTER.saturation), _uniform(*JITTER.hue))',
         '_uniform(*JITTER.brightness), _uniform(*JITTER.hue))')],
     REFERENCE_TESTS),
    ('views: reference blend table of black', PIL_OPS, [("Image.new('L', (256, 1), level)",
                                                         "Image.new('L', (256, 1), 0)")], PIL_OPS_TESTS),
    ('views: reference blur reads what it writes', PIL_OPS, [('            src, dst = dst, src\n', '')], PIL_OPS_TESTS),
    ('views: reference blur edges not refreshed', PIL_OPS, [('            _extend_edges(src, axis, margin)\n', '')],
     PIL_OPS_TESTS),
    ('views: reference solarize from 127', PIL_OPS, [('    flipped = pixels >> 7\n',
                                                      '    flipped = (pixels >= 127).view(np.uint8)\n')],
     PIL_OPS_TESTS),
    ('step: bf16 autocast does nothing', AMP, [('        if self.dtype is None:\n', '        if True:\n')],
     BF16_TEST),
    ('bench: FLOPs of the forward only', BENCH, [('            loss = model(x, x, 0.99)\n        loss.backward()\n',
                                                  '            loss = model(x, x, 0.99)\n    loss.backward()\n')],
     BENCH_TESTS),
    ('bench: FLOPs per batch, not per image', BENCH, [('get_total_flops() / 2', 'get_total_flops()')], BENCH_TESTS),
    ('bench: ours without bf16', BENCH, [("Amp('auto', device, fast=ours)", "Amp('auto', device)")], BENCH_TESTS),
    ('bench: ours without channels_last', BENCH, [('torch.channels_last if ours and not',
                                                   'torch.channels_last if False and not')], BENCH_TESTS),
    ('bench: warm-up steps timed', BENCH, [
        ('        it = iter(batches)\n        for _ in range(warmup):',
         '        it = iter(batches)\n        tic = time.perf_counter()\n        for _ in range(warmup):'),
        ('            torch.cuda.reset_peak_memory_stats()\n        tic = time.perf_counter()\n',
         '            torch.cuda.reset_peak_memory_stats()\n')],
     BENCH_TESTS),
    ('dist: a non-finite loss decided per process', DIST, [('        tdist.all_reduce(flag, op=tdist.ReduceOp.MIN)\n',
                                                            '        pass\n')], NONFINITE_TEST),
    # a bijection of the positions that depends on the number of processes: the seeds of an epoch are the
    # same set with one or two processes, and a resume repeats them, but images are paired with others
    ('dist: views paired with another position', SAMPLER, [
        ('yield order[pos % self.n], sample_seed(self.seed, self.epoch, pos)',
         'yield order[pos % self.n], sample_seed(self.seed, self.epoch, '
         '(pos + self.world_size - 1) % self._positions().stop)')], PAIRING_TESTS),
    ('faults: --resume reads any dict', CKPT, [('    missing = [k for k in keys if k not in ckpt]\n',
                                                '    missing = []\n')], FOREIGN_TEST),
    ('faults: a dead peer is a traceback', LAUNCH, [
        ("_PEER_FAILURES = ('Connection reset by peer', 'Connection closed by peer', ", '_PEER_FAILURES = (')],
     TORCHRUN_TEST),
]


def _copy_tree(dest):
    ignore = shutil.ignore_patterns('.venv*', '.git', '.gpu_data', 'output', 'runs', '__pycache__', '.pytest_cache',
                                    '.ruff_cache', '*.pyc')
    shutil.copytree(ROOT, dest, ignore=ignore, dirs_exist_ok=True)


def _apply(root, path, edits):
    """Mutate root/path in place; returns None, or why the mutation cannot be applied."""
    full = os.path.join(root, path)
    with open(full) as f:
        text = f.read()
    for old, new in edits:
        if text.count(old) != 1:
            return f'{old[:60]!r} occurs {text.count(old)} times in {path}'
        text = text.replace(old, new)
    with open(full, 'w') as f:
        f.write(text)
    return None


def run_tests(root, tests):
    """(passed, seconds, last line of pytest's output) of the tests in the tree at root."""
    env = dict(os.environ, OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='', PYTHONDONTWRITEBYTECODE='1')
    tic = time.time()
    proc = subprocess.run([sys.executable, '-m', 'pytest', '-x', '-q', '-p', 'no:cacheprovider', *tests],
                          cwd=root, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    return proc.returncode == 0, time.time() - tic, (lines[-1] if lines else proc.stderr.strip()[-200:])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('-k', default='', help="only the mutations whose name contains this (e.g. 'views:')")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if args.k in m[0]]
    if not chosen:
        parser.error(f'no mutation name contains {args.k!r}')
    missed = 0
    with tempfile.TemporaryDirectory() as tmp:
        clean = os.path.join(tmp, 'clean')
        _copy_tree(clean)
        tests = list(dict.fromkeys(t for m in chosen for t in m[3]))
        ok, seconds, line = run_tests(clean, tests)
        print(f'{"the unmutated tree":<50} {"passes" if ok else "FAILS"} ({seconds:.0f} s: {line})', flush=True)
        if not ok:
            print('the tests must pass on the unmutated tree first')
            return 1
        for name, path, edits, tests in chosen:
            tree = os.path.join(tmp, 'mutant')
            shutil.rmtree(tree, ignore_errors=True)
            shutil.copytree(clean, tree)
            problem = _apply(tree, path, edits)
            if problem:
                missed += 1
                print(f'{name:<50} NOT APPLIED: {problem}', flush=True)
                continue
            ok, seconds, line = run_tests(tree, tests)
            missed += ok
            print(f'{name:<50} {"MISSED" if ok else "caught"} ({seconds:.0f} s: {line})', flush=True)
    print(f'{len(chosen) - missed} of {len(chosen)} mutations caught')
    return 1 if missed else 0


if __name__ == '__main__':
    sys.exit(main())
