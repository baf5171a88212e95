"""CIFAR tooling: data preparation (with a stand-in for the download), curves from logs,
the shipped demo data, and the recipe commands for a few steps."""
import hashlib
import json
import os
import sys

import pytest
import torch
from PIL import Image

from helpers import start, wait_output
from moco import demo_data
from moco.knn import knn_classify
from moco.tools import plot, prepare_data


class _FakeCIFAR:
    """What torchvision.datasets.CIFAR10 gives, without the download: PIL images and labels."""
    classes = ['airplane', 'automobile', 'bird']

    def __init__(self, root, train=True, download=False):
        self.n = 6 if train else 3
        self.root = root

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return Image.new('RGB', (32, 32), (i * 40, 0, 0)), i % 3


def test_prepare_writes_the_image_folder_layout(tmp_path, monkeypatch):
    import torchvision.datasets as tvd
    monkeypatch.setattr(tvd, 'CIFAR10', _FakeCIFAR)
    counts = prepare_data.prepare('cifar10', str(tmp_path / 'c10'))
    assert counts == {'train': 6, 'val': 3}
    assert sorted(os.listdir(tmp_path / 'c10' / 'train')) == sorted(_FakeCIFAR.classes)
    img = Image.open(tmp_path / 'c10' / 'train' / 'bird' / '00005.png')
    assert img.size == (32, 32) and img.getpixel((0, 0)) == (200, 0, 0)   # lossless
    with pytest.raises(SystemExit, match='already exists'):
        prepare_data.prepare('cifar10', str(tmp_path / 'c10'))


def test_prepare_without_network_is_a_one_line_error(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    def offline(*args, **kwargs):
        raise RuntimeError('<urlopen error [Errno -3] Temporary failure in name resolution>\nmore')
    monkeypatch.setattr(tvd, 'CIFAR100', offline)
    with pytest.raises(SystemExit, match='cannot get cifar100') as e:
        prepare_data.prepare('cifar100', str(tmp_path / 'c100'))
    assert '\n' not in str(e.value)


def test_plot_from_logs(tmp_path):
    for name, losses in (('a', [4.0, 3.5, 3.2]), ('b', [4.1, 3.9, 3.0])):
        os.makedirs(tmp_path / name)
        with open(tmp_path / name / 'log.txt', 'w') as f:
            f.write(json.dumps({'epoch': 0, 'knn_top1': 20.0}) + '\n')
            for e, loss in enumerate(losses, 1):
                f.write(json.dumps({'epoch': e, 'train_loss': loss, **({'knn_top1': 20 + 5 * e} if e % 2 == 0 else {})})
                        + '\n')
    epochs, losses, knn_epochs, knn = plot.read_log(str(tmp_path / 'a'))
    assert epochs == [1, 2, 3] and losses == [4.0, 3.5, 3.2] and knn_epochs == [0, 2] and knn == [20.0, 30]
    out = plot.plot([str(tmp_path / 'a'), str(tmp_path / 'b')], str(tmp_path / 'curves.png'))
    img = Image.open(out)
    assert img.format == 'PNG' and img.size[0] > 600
    with pytest.raises(SystemExit, match='no log'):
        plot.read_log(str(tmp_path / 'missing'))


@pytest.mark.slow   # unpacks 6,000 files
def test_demo_data_is_present_and_well_formed(tmp_path):
    archive = os.path.join(os.path.dirname(demo_data.__file__), 'cifar10_demo.tar.gz')
    assert os.path.getsize(archive) < 5 * 2 ** 20            # a few MB at most
    root = demo_data.extract(str(tmp_path))
    for split, per_class in (('train', 500), ('val', 100)):
        classes = sorted(os.listdir(os.path.join(root, split)))
        assert len(classes) == 10
        for c in classes:
            files = os.listdir(os.path.join(root, split, c))
            assert len(files) == per_class
        first_class = os.path.join(root, split, classes[0])
        img = Image.open(os.path.join(first_class, sorted(os.listdir(first_class))[0]))
        assert img.size == (32, 32) and img.mode == 'RGB'
    def contents(split):
        folder = os.path.join(root, split)
        return {hashlib.sha1(open(os.path.join(folder, c, f), 'rb').read()).hexdigest()
                for c in os.listdir(folder) for f in os.listdir(os.path.join(folder, c))}
    train, val = contents('train'), contents('val')
    assert len(train) == 5000 and len(val) == 1000             # no duplicated files
    assert not train & val                                     # held-out means held out


def test_knn_on_a_problem_with_a_known_answer():
    """Two tight clusters on the unit circle and one ambiguous point, k 3: the weighted vote is known."""
    train = torch.tensor([[1., 0.], [0.99, 0.1], [0.98, -0.1], [0., 1.], [0.1, 0.99], [-0.1, 0.98]])
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    test = torch.tensor([[2., 0.1], [0.05, 3.], [1., 1.05]])
    pred = knn_classify(train, labels, test, num_classes=2, k=3, T=0.1)
    assert pred.tolist() == [0, 1, 1]


@pytest.mark.slow
@pytest.mark.parametrize('recipe', ['mocov3', 'byol', 'm2t', 'vit'])
def test_cifar_recipes_run_a_few_steps(tiny_folder, tmp_path, recipe):
    """The CONFIG.md CIFAR-10 commands, shrunk (batch, widths, epochs) to a few CPU steps, with --fast as
    there (on a CPU: the in-memory pipeline, fp32)."""
    common = ['--image-size', '32', '--no-blur', '--fast', '-b', '16', '--epochs', '1',
              '--warmup-epochs', '0', '-j', '0',
              '--moco-dim', '16', '--moco-mlp-dim', '32', '--knn-freq', '1', '--knn-k', '5', '-p', '100',
              '--output-dir', str(tmp_path)]
    arch = {'vit': ['-a', 'vit_tiny_patch4', '--optimizer', 'adamw', '--lr', '1.5e-4', '--wd', '0.1',
                    '--stop-grad-conv1', '--moco-t', '0.2', '--moco-m-cos']}.get(
        recipe, ['-a', 'resnet18_cifar', '--channels-last', '--method', recipe])
    if recipe == 'mocov3':   # CONFIG.md's solo-learn variant
        arch += ['--lars-trust', '0.02', '--lr', '0.3']
    rc, out = wait_output(start([sys.executable, 'main_moco.py', *arch, *common, str(tiny_folder)]))
    assert rc == 0, out
    assert 'kNN top-1 after epoch 1' in out and os.path.exists(tmp_path / 'checkpoint_0000.pth.tar')
    assert '(memory data pipeline)' in out     # and its kNN monitor reads the decoded images
    if recipe == 'mocov3':
        groups = torch.load(tmp_path / 'checkpoint_0000.pth.tar', weights_only=True)['optimizer']['param_groups']
        assert groups[0]['trust_coefficient'] == 0.02
