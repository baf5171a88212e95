"""CUDA-only checks of the fast path: each compares the GPU code against its CPU twin, which the rest
of the suite tests exactly. Skipped without a GPU (CI has none); run them where one is:
``python -m pytest -q tests/test_gpu.py``. ``MOCO_GPU_TESTS_ON_CPU=1`` runs them on the CPU instead
(the dry run of the GPU check: it catches a missing file, import or typo before GPU minutes are spent;
what only CUDA can show, such as nvJPEG's pixels or the fused optimizer, is then not shown).

Tolerances: nvJPEG's IDCT is not libjpeg's, so decoded pixels may differ from PIL's (mean below 1
level, at most 16 levels); views from the GPU pipeline then differ from the CPU pipeline's by that
much after normalisation; float ops on the GPU differ from the CPU's by rounding only (1e-4)."""
import os
import sys

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from helpers import lars_loop_and_foreach, start, wait_output
from moco.amp import Amp
from moco.data.folder import image_folder, load_rgb
from moco.data.gpu import EncodedFiles, GpuJpegLoader, decode_on_device
from moco.data.memory import InMemoryLoader
from moco.data.sampler import start_epoch
from moco.models import build_moco, compile_networks
from moco.optim import build_optimizer

ON_GPU = torch.cuda.is_available()
DRY_RUN = not ON_GPU and os.environ.get('MOCO_GPU_TESTS_ON_CPU') == '1'
pytestmark = pytest.mark.skipif(not (ON_GPU or DRY_RUN), reason='needs a CUDA GPU (MOCO_GPU_TESTS_ON_CPU=1: dry run)')
CUDA = torch.device('cuda', 0) if ON_GPU else torch.device('cpu')   # the device under test
CPU = torch.device('cpu')


def _epoch(loader, epoch=0):
    start_epoch(loader, epoch)
    return [(tuple(v.cpu() for v in views), targets.cpu(), skipped) for views, targets, skipped in loader]


def test_nvjpeg_decodes_close_to_pil(tiny_folder):
    samples = image_folder(tiny_folder, 'train', None).samples
    files = EncodedFiles(samples)
    payloads = [files[(i, 0)][0] for i in range(len(samples))]
    assert all(p.dim() == 1 for p in payloads)                       # all JPEG bytes, to the GPU
    images = decode_on_device(payloads, [p for p, _ in samples], CUDA)
    for (path, _), image in zip(samples, images):
        assert image.device.type == CUDA.type
        diff = (image.cpu().int() - TF.pil_to_tensor(load_rgb(path)).int()).abs()
        assert diff.float().mean() < 1.0 and diff.max() <= 16, path


def test_reference_pipeline_on_cuda_gives_the_cpu_views_exactly(tiny_folder):
    """uint8 views sent to the GPU and made float there (a table of torchvision's CPU values: CUDA's
    division by a constant would differ in the last bit): the CPU run's float views bit for bit."""
    from moco.data.pipelines import pretrain_loader
    from moco.data.views import ToFloat
    views = torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8)
    assert torch.equal(ToFloat()(views.to(CUDA)).cpu(), ToFloat()(views))
    gpu = _epoch(pretrain_loader('reference', tiny_folder, 8, CUDA, 32, seed=3, workers=2))
    cpu = _epoch(pretrain_loader('reference', tiny_folder, 8, CPU, 32, seed=3))
    assert len(gpu) == len(cpu) == 5
    for (vg, yg, _), (vc, yc, _) in zip(gpu, cpu):
        assert torch.equal(yg, yc) and all(torch.equal(a, b) for a, b in zip(vg, vc))


def test_gpu_pipeline_on_cuda_matches_the_cpu_pipeline(tiny_folder):
    """Same seed: the same images, labels and random parameters; pixels within nvJPEG's rounding."""
    gpu = _epoch(GpuJpegLoader(tiny_folder, 'train', 8, CUDA, 32, seed=3, workers=2))   # thread + side stream
    cpu = _epoch(GpuJpegLoader(tiny_folder, 'train', 8, CPU, 32, seed=3))
    assert len(gpu) == len(cpu) == 5
    for (vg, yg, sg), (vc, yc, sc) in zip(gpu, cpu):
        assert torch.equal(yg, yc) and torch.equal(sg, sc)
        for a, b in zip(vg, vc):
            assert (a - b).abs().mean() < 0.05, (a - b).abs().mean()


def test_memory_pipeline_on_cuda_matches_cpu(tiny_folder):
    gpu = _epoch(InMemoryLoader(tiny_folder, 'train', 8, CUDA, 16, seed=1))
    cpu = _epoch(InMemoryLoader(tiny_folder, 'train', 8, CPU, 16, seed=1))
    for (vg, yg, _), (vc, yc, _) in zip(gpu, cpu):
        assert torch.equal(yg, yc)
        for a, b in zip(vg, vc):
            assert torch.allclose(a, b, atol=1e-4)


