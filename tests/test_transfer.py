"""transfer/: the data set layouts (CIFAR folders, Flowers-102 .mat files, Pets annotations), the
.mat reader, and one fine-tuning step from a converted and from a pretraining checkpoint."""
import base64
import json
import os
import shutil
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import convert_to_deit
import main_moco
from moco.checkpoint import read_backbone
from transfer import finetune
from transfer.datasets import Flowers, Pets, build_dataset, read_mat, transfer_transform

# Written by scipy.io.savemat({'labels': [[77, 77, 3, 102, 1]] (double), 'trnid': [[1, 4]] (double),
# 'tstid': [[2, 3, 5]] (uint16)}), without and with compression.
SCIPY_MAT = (
    'TUFUTEFCIDUuMCBNQVQtZmlsZSBQbGF0Zm9ybTogcG9zaXgsIENyZWF0ZWQgb246IE1vbiBOb3YgMjMgMTE6MjE6NTMgMjAyNgAAAAAA'
    'AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAABSU0OAAAAYAAAAAYAAAAIAAAABgAAAAAAAAAFAAAA'
    'CAAAAAEAAAAFAAAAAQAAAAYAAABsYWJlbHMAAAkAAAAoAAAAAAAAAABAU0AAAAAAAEBTQAAAAAAAAAhAAAAAAACAWUAAAAAAAADwPw4A'
    'AABIAAAABgAAAAgAAAAGAAAAAAAAAAUAAAAIAAAAAQAAAAIAAAABAAAABQAAAHRybmlkAAAACQAAABAAAAAAAAAAAADwPwAAAAAAABBA'
    'DgAAAEAAAAAGAAAACAAAAAsAAAAAAAAABQAAAAgAAAABAAAAAwAAAAEAAAAFAAAAdHN0aWQAAAAEAAAABgAAAAIAAwAFAAAA',
    'TUFUTEFCIDUuMCBNQVQtZmlsZSBQbGF0Zm9ybTogcG9zaXgsIENyZWF0ZWQgb246IE1vbiBOb3YgMjMgMTE6MjE6NTMgMjAyNgAAAAAA'
    'AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAABSU0PAAAAOgAAAHic42NgYEgAYjYg5oDSIMAK5TNC'
    '2YxQuZzEpNScYgYGTiBbA6qWwSHYAYVm4IDQDZFQ/gd7AAkdB3cPAAAAMQAAAHic42NgYPAAYjYg5oDSIMAK5TMCMROUBomVFOVlpgBp'
    'TiAWYICBD/YQWsABAHGSBDoPAAAALwAAAHic42NgYHAAYjYg5gBibgYIYIXyGYGYGUqDxEqKSzJTgDQLVA8TUBYkDgBO6AK7',
)


def write_mat(path, arrays, compress):
    """A MATLAB-style v5 file of 1xN double arrays whose data are stored as small integers (MATLAB
    saves integer-valued doubles as miUINT8/miUINT16), with small-format tags where they fit."""
    def element(mi_type, data):
        if len(data) <= 4:
            return struct.pack('<HH', mi_type, len(data)) + data.ljust(4, b'\0')
        return struct.pack('<II', mi_type, len(data)) + data + b'\0' * (-len(data) % 8)

    body = b''
    for name, values in arrays.items():
        mi_type, dtype = (2, np.uint8) if max(values) < 256 else (4, np.uint16)
        matrix = (element(6, struct.pack('<II', 6, 0)) + element(5, struct.pack('<ii', 1, len(values)))
                  + element(1, name.encode()) + element(mi_type, np.asarray(values, dtype).tobytes()))
        matrix = struct.pack('<II', 14, len(matrix)) + matrix
        if compress:
            packed = zlib.compress(matrix)
            matrix = struct.pack('<II', 15, len(packed)) + packed
        body += matrix
    header = b'MATLAB 5.0 MAT-file, written by a test'.ljust(116) + b'\0' * 8 + struct.pack('<H', 0x0100) + b'IM'
    with open(path, 'wb') as f:
        f.write(header + body)


FLOWER_LABELS = [1, 5, 102, 5, 1, 102]         # image_00001 .. image_00006
PETS = {'trainval.txt': [('Abyssinian_1', 1), ('Abyssinian_2', 1), ('yorkshire_terrier_1', 37),
                         ('yorkshire_terrier_2', 37)],
        'test.txt': [('Abyssinian_3', 1), ('yorkshire_terrier_3', 37)]}


