"""Helpers the tests import (``from helpers import ...``): paths, processes, ports, comparisons, small
models and awkward files. pytest's fixtures and hooks are in tests/conftest.py."""
import io
import os
import random
import signal
import socket
import subprocess
import sys

import torch
import torch.nn as nn
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def unassigned_port(_taken=set()):  # noqa: B006 (shared on purpose)
    """A free TCP port below Linux's ephemeral range, distinct from the ones this module already chose.

    ``free_port()`` returns an ephemeral port and releases it; while a launcher starts up,
    the many sockets that concurrently running gloo processes open may be given that same port (seen
    once: two launches talking to each other's store). Ports below the ephemeral range are never given
    out that way. 29400-29600 (torchrun's default 29500) is avoided.
    """
    try:
        with open('/proc/sys/net/ipv4/ip_local_port_range') as f:
            ephemeral_low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    rng = random.SystemRandom()
    for _ in range(1000):
        port = rng.randrange(20000, max(ephemeral_low, 20001))
        if port in _taken or 29400 <= port <= 29600:
            continue
        with socket.socket() as s:
            try:
                s.bind(('127.0.0.1', port))
            except OSError:
                continue
        _taken.add(port)
        return port
    return free_port()


def cli_env(gpu=False):
    """The test's environment without anything a launcher or a scheduler could have left in it; no GPU
    visible unless ``gpu``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(('SLURM_', 'TORCHELASTIC_', 'MASTER_', 'GROUP_', 'ROLE_'))
           and k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE')}
    # one thread per process, and threads that sleep rather than spin while they wait: on a few shared
    # cores a spinning OpenMP team makes a 2-thread process (the spawned one of -mp) ~10x slower
    env.update(OMP_NUM_THREADS='1', OMP_WAIT_POLICY='PASSIVE', PYTHONUNBUFFERED='1')
    if not gpu:
        env['CUDA_VISIBLE_DEVICES'] = ''
    return env


# ---- command-line runs (tests/test_resume.py, tests/test_cli_faults.py) ----
def start(args, gpu=False):
    # own process group, so that the data-loading workers die with the main process when it is killed
    return subprocess.Popen(args, cwd=ROOT, env=cli_env(gpu), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def wait_output(proc, timeout=300):
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        kill_group(proc)
    return proc.returncode, out


def load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def assert_identical(a, b, where=''):
    """Nested dicts/lists of tensors and numbers, compared exactly."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), where
        for k in a:
            assert_identical(a[k], b[k], f'{where}.{k}')
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f'{where}[{i}]')
    elif torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b, where


# ---- awkward image files ----
def jpeg_bytes(mode='RGB', size=(12, 10), color=(200, 30, 60)):
    buf = io.BytesIO()
    Image.new(mode, size, color if mode != 'L' else 128).save(buf, 'JPEG')
    return buf.getvalue()


def broken_folder(root):
    """Two good JPEGs around a truncated JPEG, a text file and an empty file, in root/c/."""
    (root / 'c').mkdir(parents=True)
    good = jpeg_bytes()
    (root / 'c' / '0_good.jpg').write_bytes(good)
    (root / 'c' / '1_truncated.jpg').write_bytes(good[:len(good) // 2])
    (root / 'c' / '2_text.jpg').write_text('<html>404 not found</html>')
    (root / 'c' / '3_empty.jpg').write_bytes(b'')
    (root / 'c' / '4_good.jpg').write_bytes(good)
    return root


def small_moco(method, arch='resnet18_cifar', **kw):
    """The model of ``method`` with small heads (and 8 px images for a ViT): quick to build and run."""
    from moco.models import build_moco
    return build_moco(arch, dim=16, mlp_dim=32, image_size=8 if 'vit' in arch else None, method=method, **kw)


class TinyNet(nn.Module):
    """A small ResNet-like encoder (conv + BN + ReLU, pool, ``fc``), with BN running statistics."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def run_script(script, argv, capsys):
    """``script.main`` (main_moco or main_lincls) in this process, as its command line would run it:
    (exit code, stdout, stderr)."""
    capsys.readouterr()
    try:
        script.main(script.get_args_parser().parse_args([str(a) for a in argv]))
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def run_in_process(script, argv, capsys):
    """``run_script``: (exit code, the lines of stderr that start with 'error:')."""
    code, _, err = run_script(script, argv, capsys)
    return code, [line for line in err.splitlines() if line.startswith('error:')]


def lars_loop_and_foreach(device):
    """Three LARS steps with the original's per-tensor loop and with the multi-tensor step, on a model with
    conv, linear, BN and bias tensors, a frozen tensor and a zero weight: [(state_dict, optimizer state)]
    of each, on the CPU."""
    from moco.optim import LARS

    def model():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 5),
                          nn.Linear(5, 3, bias=False)).to(device)
        with torch.no_grad():
            m[4].weight.zero_()          # trust ratio 1 for a zero weight
        m[1].bias.requires_grad_(False)  # no gradient: skipped
        return m

    runs = []
    for foreach in (False, True):
        net = model()
        opt = LARS(net.parameters(), lr=0.3, weight_decay=1e-4, momentum=0.9, foreach=foreach)
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            opt.zero_grad()
            net(torch.randn(2, 3, 6, 6, generator=gen).to(device)).pow(2).sum().backward()
            opt.step()
        state = {i: {k: v.cpu() for k, v in s.items()} for i, s in opt.state_dict()['state'].items()}
        runs.append(({k: v.cpu() for k, v in net.state_dict().items()}, {'state': state}))
    return runs
