"""GPU tier: the cube on CUDA, with bf16 and fp16 autocast. Skips cleanly without a GPU.

Run on a GPU box with `pytest tests/test_gpu.py` (the cube library needs no Ray, so this
runs where Ray is not installed).
"""

import pytest
import torch

from cube.losses import LossConfig
from cube.model import CellularCube, CubeConfig
from cube.training import OptimConfig, make_optimizer, train_epoch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CFG = CubeConfig(fire_rate=1.0)


def batches(n: int, dim: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, dim, generator=g) / dim**0.5
    for _ in range(n):
        q = torch.randn(32, dim, generator=g)
        yield q.to(device), (q @ w + 0.1 * torch.randn(32, dim, generator=g)).to(device)


def test_cuda_forward_matches_cpu():
    torch.manual_seed(0)
    cpu = CellularCube(CFG, 64).eval()
    with torch.no_grad():
        cpu.decoder.weight.normal_(0, 0.05)
    gpu = CellularCube(CFG, 64).eval()
    gpu.load_state_dict(cpu.state_dict())
    gpu = gpu.cuda()
    q = torch.randn(8, 64)
    torch.backends.cudnn.allow_tf32 = False
    torch.testing.assert_close(gpu(q.cuda()).pred.cpu(), cpu(q).pred, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_reduces_loss(precision):
    torch.manual_seed(0)
    model = CellularCube(CFG, 64).cuda().to(memory_format=torch.channels_last_3d)
    optim = OptimConfig(epochs=1, lr=3e-3, precision=precision)
    opt, sched = make_optimizer(model, optim, steps_per_epoch=40)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    first = train_epoch(model, batches(5, 64, "cuda"), opt, sched, LossConfig(), optim, scaler)
    for _ in range(6):
        last = train_epoch(model, batches(5, 64, "cuda"), opt, sched, LossConfig(), optim, scaler)
    assert torch.isfinite(torch.tensor(last["loss/total"]))
    assert last["loss/total"] < first["loss/total"]
