"""Whether a checkpoint file is intact, before anything is loaded from it.

``torch.save`` writes a zip archive and stores the CRC-32 of every entry, but ``torch.load`` does not
check them: a file with a flipped bit loads silently. ``damage(path)`` reads the file once (about a
second a GB from a local disk) and returns None when it is intact, else what is wrong, naming the
entry: an entry whose bytes do not match its CRC-32, or a zip structure that does not add up. For the
files torch's writer makes, every byte is accounted for: each entry's local header, name, zip64 field
(for an entry of or past 4 GiB) and alignment padding, its data (the CRC) and the data descriptor after
it agree with its record in the central directory, the records follow one another without gaps, and
the central directory and the end records hold the values that writer puts there. A flipped bit
anywhere is therefore reported, even one in a byte that ``torch.load`` would never read. Files of other
zip writers get the CRC and the structure checks only; files that are not zip archives at all (torch's
pre-1.6 format) are not checked.
"""
import mmap
import os
import struct
import zlib

LOCAL, CENTRAL, DESCRIPTOR = 0x04034b50, 0x02014b50, 0x08074b50
END, ZIP64_END, ZIP64_LOCATOR = 0x06054b50, 0x06064b50, 0x07064b50
TORCH_PADDING_ID = 0x4246   # 'FB': the extra field torch's writer pads entries with, filled with b'Z'
TORCH_ZIP64_VERSIONS = (0x031E, 0x002D)   # what torch's writer (miniz, since torch 1.6) puts in the zip64 end record
CRC_BLOCK = 1 << 24


class Damaged(Exception):
    pass


def is_zip(path):
    """Whether the file starts as a zip archive or ends as one (a damaged start is still a zip's)."""
    with open(path, 'rb') as f:
        head = f.read(4)
        f.seek(max(0, os.path.getsize(path) - 22))
        tail = f.read(4)
    return head == struct.pack('<I', LOCAL) or tail == struct.pack('<I', END)


def damage(path):
    """None if ``path`` is intact (or not a zip archive), else a short description of the damage."""
    size = os.path.getsize(path)
    if size == 0:
        return 'the file is empty'
    if size < 22:   # shorter than a zip's end record: a cut archive if it starts as one
        with open(path, 'rb') as f:
            head = f.read(4)
        return 'the file is cut short' if struct.pack('<I', LOCAL).startswith(head[:4]) else None
    if not is_zip(path):
        return None
    with open(path, 'rb') as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        try:
            _check(memoryview(data))
        except Damaged as e:
            return str(e)
        except (struct.error, IndexError, ValueError) as e:
            return f'the zip structure is cut or garbled ({e})'
    return None


def _unpack(fmt, data, offset, what):
    size = struct.calcsize(fmt)
    if offset < 0 or offset + size > len(data):
        raise Damaged(f'{what} lies outside the file (cut short?)')
    return struct.unpack_from(fmt, data, offset)


def _end_records(data):
    """(number of entries, central directory offset and size, the zip64 end record's (version made by,
    version needed) or None without zip64 records, where the end records start) from
    the end record (the last 22 bytes: torch writes no archive comment) and, when present before it,
    the zip64 locator and end record, with which it must agree."""
    pos = len(data) - 22
    (sig, disk, cd_disk, count_disk, count, cd_size, cd_offset,
     comment) = _unpack('<IHHHHIIH', data, pos, 'the end record')
    if sig != END or comment != 0:
        raise Damaged('the end of the zip archive is missing or damaged (the file was cut short?)')
    if disk or cd_disk or count_disk != count:
        raise Damaged('the end record of the zip archive is damaged')
    loc = pos - 20
    if loc < 56 or _unpack('<I', data, loc, 'the zip64 locator')[0] != ZIP64_LOCATOR:
        if count == 0xFFFF or 0xFFFFFFFF in (cd_size, cd_offset):
            raise Damaged('the zip64 records of the archive are missing or damaged')
        return count, cd_offset, cd_size, None, pos
    _, z_disk, z_offset, disks = _unpack('<IIQI', data, loc, 'the zip64 locator')
    if z_disk != 0 or disks != 1 or z_offset != loc - 56:
        raise Damaged('the zip64 locator of the archive is damaged')
    (sig, rec_size, made_by, needed, disk64, cd_disk64, count_disk64, count64, cd_size64,
     cd_offset64) = _unpack('<IQHHIIQQQQ', data, z_offset, 'the zip64 end record')
    if sig != ZIP64_END or rec_size != 44 or disk64 or cd_disk64 or count_disk64 != count64:
        raise Damaged('the zip64 end record of the archive is damaged')
    for small, big, marker in ((count, count64, 0xFFFF), (cd_size, cd_size64, 0xFFFFFFFF),
                               (cd_offset, cd_offset64, 0xFFFFFFFF)):
        if small != big and small != marker:
            raise Damaged('the end records of the archive disagree')
    return count64, cd_offset64, cd_size64, (made_by, needed), z_offset


