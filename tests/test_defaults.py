"""The defaults are the original's numerics; ``--fast`` (and each of its parts, as its own flag) is
the only way to the faster, not bit-compatible path (README "Speed").

- precision: fp16 autocast + GradScaler on CUDA, fp32 on CPU; bf16 only with --fast or --amp bf16;
- input pipeline: PIL in loader workers; with --fast the in-memory pipeline for folders of small
  images of one size, else the GPU pipeline with CUDA;
- the casts meant to raise precision (BYOL's loss, momentum BN, all-reduce BN) never lower float64.
"""
import os

import pytest
import torch
from PIL import Image

import main_moco
from moco.amp import Amp, resolve_precision
from moco.data import pipelines
from moco.dtypes import at_least_fp32
from moco.losses import regression_loss
from moco.momentum_bn import MomentumBatchNorm

CUDA, CPU = torch.device('cuda', 0), torch.device('cpu')


def test_command_line_defaults_are_the_originals():
    args = main_moco.get_args_parser().parse_args(['DIR'])
    assert (args.amp, args.data_pipeline, args.fast, args.compile) == ('auto', 'auto', False, False)


@pytest.mark.parametrize('bf16_supported', [True, False])
def test_auto_precision_is_fp16_on_cuda_unless_fast(monkeypatch, bf16_supported):
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda *a, **k: bf16_supported)
    assert resolve_precision('auto', CUDA) == 'fp16'
    assert resolve_precision('auto', CUDA, fast=True) == ('bf16' if bf16_supported else 'fp16')
    assert resolve_precision('fp16', CUDA, fast=True) == 'fp16'          # an explicit choice wins
    assert resolve_precision('auto', CPU) == resolve_precision('auto', CPU, fast=True) == 'fp32'
    assert Amp('auto', CPU).scaler.is_enabled() is False


def test_auto_pipeline_is_reference_unless_fast(tiny_folder, tmp_path):
    for device in (CUDA, CPU):
        assert pipelines.resolve('auto', device, tiny_folder) == 'reference'
        assert pipelines.resolve('auto', device, tiny_folder, fast=True) == 'memory'      # 32 px, one size
        assert pipelines.resolve('gpu', device, tiny_folder, fast=True) == 'gpu'          # explicit wins
    mixed = tmp_path / 'mixed'
    for i, size in enumerate([(300, 200), (320, 240), (300, 200)]):
        os.makedirs(mixed / 'train' / 'a', exist_ok=True)
        Image.new('RGB', size, (i * 40, 90, 20)).save(mixed / 'train' / 'a' / f'{i}.jpg')
    assert pipelines.resolve('auto', CUDA, str(mixed), fast=True) == 'gpu'
    assert pipelines.resolve('auto', CPU, str(mixed), fast=True) == 'reference'
    assert pipelines.resolve('auto', CPU, str(tmp_path / 'missing'), fast=True) == 'reference'


@pytest.mark.slow
def test_pretraining_without_flags_reports_the_original_numerics(tiny_folder, tmp_path, capsys):
    """A CPU run with no precision or pipeline flags: fp32, the reference (PIL) pipeline."""
    args = main_moco.get_args_parser().parse_args([
        tiny_folder, '-a', 'resnet18_cifar', '--image-size', '16', '--moco-dim', '8', '--moco-mlp-dim', '16',
        '-b', '8', '--epochs', '1', '-j', '0', '-p', '100', '--seed', '0', '--output-dir', str(tmp_path)])
    main_moco.main(args)
    out = capsys.readouterr().out
    assert 'precision: fp32' in out and '(reference data pipeline)' in out


def test_upcasts_never_lower_float64():
    assert at_least_fp32(torch.zeros(1, dtype=torch.float16)).dtype == torch.float32
    assert at_least_fp32(torch.zeros(1, dtype=torch.bfloat16)).dtype == torch.float32
    assert at_least_fp32(torch.zeros(1, dtype=torch.float64)).dtype == torch.float64
    g = torch.Generator().manual_seed(0)
    p, z = torch.randn(4, 8, generator=g, dtype=torch.float64), torch.randn(4, 8, generator=g, dtype=torch.float64)
    p = p * 1e-3 + z        # nearly aligned: 2 - 2 cos is tiny, and float32 would lose it
    loss = regression_loss(p, z)
    exact = (2 - 2 * (p / p.norm(dim=1, keepdim=True) * z / z.norm(dim=1, keepdim=True)).sum(1)).mean()
    assert loss.dtype == torch.float64 and torch.allclose(loss, exact, rtol=1e-9, atol=0)
    bn = MomentumBatchNorm(3, eps=1e-20).double()         # the release's double Bessel factor, alpha 1
    x = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64) * 1e-4 + 1e4   # float32 loses the spread
    y = bn(x)
    n = 6 * 16
    centred = x - x.mean(dim=(0, 2, 3), keepdim=True)
    ref = centred / centred.pow(2).mean(dim=(0, 2, 3), keepdim=True).sqrt() * (n - 1) / n
    assert y.dtype == torch.float64
    assert torch.allclose(y, ref, rtol=1e-6, atol=1e-6)
