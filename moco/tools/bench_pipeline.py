"""Data-pipeline benchmark (``python -m moco.tools.bench --pipeline``): the reference pipeline's two-view
transform against the original release's, in one run, on ImageNet-sized JPEGs cut from photographs.

    python -m moco.tools.bench --pipeline                          # transform per core, loader at -j 1 and 2
    python -m moco.tools.bench --pipeline --photos DIR --out F     # also cut from the photographs in DIR

The original: its op list as the release's main_moco.py writes it (``moco.data.views.original_pretrain_transform``,
the definition: torchvision ops on PIL images, ToTensor + Normalize in the worker) behind torchvision's
ImageFolder loader. Ours: its equal ``moco.data.views.pil_pretrain_transform`` (uint8 views) and ``ToFloat``
where the batch goes.

Rows: the transform alone, per core: decode + both views of every image, one thread, CPU time
(``time.thread_time``) over ``--rounds`` rounds of all images, original and ours alternating every 25
images on the same images and seeds; img/s, ours / original, and the spread of that ratio over the
blocks. Before timing, both views of every image are checked to
be the original's bytes (the row says so). Then the loader end to end at each ``--loader-workers``
count: batches of ``--loader-batch`` through the workers (files read, decoded, both views, collated,
pinned and sent with CUDA; ours as uint8), wall-clock img/s in the middle of one epoch (the JPEGs
hard-linked until an epoch is long enough), and the ratio to as many processes at once doing the
workers' work on the same batches without the loader (what the workers could give at most: the
loader's own cost is the difference), the two alternating ``--loader-rounds`` times, the median ratio.
Last, ``ToFloat`` (ToTensor + Normalize) where the batch goes.
"""
import glob
import io
import json
import os
import random
import shutil
import statistics
import tempfile
import time

import torch
from PIL import Image

from moco.data.views import ToFloat, original_pretrain_transform, pil_pretrain_transform
from moco.run_record import write_text_atomic

# ImageNet's common sizes (width, height), both orientations
JPEG_SIZES = ((500, 375), (375, 500), (500, 333), (333, 500), (500, 500), (400, 300), (300, 400), (500, 400))


# ----------------------------------------------------------------------------------- the original
def original_loader(data):
    """torchvision's ImageFolder loader (pil_loader): open, convert to RGB."""
    img = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
    return img.convert('RGB')


# ----------------------------------------------------------------------------------- photographs
def photo_files(extra_dir=None):
    """Photographs at hand: matplotlib's sample photograph, scikit-image's photographs when it is
    installed, and the images in ``extra_dir``."""
    import matplotlib
    files = [os.path.join(matplotlib.get_data_path(), 'sample_data', 'grace_hopper.jpg')]
    try:
        import skimage
        skimage_data = os.path.join(os.path.dirname(skimage.__file__), 'data')
        files += [os.path.join(skimage_data, f) for f in ('astronaut.png', 'chelsea.png', 'coffee.png',
                                                           'hubble_deep_field.jpg', 'ihc.png', 'motorcycle_left.png',
                                                           'retina.jpg', 'rocket.jpg')]
    except ImportError:
        pass
    if extra_dir:
        files += sorted(f for f in glob.glob(os.path.join(extra_dir, '*'))
                        if f.lower().endswith(('.jpg', '.jpeg', '.png', '.webp', '.bmp', '.tif', '.tiff')))
    return [f for f in files if os.path.isfile(f)]


def cut_jpegs(dest, photos, n=150, seed=0, quality=90):
    """dest/train/photos/*.jpg: ``n`` JPEGs of ImageNet's common sizes and both orientations, cut at random
    places from ``photos`` (photographs larger than 900 px first scaled to a long side of 600-900 px)."""
    rng = random.Random(seed)
    folder = os.path.join(dest, 'train', 'photos')
    os.makedirs(folder, exist_ok=True)
    images = [Image.open(p).convert('RGB') for p in photos]
    for i in range(n):
        img = images[i % len(images)]
        if max(img.size) > 900:
            scale = rng.randint(600, 900) / max(img.size)
            img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC)
        w, h = JPEG_SIZES[i % len(JPEG_SIZES)]
        grow = max(w / img.width, h / img.height)
        if grow > 1:   # a photograph smaller than the size: enlarged just enough
            img = img.resize((int(img.width * grow) + 1, int(img.height * grow) + 1), Image.BICUBIC)
        x, y = rng.randint(0, img.width - w), rng.randint(0, img.height - h)
        img.crop((x, y, x + w, y + h)).save(os.path.join(folder, f'{i:04d}.jpg'), quality=quality)
    return dest