@pytest.fixture(scope='module')
def layouts(tiny_folder, tmp_path_factory):
    """Tiny trees in the real layouts, made of demo JPEGs: 4 training and 2 test images each."""
    root = tmp_path_factory.mktemp('transfer')
    jpgs = sorted(os.path.join(tiny_folder, 'train', c, f) for c in ('airplane', 'cat')
                  for f in os.listdir(os.path.join(tiny_folder, 'train', c)))
    cifar = root / 'cifar'
    for i, cls in enumerate(('airplane', 'cat')):
        for split, n in (('train', 2), ('val', 1)):
            os.makedirs(cifar / split / cls)
            for j in range(n):
                shutil.copy(jpgs[4 * i + 2 * (split == 'val') + j], cifar / split / cls / f'{j}.jpg')
    flowers = root / 'flowers'
    os.makedirs(flowers / 'jpg')
    for i in range(6):
        shutil.copy(jpgs[i], flowers / 'jpg' / f'image_{i + 1:05d}.jpg')
    write_mat(flowers / 'imagelabels.mat', {'labels': FLOWER_LABELS}, compress=True)
    write_mat(flowers / 'setid.mat', {'trnid': [1, 2], 'valid': [3, 4], 'tstid': [5, 6]}, compress=False)
    pets = root / 'pets'
    os.makedirs(pets / 'images'), os.makedirs(pets / 'annotations')
    for split, rows in PETS.items():
        with open(pets / 'annotations' / split, 'w') as f:
            for k, (name, label) in enumerate(rows):
                f.write(f'{name} {label} {1 + (label > 12)} {label}\n')
                shutil.copy(jpgs[k + 4 * (split == 'test.txt')], pets / 'images' / f'{name}.jpg')
    return {'cifar10': str(cifar), 'flowers': str(flowers), 'pets': str(pets)}


def test_read_mat_matches_scipy(tmp_path):
    for blob in SCIPY_MAT:
        path = tmp_path / 'scipy.mat'
        path.write_bytes(base64.b64decode(blob))
        arrays = read_mat(path)
        assert arrays['labels'].dtype == np.float64 and arrays['labels'].shape == (1, 5)
        assert arrays['labels'].tolist() == [[77, 77, 3, 102, 1]]
        assert arrays['trnid'].tolist() == [[1, 4]] and arrays['tstid'].tolist() == [[2, 3, 5]]
        assert arrays['tstid'].dtype == np.uint16


def test_dataset_layouts(layouts):
    flowers_train = Flowers(layouts['flowers'], train=True)
    names = [(os.path.basename(p), t) for p, t in flowers_train.samples]
    assert names == [('image_00001.jpg', 0), ('image_00002.jpg', 4), ('image_00003.jpg', 101), ('image_00004.jpg', 4)]
    assert [t for _, t in Flowers(layouts['flowers'], train=False).samples] == [0, 101]
    for split, train in (('trainval.txt', True), ('test.txt', False)):
        pets = Pets(layouts['pets'], train=train)
        assert [(os.path.basename(p), t) for p, t in pets.samples] == [(n + '.jpg', c - 1) for n, c in PETS[split]]
    x, y = pets[1]
    assert y == 36 and x.size == (32, 32)  # a PIL image without a transform

    for name, n_classes in (('cifar10', 2), ('flowers', 102), ('pets', 37)):
        ds, classes = build_dataset(name, layouts[name], True, transfer_transform(True, 32))
        assert classes == n_classes and len(ds) == 4
        img, _ = ds[0]
        assert img.shape == (3, 32, 32)


def call(module, *argv):
    try:
        module.main(module.get_args_parser().parse_args([str(a) for a in argv]))
    except SystemExit as e:
        return e.code
    return 0


@pytest.fixture(scope='module')
def pretrained(layouts, tmp_path_factory):
    """A ViT pretraining checkpoint written by main_moco.py, and its convert_to_deit.py conversion."""
    out = tmp_path_factory.mktemp('vit')
    assert call(main_moco, layouts['cifar10'], '-a', 'vit_tiny_patch4', '--image-size', 32, '-b', 4, '--epochs', 1,
                '--warmup-epochs', 0, '--moco-dim', 16, '--moco-mlp-dim', 32, '-j', 0, '--output-dir', out) == 0
    moco = str(out / 'checkpoint_0000.pth.tar')
    deit = str(out / 'deit.pth')
    assert call(convert_to_deit, '--input', moco, '--output', deit) == 0
    return {'moco': moco, 'deit': deit}


