"""GPU tier: the cube on CUDA, with bf16 and fp16 autocast, and the graphed training step
(cube/train/graph_step.py) against the eager one. Skips cleanly without a GPU.

Run on a GPU box with `pytest tests/test_gpu.py` (the cube library needs no Ray, so this
runs where Ray is not installed).
"""

import pytest
import torch

from cube.model import CellularCube, CubeConfig
from cube.train.loop import train_epoch
from cube.train.losses import LossConfig
from cube.train.optim import OptimConfig, make_optimizer

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


# --- the graphed fast path (cube/train/graph_step.py) against the eager step ----------------------


@pytest.fixture
def strict_fp32():
    """No TF32, deterministic cuDNN: eager and graphed steps then differ only by rounding."""
    flags = ("allow_tf32", "benchmark", "deterministic")
    saved = [getattr(torch.backends.cudnn, f) for f in flags], torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = (
        False,
        False,
        True,
    )
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    for f, v in zip(flags, saved[0]):
        setattr(torch.backends.cudnn, f, v)
    torch.backends.cuda.matmul.allow_tf32 = saved[1]


def twin_models(cfg: CubeConfig, dim: int) -> tuple[CellularCube, CellularCube]:
    torch.manual_seed(0)
    model = CellularCube(cfg, dim)
    with torch.no_grad():
        model.decoder.weight.normal_(0, 0.05)
    twin = CellularCube(cfg, dim)
    twin.load_state_dict(model.state_dict())
    return tuple(m.cuda().to(memory_format=torch.channels_last_3d) for m in (model, twin))


@pytest.mark.parametrize("kernel, compile_step", [
    ("conv3d", False), ("conv3d", True), ("conv2d", False), ("conv2d", True), ("im2col", False), ("im2col", True)])
def test_graphed_step_matches_eager_fp32(strict_fp32, kernel, compile_step):
    """Default cube with step jitter (five graphs, replayed in random order), fire_rate 1:
    same losses, gradient norms and weights as train_epoch (conv3d, eager), step by step,
    whichever lattice kernel the graphed step computes the conv with."""
    from cube.train.graph_step import GraphedCubeStep

    cfg = CubeConfig(fire_rate=1.0)
    optim = OptimConfig(epochs=1, lr=3e-3, warmup_fraction=0.3)
    data = list(batches(6, 64, "cuda"))
    eager, fast_model = twin_models(cfg, 64)
    opt, sched = make_optimizer(eager, optim, steps_per_epoch=len(data))
    fast = GraphedCubeStep(fast_model, LossConfig(), optim, 32, steps_per_epoch=len(data), kernel=kernel,
                           compile_step=compile_step)
    torch.manual_seed(1)  # the step counts come from the CPU generator in both
    want = [train_epoch(eager, [b], opt, sched, LossConfig(), optim) for b in data]
    torch.manual_seed(1)
    got = [(fast.step(q, a), fast.terms["grad_norm"]) for q, a in data]
    tol = {"rtol": 1e-3, "atol": 1e-5} if compile_step else {"rtol": 1e-4, "atol": 1e-6}
    torch.testing.assert_close(
        torch.stack([g[0] for g in got]).cpu(), torch.tensor([w["loss/total"] for w in want]), **tol
    )
    torch.testing.assert_close(
        torch.stack([g[1] for g in got]).cpu(), torch.tensor([w["grad_norm"] for w in want]), **tol
    )
    # Losses and gradient norms match tightly. Weights get a looser bound: Adam's first steps move a
    # weight by ~lr whatever the size of its gradient, so a near-zero gradient that rounds to the
    # other sign flips it. Measured on an H100 (torch 2.11): graphed, uncompiled, 65 of 8,640
    # lattice weights differed by up to 1.4e-4 after 6 steps; fused compiled kernels round more.
    atol = 5e-3 if compile_step else 1e-3
    for p, q in zip(fast_model.parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=atol)


@pytest.mark.parametrize("kernel", ["conv3d", "conv2d", "im2col"])
def test_graphed_step_bf16_trains(kernel):
    from cube.train.graph_step import GraphedCubeStep

    torch.manual_seed(0)
    model = CellularCube(CubeConfig(), 64).cuda()  # default cube: fire 0.75, jitter 4
    optim = OptimConfig(epochs=1, lr=3e-3, precision="bf16")
    fast = GraphedCubeStep(model, LossConfig(), optim, 32, steps_per_epoch=40, kernel=kernel)
    data = list(batches(5, 64, "cuda"))
    losses = torch.stack([fast.step(*data[i % 5]) for i in range(40)]).cpu()
    assert torch.isfinite(losses).all()
    assert losses[-5:].mean() < losses[:5].mean()


def test_graphed_step_refuses_replaced_optimizer_state():
    from cube.train.graph_step import GraphedCubeStep

    cfg = CubeConfig(width=5, height=5, depth=4, channels=4, hidden=8, io_channels=2, steps=3)
    fast = GraphedCubeStep(CellularCube(cfg, 64).cuda(), LossConfig(), OptimConfig(epochs=1), 32, steps_per_epoch=10)
    q, a = next(batches(1, 64, "cuda"))
    fast.step(q, a)
    fast.optimizer.load_state_dict(fast.optimizer.state_dict())
    with pytest.raises(RuntimeError, match="replaced"):
        fast.step(q, a)


def test_fit_on_cuda_takes_the_graphed_conv2d_step_and_resumes():
    """`fit` on a CUDA model with the default OptimConfig trains through the CUDA graphs with the
    conv2d kernel, learns, writes a checkpoint state that resumes to the same epochs."""
    from cube.eval.metrics import HeldOut, Split
    from cube.train.loop import build_model, fit

    cfg = CubeConfig(fire_rate=1.0, steps_jitter=0)  # no RNG inside the step: a resume repeats the run
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 64, generator=g) / 8
    q = torch.randn(320, 64, generator=g)
    a = q @ w + 0.1 * torch.randn(320, 64, generator=g)
    train, val = Split(q[:256], a[:256]), HeldOut(q[256:], a[256:], torch.arange(64), [""] * 64, [""] * 64)
    optim = OptimConfig(epochs=3, lr=3e-3)

    def run(state=None, weights=None):
        model = build_model(cfg, train.q.mean(0), train.a.mean(0), "cuda")
        if weights is not None:
            model.load_state_dict(weights)
        seen = []

        def keep(end) -> None:  # copies, as a checkpoint on disk would be
            tensors, meta = end.train_state()
            seen.append(
                (
                    end.metrics,
                    end.opt.defaults["capturable"],
                    {k: v.clone() for k, v in model.state_dict().items()},
                    ({k: v.clone() for k, v in tensors.items()}, meta),
                )
            )

        fit(model, train, val, LossConfig(), optim, on_epoch=keep, state=state)
        assert model.rule.kernel == "conv2d"
        return seen

    whole = run()
    assert all(capturable for _, capturable, _, _ in whole)  # the graphed step's optimiser
    assert whole[-1][0]["loss_total"] < whole[0][0]["loss_total"]
    assert whole[-1][0]["val_mrr"] > 0.5
    resumed = run(state=whole[0][3], weights=whole[0][2])
    assert [m["epoch"] for m, *_ in resumed] == [2, 3]
    for (got, *_), (want, *_) in zip(resumed, whole[1:]):
        assert got["val_mrr"] == pytest.approx(want["val_mrr"], abs=0.02)
        assert got["loss_total"] == pytest.approx(want["loss_total"], rel=1e-2)
