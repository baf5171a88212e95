"""moco/recompute.py (``--grad-checkpointing``) and models.residual_blocks: the residual blocks of the online
encoder are recomputed in the backward, and a run is bit-identical to one without it on CPU (loss, every
gradient, BatchNorm buffers, weights and optimizer state after 3 steps), in fp32 and bf16, with one process
and with two (synchronised BatchNorm)."""
import contextlib

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from helpers import assert_identical, small_moco
from moco import recompute
from moco.errors import UserError
from moco.models import BackboneFeatures, build_moco, residual_blocks
from moco.optim import build_optimizer
from moco.recompute import checkpoint_blocks, enable_grad_checkpointing, is_checkpointed, uncheckpoint_blocks

SIZE = {'resnet18_cifar': 16, 'resnet10_w16': 16, 'regnet_y_400mf': 32, 'vit_tiny_patch4': 8}


def train(method, arch, optimizer, grad_checkpointing, steps=3, bf16=False, model_hook=None):
    """``steps`` steps of ``method`` on random images (batch 4): per step the loss and every gradient, then
    the state_dict (BN buffers included), the optimizer state and the global random state."""
    torch.manual_seed(0)
    model = small_moco(method, arch).train()
    if grad_checkpointing:
        enable_grad_checkpointing(model)
    if model_hook is not None:
        model_hook(model)
    opt = build_optimizer(optimizer, model, lr=0.5, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(1)
    steps_out = []
    for step in range(steps):
        x = torch.randn(4, 3, SIZE[arch], SIZE[arch], generator=gen)
        model.before_step(step / steps)
        with torch.autocast('cpu', torch.bfloat16, enabled=bf16):
            loss = model(x, x.flip(3), 0.99)
        opt.zero_grad()
        loss.backward()
        steps_out.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                          if p.grad is not None}))
        opt.step()
    return steps_out, model.state_dict(), opt.state_dict()['state'], torch.get_rng_state()


def test_residual_blocks_of_every_family():
    counts = {'resnet18_cifar': (8, 'BasicBlock'), 'resnet10_w16': (4, 'BasicBlock'), 'resnet50': (16, 'Bottleneck'),
              'resnext50_32x4d': (16, 'Bottleneck'), 'regnet_x_400mf': (22, 'ResBottleneckBlock'),
              'vit_tiny_patch4': (12, 'Block'), 'vit_conv_small': (11, 'Block')}
    for arch, (n, kind) in counts.items():
        encoder = build_moco(arch, dim=8, mlp_dim=16).base_encoder
        blocks = residual_blocks(encoder)
        assert len(blocks) == n and {type(b).__name__ for b in blocks} == {kind}, arch
    with pytest.raises(TypeError):
        residual_blocks(torch.nn.Linear(2, 2))


def test_names_outputs_and_files_do_not_change():
    """Only the blocks' forward is replaced, on the instance: same state_dict keys (files load both ways),
    same features; without gradients (kNN, evaluation) nothing is checkpointed; enabling twice is enabling
    once, and it can be undone."""
    torch.manual_seed(0)
    plain = small_moco('mocov3', 'resnet10_w16')
    torch.manual_seed(0)
    model = small_moco('mocov3', 'resnet10_w16')
    assert enable_grad_checkpointing(model) == 4 and checkpoint_blocks(model.base_encoder) == 4
    assert is_checkpointed(model.base_encoder) and not is_checkpointed(model.momentum_encoder)
    assert list(model.state_dict()) == list(plain.state_dict())
    model.load_state_dict(plain.state_dict())
    plain.load_state_dict(model.state_dict())
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(BackboneFeatures(model.base_encoder).eval()(x),
                           BackboneFeatures(plain.base_encoder).eval()(x))
    uncheckpoint_blocks(model.base_encoder)
    assert not is_checkpointed(model.base_encoder) and 'forward' not in vars(residual_blocks(model.base_encoder)[0])


@pytest.mark.parametrize('method,arch,optimizer', [
    ('mocov3', 'resnet18_cifar', 'lars'), ('mocov3', 'vit_tiny_patch4', 'adamw'),
    ('byol', 'regnet_y_400mf', 'lars'), ('byol', 'vit_tiny_patch4', 'adamw'), ('m2t', 'resnet10_w16', 'lars')])
