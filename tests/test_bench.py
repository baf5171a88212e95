"""python -m moco.tools.bench runs on CPU (tiny sizes) and reports every column for both configurations; what
it could get wrong is checked piece by piece: the FLOPs of a step per image, the timing (warm-up steps
excluded) and the two configurations it compares."""
import json
import types

import pytest
import torch

from moco.errors import UserError
from moco.tools import bench


@pytest.mark.slow   # forks the loader workers and the processes that work without them
def test_pipeline_bench_checks_the_views_and_reports_every_row(tmp_path, capsys):
    out = tmp_path / 'pipeline.json'
    result = bench.main(['--pipeline', '--images', '8', '--rounds', '1', '--loader-workers', '1',
                         '--loader-batch', '4', '--loader-rounds', '2', '--image-size', '32', '--out', str(out)])
    assert result['identical_views'] is True and json.loads(out.read_text()) == json.loads(json.dumps(result))
    rows = result['rows']
    assert [(r['kind'], r['config']) for r in rows] == [('transform', 'original'), ('transform', 'ours'),
                                                        ('loader', 'original'), ('loader', 'ours'),
                                                        ('to_float', 'ours')]
    transform = {r['config']: r for r in rows if r['kind'] == 'transform'}
    assert transform['ours']['vs_original'] == pytest.approx(
        transform['ours']['images_per_s_per_core'] / transform['original']['images_per_s_per_core'])
    assert len(transform['ours']['blocks_ms']) == 1   # 8 images: one block of the one round
    for r in rows:
        if r['kind'] == 'loader':
            assert len(r['pairs']) == 2 and r['images_per_s'] > 0 and r['of_transform_alone'] > 0
    printed = capsys.readouterr().out
    assert 'identical to the original: True' in printed and 'ToFloat on cpu' in printed


@pytest.mark.slow   # a whole benchmark run
def test_bench_tiny_on_cpu(tiny_folder, tmp_path, capsys):
    out = tmp_path / 'bench.json'
    rows = bench.main(['--tiny', '--models', 'resnet18_cifar:8', 'vit_tiny_patch4:8', '--steps', '1',
                       '--warmup', '0', '--image-size', '16', '--data', str(tiny_folder), '-j', '0',
                       '--out', str(out)])
    assert [(r['model'], r['input'], r['config']) for r in rows] == [
        (m, i, c) for m in ('resnet18_cifar', 'vit_tiny_patch4') for i in ('synthetic', 'files')
        for c in ('reference', 'ours')]
    for r in rows:
        assert r['images_per_s'] > 0 and r['model_tflops'] > 0 and r['gflop_per_image_step'] > 0
        assert r['peak_gib'] is None                      # no GPU
    ref = {(r['model'], r['input']): r for r in rows if r['config'] == 'reference'}
    for r in rows:
        assert abs(r['vs_reference'] - r['images_per_s'] / ref[r['model'], r['input']]['images_per_s']) < 1e-9
    for r in rows:    # TFLOP/s and the fraction of the peak are img/s times the FLOPs of an image's step
        assert r['model_tflops'] == pytest.approx(r['images_per_s'] * r['gflop_per_image_step'] / 1e3, rel=1e-9)
        assert r['fraction_of_peak'] == pytest.approx(r['model_tflops'] / 750, rel=1e-9)
    assert json.loads(out.read_text())['rows'] == rows
    printed = capsys.readouterr().out
    assert 'img/s' in printed and 'TFLOP/s' in printed and 'vs ref' in printed


def test_fullsize_jpegs_are_made_once(tmp_path):
    from PIL import Image
    root = bench.make_fullsize_jpegs(str(tmp_path / 'fs'), n=12)
    files = sorted((tmp_path / 'fs' / 'train').rglob('*.jpg'))
    assert len(files) == 12 and len({f.parent for f in files}) > 1
    for f in files:
        w, h = Image.open(f).size
        assert 300 <= w <= 500 and 300 <= h <= 500
    stamp = files[0].stat().st_mtime_ns
    assert bench.make_fullsize_jpegs(root, n=12) == root and files[0].stat().st_mtime_ns == stamp
    assert not (tmp_path / 'fs.partial').exists()
    # images of several sizes: not for the in-memory pipeline; the GPU one (here on the CPU) reads them
    with pytest.raises(UserError, match='one size'):
        bench.from_files(root, 4, 64, 0, torch.device('cpu'), 'memory')
    x1, x2 = next(bench.from_files(root, 4, 64, 0, torch.device('cpu'), 'gpu'))
    assert x1.shape == x2.shape == (4, 3, 64, 64) and not torch.equal(x1, x2)