def _extra_fields(extra, what):
    """A header's extra fields as {tag: body}. Each must be whole and known: torch's writer puts in at most
    a zip64 field and its padding (in the local header, the zip64 field comes first)."""
    fields, pos = {}, 0
    while pos < len(extra):
        if pos + 4 > len(extra):
            raise Damaged(f'{what} has a garbled extra field')
        tag, size = struct.unpack_from('<HH', extra, pos)
        body = bytes(extra[pos + 4:pos + 4 + size])
        if len(body) != size:
            raise Damaged(f'{what} has a cut extra field')
        if tag not in (1, TORCH_PADDING_ID):
            raise Damaged(f'{what} has an unknown extra field {tag:#06x}')
        if tag in fields:
            raise Damaged(f'{what} has the extra field {tag:#06x} twice')
        fields[tag] = body
        pos += 4 + size
    return fields


def _zip64_values(extra, file_size, comp_size, offset):
    """The central record's sizes and offset, with the zip64 extra field read where they are 0xFFFFFFFF."""
    body = _extra_fields(extra, 'a central directory record').get(1, b'')
    values, k = [], 0
    for value in (file_size, comp_size, offset):
        if value == 0xFFFFFFFF:
            if k + 8 > len(body):
                raise Damaged('a zip64 extra field has the wrong length')
            value = struct.unpack_from('<Q', body, k)[0]
            k += 8
        values.append(value)
    if k != len(body):
        raise Damaged('a zip64 extra field has the wrong length')
    return tuple(values)


def _local_zip64(body, e, descriptor):
    """Whether a local header's zip64 field agrees with the central record. Its length says what it holds:
    the sizes (uncompressed, compressed), the offset, or both in that order; torch's writer adds the
    offset for an entry that starts past 4 GiB and, as it writes the header before the data, gives 0 for
    the compressed size when a data descriptor follows."""
    sizes = struct.pack('<QQ', e['file_size'], 0 if descriptor else e['comp_size'])
    offset = struct.pack('<Q', e['offset'])
    return body in (sizes, offset, sizes + offset)


