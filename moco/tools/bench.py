"""Training-step benchmark: our step against a straightforward reference-style step, in one run.

    python -m moco.tools.bench                         # GPU: vit_small 256, resnet50 256, vit_base 128, 224 px
    python -m moco.tools.bench --tiny                  # CPU-sized models and images (what CI runs)
    python -m moco.tools.bench --data DIR              # also end to end from DIR/train (JPEG files)
    python -m moco.tools.bench --fullsize-jpegs DIR    # ... from ImageNet-sized JPEGs made from the demo data
    python -m moco.tools.bench --configs ours_compiled --inputs synthetic   # only our compiled step
    python -m moco.tools.bench --monitors              # the step with the gradient monitors at -p 10 and 1, vs without
    python -m moco.tools.bench --pipeline              # the data pipeline instead: ours vs the original's
                                                 # two-view transform per core, and the loader
                                                 # (moco/tools/bench_pipeline.py)

reference: the original's step: fp16 autocast + GradScaler on CUDA (fp32 on CPU), contiguous memory,
    LARS looping over tensors in Python (AdamW without foreach for ViTs), no compilation.
ours: main_moco.py --fast: bf16 autocast where supported (no GradScaler), and its defaults that keep
    the mathematics: channels_last for ResNets, multi-tensor LARS (fused AdamW on CUDA); optionally
    ``--compile``; both keep the
    non-finite-loss check of ``Amp.backward_step`` (one host sync per step).
Both run the same model (MoCo v3 forward of both views through both encoders, backward, step) on
synthetic input, and with ``--data`` from image files: the reference loader (PIL in workers) against
ours (the GPU pipeline of moco/data/gpu.py; for images of <= 64 px the in-memory one). Printed per
row: img/s, model TFLOP/s (FLOPs of one step counted by torch's FlopCounterMode), the fraction of
``--peak-tflops``, peak GPU memory, and ours / reference. ``--configs`` chooses the rows (ours_compiled:
ours with ``torch.compile``, a row of its own), ``--inputs`` the inputs; ``--out`` is rewritten after
every row, so a run stopped early keeps the rows it measured; ``--profile F`` appends torch.profiler's
top operations of a few steps of ours (synthetic input) per model to F.
"""
import argparse
import json
import os
import sys
import time

import torch

from moco.amp import Amp
from moco.errors import UserError
from moco.models import build_moco, compile_networks, is_vit
from moco.optim import LARS, build_optimizer
from moco.run_record import write_text_atomic

GPU_MODELS = (('vit_small', 256), ('resnet50', 256), ('vit_base', 128))
CONFIGS = ('reference', 'ours', 'ours_compiled')
TINY_MODELS = (('vit_tiny_patch4', 16), ('resnet18_cifar', 16))


def monitor_cost(arch, batch, image_size, device, steps, warmup, print_freqs=(10, 1), rounds=3):
    """Seconds per step of ours without the gradient monitors and with them at each print frequency
    (the measurement and its read-back at every print_freq-th step, as main_moco.py does), rounds
    alternating; {'none': s, 'p10': s, 'p1': s}, each the median of its rounds."""
    import statistics

    from moco.metrics import RunLog
    from moco.monitors import TrainingMonitors
    runner = Runner(arch, batch, image_size, device, ours=True)
    monitors = TrainingMonitors(runner.model)
    run_log = RunLog('.', enabled=False)
    batches = synthetic(batch, image_size, device)
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)

    def timed(print_freq):
        for k in range(warmup + steps):
            if k == warmup:
                sync()
                tic = time.perf_counter()
            x1, x2 = (x.to(memory_format=runner.memory_format) for x in next(batches))
            with runner.amp.autocast():
                loss = runner.model(x1, x2, 0.99)
            logged = print_freq is not None and k % print_freq == 0
            runner.amp.backward_step(loss, runner.optimizer, True,
                                     monitors.after_backward(logged, loss) if print_freq else None)
            if logged:
                monitors.log_step(k, run_log)
        sync()
        return (time.perf_counter() - tic) / steps
    configs = {'none': None, **{f'p{p}': p for p in print_freqs}}
    seconds = {name: [] for name in configs}
    for _ in range(rounds):
        for name, print_freq in configs.items():
            seconds[name].append(timed(print_freq))
    return {name: statistics.median(v) for name, v in seconds.items()}


