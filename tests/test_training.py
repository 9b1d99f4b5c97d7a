"""The training loop without Ray: learning, bf16 autocast on CPU, schedule, early stopping."""

import pytest
import torch

from cube.eval.inference import score
from cube.model import CellularCube, CubeConfig
from cube.train.loop import Progress, train_epoch
from cube.train.losses import LossConfig
from cube.train.optim import OptimConfig, make_optimizer

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
    from cube.eval.analysis import morans_i

    z, y, x = torch.meshgrid(torch.arange(6.0), torch.arange(8.0), torch.arange(8.0), indexing="ij")
    smooth = (z + y + x)[None]
    noise = torch.randn(1, 6, 8, 8, generator=torch.Generator().manual_seed(0))
    assert morans_i(smooth).item() > 0.8
    assert abs(morans_i(noise).item()) < 0.1


def test_learning_rate_scales_with_the_global_batch():
    from cube.train.optim import peak_lr

    cfg = OptimConfig(lr=1e-3, batch_size=32)
    assert peak_lr(cfg, world_size=1) == pytest.approx(1e-3)
    assert peak_lr(cfg, world_size=2) == pytest.approx(2e-3)
    assert peak_lr(OptimConfig(lr=1e-3, batch_size=16), world_size=4) == pytest.approx(2e-3)
    assert peak_lr(OptimConfig(lr=1e-3, lr_reference_batch=0), world_size=8) == pytest.approx(1e-3)
    model = torch.nn.Linear(2, 2)
    opt, _ = make_optimizer(model, cfg, steps_per_epoch=4, world_size=2)
    assert opt.param_groups[0]["initial_lr"] == pytest.approx(2e-3)


# --- the GPU fast path inside `fit` (its CPU-checkable part: the same step, uncaptured) --------


def fit_run(graphed: bool, epochs: int = 3, state=None, model_state=None, cfg: CubeConfig = CFG):
    """`cube.train.loop.fit` on the linear-map task; returns each epoch's metrics and the
    (weights, training state) after each epoch, as a checkpoint would hold them."""
    from cube.eval.metrics import HeldOut, Split
    from cube.train.loop import build_model, fit

    q, a = task(192)
    qv, av = task(48, seed=2)
    val = HeldOut(qv, av, torch.arange(48), [""] * 48, [""] * 48)
    model = build_model(cfg, q.mean(0), a.mean(0), seed=0)
    if model_state is not None:
        model.load_state_dict(model_state)
    seen = []

    def keep(end) -> None:
        tensors, meta = end.train_state()
        seen.append((end.metrics, {k: v.clone() for k, v in model.state_dict().items()},
                     ({k: v.clone() for k, v in tensors.items()}, meta)))

    optim = OptimConfig(epochs=epochs, lr=3e-3, batch_size=32)
    fit(model, Split(q, a), val, LossConfig(), optim, seed=0, on_epoch=keep, state=state, graphed=graphed)
    return seen


def test_graphed_fit_trains_as_the_eager_fit():
    cfg = CubeConfig(width=6, height=6, depth=4, channels=6, hidden=16, io_channels=2, steps=4)  # fire 0.75, jitter
    eager, graphed = fit_run(False, cfg=cfg), fit_run(True, cfg=cfg)
    for e, g in zip(eager, graphed):
        for key in ("loss_total", "grad_norm", "val_mrr", "lr"):
            assert g[0][key] == pytest.approx(e[0][key], rel=1e-4, abs=1e-6), key
    assert graphed[-1][0]["val_mrr"] > graphed[0][0]["val_mrr"] - 0.02