def test_three_steps_are_bit_identical(method, arch, optimizer):
    assert_identical(train(method, arch, optimizer, False), train(method, arch, optimizer, True), arch)


def test_bf16_autocast_steps_are_bit_identical():
    """The recomputation runs under the forward's autocast state, so the same bf16 ops give the same bits."""
    for arch, optimizer in (('resnet10_w16', 'lars'), ('vit_tiny_patch4', 'adamw')):
        assert_identical(train('mocov3', arch, optimizer, False, steps=2, bf16=True),
                         train('mocov3', arch, optimizer, True, steps=2, bf16=True), arch)


def test_blocks_are_recomputed_and_fewer_activations_are_kept():
    """Each block runs again in the backward (a layer inside it runs twice per view), and the forward keeps
    less than half the bytes of saved tensors."""
    def step(grad_checkpointing):
        torch.manual_seed(0)
        model = small_moco('mocov3', 'vit_tiny_patch4').train()
        if grad_checkpointing:
            enable_grad_checkpointing(model)
        calls, fc1 = [], model.base_encoder.blocks[3].mlp.fc1
        fc1.forward = lambda x: calls.append(1) or type(fc1).forward(fc1, x)   # (torch runs no hooks in a recompute)
        saved = []

        def pack(t):
            saved.append(t.numel() * t.element_size())
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8), 0.99)
        loss.backward()
        return len(calls), sum(saved)

    (calls_plain, bytes_plain), (calls_ckpt, bytes_ckpt) = step(False), step(True)
    assert (calls_plain, calls_ckpt) == (2, 4)
    assert bytes_ckpt < bytes_plain / 2


def test_a_plain_checkpoint_counts_batchnorm_statistics_twice(monkeypatch):
    """The trap (pytorch#96136): a recomputed BatchNorm updates its running statistics again. A naive
    ``checkpoint`` of a block counts the batch twice; ours once, as without checkpointing. Without the
    buffer guard (``_buffers_kept``) the 3-step comparison fails on the BN buffers."""
    torch.manual_seed(0)
    encoder = small_moco('mocov3', 'resnet10_w16').base_encoder.train()
    block = residual_blocks(encoder)[1]
    x = torch.randn(4, 16, 8, 8, requires_grad=True)
    start = {k: v.clone() for k, v in block.state_dict().items()}
    block(x).sum().backward()
    once = {k: v.clone() for k, v in block.state_dict().items()}
    assert once['bn1.num_batches_tracked'] == 1
    block.load_state_dict(start)
    checkpoint(block, x, use_reentrant=False).sum().backward()
    assert block.bn1.num_batches_tracked == 2 and not torch.equal(block.bn1.running_var, once['bn1.running_var'])
    block.load_state_dict(start)
    checkpoint_blocks(encoder)
    block(x).sum().backward()
    assert_identical(block.state_dict(), once)

    monkeypatch.setattr(recompute, '_buffers_kept', lambda module: contextlib.nullcontext())
    _, naive_state, _, _ = train('mocov3', 'resnet10_w16', 'lars', True, steps=1)
    _, plain_state, _, _ = train('mocov3', 'resnet10_w16', 'lars', False, steps=1)
    key = 'base_encoder.layer1.0.bn1.num_batches_tracked'
    assert (naive_state[key], plain_state[key]) == (4, 2)   # two views, each counted twice
    assert not torch.equal(naive_state['base_encoder.layer1.0.bn1.running_mean'],
                           plain_state['base_encoder.layer1.0.bn1.running_mean'])


def test_compile_with_batchnorm_blocks_is_refused_in_one_line():
    model = small_moco('mocov3', 'resnet10_w16')
    with pytest.raises(UserError, match='--grad-checkpointing does not work with --compile') as e:
        enable_grad_checkpointing(model, compile=True)
    assert '\n' not in str(e.value) and not is_checkpointed(model.base_encoder)
    assert enable_grad_checkpointing(small_moco('mocov3', 'vit_tiny_patch4'), compile=True) == 12