def test_default_precision_and_fused_adamw_on_cuda():
    if ON_GPU:   # the original's fp16 unless --fast
        assert Amp('auto', CUDA).precision == 'fp16'
        assert Amp('auto', CUDA, fast=True).precision == ('bf16' if torch.cuda.is_bf16_supported() else 'fp16')
    torch.manual_seed(0)
    model = build_moco('vit_tiny_patch4', 16, 32, image_size=16).to(CUDA)
    fused = build_optimizer('adamw', model, 1e-3, 0.1)
    assert bool(fused.defaults['fused']) == ON_GPU
    reference = torch.optim.AdamW([p.detach().clone().requires_grad_(p.requires_grad) for p in model.parameters()],
                                  1e-3, weight_decay=0.1, foreach=False)
    for p, q in zip(model.parameters(), reference.param_groups[0]['params']):
        if p.requires_grad:
            p.grad = q.grad = torch.randn_like(p)
    fused.step()
    reference.step()
    for p, q in zip(model.parameters(), reference.param_groups[0]['params']):
        assert torch.allclose(p, q, atol=1e-6)


def test_lars_foreach_step_is_bit_identical_to_the_loop_on_cuda():
    """README says the multi-tensor LARS gives the per-tensor loop's bits on CPU (tests/test_optim.py);
    on CUDA ``_foreach_norm`` may reduce in another order. A failure here means README must say "within
    the printed difference" instead of "bit-identical" for CUDA."""
    (sd_loop, opt_loop), (sd_fe, opt_fe) = lars_loop_and_foreach(CUDA)
    worst = max((sd_loop[k].float() - sd_fe[k].float()).abs().max().item() for k in sd_loop)
    print(f'multi-tensor LARS against the loop on {CUDA}: largest weight difference {worst:g}')
    assert torch.allclose(torch.cat([v.float().flatten() for v in sd_loop.values()]),
                          torch.cat([v.float().flatten() for v in sd_fe.values()]), rtol=1e-5, atol=1e-7)
    for k in sd_loop:
        assert torch.equal(sd_loop[k], sd_fe[k]), f'{k}: not bit-identical on CUDA (largest difference {worst:g})'
    for i in opt_loop['state']:
        assert torch.equal(opt_loop['state'][i]['mu'], opt_fe['state'][i]['mu']), i


@pytest.mark.skipif(not ON_GPU,
                    reason='compiling takes minutes on a CPU (tests/test_fast_step.py compiles with aot_eager)')
def test_compiled_bf16_step_is_close_to_eager_on_cuda():
    torch.manual_seed(0)
    eager = build_moco('resnet18_cifar', 16, 32, T=0.2).to(CUDA, memory_format=torch.channels_last)
    compiled = compile_networks(build_moco('resnet18_cifar', 16, 32, T=0.2).to(CUDA, memory_format=torch.channels_last))
    compiled.load_state_dict(eager.state_dict())
    x1, x2 = (torch.randn(16, 3, 32, 32, device=CUDA).contiguous(memory_format=torch.channels_last) for _ in range(2))
    amp = Amp('auto', CUDA, fast=True)
    losses = []
    for model in (eager, compiled):
        with amp.autocast():
            losses.append(model(x1, x2, 0.99).float())
    assert torch.allclose(losses[0], losses[1], rtol=2e-2)


def test_pretraining_on_one_gpu_with_the_defaults_and_fast(tiny_folder, tmp_path):
    """--gpu 0 with default flags: the original's numerics (PIL pipeline, fp16 + GradScaler); with --fast
    and the GPU pipeline: bf16 where supported. On the CPU dry run: the same commands without --gpu."""
    base = [sys.executable, 'main_moco.py', str(tiny_folder), '-a', 'resnet18_cifar', '--image-size', '32',
            '--moco-dim', '16', '--moco-mlp-dim', '32', '-b', '8', '--epochs', '1', '-j', '2', '-p', '1',
            '--knn-freq', '1', '--knn-k', '5'] + (['--gpu', '0'] if ON_GPU else [])
    rc, out = wait_output(start(base + ['--output-dir', str(tmp_path / 'default')], gpu=ON_GPU))
    assert rc == 0, out
    assert '(reference data pipeline)' in out and 'kNN top-1 after epoch 1' in out
    assert f'precision: {"fp16" if ON_GPU else "fp32"}' in out
    rc, out = wait_output(start(base + ['--fast', '--data-pipeline', 'gpu', '--output-dir', str(tmp_path / 'fast')],
                                gpu=ON_GPU))
    assert rc == 0, out
    assert '(gpu data pipeline)' in out and 'kNN top-1 after epoch 1' in out
    fast_precision = ('bf16' if torch.cuda.is_bf16_supported() else 'fp16') if ON_GPU else 'fp32'
    assert f'precision: {fast_precision}' in out