@pytest.mark.parametrize("first, then", [(True, True), (False, True), (True, False)])
def test_fit_resumes_across_step_kinds(first, then, tmp_path):
    """A checkpoint after epoch 1, through the files a run writes, continues to the uninterrupted
    run's epochs 2 and 3, whether the graphed step or train_epoch wrote it and either resumes it:
    bit for bit on the CPU when the same step resumes; across the two steps the weights differ
    by AdamW's float-vs-tensor rate rounding only."""
    from cube.train.checkpoint import load_train_state, save_train_state

    whole = fit_run(first)
    _, weights, state = whole[0]
    save_train_state(tmp_path, *state)
    resumed = fit_run(then, state=load_train_state(tmp_path), model_state=weights)
    assert [m["epoch"] for m, _, _ in resumed] == [2, 3]
    assert all(m["resumed_from"] == 1 for m, _, _ in resumed)
    for got, want in zip(resumed, whole[1:]):
        for key in ("loss_total", "grad_norm", "val_mrr", "lr"):
            assert got[0][key] == (want[0][key] if first == then else pytest.approx(want[0][key], rel=1e-5)), key
        for name, value in want[1].items():
            if first == then:
                assert torch.equal(got[1][name], value), name
            else:
                torch.testing.assert_close(got[1][name], value, rtol=1e-5, atol=1e-6)


def test_cuda_graphs_refusals_name_the_setting():
    from cube.eval.metrics import HeldOut, Split
    from cube.train.loop import build_model, fit

    q, a = task(64)
    model = build_model(CFG, q.mean(0), a.mean(0))
    val = HeldOut(q[:8], a[:8], torch.arange(8), [""] * 8, [""] * 8)
    with pytest.raises(ValueError, match="cuda_graphs=on needs the CUDA-graph step.*on cpu"):
        fit(model, Split(q, a), val, LossConfig(), OptimConfig(epochs=1, cuda_graphs="on"))
    with pytest.raises(ValueError, match="compile=true"):
        OptimConfig(compile=True, cuda_graphs="off")
    with pytest.raises(ValueError, match="kernel must be"):
        OptimConfig(kernel="winograd")


def test_batch_scaling_of_the_rate_is_capped():
    from cube.train.optim import peak_lr

    assert peak_lr(OptimConfig(lr=1e-3, batch_size=256), world_size=64) == pytest.approx(1e-2)  # not 0.512
    assert peak_lr(OptimConfig(lr=1e-3, batch_size=256, max_lr=0.05), world_size=64) == pytest.approx(0.05)
    assert peak_lr(OptimConfig(lr=0.03, batch_size=32), world_size=4) == pytest.approx(0.03)  # an explicit lr is kept


def test_an_absurd_learning_rate_stops_with_a_divergence_error():
    """The user's lr=1e6: one clear error naming the epoch, the step and what to lower, before
    any NaN reaches a metric or a checkpoint."""
    from cube.eval.metrics import HeldOut, Split
    from cube.train.loop import build_model, fit
    from cube.train.step import DivergenceError

    q, a = task(256)
    model = build_model(CFG, q.mean(0), a.mean(0))
    val = HeldOut(q[:32], a[:32], torch.arange(32), [""] * 32, [""] * 32)
    reported = []
    optim = OptimConfig(epochs=2, lr=1e6, max_lr=1e6, grad_clip=0.0, warmup_fraction=0.0)
    with pytest.raises(DivergenceError, match=r"diverged at epoch 1, step \d+ of 8.*Lower optim.lr"):
        fit(model, Split(q, a), val, LossConfig(), optim, on_epoch=reported.append)
    assert reported == []  # nothing was reported or checkpointed


def test_a_nan_model_scores_worst_and_is_called_broken():
    """A checkpoint whose decoder weights are NaN: the worst MRR, never a win, and a warning."""
    from cube.eval.metrics import HeldOut, Split
    from cube.eval.report import compare, format_report

    q, a = task(96)
    model = CellularCube(CFG, 24)
    model.set_centering(q.mean(0), a.mean(0))
    with torch.no_grad():
        model.decoder.weight.fill_(float("nan"))
    model.eval()
    held_out = HeldOut(q[64:], a[64:], torch.arange(32), [f"q{i}" for i in range(32)], [f"a{i}" for i in range(32)])
    report = compare(model, Split(q[:64], a[:64]), held_out, held_out, seeds=1)
    assert report["cube"]["mrr"] == pytest.approx(1 / 32) and report["cube"]["recall@1"] == 0
    assert report["cube"]["nonfinite"] == 1 and report["cube_minus_best_mrr"] < -0.5
    text = format_report(report)
    assert "is below the best baseline" in text and "WARNING: 100% of the cube's predictions are non-finite" in text
    assert all(not ex["correct"] for ex in report["examples"])