@pytest.mark.slow   # torch.compile takes a while (about 30 s)
def test_compiled_vit_with_checkpointing_equals_eager():
    """ViT blocks hold no buffers: torch.compile (traced with aot_eager, as tests/test_fast_step.py) takes
    the checkpointed blocks; the steps equal eager ones without checkpointing."""
    from moco.models import compile_networks
    eager = train('mocov3', 'vit_tiny_patch4', 'adamw', False, steps=2)
    compiled = train('mocov3', 'vit_tiny_patch4', 'adamw', True, steps=2,
                     model_hook=lambda m: compile_networks(m, backend='aot_eager'))
    for (loss_e, grads_e), (loss_c, grads_c) in zip(eager[0], compiled[0]):
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
        for name in grads_e:
            torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-4, atol=1e-6)


# ---- two processes: synchronised BatchNorm (moco/norm.py) recomputed ----
def _sync_bn_worker(rank, port, result_path):
    import torch.distributed as tdist

    from moco import dist
    from moco.norm import AllReduceBatchNorm, convert_sync_batchnorm
    torch.set_num_threads(1)
    tdist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', world_size=2, rank=rank)
    try:
        results = {}
        for grad_checkpointing in (False, True):
            torch.manual_seed(0)                        # the same initial model on both ranks
            model = small_moco('mocov3', 'resnet10_w16').train()
            if grad_checkpointing:                      # as main_moco.py: right after build_moco, before the conversion
                enable_grad_checkpointing(model)
            model = convert_sync_batchnorm(model, torch.device('cpu'))
            assert isinstance(residual_blocks(model.base_encoder)[0].bn1, AllReduceBatchNorm)
            assert is_checkpointed(model.base_encoder) == grad_checkpointing
            ddp = dist.ddp(model, torch.device('cpu'), sync_buffers=True, gradient_as_bucket_view=True)
            opt = build_optimizer('lars', model, lr=0.5, weight_decay=1e-4)
            gen = torch.Generator().manual_seed(100 + rank)   # different images on each rank
            steps = []
            for _ in range(2):
                x = torch.randn(4, 3, 16, 16, generator=gen)
                loss = ddp(x, x.flip(3), 0.99)
                opt.zero_grad()
                loss.backward()
                steps.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                              if p.grad is not None}))
                opt.step()
            results[grad_checkpointing] = (steps, {k: v.clone() for k, v in model.state_dict().items()})
        torch.save(results, f'{result_path}.{rank}')
    finally:
        tdist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_with_synchronised_batchnorm_are_bit_identical(tmp_path):
    """Two gloo processes, different images, AllReduceBatchNorm in the recomputed blocks (its all-reduces
    run again in the backward, in the same order on both ranks): per rank, losses, gradients, BN buffers
    and weights after 2 LARS steps equal the run without checkpointing; gradients agree across ranks."""
    import torch.multiprocessing as mp

    from helpers import unassigned_port
    path = tmp_path / 'result.pt'
    mp.spawn(_sync_bn_worker, args=(unassigned_port(), str(path)), nprocs=2)
    ranks = [torch.load(f'{path}.{r}', weights_only=True) for r in range(2)]
    for r in ranks:
        assert_identical(r[False], r[True])
        assert r[True][1]['base_encoder.layer1.0.bn1.num_batches_tracked'] == 4   # 2 steps of 2 views
    for name, grad in ranks[0][True][0][-1][1].items():
        assert torch.equal(grad, ranks[1][True][0][-1][1][name]), name


@pytest.mark.slow
def test_main_moco_with_grad_checkpointing_writes_the_same_checkpoint(tiny_folder, tmp_path, capsys):
    """Through the command line, a ResNet epoch (synchronised BN statistics, LARS) ends bit for bit where it
    ends without --grad-checkpointing."""
    import main_moco
    from helpers import assert_identical, run_in_process
    common = ['-a', 'resnet18_cifar', '--image-size', '16', '--moco-dim', '8', '--moco-mlp-dim', '16', '-b', '8',
              '--epochs', '1', '--warmup-epochs', '0', '-j', '0', '--seed', '0']
    files = []
    for name, extra in (('plain', []), ('recomputed', ['--grad-checkpointing'])):
        code, errors = run_in_process(main_moco, [*common, *extra, '--output-dir', tmp_path / name, tiny_folder],
                                      capsys)
        assert code == 0 and not errors, errors
        files.append(torch.load(tmp_path / name / 'checkpoint_0000.pth.tar', weights_only=True))
    assert_identical(files[0]['state_dict'], files[1]['state_dict'], 'state_dict')
    assert_identical(files[0]['optimizer'], files[1]['optimizer'], 'optimizer')