# the original recipes of transfer/README.md (CIFAR-100 differs from CIFAR-10 by --mixup 0.5 only)
RECIPES = {
    'cifar10': ('deit', ['--weight-decay', 0.1, '--reprob', 0.0, '--drop-path', 0.1, '--mixup', 0.8, '--cutmix', 1]),
    'flowers': ('moco', ['--weight-decay', 0.3, '--reprob', 0.25, '--drop-path', 0.1, '--mixup', 0, '--cutmix', 0]),
    'pets': ('moco', ['--weight-decay', 0.1, '--reprob', 0, '--drop-path', 0, '--mixup', 0.8, '--cutmix', 0,
                      '--aug', 'deit', '--repeated-aug']),
}


@pytest.mark.slow   # pretrains, then runs the script
@pytest.mark.parametrize('data_set', sorted(RECIPES))
def test_finetune_one_step(data_set, layouts, pretrained, tmp_path, capsys):
    source, recipe = RECIPES[data_set]
    out, lr, wd = tmp_path / 'ft', 0.05 * 4 / 512, recipe[1]
    common = ['-a', 'vit_tiny_patch4', '--input-size', 32, '-j', 0, '-p', 1, '--output-dir', out,
              '--data-set', data_set, layouts[data_set]]
    assert call(finetune, *common, '-b', 4, '--epochs', 1, '--warmup-epochs', 0, '--lr', 0.05,
                '--pretrained', pretrained[source], *([] if '--repeated-aug' in recipe else ['--no-repeated-aug']),
                *recipe) == 0

    ckpt = torch.load(out / 'checkpoint.pth', map_location='cpu', weights_only=True)
    assert ckpt['epoch'] == 1 and ckpt['arch'] == 'vit_tiny_patch4'
    assert ckpt['optimizer']['param_groups'][0]['lr'] == pytest.approx(lr)
    n_classes = {'cifar10': 2, 'flowers': 102, 'pets': 37}[data_set]
    assert ckpt['model']['head.weight'].shape == (n_classes, 192)

    # the run started from the pretrained backbone: one AdamW step moves a weight by at most
    # lr x (1 + wd |w|) (|m / sqrt(v)| <= 1 at the first step), and it moves them all by about lr
    start = read_backbone(pretrained['moco']).state
    moved = []
    for k, w0 in start.items():
        delta = (ckpt['model'][k] - w0).abs()
        assert torch.all(delta <= lr * (1 + wd * w0.abs()) * 1.001 + 1e-7), k
        moved.append(delta.max().item())
    assert min(moved) > 0.5 * lr  # every tensor trained, pos_embed too (learnable in DeiT's ViT)
    assert (ckpt['model']['pos_embed'] != start['pos_embed']).any()

    log = [json.loads(line) for line in open(out / 'log.txt')]
    assert len(log) == 1 and 0 <= log[0]['test_acc1'] <= 100 and np.isfinite(log[0]['train_loss'])
    if data_set == 'cifar10':  # evaluation only, from the run's checkpoint, gives the logged accuracy
        capsys.readouterr()
        assert call(finetune, *common, '-e', '--resume', out / 'checkpoint.pth') == 0
        assert f'* Acc@1 {log[0]["test_acc1"]:.3f}' in capsys.readouterr().out


def test_epoch_lr_follows_deit():
    """DeiT steps timm's scheduler after each epoch: epoch e runs at warmup/cosine(max(e - 1, 0))."""
    args = finetune.get_args_parser().parse_args(['x', '--epochs', '10', '--warmup-epochs', '3'])
    lr, warmup_lr, min_lr = 6e-4, args.warmup_lr, args.min_lr
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = finetune.build_scheduler(optimizer, args)
    expected = []
    for e in range(10):
        t = max(e - 1, 0)
        expected.append(warmup_lr + t * (lr - warmup_lr) / 3 if t < 3
                        else min_lr + 0.5 * (lr - min_lr) * (1 + np.cos(np.pi * t / 10)))
    got = []
    for e in (0, 1, 2, 3, 4, 9, 5, 6, 7, 8):  # out of order, as after a resume: no hidden state
        finetune.set_epoch_lr(scheduler, e)
        got.append((e, optimizer.param_groups[0]['lr']))
    for e, value in got:
        assert value == pytest.approx(expected[e], rel=1e-9), e
    assert expected[0] == expected[1] == warmup_lr and expected[2] == pytest.approx(warmup_lr + (lr - warmup_lr) / 3)


