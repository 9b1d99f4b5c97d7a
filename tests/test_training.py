"""The training loop without Ray: learning, bf16 autocast on CPU, schedule, early stopping."""

import pytest
import torch

from cube.losses import LossConfig
from cube.model import CellularCube, CubeConfig
from cube.training import OptimConfig, Progress, make_optimizer, score, train_epoch

CFG = CubeConfig(width=6, height=6, depth=4, channels=6, hidden=16, io_channels=2, steps=4, fire_rate=1.0)


def task(n: int, dim: int = 24, seed: int = 0):
    """Samples of one fixed linear map (the map never changes with `seed`)."""
    w = torch.randn(dim, dim, generator=torch.Generator().manual_seed(123)) / dim**0.5
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, dim, generator=g)
    return q, q @ w + 0.05 * torch.randn(n, dim, generator=g)


def fit(precision: str, epochs: int = 15) -> tuple[list[float], dict]:
    torch.manual_seed(0)
    q, a = task(256)
    model = CellularCube(CFG, 24)
    model.set_centering(q.mean(0), a.mean(0))
    optim = OptimConfig(epochs=epochs, lr=3e-3, precision=precision)
    opt, sched = make_optimizer(model, optim, steps_per_epoch=8)
    losses = [train_epoch(model, zip(q.split(32), a.split(32)), opt, sched, LossConfig(), optim)["loss/total"]
              for _ in range(epochs)]
    qt, at = task(64, seed=1)
    return losses, score(model, qt, at, torch.arange(64))


def test_training_learns_a_held_out_map():
    losses, held_out = fit("fp32")
    assert losses[-1] < 0.7 * losses[0]
    untrained = CellularCube(CFG, 24)
    qt, at = task(64, seed=1)
    q, a = task(256)
    untrained.set_centering(q.mean(0), a.mean(0))
    assert held_out["mrr"] > score(untrained, qt, at, torch.arange(64))["mrr"] + 0.2


def test_bf16_autocast_on_cpu_trains():
    losses, _ = fit("bf16", epochs=4)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_warmup_then_cosine_schedule():
    model = torch.nn.Linear(2, 2)
    opt, sched = make_optimizer(model, OptimConfig(epochs=10, lr=1.0, warmup_fraction=0.1), steps_per_epoch=10)
    lrs = []
    for _ in range(100):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[0] < lrs[5] < lrs[9] <= 1.0  # warm-up over 10 steps
    assert lrs[50] < lrs[20] and lrs[-1] < 0.1  # cosine decay to a small floor


def test_early_stopping_patience():
    p = Progress()
    history = [p.update(m) for m in (0.5, 0.6, 0.6, 0.55)]
    assert history == [True, True, False, False]
    assert p.epoch == 4 and p.best_val_mrr == 0.6 and p.bad_epochs == 2
    assert p.should_stop(2) and not p.should_stop(3) and not p.should_stop(0)


def test_morans_i_separates_smooth_fields_from_noise():
    from cube.analysis import morans_i

    z, y, x = torch.meshgrid(torch.arange(6.0), torch.arange(8.0), torch.arange(8.0), indexing="ij")
    smooth = (z + y + x)[None]
    noise = torch.randn(1, 6, 8, 8, generator=torch.Generator().manual_seed(0))
    assert morans_i(smooth).item() > 0.8
    assert abs(morans_i(noise).item()) < 0.1


def test_learning_rate_scales_with_the_global_batch():
    from cube.training import peak_lr

    cfg = OptimConfig(lr=1e-3, batch_size=32)
    assert peak_lr(cfg, world_size=1) == pytest.approx(1e-3)
    assert peak_lr(cfg, world_size=2) == pytest.approx(2e-3)
    assert peak_lr(OptimConfig(lr=1e-3, batch_size=16), world_size=4) == pytest.approx(2e-3)
    assert peak_lr(OptimConfig(lr=1e-3, lr_reference_batch=0), world_size=8) == pytest.approx(1e-3)
    model = torch.nn.Linear(2, 2)
    opt, _ = make_optimizer(model, cfg, steps_per_epoch=4, world_size=2)
    assert opt.param_groups[0]["initial_lr"] == pytest.approx(2e-3)
