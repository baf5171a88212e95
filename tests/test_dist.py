"""moco/dist.py: the one DDP wrapper keeping Momentum² Teacher's momentum-BN
statistics per process."""

import pytest
import torch

from helpers import small_moco
from moco.momentum_bn import mbn_alpha


def _m2t_ddp_worker(rank, port, result_path):
    import torch.distributed as tdist

    from moco import dist
    tdist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', world_size=2, rank=rank)
    try:
        torch.manual_seed(0)                       # the same initial model on both ranks
        model = small_moco('m2t').train()
        ddp = dist.ddp(model, torch.device('cpu'), sync_buffers=model.sync_bn)
        torch.manual_seed(100 + rank)              # different images on each rank
        for _ in range(2):
            x = torch.randn(4, 3, 8, 8)
            ddp(x, x.flip(3), 0.99, mbn_alpha(0.5)).backward()
        teacher = model.momentum_encoder.bn1.running_mean.clone()
        student = model.base_encoder.bn1.running_mean.clone()
        gathered = [torch.empty_like(teacher) for _ in range(2)]
        tdist.all_gather(gathered, teacher)
        grads = [torch.empty_like(model.base_encoder.conv1.weight.grad) for _ in range(2)]
        tdist.all_gather(grads, model.base_encoder.conv1.weight.grad)
        if rank == 0:
            torch.save({'teacher': gathered, 'grads': grads, 'student': student}, result_path)
    finally:
        tdist.destroy_process_group()


@pytest.mark.slow
def test_m2t_under_ddp_keeps_momentum_bn_statistics_per_process(tmp_path):
    """Two gloo processes, different data: gradients are averaged (equal on both ranks), but each
    rank keeps its own momentum-BN history (no buffer broadcast), as in the release under torch 1.5."""
    import torch.multiprocessing as mp

    from helpers import unassigned_port
    path = tmp_path / 'result.pt'
    mp.spawn(_m2t_ddp_worker, args=(unassigned_port(), str(path)), nprocs=2)
    r = torch.load(path, weights_only=True)
    assert torch.equal(r['grads'][0], r['grads'][1])
    assert not torch.allclose(r['teacher'][0], r['teacher'][1])
