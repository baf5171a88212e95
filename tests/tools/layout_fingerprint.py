#!/usr/bin/env python
"""Fingerprint of the numbers this repository computes, to show that a change of code layout changes
none of them (bit for bit). Run from the repository root:

    python tests/tools/layout_fingerprint.py [--work /tmp/layout_fp] > fingerprint.txt

and compare the output of two commits with ``diff``, made on the same machine with the same versions
(hashes of float results differ between CPUs and torch versions, so no reference output is kept).
It prints SHA-256 hashes of
* two epochs of batches (both views and the targets) of each data pipeline that runs on the CPU: the
  reference PIL loader (workers 0), the in-memory pipeline, and the GPU pipeline's code on the CPU
  (files decoded in the workers, and JPEG bytes decoded in the training process);
* the kNN monitor's features of a fixed backbone, read through the PIL eval sets and the decoded ones;
* per-step losses (TensorBoard ``train/loss`` at -p 1), log.txt and every tensor and plain value of the
  checkpoints of short CPU runs: main_moco.py (mocov3 with kNN, byol, m2t on the memory pipeline, a ViT),
  main_lincls.py, convert_to_deit.py and transfer fine-tuning.
Only the command lines, flags and file formats of README/CONFIG are used for the runs, so the script
works on any commit that keeps them. Everything runs single-threaded (the float sums of several threads
depend on how the work is split).
"""
import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys

ROOT = os.getcwd()
sys.path.insert(0, ROOT)
os.environ.update(OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')

import torch  # noqa: E402

torch.set_num_threads(1)
SEED = 0
WORK = '/tmp/layout_fp'
IMAGE_SIZE = 32
BATCH = 16


def update(h, obj):
    """Feed a nested structure of tensors and plain values into hash ``h``, in a fixed order."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f'T{t.dtype}{tuple(t.shape)}'.encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(b'{')
        for k in sorted(obj, key=str):
            h.update(repr(k).encode())
            update(h, obj[k])
        h.update(b'}')
    elif isinstance(obj, (list, tuple)):
        h.update(b'[')
        for x in obj:
            update(h, x)
        h.update(b']')
    elif isinstance(obj, str):   # paths inside the scratch folder are named relative to it
        h.update(repr(obj.replace(WORK, '<work>')).encode())
    else:
        h.update(repr(obj).encode())


def digest(obj):
    h = hashlib.sha256()
    update(h, obj)
    return h.hexdigest()


def show(name, obj):
    print(f'{name:42s} {digest(obj)}', flush=True)


# ---------------------------------------------------------------- data pipelines

def two_epochs(loader):
    from moco.data import start_epoch
    batches = []
    for epoch in range(2):
        start_epoch(loader, epoch, SEED)
        for views, targets, skipped in loader:
            batches.append(([v.clone() for v in views], targets.clone(), torch.as_tensor(skipped).clone()))
    return batches


def _loader_and_count(*args, **kwargs):
    """(loader, image count) of ``pretrain_loader`` on any commit: older ones return that pair, newer
    ones the loader alone (with ``num_images``)."""
    try:
        from moco.data.pipelines import pretrain_loader
    except ImportError:
        from moco.pipelines import pretrain_loader
    result = pretrain_loader(*args, **kwargs)
    return result if isinstance(result, tuple) else (result, result.num_images)


def data_fingerprints(root):
    try:
        from moco.data.gpu import GpuJpegLoader
    except ImportError:
        from moco.gpu_data import GpuJpegLoader
    cpu = torch.device('cpu')
    for pipeline in ('reference', 'memory', 'gpu'):
        loader, n = _loader_and_count(pipeline, root, BATCH, cpu, IMAGE_SIZE, 0.08, blur=True, seed=SEED, workers=0)
        batches = two_epochs(loader)
        show(f'data {pipeline} ({n} images, {len(batches)} batches)', batches)
    loader, _ = _loader_and_count('reference', root, BATCH, cpu, IMAGE_SIZE, 0.2, blur=False, seed=SEED + 1,
                                  workers=0)
    show('data reference crop-min 0.2 no-blur seed 1', two_epochs(loader))
    loader = GpuJpegLoader(root, 'train', BATCH, cpu, IMAGE_SIZE, seed=SEED, workers=0, decode_in_workers=False)
    show('data gpu, JPEG bytes decoded in process', two_epochs(loader))

    # the kNN monitor's features of one fixed backbone, through both kinds of evaluation sets
    from moco.knn import extract_features
    from moco.models import BackboneFeatures, encoder_factory
    torch.manual_seed(SEED)
    backbone = BackboneFeatures(encoder_factory('resnet10_w32')(num_classes=10), 'fc').eval()
    try:
        from moco.data.eval_sets import knn_sets
        memory_loader, _ = _loader_and_count('memory', root, BATCH, cpu, IMAGE_SIZE, seed=SEED)
        memory_sets = knn_sets(memory_loader, root, IMAGE_SIZE)
        pil_sets = knn_sets(None, root, IMAGE_SIZE)
    except ImportError:
        from moco.data import eval_transform, image_folder
        from moco.memory_data import knn_sets_in_memory
        memory_sets = knn_sets_in_memory(_loader_and_count('memory', root, BATCH, cpu, IMAGE_SIZE, seed=SEED)[0], root,
                                         IMAGE_SIZE)
        pil_sets = [image_folder(root, s, eval_transform(IMAGE_SIZE)) for s in ('train', 'val')]
    for kind, sets in (('decoded', memory_sets), ('PIL', pil_sets)):
        show(f'knn features, {kind} sets', [extract_features(backbone, s, cpu, batch_size=64) for s in sets])


# ---------------------------------------------------------------- runs of the scripts

def run(*argv):
    cmd = [sys.executable, *map(str, argv)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f'failed ({proc.returncode}): {" ".join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}')


def losses(out):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(os.path.join(out, 'tensorboard'), size_guidance={'scalars': 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()['scalars']
            if not tag.endswith(('images_per_s', 'time'))}


def log_lines(out):
    lines = [json.loads(line) for line in open(os.path.join(out, 'log.txt'))]
    return [{k: v for k, v in r.items() if 'time' not in k and 'per_s' not in k} for r in lines]


def checkpoint(path):
    """A checkpoint without its line of training, whose id is drawn afresh by each run."""
    ckpt = torch.load(path, map_location='cpu', weights_only=True)
    ckpt.pop('line', None)
    return ckpt


def show_run(name, out, files):
    show(f'{name}: losses', losses(out))
    show(f'{name}: log.txt', log_lines(out))
    for f in files:
        show(f'{name}: {f}', checkpoint(os.path.join(out, f)))


def run_fingerprints(root, work):
    common = ['-a', 'resnet10_w32', '--image-size', IMAGE_SIZE, '-b', BATCH, '--epochs', 2, '--warmup-epochs', 1,
              '--moco-dim', 32, '--moco-mlp-dim', 64, '-j', 0, '-p', 1, '--seed', SEED, '--keep-checkpoints', 0]
    runs = {
        'mocov3': ['--knn-freq', 1, '--knn-k', 20],
        'byol': ['--method', 'byol'],
        'm2t': ['--method', 'm2t', '--data-pipeline', 'memory', '--knn-freq', 1, '--knn-k', 20],
    }
    for name, extra in runs.items():
        out = os.path.join(work, name)
        run('main_moco.py', *common, *extra, '--output-dir', out, root)
        show_run(f'main_moco {name}', out, ['checkpoint_0000.pth.tar', 'checkpoint_0001.pth.tar'])

    for name in ('mocov3', 'm2t'):
        out = os.path.join(work, f'lincls_{name}')
        run('main_lincls.py', '-b', BATCH, '--epochs', 2, '--seed', SEED, '-j', 0, '-p', 1, '--lr', 0.5,
            '--pretrained', os.path.join(work, name, 'checkpoint_0001.pth.tar'), '--output-dir', out, root)
        show_run(f'main_lincls {name}', out, ['checkpoint.pth.tar', 'model_best.pth.tar'])

    vit = os.path.join(work, 'vit')
    run('main_moco.py', '-a', 'vit_tiny_patch4', '--image-size', IMAGE_SIZE, '-b', BATCH, '--epochs', 1,
        '--warmup-epochs', 0, '--moco-dim', 16, '--moco-mlp-dim', 32, '-j', 0, '-p', 1, '--seed', SEED,
        '--optimizer', 'adamw', '--lr', 1.5e-4, '--wd', 0.1, '--output-dir', vit, root)
    show_run('main_moco vit', vit, ['checkpoint_0000.pth.tar'])
    deit = os.path.join(work, 'deit.pth')
    run('convert_to_deit.py', '--input', os.path.join(vit, 'checkpoint_0000.pth.tar'), '--output', deit)
    show('convert_to_deit', checkpoint(deit))

    # --aug transfer: DeiT's RandAugment (--aug deit) fails in timm 1.0.31's posterize with this Pillow
    for source, extra in (('moco', ['--no-repeated-aug']), ('deit', ['--mixup', 0, '--cutmix', 0, '--smoothing', 0])):
        out = os.path.join(work, f'finetune_{source}')
        pretrained = deit if source == 'deit' else os.path.join(vit, 'checkpoint_0000.pth.tar')
        run('-m', 'transfer.finetune', '-a', 'vit_tiny_patch4', '--input-size', IMAGE_SIZE, '-b', BATCH, '--epochs', 2,
            '--warmup-epochs', 1, '--lr', 5e-4, '--aug', 'transfer', '-j', 0, '-p', 1, '--seed', SEED,
            '--pretrained', pretrained, '--output-dir', out, *extra, root)
        show_run(f'finetune {source}', out, ['checkpoint.pth', 'best_checkpoint.pth'])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--work', default='/tmp/layout_fp', help='scratch folder (emptied first)')
    parser.add_argument('--only', choices=['data', 'runs'], help='one half only')
    args = parser.parse_args()
    global WORK
    WORK = args.work
    shutil.rmtree(args.work, ignore_errors=True)
    os.makedirs(args.work)
    from moco import demo_data
    root = demo_data.extract(args.work, per_class={'train': 20, 'val': 5})   # 200 train, 50 val images
    if args.only != 'runs':
        data_fingerprints(root)
    if args.only != 'data':
        run_fingerprints(root, os.path.join(args.work, 'runs'))


if __name__ == '__main__':
    main()