# ----------------------------------------------------------------------------------- measurements
def views_identical(datas, seeds=2):
    """Whether both views of every image (``seeds`` seeds each) are the original's bytes."""
    from moco.data.folder import load_rgb
    ours, original, to_float = pil_pretrain_transform(), original_pretrain_transform(), ToFloat()
    for k, data in enumerate(datas):
        for s in range(seeds):
            torch.manual_seed(k * 1000 + s)
            random.seed(k * 1000 + s)
            expected = original(original_loader(data))
            torch.manual_seed(k * 1000 + s)
            random.seed(k * 1000 + s)
            got = ours(load_rgb(f'image {k}', data))
            if not all(torch.equal(e, to_float(g[None])[0]) for e, g in zip(expected, got)):
                return False
    return True


def transform_seconds(datas, rounds=5, block=25):
    """CPU seconds per image of decode + both views, {'original': [...], 'ours': [...]}: one value per block
    of ``block`` images, ``rounds`` times over all images. Original and ours alternate block by block
    on the same images and seeds, so that a change in the machine's speed touches both alike."""
    from moco.data.folder import load_rgb
    ours, original = pil_pretrain_transform(), original_pretrain_transform()
    runs = {'original': (original, original_loader), 'ours': (ours, lambda d: load_rgb('image', d))}
    seconds = {name: [] for name in runs}
    for r in range(rounds):
        for start in range(0, len(datas), block):
            for name, (transform, load) in runs.items():
                torch.manual_seed(r * 100_003 + start)
                random.seed(r * 100_003 + start)
                tic = time.thread_time()
                for data in datas[start:start + block]:
                    transform(load(data))
                seconds[name].append((time.thread_time() - tic) / len(datas[start:start + block]))
    return seconds


def fill_folder(root, total):
    """Hard links (copies where links fail) of root/train/photos' JPEGs until it holds ``total`` files, so
    that a loader's epoch is long enough to be timed in its steady state."""
    folder = os.path.join(root, 'train', 'photos')
    files = sorted(os.listdir(folder))
    for k in range(len(files), total):
        src, dst = os.path.join(folder, files[k % len(files)]), os.path.join(folder, f'copy{k:05d}.jpg')
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)


def timed_batches(n, batch, warmup, count):
    """The (index, seed) items of batches warmup .. warmup + count - 1 of epoch 0 of the loader's sampler."""
    from moco.data.sampler import EpochSampler
    items = list(EpochSampler(n, batch, shuffle=True, drop_last=True, seed=0))
    return [items[b * batch:(b + 1) * batch] for b in range(warmup, warmup + count)]


def _transforms_alone(which, root, image_size, batches, start, out):
    """One process of ``concurrent_rate``: the loader workers' work on these batches without the loader."""
    torch.set_num_threads(1)
    from moco.data.folder import image_folder
    from moco.data.sampler import EpochDataset
    transform = pil_pretrain_transform(image_size) if which == 'ours' else original_pretrain_transform(image_size)
    items = EpochDataset(image_folder(root, 'train', transform))
    start.wait()
    tic = time.perf_counter()
    for batch in batches:
        for key in batch:
            items[key]
    out.put(time.perf_counter() - tic)


def concurrent_rate(which, root, processes, batches, image_size=224):
    """Wall-clock img/s of ``processes`` processes started together, each reading, decoding and
    augmenting its share of ``batches`` (every processes-th batch, as a DataLoader deals them out):
    what that many loader workers could give at most here (two busy processes may each run slower than
    one: shared caches and memory, or SMT siblings)."""
    import multiprocessing as mp
    ctx = mp.get_context('fork')
    start, out = ctx.Barrier(processes), ctx.Queue()
    procs = [ctx.Process(target=_transforms_alone, args=(which, root, image_size, batches[p::processes], start, out))
             for p in range(processes)]
    for proc in procs:
        proc.start()
    seconds = [out.get() for _ in procs]
    for proc in procs:
        proc.join()
    return sum(len(b) for b in batches) / max(seconds)


def loader_rate(root, which, workers, batch, image_size, warmup, count, device):
    """Wall-clock img/s of the whole loader over batches warmup .. warmup + count - 1 of one epoch: the
    workers have started and the queues are in their steady state at both ends of the timing."""
    from moco.data import start_epoch
    from moco.data.folder import SafeImageFolder
    from moco.data.pipelines import pretrain_loader
    from moco.data.sampler import make_loader
    if which == 'ours':   # its DataLoader: the uint8 views as they reach the device (ToFloat is timed apart)
        loader = pretrain_loader('reference', root, batch, device, image_size, seed=0, workers=workers).loader
    else:
        dataset = SafeImageFolder(os.path.join(root, 'train'), original_pretrain_transform(image_size))
        loader = make_loader(dataset, batch, workers, shuffle=True, drop_last=True, seed=0,
                             pin_memory=device.type == 'cuda')
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    start_epoch(loader, 0)
    tic = None
    for b, (views, _, _) in enumerate(loader):
        views = [v.to(device, non_blocking=True) for v in views]
        if b == warmup - 1:
            sync()
            tic = time.perf_counter()
        elif b == warmup + count - 1:
            break
    sync()
    return count * batch / (time.perf_counter() - tic)


