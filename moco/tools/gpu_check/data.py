"""Data preparation, CPU work started in the background while the tests run: the fullsize JPEGs of the
bench's end-to-end rows, and CIFAR-10 unpacked from its tarball (the dry run's made from the shipped
demo data)."""
import os
import shlex
import shutil
import sys
import tarfile

from .commands import fullsize_jpegs_cmd
from .settings import CARRIED_TAR, DRY_PER_CLASS, ROOT

BENCH_PARTS = ('bench', 'profile', 'bench_compiled')
CIFAR_PARTS = ('cifar', 'cifar_ref')


def prepare(check):
    """Start what the selected parts need; sets check.fullsize and check.cifar_data (None: no CIFAR-10)."""
    check.fullsize = os.path.join(check.work, 'fullsize')
    if any(p in check.parts for p in BENCH_PARTS):
        check.runner.start_background('fullsize', fullsize_jpegs_cmd(check.fullsize, check.dry), 'prepare_fullsize')
    check.cifar_data = None
    if any(p in check.parts for p in CIFAR_PARTS):
        check.cifar_data = prepare_cifar(check)


def prepare_cifar(check):
    """The CIFAR-10 folder the CIFAR parts will use (being unpacked in the background, maybe), or None."""
    if check.args.cifar_dir:
        return check.args.cifar_dir
    tar = find_tarball(check.args.cifar_tar, check.dry, check.work)
    if tar is None:
        check.note('no CIFAR-10 tarball (--cifar-tar, or make gpu-check-prepare): the CIFAR parts will be skipped')
        return None
    dest = os.path.join(check.work, 'data')   # not a run folder's name: runs are removed before they start
    if os.path.isdir(dest):   # unpacked by an earlier check on this machine
        folder = find_split_folder(os.path.join(dest, 'cifar10'))
        check.note(f'CIFAR-10: reusing {folder}')
        return folder
    partial = dest + '.partial'
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    cmd = unpack_command(tar, partial, dest, use_tar=bool(shutil.which('tar') and shutil.which('xz')))
    shutil.rmtree(dest, ignore_errors=True)
    check.runner.start_background('cifar', cmd, 'unpack_cifar')
    return os.path.join(dest, 'cifar10')


def find_tarball(given, dry, work):
    """--cifar-tar; else in the dry run one made here; else the carried one, if present."""
    if given is None and dry:
        return dry_tarball(work)
    if given is None:
        carried = os.path.join(ROOT, CARRIED_TAR)
        return carried if os.path.isfile(carried) else None
    return given


def dry_tarball(work):
    """A CIFAR-10-shaped tarball (cifar10/{train,val}/<class>/*.jpg) of a few shipped demo images."""
    from moco import demo_data
    path = os.path.join(work, 'dry_cifar10-jpeg.tar.xz')
    if os.path.isfile(path):
        return path
    src = demo_data.extract(os.path.join(work, 'dry_src'), per_class=DRY_PER_CLASS)
    with tarfile.open(path + '.tmp', 'w:xz') as tar:
        for split in ('train', 'val'):
            tar.add(os.path.join(src, split), arcname=f'cifar10/{split}')
    os.replace(path + '.tmp', path)
    return path


def unpack_command(tar, partial, dest, use_tar=True):
    """Unpack tar into the (empty) folder partial, then rename it dest: complete or absent. GNU tar with
    xz where both exist, else Python's tarfile."""
    if use_tar:
        return ['sh', '-c', f'tar -xJf {shlex.quote(tar)} -C {shlex.quote(partial)} && '
                            f'mv {shlex.quote(partial)} {shlex.quote(dest)}']
    return [sys.executable, '-c', f'import os, tarfile; tarfile.open({tar!r}).extractall({partial!r}, filter="data"); '
                                  f'os.replace({partial!r}, {dest!r})']


def find_split_folder(path):
    """path if it holds train/ and val/, else the first folder that does at most two levels below path's
    parent, the unpacked tarball (whose top folder may be named otherwise); path if none does."""
    def ok(p):
        return os.path.isdir(os.path.join(p, 'train')) and os.path.isdir(os.path.join(p, 'val'))
    if ok(path):
        return path
    base = os.path.dirname(path)
    for root, dirs, _ in os.walk(base):
        if ok(root):
            return root
        dirs.sort()
        if root.count(os.sep) - base.count(os.sep) >= 2:
            dirs[:] = []
    return path
