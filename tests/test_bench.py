"""python -m moco.bench runs on CPU (tiny sizes) and reports every column for both configurations."""
import json

import pytest
import torch

from moco import bench
from moco.dist import UserError


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
    # the same model costs the same FLOPs in both configurations (fp32 on CPU)
    assert len({round(r['gflop_per_image_step'], 6) for r in rows if r['model'] == 'resnet18_cifar'}) == 1
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
