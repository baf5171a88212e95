"""The demo's recipe stays runnable: moco.tools.demo end to end (baselines, MoCo v3 pretraining through
main_moco.py with the demo's flags, kNN curve, linear probe, curves.png) on a few shipped images and
a few steps, with a tiny projector."""
import os

import torch

from moco.data.eval_sets import eval_resize
from moco.data.memory import decode_folder
from moco.knn import knn_top1, raw_pixel_knn_accuracy
from moco.models import build_moco, encoder_factory
from moco.tools import demo


def test_demo_recipe_runs_a_few_steps(tmp_path):
    args = demo.get_args_parser().parse_args(
        ['--epochs', '2', '--knn-freq', '1', '--per-class', '4', '2',
         '--output-dir', str(tmp_path)])
    result = demo.main(args, moco_overrides=['-b', '8', '--moco-mlp-dim', '32', '--moco-dim', '16', '-p', '100'])
    assert [e for e, _ in result['knn_curve']] == [0, 1, 2]          # at init and after every epoch
    for key in ('raw_pixels', 'init_moco', 'init_default', 'learned', 'probe'):
        assert 0 <= result[key] <= 100
    assert result['probe_wd'] in demo.PROBE_WDS
    assert os.path.isfile(os.path.join(result['run_dir'], 'curves.png'))
    ckpt = os.path.join(result['run_dir'], 'checkpoint_0001.pth.tar')
    # the table's rows read the kNN monitor's view: the same images, resized to the training size
    assert result['image_size'] == demo.IMAGE_SIZE < 32
    data = os.path.join(str(tmp_path), 'data', 'cifar10_demo')
    (train_x, train_y, _), (val_x, val_y, _) = decode_folder(data, 'train'), decode_folder(data, 'val')
    train_x, val_x = eval_resize(train_x, demo.IMAGE_SIZE), eval_resize(val_x, demo.IMAGE_SIZE)
    assert result['raw_pixels'] == raw_pixel_knn_accuracy(train_x, train_y, val_x, val_y, k=demo.KNN_K, T=demo.KNN_T)
    encoder = demo.pretrained_encoder(ckpt)
    learned = knn_top1(demo.features(encoder, train_x), train_y, demo.features(encoder, val_x), val_y,
                       k=demo.KNN_K, T=demo.KNN_T)
    assert learned == result['learned']      # the monitor's figure after the last epoch


def test_demo_arch_is_a_resnet_with_moco_init():
    """The demo's network: torchvision's ResNet modules, widths 16-32-64-128; MoCo v3 zero-initialises its
    residual branches."""
    enc = encoder_factory(demo.ARCH)(num_classes=5)
    assert enc(torch.zeros(2, 3, demo.IMAGE_SIZE, demo.IMAGE_SIZE)).shape == (2, 5)
    stages = (enc.layer1, enc.layer2, enc.layer3, enc.layer4)
    assert [stage[0].conv1.out_channels for stage in stages] == [16, 32, 64, 128]
    assert all(b.bn2.weight.detach().abs().sum().item() == 0 for b in (enc.layer1[0], enc.layer4[0]))
    default = encoder_factory(demo.ARCH, zero_init_residual=False)(num_classes=5)
    assert default.layer1[0].bn2.weight.detach().abs().sum().item() > 0
    model = build_moco(demo.ARCH, dim=16, mlp_dim=32, T=0.2)
    assert model.base_encoder.fc[0].in_features == 128


def test_probe_chooses_its_l2_on_training_images_and_fits_to_convergence():
    """Two Gaussian classes in 8 dimensions: the chosen L2 is among the grid, the probe separates them,
    and a converged fit reaches the minimum of its objective (zero gradient)."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(400) % 2
    x = torch.randn(400, 8, generator=g) + y[:, None] * 1.5
    result = demo.linear_probe(x[:300], y[:300], x[300:], y[300:], log=lambda line: None)
    assert result['wd'] in demo.PROBE_WDS and set(result['cv_top1']) == set(demo.PROBE_WDS)
    assert result['top1'] > 90
    head = demo.fit_logistic(x, y, 1e-2)
    loss = torch.nn.functional.cross_entropy(head(x), y) + 1e-2 / 2 * head.weight.pow(2).sum()
    grads = torch.autograd.grad(loss, list(head.parameters()))
    assert max(gr.abs().max().item() for gr in grads) < 1e-4


def test_raw_pixel_knn_is_mean_centred():
    """Two classes that differ only around the mean image: without centring every image points the same way."""
    base = torch.full((3, 4, 4), 200.)
    train = torch.stack([base + 1, base + 2, base - 1, base - 2])
    labels = torch.tensor([0, 0, 1, 1])
    test = torch.stack([base + 1.5, base - 1.5])
    assert raw_pixel_knn_accuracy(train, labels, test, torch.tensor([0, 1]), k=2, T=0.1) == 100