def step_flops(model, image_size, device, precision):
    """FLOPs of one training step (forward of both views through both encoders, backward) per image."""
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.randn(2, 3, image_size, image_size, device=device)
    amp = Amp(precision, device)
    with FlopCounterMode(display=False) as counter:
        with amp.autocast():
            loss = model(x, x, 0.99)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 2


class Runner:
    """One configuration of the step: precision, memory format, optimizer implementation, compile."""

    def __init__(self, arch, batch, image_size, device, ours, compile_model=False, compile_backend='inductor'):
        self.batch, self.device = batch, device
        torch.manual_seed(0)
        model = build_moco(arch, T=0.2, image_size=image_size if is_vit(arch) else None)
        self.memory_format = torch.channels_last if ours and not is_vit(arch) else torch.contiguous_format
        self.model = model.to(device, memory_format=self.memory_format).train()
        # ours: main_moco.py --fast on this device; reference: the original's choices
        self.amp = Amp('auto', device, fast=ours)
        if ours:
            self.optimizer = build_optimizer('adamw', self.model, 1e-4, 0.1) if is_vit(arch) else \
                build_optimizer('lars', self.model, 0.1, 1e-6)
        elif is_vit(arch):
            self.optimizer = torch.optim.AdamW(self.model.parameters(), 1e-4, weight_decay=0.1, foreach=False)
        else:
            self.optimizer = LARS(self.model.parameters(), 0.1, weight_decay=1e-6, foreach=False)
        if compile_model:
            compile_networks(self.model, backend=compile_backend)

    def step(self, x1, x2):
        x1 = x1.to(self.device, non_blocking=True, memory_format=self.memory_format)
        x2 = x2.to(self.device, non_blocking=True, memory_format=self.memory_format)
        with self.amp.autocast():
            loss = self.model(x1, x2, 0.99)
        self.amp.backward_step(loss, self.optimizer)

    def timed(self, batches, warmup, steps):
        """img/s over ``steps`` steps after ``warmup``, and peak GPU memory (GiB, or None)."""
        sync = torch.cuda.synchronize if self.device.type == 'cuda' else (lambda: None)
        it = iter(batches)
        for _ in range(warmup):
            self.step(*next(it))
        sync()
        if self.device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats()
        tic = time.perf_counter()
        for _ in range(steps):
            self.step(*next(it))
        sync()
        seconds = time.perf_counter() - tic
        peak = torch.cuda.max_memory_allocated() / 2 ** 30 if self.device.type == 'cuda' else None
        return self.batch * steps / seconds, peak


def synthetic(batch, image_size, device):
    x1 = torch.randn(batch, 3, image_size, image_size, device=device)
    x2 = torch.randn(batch, 3, image_size, image_size, device=device)
    while True:
        yield x1, x2


def from_files(data, batch, image_size, workers, device, pipeline):
    """Endless batches of both views of DIR/train through a data pipeline (made now: errors raise here)."""
    from moco.data.pipelines import pretrain_loader
    loader = pretrain_loader(pipeline, data, batch, device, image_size, blur=image_size > 64, seed=0,
                                workers=workers)
    return _endless(loader)


def _endless(loader):
    from moco.data import start_epoch
    epoch = 0
    while True:
        start_epoch(loader, epoch)
        for views, _, _ in loader:
            yield views[0], views[1]
        epoch += 1


