"""moco/file_check.py: every single-bit flip of a checkpoint torch wrote is found, wherever it lands (data,
names, padding, headers, the central directory, the end records), and so is every cut; intact files
of every kind pass. (``torch.load`` loads most of these damaged files without a word.)"""
import io
import random
import shutil
import struct
import zipfile
import zlib

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


def _torch_layout(entries, big=(), far=()):
    """An archive of the (name, data) entries laid out byte for byte as torch's writer lays out a checkpoint
    (checked below), with the entries named in ``big`` and ``far`` written as it writes an entry of 4 GiB
    or more and one that starts past 4 GiB: 0xFFFFFFFF in the central record's sizes or offset, the true
    values in zip64 fields of the central record and of the local header (there before the padding, with
    a compressed size of 0, as the data descriptor follows), and a data descriptor of 64-bit sizes."""
    out, central, ff = bytearray(), bytearray(), 0xFFFFFFFF
    for name, data in entries:
        offset, crc, size = len(out), zlib.crc32(data), len(data)
        sizes = struct.pack('<QQ', size, size) if name in big else b''
        where = struct.pack('<Q', offset) if name in far else b''
        local64 = (struct.pack('<QQ', size, 0) if sizes else b'') + where
        local64 = struct.pack('<HH', 1, len(local64)) + local64 if local64 else b''
        pad = -(offset + 30 + len(name) + len(local64) + 4) % 64   # the data starts on 64 bytes
        out += struct.pack('<IHHHHHIIIHH', 0x04034b50, 0, 0x808, 0, 0, 0, 0, 0, 0, len(name), len(local64) + 4 + pad)
        out += name + local64 + struct.pack('<HH', 0x4246, pad) + b'Z' * pad + data
        out += struct.pack('<IIQQ' if local64 else '<IIII', 0x08074b50, crc, size, size)
        central64 = struct.pack('<HH', 1, len(sizes + where)) + sizes + where if sizes + where else b''
        central += struct.pack('<IHHHHHHIIIHHHHHII', 0x02014b50, 0, 0, 0x808, 0, 0, 0, crc,
                               *[ff if sizes else size] * 2, len(name), len(central64), 0, 0, 0, 0,
                               ff if where else offset) + name + central64
    n, cd_offset, z_offset = len(entries), len(out), len(out) + len(central)
    out += central
    out += struct.pack('<IQHHIIQQQQ', 0x06064b50, 44, 0x031E, 0x2D, 0, 0, n, n, len(central), cd_offset)
    out += struct.pack('<IIQI', 0x07064b50, 0, z_offset, 1)
    out += struct.pack('<IHHHHIIH', 0x06054b50, 0, 0, n, n, len(central), ff if far else cd_offset, 0)
    return bytes(out)


def test_zip64_fields_of_entries_past_4gib_pass_and_flips_in_them_are_found(tmp_path):
    """torch's writer puts a zip64 field in the local header of an entry of 4 GiB or more (its sizes) or
    one that starts past 4 GiB (its offset), before its padding: a small archive laid out the same way
    passes, and a flip in its zip64 fields, its padding or its data is found."""
    path = _checkpoint(tmp_path / 'ckpt.pth.tar')
    with zipfile.ZipFile(path) as z:
        entries = [(i.filename.encode(), z.read(i)) for i in sorted(z.infolist(), key=lambda i: i.header_offset)]
    assert _torch_layout(entries) == path.read_bytes()   # the layout is torch's, byte for byte
    names = [n for n, _ in entries if b'/data/' in n]
    big, far = {names[0], names[1]}, {names[1], names[2]}   # sizes only, sizes and offset, offset only
    data = _torch_layout(entries, big, far)
    path.write_bytes(data)
    assert damage(path) is None
    assert torch.load(path, weights_only=True)['epoch'] == 3 and zipfile.ZipFile(path).testzip() is None
    damaged = tmp_path / 'flipped.pth.tar'
    for info in zipfile.ZipFile(path).infolist():
        if info.filename.encode() in big | far:
            name_len, extra_len = struct.unpack_from('<HH', data, info.header_offset + 26)
            extra = info.header_offset + 30 + name_len   # the zip64 field, then the padding
            for offset, what in ((extra + 4, 'its zip64 extra field'), (extra + extra_len - 1, 'its padding'),
                                 (extra + extra_len + 1, 'CRC-32')):   # (the data starts after the padding)
                damaged.write_bytes(_flipped(data, offset, 2))
                assert what in (damage(damaged) or 'not found'), (info.filename, what)
    missed = []
    for offset in range(len(data)):   # every byte (one bit each): the headers, the central records, the end
        damaged.write_bytes(_flipped(data, offset, offset % 8))
        if damage(damaged) is None:
            missed.append(offset)
    assert not missed, f'{len(missed)} of {len(data)} flips not found, first at {missed[:5]}'


def _flip_in_place(path, offset):
    with open(path, 'r+b') as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x10]))


@pytest.mark.slow
def test_a_real_checkpoint_over_8gib_passes_and_flips_past_4gib_are_found(tmp_path):
    """A real ``torch.save`` of two tensors of 4.3e9 bytes and a small one: its data/0 is over 4 GiB,
    data/1 too and starts past 4 GiB, data/2 only starts past it, so the local headers hold zip64 fields
    of all three kinds (sizes; sizes and offset; offset). It passes; a flip in the data far past 4 GiB or
    in a local zip64 field is found. (8.6 GB on disk for some 30 s; removed even if the test fails.)"""
    big = int(4.3e9)
    if shutil.disk_usage(tmp_path).free < 2 * big + (1 << 30):
        pytest.skip(f'needs 9.6 GB free on the disk of {tmp_path}')
    path = tmp_path / 'big.pth.tar'
    try:
        torch.save({'a': torch.empty(big, dtype=torch.uint8), 'b': torch.empty(big, dtype=torch.uint8),
                    'c': torch.arange(3.0)}, path)   # (torch.empty: no memset; its bytes are whatever they are)
        assert damage(path) is None
        assert torch.load(path, mmap=True, weights_only=True)['c'].tolist() == [0.0, 1.0, 2.0]
        with zipfile.ZipFile(path) as z:
            infos = {i.filename.rsplit('/', 1)[-1]: i for i in z.infolist() if '/data/' in i.filename}
        starts, zip64 = {}, {}
        with open(path, 'rb') as f:
            for key, info in infos.items():
                f.seek(info.header_offset)
                _, name_len, extra_len = struct.unpack('<26sHH', f.read(30))
                extra = f.read(name_len + extra_len)[name_len:]
                assert extra[:2] == b'\x01\x00'   # the zip64 field, then the padding
                zip64[key] = (info.header_offset + 30 + name_len, struct.unpack_from('<H', extra, 2)[0])
                starts[key] = info.header_offset + 30 + name_len + extra_len
        assert {k: size for k, (_, size) in zip64.items()} == {'0': 16, '1': 24, '2': 8}
        for offset, what in ((starts['1'] + big - 10**9, 'data/1: its bytes do not match their CRC-32'),
                             ((1 << 32) + 10**6, 'data/0: its bytes do not match their CRC-32'),
                             (zip64['1'][0] + 4 + 16 + 4, 'data/1: its zip64 extra field does not match'),
                             (zip64['2'][0] + 4 + 4, 'data/2: its zip64 extra field does not match')):
            _flip_in_place(path, offset)
            assert what in (damage(path) or 'not found'), (offset, what)
            _flip_in_place(path, offset)
    finally:
        path.unlink(missing_ok=True)