def _check(data):
    count, cd_offset, cd_size, zip64, end_of_cd = _end_records(data)
    if cd_offset + cd_size != end_of_cd:
        raise Damaged('the central directory of the archive does not end where the end records start')
    entries, pos = [], cd_offset
    for _ in range(count):
        (sig, made_by, needed, flags, method, time, date, crc, comp_size, file_size, name_len, extra_len,
         comment_len, disk, internal, external, offset) = _unpack('<IHHHHHHIIIHHHHHII', data, pos, 'a central record')
        if sig != CENTRAL:
            raise Damaged('the central directory of the archive is damaged')
        name = bytes(data[pos + 46:pos + 46 + name_len])
        extra = bytes(data[pos + 46 + name_len:pos + 46 + name_len + extra_len])
        file_size, comp_size, offset = _zip64_values(extra, file_size, comp_size, offset)
        if disk or comment_len:
            raise Damaged(f'entry {name.decode(errors="replace")}: its central record is damaged')
        entries.append(dict(name=name, made_by=made_by, needed=needed, flags=flags, method=method, time=time,
                            date=date, crc=crc, comp_size=comp_size, file_size=file_size, offset=offset,
                            internal=internal, external=external))
        pos += 46 + name_len + extra_len + comment_len
    if pos != end_of_cd:
        raise Damaged('the central directory of the archive holds more or fewer records than it says')
    expected = 0
    padded = []
    for e in sorted(entries, key=lambda e: e['offset']):
        label = f'entry {e["name"].decode(errors="replace")}'
        if e['offset'] != expected:
            raise Damaged(f'{label}: the archive has a gap or an overlap before it')
        (sig, needed, flags, method, time, date, crc, comp_size, file_size, name_len,
         extra_len) = _unpack('<IHHHHHIIIHH', data, e['offset'], f'{label}: its local header')
        name = bytes(data[e['offset'] + 30:e['offset'] + 30 + name_len])
        if sig != LOCAL or name != e['name'] or (needed, flags, method, time, date) != (
                e['needed'], e['flags'], e['method'], e['time'], e['date']):
            raise Damaged(f'{label}: its local header does not match the central directory')
        extra = data[e['offset'] + 30 + name_len:e['offset'] + 30 + name_len + extra_len]
        fields = _extra_fields(extra, f'{label}: its local header')
        padded.append((_torch_padding(fields.get(TORCH_PADDING_ID), label), label))
        z64 = fields.get(1)
        if z64 is not None and not _local_zip64(z64, e, flags & 0x8):
            raise Damaged(f'{label}: its zip64 extra field does not match the central directory')
        start = e['offset'] + 30 + name_len + extra_len
        if method != 0:   # torch stores entries uncompressed; a compressed entry is checked by zlib's reader
            raise Damaged(f'{label}: compressed (method {method}), not a checkpoint written by torch')
        if e['comp_size'] != e['file_size']:
            raise Damaged(f'{label}: its sizes disagree')
        end = start + e['comp_size']
        if end > len(data):
            raise Damaged(f'{label}: its data runs past the end of the file (cut short?)')
        if _crc(data[start:end]) != e['crc']:
            raise Damaged(f'{label}: its bytes do not match their CRC-32 (damaged data)')
        if flags & 0x8:   # a data descriptor follows the data
            if (crc, comp_size, file_size) != (0, 0, 0):
                raise Damaged(f'{label}: its local header does not match the central directory')
            sig = _unpack('<I', data, end, f'{label}: its data descriptor')[0]
            if sig != DESCRIPTOR:
                raise Damaged(f'{label}: its data descriptor is damaged')
            wide = zip64 is not None and _unpack('<IIQQ', data, end, label)[2:] == (e['comp_size'], e['file_size'])
            fmt = '<IIQQ' if wide else '<IIII'
            _, d_crc, d_comp, d_size = _unpack(fmt, data, end, f'{label}: its data descriptor')
            if (d_crc, d_comp, d_size) != (e['crc'], e['comp_size'], e['file_size']):
                raise Damaged(f'{label}: its data descriptor does not match the central directory')
            end += struct.calcsize(fmt)
        elif crc != e['crc'] or (comp_size, file_size) != (e['comp_size'], e['file_size']) and not (
                (comp_size, file_size) == (0xFFFFFFFF, 0xFFFFFFFF) and z64 is not None and len(z64) >= 16):
            # (sizes of 0xFFFFFFFF say the true ones are in the zip64 field, checked above)
            raise Damaged(f'{label}: its local header does not match the central directory')
        expected = end
    if expected != cd_offset:
        raise Damaged('the archive has bytes between its last entry and its central directory')
    if any(p for p, _ in padded):   # torch's writer pads every entry and leaves some fields at zero
        for p, label in padded:
            if not p:
                raise Damaged(f'{label}: its padding is damaged')
        for e in entries:   # (fields that nothing else cross-checks)
            if e['made_by'] or e['internal'] or e['external']:
                raise Damaged(f'entry {e["name"].decode(errors="replace")}: its central record is damaged')
        if zip64 not in (None, TORCH_ZIP64_VERSIONS):
            raise Damaged('the zip64 end record of the archive is damaged')


def _torch_padding(body, label):
    """Whether a local header has torch's alignment padding (``body``: its field's, or None), checked to
    be intact."""
    if body is None:
        return False
    if body != b'Z' * len(body):
        raise Damaged(f'{label}: its padding is damaged')
    return True


def _crc(view):
    crc = 0
    for k in range(0, len(view), CRC_BLOCK):
        crc = zlib.crc32(view[k:k + CRC_BLOCK], crc)
    return crc
