"""moco/file_check.py: every single-bit flip of a checkpoint torch wrote is found, wherever it lands (data,
names, padding, headers, the central directory, the end records), and so is every cut; intact files
of every kind pass. (``torch.load`` loads most of these damaged files without a word.)"""
import io
import random
import zipfile

import pytest
import torch

from helpers import TinyNet
from moco.file_check import damage


def _checkpoint(path, zip64_sized=False):
    torch.manual_seed(0)
    net = TinyNet()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    weights = {'module.base_encoder.' + k: v for k, v in net.state_dict().items()}
    state = {'epoch': 3, 'arch': 'tiny', 'state_dict': weights,
             'optimizer': opt.state_dict(), 'args': {'lr': 0.1, 'note': 'ü'}}
    torch.save(state, path)
    return path


def _flipped(data, offset, bit):
    out = bytearray(data)
    out[offset] ^= 1 << bit
    return bytes(out)


def test_intact_files_pass(tmp_path):
    assert damage(_checkpoint(tmp_path / 'a.pth.tar')) is None
    buf = io.BytesIO()
    torch.save({'w': torch.ones(3)}, buf)        # saved through a file object: 'archive/' entries
    (tmp_path / 'b.pt').write_bytes(buf.getvalue())
    assert damage(tmp_path / 'b.pt') is None
    legacy = tmp_path / 'legacy.pt'              # torch's pre-1.6 format is not a zip: not checked
    torch.save({'w': torch.ones(3)}, legacy, _use_new_zipfile_serialization=False)
    assert damage(legacy) is None and torch.load(legacy, weights_only=True)['w'].sum() == 3
    with zipfile.ZipFile(tmp_path / 'other.zip', 'w') as z:   # another writer's archive, stored
        z.writestr('x', b'hello' * 100)
    assert damage(tmp_path / 'other.zip') is None


def _flips_found(tmp_path, offsets):
    data = _checkpoint(tmp_path / 'ckpt.pth.tar').read_bytes()
    offsets = [o for o in offsets(len(data))]
    damaged = tmp_path / 'flipped.pth.tar'
    missed = []
    for offset in offsets:
        damaged.write_bytes(_flipped(data, offset, offset % 8))
        if damage(damaged) is None:
            missed.append(offset)
    assert not missed, f'{len(missed)} of {len(offsets)} flips not found, first at {missed[:5]}'


def test_bit_flips_in_the_structure_and_the_data_are_found(tmp_path):
    """The first and the last bytes (headers, names, padding, the central directory, the end records)
    all, and every 9th byte in between."""
    _flips_found(tmp_path, lambda n: sorted(set(range(700)) | set(range(700, n - 1500, 9)) | set(range(n - 1500, n))))


@pytest.mark.slow
def test_every_bit_flip_of_a_small_checkpoint_is_found(tmp_path):
    _flips_found(tmp_path, range)


def test_flips_in_tensor_data_load_silently_in_torch_and_are_named(tmp_path):
    path = _checkpoint(tmp_path / 'ckpt.pth.tar')
    data = path.read_bytes()
    start = data.index(torch.load(path, weights_only=True)['state_dict']['module.base_encoder.conv.weight']
                       .numpy().tobytes()[:64])
    path.write_bytes(_flipped(data, start + 5, 3))
    assert isinstance(torch.load(path, weights_only=True), dict)   # what happens without the check
    assert 'its bytes do not match their CRC-32' in damage(path) and 'entry ckpt.pth/data/' in damage(path)


def test_every_cut_is_found(tmp_path):
    data = _checkpoint(tmp_path / 'ckpt.pth.tar').read_bytes()
    cut = tmp_path / 'cut.pth.tar'
    for length in sorted(set(random.Random(0).sample(range(1, len(data)), 300)) | {0, 1, 21, 22, len(data) - 1}):
        cut.write_bytes(data[:length])
        assert damage(cut) is not None, length
    cut.write_bytes(data + b'\0')                # a byte too many (a copy that appended)
    assert damage(cut) is not None


@pytest.mark.slow
def test_flips_in_a_larger_checkpoint_at_seeded_offsets_are_found(tmp_path):
    from helpers import small_moco
    model = small_moco('mocov3', 'vit_tiny_patch4')
    path = tmp_path / 'vit.pth.tar'
    torch.save({'state_dict': model.state_dict(), 'epoch': 1}, path)
    data = path.read_bytes()
    rng = random.Random(1)
    damaged = tmp_path / 'flipped.pth.tar'
    for _ in range(50):
        offset = rng.randrange(len(data))
        damaged.write_bytes(_flipped(data, offset, rng.randrange(8)))
        assert damage(damaged) is not None, offset