def make_fullsize_jpegs(dest, n=2048, seed=0):
    """dest/train: an ImageNet-like JPEG folder for end-to-end timing where ImageNet is not at hand. The
    shipped CIFAR-10 demo images, upscaled to ImageNet's usual sizes (sides 300-500 px), with noise so
    that they are not unusually cheap to decode (JPEG quality 90, about 65 kB each; ImageNet's average
    is about 110 kB)."""
    import glob
    import random
    import tempfile

    import numpy as np
    from PIL import Image

    from moco import demo_data
    if os.path.isdir(os.path.join(dest, 'train')):
        return dest
    rng = random.Random(seed)
    noise = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as tmp:
        files = sorted(glob.glob(os.path.join(demo_data.extract(tmp), 'train', '*', '*')))
        rng.shuffle(files)   # all classes, mixed
        for i in range(n):
            path = files[i % len(files)]
            folder = os.path.join(dest + '.partial', 'train', os.path.basename(os.path.dirname(path)))
            os.makedirs(folder, exist_ok=True)
            size = (rng.randint(300, 500), rng.randint(300, 500))
            img = np.asarray(Image.open(path).convert('RGB').resize(size, Image.BICUBIC), dtype=np.float32)
            img = np.clip(img + noise.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(os.path.join(folder, f'{i:05d}.jpg'), quality=90)
    os.replace(dest + '.partial', dest)   # complete or absent
    return dest


def profile_steps(runner, batches, out, title, steps=3, warmup=3, row_limit=25):
    """Append torch.profiler's table of the operations of ``steps`` steps (after ``warmup``) to ``out``,
    sorted by their own time on the GPU (CPU time otherwise), with the step's wall time."""
    from torch.profiler import ProfilerActivity, profile
    cuda = runner.device.type == 'cuda'
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    it = iter(batches)
    for _ in range(warmup):
        runner.step(*next(it))
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        tic = time.perf_counter()
        for _ in range(steps):
            runner.step(*next(it))
        sync()
        seconds = (time.perf_counter() - tic) / steps
    try:
        table = prof.key_averages().table(sort_by='self_device_time_total' if cuda else 'self_cpu_time_total',
                                          row_limit=row_limit)
    except (AttributeError, KeyError):   # a torch without the device_time names
        table = prof.key_averages().table(sort_by='self_cuda_time_total' if cuda else 'self_cpu_time_total',
                                          row_limit=row_limit)
    with open(out, 'a') as f:
        f.write(f'== {title}: {steps} profiled steps, {seconds * 1e3:.1f} ms per step (with the profiler on)\n')
        f.write(table + '\n\n')


def main(argv=None):
    p = argparse.ArgumentParser(description='MoCo v3 training-step benchmark (ours vs reference-style)',
                                prog='python -m moco.tools.bench')
    p.add_argument('--tiny', action='store_true', help='CPU-sized models at 32 px (CI)')
    p.add_argument('--models', nargs='+', default=None, metavar='ARCH:BATCH',
                   help='e.g. vit_small:256 resnet50:256 (default: the three above, or two tiny ones)')
    p.add_argument('--image-size', type=int, default=None, help='default 224, or 32 with --tiny')
    p.add_argument('--steps', type=int, default=None, help='timed steps (default 30, or 3 with --tiny)')
    p.add_argument('--warmup', type=int, default=None, help='untimed steps first (default 10, or 1 with --tiny)')
    p.add_argument('--data', default=None, help='also measure end to end from DIR/train')
    p.add_argument('--fullsize-jpegs', default=None, metavar='DIR',
                   help='make DIR/train (--fullsize-count ImageNet-sized JPEGs from the shipped demo images) '
                        'unless it exists, and measure end to end from it (when no --data)')
    p.add_argument('--fullsize-count', type=int, default=2048, metavar='N',
                   help='number of JPEGs --fullsize-jpegs makes (default 2048)')
    p.add_argument('--prepare-only', action='store_true', help='only make the --fullsize-jpegs folder, then exit')
    p.add_argument('--configs', nargs='+', choices=CONFIGS, default=None,
                   help='rows per model and input (default: reference ours); ours_compiled: ours with '
                        'torch.compile, as a row of its own')
    p.add_argument('--inputs', nargs='+', choices=('synthetic', 'files'), default=None,
                   help='default: synthetic, and files with --data or --fullsize-jpegs')
    p.add_argument('-j', '--workers', type=int, default=min(16, os.cpu_count() or 1))
    p.add_argument('--compile', action='store_true',
                   help='torch.compile our networks (as main_moco.py --compile): the ours row is compiled')
    p.add_argument('--compile-backend', default='inductor',
                   help='torch.compile backend of compiled rows (default inductor; aot_eager: a quick CPU check)')
    p.add_argument('--peak-tflops', type=float, default=750., help='bf16 matmul ceiling of the GPU (H100: ~750)')
    p.add_argument('--out', default=None, help='also write the rows as JSON here (rewritten after every row)')
    p.add_argument('--monitors', action='store_true',
                   help='time our step without the gradient monitors and with them at print frequency 10 and 1')
    g = p.add_argument_group("--pipeline: the reference data pipeline against the original release's "
                             '(moco/tools/bench_pipeline.py)')
    g.add_argument('--pipeline', action='store_true',
                   help='measure the two-view transform per core and the loader end to end, instead of the step')
    g.add_argument('--photos', default=None, metavar='DIR',
                   help='also cut the JPEGs from the photographs in DIR (default: matplotlib\'s sample photograph '
                        'and scikit-image\'s photographs when it is installed)')
    g.add_argument('--images', type=int, default=150, help='JPEGs cut (default 150)')
    g.add_argument('--rounds', type=int, default=5, help='timed rounds over all images per transform (default 5)')
    g.add_argument('--loader-workers', type=int, nargs='+', default=[1, 2], metavar='J',
                   help='loader worker counts measured end to end (default 1 2)')
    g.add_argument('--loader-batch', type=int, default=32, help='batch of the loader rows (default 32)')
    g.add_argument('--loader-rounds', type=int, default=5,
                   help='loader runs per row, each next to a run of the workers\' work alone (default 5)')
    p.add_argument('--profile', default=None, metavar='FILE',
                   help='after the rows of each model, profile a few steps of ours (synthetic input, eager) with '
                        'torch.profiler and append its top operations to FILE')
    args = p.parse_args(argv)
    if args.pipeline:
        from moco.tools import bench_pipeline
        return bench_pipeline.run(args.photos, args.images, args.rounds, args.loader_workers, args.loader_batch,
                                  loader_rounds=args.loader_rounds, image_size=args.image_size or 224, out=args.out)

    if args.fullsize_jpegs and not args.data:
        args.data = make_fullsize_jpegs(args.fullsize_jpegs, n=args.fullsize_count)
        if args.prepare_only:
            print(f'fullsize JPEGs in {os.path.join(args.data, "train")}')
            return []
    elif args.prepare_only:
        raise SystemExit('error: --prepare-only needs --fullsize-jpegs DIR (and no --data)')
    inputs = args.inputs or (['synthetic', 'files'] if args.data else ['synthetic'])
    if 'files' in inputs and not args.data:
        raise SystemExit('error: --inputs files needs --data DIR or --fullsize-jpegs DIR')
    configs = [c for c in CONFIGS if c in (args.configs or ('reference', 'ours'))]   # reference first
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    models = [(m.split(':')[0], int(m.split(':')[1])) for m in args.models] if args.models else \
        list(TINY_MODELS if args.tiny or device.type == 'cpu' else GPU_MODELS)
    size = args.image_size or (32 if args.tiny or device.type == 'cpu' else 224)
    steps = args.steps or (3 if args.tiny else 30)
    warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 10)
    name = torch.cuda.get_device_name() if device.type == 'cuda' else f'CPU ({os.cpu_count()} cores)'
    print(f'device: {name} | torch {torch.__version__} | {size} px | {warmup} warm-up + {steps} timed steps')
    if args.monitors:
        rows = []
        for arch, batch in models:
            cost = monitor_cost(arch, batch, size, device, steps, warmup)
            rows.append(dict(model=arch, batch=batch, **{f'seconds_per_step_{k}': v for k, v in cost.items()}))
            print(f'{arch:<16}{batch:>6}  s/step without monitors {cost["none"]:.4f}, at -p 10 {cost["p10"]:.4f} '
                  f'({cost["p10"] / cost["none"] - 1:+.1%}), at -p 1 {cost["p1"]:.4f} '
                  f'({cost["p1"] / cost["none"] - 1:+.1%})', flush=True)
        if args.out:
            write_text_atomic(args.out, json.dumps({'device': name, 'torch': torch.__version__, 'image_size': size,
                                                    'rows': rows}, indent=1))
        return rows

    rows = []

    def write_json():
        if args.out:
            write_text_atomic(args.out, json.dumps({'device': name, 'torch': torch.__version__, 'image_size': size,
                                                    'rows': rows}, indent=1))

    header = f'{"model":<16}{"batch":>6} {"input":<17}{"config":<15}{"img/s":>9}{"TFLOP/s":>9}{"of peak":>9}' \
             f'{"peak GiB":>9}{"vs ref":>8}'
    print(header)
    for arch, batch in models:
        flops = None   # of one image-step: the same model costs the same in every configuration
        for input_name in inputs:
            ref_rate = None
            for config in configs:
                ours = config != 'reference'
                runner = Runner(arch, batch, size, device, ours=ours,
                                compile_model=config == 'ours_compiled' or (args.compile and config == 'ours'),
                                compile_backend=args.compile_backend)
                if flops is None:   # counted on an eager runner
                    counted = runner if config != 'ours_compiled' else Runner(arch, 2, size, device, ours=False)
                    flops = step_flops(counted.model, size, device, counted.amp.precision)
                    del counted
                pipeline = None
                if input_name == 'synthetic':
                    batches = synthetic(batch, size, device)
                else:  # ours: small images of one size through the in-memory pipeline, others the GPU one
                    pipeline = ('memory' if size <= 64 else 'gpu') if ours else 'reference'
                    try:
                        batches = from_files(args.data, batch, size, args.workers, device, pipeline)
                    except UserError:   # images of several sizes
                        pipeline = 'gpu'
                        batches = from_files(args.data, batch, size, args.workers, device, pipeline)
                rate, peak = runner.timed(batches, warmup, steps)
                tflops = rate * flops / 1e12
                ref_rate = rate if config == 'reference' else ref_rate
                vs_ref = rate / ref_rate if ref_rate else None
                row = dict(model=arch, batch=batch, input=input_name, pipeline=pipeline, config=config,
                           precision=runner.amp.precision,
                           images_per_s=rate, model_tflops=tflops, fraction_of_peak=tflops / args.peak_tflops,
                           peak_gib=peak, vs_reference=vs_ref, gflop_per_image_step=flops / 1e9)
                rows.append(row)
                write_json()
                source = input_name if pipeline is None else f'{input_name}/{pipeline}'
                print(f'{arch:<16}{batch:>6} {source:<17}{config:<15}{rate:>9.1f}{tflops:>9.3f}'
                      f'{tflops / args.peak_tflops:>9.1%}{(f"{peak:.1f}" if peak else "-"):>9}'
                      f'{(f"{vs_ref:.2f}x" if vs_ref else "-"):>8}', flush=True)
                del runner, batches
                if device.type == 'cuda':
                    torch.cuda.empty_cache()
        if args.profile:
            runner = Runner(arch, batch, size, device, ours=True)
            profile_steps(runner, synthetic(batch, size, device), args.profile, f'{arch} batch {batch}, {size} px, '
                          f'ours ({runner.amp.precision}), synthetic input, {name}, torch {torch.__version__}',
                          steps=min(3, steps), warmup=min(3, max(1, warmup)))
            print(f'profile of {arch} (ours) appended to {args.profile}', flush=True)
            del runner
            if device.type == 'cuda':
                torch.cuda.empty_cache()
    write_json()
    return rows


if __name__ == '__main__':
    main()
    sys.exit(0)