class _Linear2(torch.nn.Module):
    """A 'MoCo' of one Linear layer: the FLOPs of its step are known in closed form."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.fc = torch.nn.Linear(n_in, n_out)

    def forward(self, x1, x2, m):
        return self.fc(x1.flatten(1)).square().mean() + self.fc(x2.flatten(1)).square().mean()


def test_step_flops_count_forward_and_backward_per_image():
    """Per image and step: each view's forward (2 n_in n_out multiply-adds) and the weight gradient's
    backward (the same again; the input needs no gradient)."""
    model = _Linear2(3 * 4 * 4, 5)
    assert bench.step_flops(model, 4, torch.device('cpu'), 'fp32') == 2 * (2 + 2) * 48 * 5
    assert all(p.grad is None for p in model.parameters())      # and it leaves no gradient behind


def test_step_flops_of_a_real_model_are_per_image():
    """Counted at batch 2, the FLOPs per image equal a count at batch 3 divided by 3: all but the B x B
    logits of the loss (a few hundred FLOPs here, under 0.1% at the recipes' batches) grow with the batch."""
    from torch.utils.flop_counter import FlopCounterMode

    from moco.models import build_moco
    torch.manual_seed(0)
    model = build_moco('resnet18_cifar', 16, 32, T=0.2)
    x = torch.randn(3, 3, 16, 16)
    with FlopCounterMode(display=False) as counter:
        model(x, x, 0.99).backward()
    assert bench.step_flops(model, 16, torch.device('cpu'), 'fp32') == pytest.approx(counter.get_total_flops() / 3,
                                                                                     rel=1e-6)


class _Stub(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2, 1)
        self.fc = torch.nn.Linear(2, 2)

    def to(self, *args, **kwargs):      # stands for the model on a GPU this machine may not have
        return self


@pytest.mark.filterwarnings('ignore:torch.cuda.amp.GradScaler is enabled, but CUDA is not available')
@pytest.mark.parametrize('device', ['cpu', 'cuda'])
def test_reference_and_ours_are_the_documented_configurations(monkeypatch, device):
    """reference: the original's step (fp16 + GradScaler on CUDA, fp32 on CPU; contiguous; LARS looping
    over tensors, AdamW without foreach); ours: main_moco.py's fast path (bf16 where the GPU has it;
    channels_last ResNets; multi-tensor LARS, build_optimizer's AdamW). Checked without a GPU: the model
    is a stub and the GPU is said to have bf16."""
    from moco.optim import LARS
    monkeypatch.setattr(bench, 'build_moco', lambda *args, **kwargs: _Stub())
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda *args, **kwargs: True)
    dev = torch.device(device)
    for arch in ('resnet50', 'vit_small'):
        ref, ours = (bench.Runner(arch, 8, 32, dev, ours=o) for o in (False, True))
        assert ref.amp.precision == ('fp16' if device == 'cuda' else 'fp32'), arch
        assert ours.amp.precision == ('bf16' if device == 'cuda' else 'fp32'), arch
        assert ref.memory_format == torch.contiguous_format
        assert ours.memory_format == (torch.contiguous_format if arch.startswith('vit') else torch.channels_last)
        if arch.startswith('vit'):
            assert type(ref.optimizer) is type(ours.optimizer) is torch.optim.AdamW
            assert ref.optimizer.defaults['foreach'] is False and ours.optimizer.defaults['foreach'] is not False
        else:
            assert isinstance(ref.optimizer, LARS) and isinstance(ours.optimizer, LARS)
            assert ref.optimizer.foreach is False and ours.optimizer.foreach is True


def test_both_configurations_start_from_the_same_weights():
    runners = [bench.Runner('resnet18_cifar', 4, 16, torch.device('cpu'), ours=o) for o in (False, True)]
    a, b = (r.model.state_dict() for r in runners)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_timed_counts_only_the_timed_steps(monkeypatch):
    """Warm-up steps are run but not timed; img/s is batch x timed steps / their seconds."""
    clock = [100.]
    monkeypatch.setattr(bench.time, 'perf_counter', lambda: clock[0])
    done = []

    def step(x1, x2):
        done.append(x1)
        clock[0] += 0.5                  # each step takes half a second

    runner = types.SimpleNamespace(step=step, batch=8, device=torch.device('cpu'))
    batches = ((i, i) for i in range(100))
    rate, peak = bench.Runner.timed(runner, batches, warmup=3, steps=4)
    assert done == list(range(7)) and rate == 8 * 4 / 2.0 and peak is None
