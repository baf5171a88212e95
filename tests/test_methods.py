"""Each method's hyper-parameters when a flag is not given (moco/methods.py): MoCo v3's original
defaults, BYOL's presets by epochs, Momentum² Teacher's by batch size."""
from types import SimpleNamespace

import pytest

from moco.data.sampler import EpochSampler
from moco.methods import apply_method_defaults, method_defaults
from moco.schedules import scaled_lr


@pytest.mark.parametrize('method, epochs, batch, peak, optimizer', [
    ('mocov3', 100, 4096, 9.6, 'lars'), ('byol', 40, 4096, 7.2, 'lars'), ('byol', 100, 4096, 7.2, 'lars'),
    ('byol', 300, 4096, 4.8, 'lars'), ('byol', 1000, 4096, 3.2, 'lars'), ('m2t', 100, 4096, 7.2, 'lars'),
    ('m2t', 200, 4096, 7.2, 'lars'), ('m2t', 300, 4096, 4.8, 'lars'), ('m2t', 100, 1024, 0.2, 'sgd')])


def test_peak_learning_rates(method, epochs, batch, peak, optimizer):
    args = SimpleNamespace(method=method, epochs=epochs, batch_size=batch, lr=None, weight_decay=None, moco_m=None,
                           optimizer=None, moco_m_cos=False, world_size=1, workers=0, multiprocessing_distributed=False)
    apply_method_defaults(args)
    args.lr = scaled_lr(args.lr, args.batch_size)
    assert args.lr == pytest.approx(peak) and args.optimizer == optimizer
    assert args.moco_m_cos == (method != 'mocov3')


def test_presets_and_given_flags_win():
    assert method_defaults('byol', 1000, 4096) == dict(lr=0.2, weight_decay=1.5e-6, moco_m=0.996, optimizer='lars',
                                                       moco_m_cos=True)
    assert method_defaults('byol', 40, 4096)['moco_m'] == 0.97
    assert method_defaults('m2t', 100, 256)['weight_decay'] == 1e-4
    args = SimpleNamespace(method='byol', epochs=300, batch_size=4096, lr=1.0, weight_decay=None, moco_m=0.9,
                           optimizer='adamw', moco_m_cos=False)
    apply_method_defaults(args)
    assert (args.lr, args.weight_decay, args.moco_m, args.optimizer) == (1.0, 1e-6, 0.9, 'adamw')
    plain = SimpleNamespace(method='mocov3', epochs=300, batch_size=4096, lr=None, weight_decay=None, moco_m=None,
                            optimizer=None, moco_m_cos=False)
    apply_method_defaults(plain)   # the original main_moco.py defaults, momentum schedule as the flag says
    assert (plain.lr, plain.weight_decay, plain.moco_m, plain.optimizer, plain.moco_m_cos) == \
        (0.6, 1e-6, 0.99, 'lars', False)


def test_imagenet_iterations_per_epoch():
    sampler = EpochSampler(1_281_167, 4096, shuffle=True, drop_last=True, seed=0)
    iters = len(sampler) // 4096
    assert iters == 312 and [iters * e for e in (100, 300, 1000)] == [31_200, 93_600, 312_000]
    assert iters * 10 == 3_120   # warmup iterations