def to_float_rate(device, image_size=224, batch=64, steps=5):
    """img/s (both views) of ``views.ToFloat`` on ``device``: ToTensor + Normalize where the batch goes."""
    to_float = ToFloat()
    views = torch.randint(0, 256, (batch, image_size, image_size, 3), dtype=torch.uint8, device=device)
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    to_float(views)
    sync()
    tic = time.perf_counter()
    for _ in range(steps):
        to_float(views)
    sync()
    return batch * steps / 2 / (time.perf_counter() - tic)


def run(photos_dir=None, n=150, rounds=5, loader_workers=(1, 2), loader_batch=32, loader_batches=None,
        loader_rounds=5, image_size=224, out=None, check_seeds=2):
    torch.set_num_threads(1)
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    photos = photo_files(photos_dir)
    result = {'device': torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu',
              'cpu': _cpu_name(), 'cores': os.cpu_count(), 'torch': torch.__version__,
              'photographs': [os.path.basename(p) for p in photos], 'images': n, 'image_size': image_size, 'rows': []}

    def write():
        if out:
            write_text_atomic(out, json.dumps(result, indent=1))

    with tempfile.TemporaryDirectory() as tmp:
        root = cut_jpegs(tmp, photos, n)
        files = sorted(glob.glob(os.path.join(root, 'train', 'photos', '*.jpg')))
        datas = [open(f, 'rb').read() for f in files]
        sizes = sorted({Image.open(io.BytesIO(d)).size for d in datas})
        print(f'{n} JPEGs (quality 90) of {len(sizes)} sizes, cut from {len(photos)} photograph(s): '
              f'{", ".join(result["photographs"])} | {result["cpu"]} | torch {torch.__version__}', flush=True)
        identical = views_identical(datas, check_seeds)
        result['identical_views'] = identical
        print(f'both views of every image, {check_seeds} seeds each, identical to the original: {identical}')
        seconds = transform_seconds(datas, rounds)
        rate = {k: 1 / statistics.mean(v) for k, v in seconds.items()}
        block_ratios = sorted(a / b for a, b in zip(seconds['original'], seconds['ours']))
        for name in ('original', 'ours'):
            row = dict(kind='transform', config=name, images_per_s_per_core=rate[name],
                       ms_per_image=1e3 / rate[name], blocks_ms=[s * 1e3 for s in seconds[name]],
                       vs_original=rate[name] / rate['original'])
            if name == 'ours':
                row['block_ratios'] = dict(min=block_ratios[0], median=statistics.median(block_ratios),
                                           max=block_ratios[-1])
            result['rows'].append(row)
            spread = (f'  (blocks of 25 images: {block_ratios[0]:.2f}-{block_ratios[-1]:.2f}x, median '
                      f'{statistics.median(block_ratios):.2f}x)' if name == 'ours' else '')
            print(f'transform, 1 core   {name:<9}{rate[name]:8.1f} img/s  {1e3 / rate[name]:6.2f} ms/img  '
                  f'{row["vs_original"]:.2f}x{spread}', flush=True)
        write()
        def warmup_and_count(workers):   # the queues full, then 12 batches per worker
            return 2 * workers + 1, loader_batches or 12 * workers
        fill_folder(root, max(sum(warmup_and_count(w)) + 1 for w in loader_workers) * loader_batch)
        n_files = len(os.listdir(os.path.join(root, 'train', 'photos')))
        for workers in loader_workers:
            warmup, count = warmup_and_count(workers)
            batches = timed_batches(n_files, loader_batch, warmup, count)
            for name in ('original', 'ours'):
                pairs = [(concurrent_rate(name, root, workers, batches, image_size),
                          loader_rate(root, name, workers, loader_batch, image_size, warmup, count, device))
                         for _ in range(loader_rounds)]
                alone, got = (statistics.median(x) for x in zip(*pairs))
                of_alone = statistics.median(g / a for a, g in pairs)
                result['rows'].append(dict(kind='loader', config=name, workers=workers, batch=loader_batch,
                                           images_per_s=got, transform_alone_images_per_s=alone,
                                           of_transform_alone=of_alone, pairs=pairs))
                print(f'loader, -j {workers:<2}      {name:<9}{got:8.1f} img/s  {of_alone:6.0%} of {workers} '
                      f'process(es) doing the workers\' work alone ({alone:.1f} img/s; median of {loader_rounds} '
                      'pairs)', flush=True)
                write()
        rate = to_float_rate(device, image_size)
        result['rows'].append(dict(kind='to_float', config='ours', device=device.type, images_per_s=rate))
        print(f'ToFloat on {device.type}: {rate:.0f} img/s (both views; ToTensor + Normalize, which the original '
              'does in the workers)', flush=True)
    write()
    return result


def _cpu_name():
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()