def test_deit_randaugment_posterize_keeping_zero_bits_gives_black_instead_of_an_error():
    """DeiT's policy reaches 0 bits at magnitude 10 (about one image in 800); Pillow 11+ raises there,
    which killed a fine-tuning epoch. The black image is what older Pillow returned."""
    from timm.data.auto_augment import AugmentOp
    img = Image.new('RGB', (8, 8), (200, 100, 50))
    out = AugmentOp('PosterizeIncreasing', prob=1.0, magnitude=10, hparams={})(img)
    assert out.size == img.size and np.asarray(out).max() == 0
    kept = AugmentOp('PosterizeIncreasing', prob=1.0, magnitude=5, hparams={})(img)   # 2 bits: unchanged op
    assert np.array_equal(np.asarray(kept), np.asarray(ImageOps.posterize(img, 2)))


def test_position_embedding_is_recomputed_for_another_input_size():
    """MoCo v3's pos_embed is the fixed sin-cos table of its grid: at another --input-size it is the new
    grid's table (exactly), and a learned table (not sin-cos) is resampled as DeiT does."""
    import vits
    model = finetune.build_model('vit_tiny_patch4', 10, 16, 0.)          # 4 x 4 patches
    pretrained = {'pos_embed': vits.sincos_pos_embed_2d(8, 8, 192), 'cls_token': torch.zeros(1, 1, 192)}
    fitted = finetune.fit_position_embedding(pretrained, model)
    assert torch.equal(fitted['pos_embed'], vits.sincos_pos_embed_2d(4, 4, 192))
    assert fitted['cls_token'] is pretrained['cls_token']
    learned = {'pos_embed': torch.randn(1, 65, 192)}
    assert finetune.fit_position_embedding(learned, model)['pos_embed'].shape == (1, 17, 192)
    same = {'pos_embed': vits.sincos_pos_embed_2d(4, 4, 192)}
    assert finetune.fit_position_embedding(same, model) is same


@pytest.mark.slow   # pretrains, then runs the script
def test_finetune_at_another_size_and_bad_folders(layouts, pretrained, tmp_path, capsys):
    out = tmp_path / 'ft'
    common = ['-a', 'vit_tiny_patch4', '-j', 0, '-p', 1, '-b', 4, '--epochs', 1, '--warmup-epochs', 0,
              '--no-repeated-aug', '--mixup', 0, '--cutmix', 0, '--data-set', 'cifar10']
    assert call(finetune, *common, '--input-size', 16, '--pretrained', pretrained['moco'], '--output-dir', out,
                layouts['cifar10']) == 0                                # pretrained at 32 px (8 x 8 patches)
    assert 'position embedding is for a 8x8 grid of patches, this --input-size gives 4x4' in capsys.readouterr().out
    assert torch.load(out / 'checkpoint.pth', weights_only=True)['model']['pos_embed'].shape == (1, 17, 192)
    flat = tmp_path / 'flat'
    for split in ('train', 'val'):
        (flat / split).mkdir(parents=True)
        for k in range(4):
            Image.new('RGB', (32, 32), (k * 40, 0, 0)).save(flat / split / f'{k}.jpg')
    capsys.readouterr()
    assert call(finetune, *common, '--input-size', 32, '--output-dir', tmp_path / 'ft2', '--data-set', 'imagenet',
                flat) == 2
    assert 'fine-tuning needs labels' in capsys.readouterr().err
    assert call(finetune, *common, '--input-size', 30, '--output-dir', tmp_path / 'ft3', layouts['cifar10']) == 2
    assert "--input-size 30 is not a multiple of vit_tiny_patch4's patch size 4" in capsys.readouterr().err
    assert not (tmp_path / 'ft2').exists() and not (tmp_path / 'ft3').exists()
