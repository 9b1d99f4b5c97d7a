"""The GPU fast path's CPU-checkable parts (no Ray, no GPU, well under a second each).

The pure lattice step must reproduce `run_lattice` bit for bit, `run_lattice`'s analysis hooks
must give what they gave before the step was split out, and `GraphedCubeStep`'s step body (run
eagerly with capture=False) must follow `train_epoch`'s trajectory. The captured graphs
themselves are checked against eager training in tests/test_gpu.py.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from cube.model import CellularCube, CubeConfig
from cube.train.graph_step import GraphedCubeStep, lattice_step
from cube.train.loop import train_epoch
from cube.train.losses import LossConfig
from cube.train.optim import OptimConfig, make_optimizer

TINY = CubeConfig(width=5, height=4, depth=3, channels=4, hidden=8, io_channels=2, steps=3, steps_jitter=2)
E, B = 12, 6


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tensors this small gain nothing from intra-op threads, and on a busy 2-core machine the
    threads' contention made a 6 ms step take 500 ms."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(cfg: CubeConfig = TINY, seed: int = 0) -> CellularCube:
    torch.manual_seed(seed)
    model = CellularCube(cfg, E)
    with torch.no_grad():  # a generic trained-looking cube, not the identity start
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def reference_run_lattice(model, front, steps=None, layer_mask=None, damage=None):
    """`CellularCube.run_lattice` as it was before the pure step was split out (commit cd3b291)."""
    c = model.cfg
    b = front.shape[0]
    x = front.new_zeros(b, c.channels, c.depth, c.height, c.width).contiguous(memory_format=torch.channels_last_3d)
    clamp = torch.zeros_like(x[:1])
    clamp[:, : c.io_channels, 0] = 1.0
    inject = F.pad(front, (0, 0, 0, 0, 0, c.channels - c.io_channels)).unsqueeze(2)
    inject = F.pad(inject, (0, 0, 0, 0, 0, c.depth - 1))
    dx = torch.zeros_like(x)
    if steps is None:
        steps = c.steps
        if model.training and c.steps_jitter:
            steps += int(torch.randint(0, c.steps_jitter + 1, ()))
    for t in range(steps):
        x = x * (1 - clamp) + inject
        dx = model.rule(x)
        if model.training and c.fire_rate < 1.0:
            fire = (torch.rand(b, 1, c.depth, c.height, c.width, device=x.device) < c.fire_rate)
            dx = dx * fire.to(dx.dtype)
        elif c.fire_rate < 1.0:
            dx = dx * c.fire_rate
        if layer_mask is not None:
            dx = dx * layer_mask.view(1, 1, -1, 1, 1)
        x = x + dx
        if damage is not None and t == damage[0]:
            x = x * (1 - damage[1].to(x.dtype))
    return x, dx


def seeded(fn, seed: int = 7):
    torch.manual_seed(seed)
    return fn()


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("kwargs", [
    {},
    {"steps": 5},
    {"layer_mask": torch.tensor([1.0, 0.0, 1.0])},
    {"layer_mask": torch.tensor([0.3, 1.0, 0.7])},
    {"damage": (1, (torch.rand(3, 4, 5) > 0.5).float())},
])
def test_run_lattice_unchanged_by_the_split(training, kwargs):
    model = tiny_model().train(training)
    front = torch.randn(B, TINY.io_channels, TINY.height, TINY.width)
    with torch.no_grad():
        got = seeded(lambda: model.run_lattice(front, **kwargs))
        want = seeded(lambda: reference_run_lattice(model, front, **kwargs))
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@pytest.mark.parametrize("training", [True, False])
def test_pure_step_loop_equals_run_lattice(training):
    model = tiny_model().train(training)
    front = torch.randn(B, TINY.io_channels, TINY.height, TINY.width)

    def pure():
        x, inject, keep = model.lattice_inputs(front)
        for _ in range(4):
            x, dx = lattice_step(model, x, inject, keep)
        return x, dx

    with torch.no_grad():
        got = seeded(pure)
        want = seeded(lambda: model.run_lattice(front, steps=4))
    assert got[0].is_contiguous(memory_format=torch.channels_last_3d)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@pytest.mark.parametrize("options", [
    {}, {"fire_rate": 1.0}, {"adapter": "mlp"}, {"normalize_input": True}, {"lattice": False},
    {"perception": "sobel", "transport_init": False}, {"residual": False},
])
def test_fast_forward_is_the_model_forward(options):
    """The graphed step's forward (its lattice step function, T fixed) is CellularCube.forward
    step by step through the analysis hooks, for every architecture option: a new option in
    forward that the fast path misses fails here."""
    model = tiny_model(dataclasses.replace(TINY, **options))
    fast = GraphedCubeStep(model, LossConfig(), OptimConfig(epochs=1), B, 3, capture=False, channels_last=False)
    q = torch.randn(B, E)
    with torch.no_grad():
        got = seeded(lambda: model(q, steps=4, step_fn=fast._lattice_step))
        want = seeded(lambda: model(q, steps=4, layer_mask=torch.ones(TINY.depth)))
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(E, E, generator=g) / E**0.5
    out = []
    for _ in range(n):
        q = torch.randn(B, E, generator=g)
        out.append((q, q @ w + 0.1 * torch.randn(B, E, generator=g)))
    return out


@pytest.mark.parametrize("precision, fire_rate", [("fp32", 1.0), ("fp32", 0.75), ("bf16", 1.0)])
def test_uncaptured_step_follows_train_epoch(precision, fire_rate):
    """Same losses, gradient norms, parameters and learning rates as train_epoch, step by step
    (warm-up then cosine schedule, step jitter and fire masks drawn from the same CPU RNG)."""
    cfg = dataclasses.replace(TINY, fire_rate=fire_rate)
    optim = OptimConfig(epochs=1, lr=3e-3, warmup_fraction=0.4, precision=precision)
    data = batches(5)
    eager, fast_model = tiny_model(cfg), tiny_model(cfg)
    opt, sched = make_optimizer(eager, optim, steps_per_epoch=len(data))
    fast = GraphedCubeStep(
        fast_model, LossConfig(), optim, B, steps_per_epoch=len(data), capture=False, channels_last=False
    )
    torch.manual_seed(3)
    want = [train_epoch(eager, [batch], opt, sched, LossConfig(), optim) for batch in data]
    torch.manual_seed(3)
    got = [(fast.step(*batch)["total"], fast.terms["grad_norm"]) for batch in data]
    tol = {"rtol": 1e-5, "atol": 1e-6} if precision == "fp32" else {"rtol": 2e-2, "atol": 2e-3}
    torch.testing.assert_close(torch.stack([g[0] for g in got]), torch.tensor([w["loss/total"] for w in want]), **tol)
    torch.testing.assert_close(torch.stack([g[1] for g in got]), torch.tensor([w["grad_norm"] for w in want]), **tol)
    assert fast.lr == pytest.approx(sched.get_last_lr()[0])
    for p, q in zip(fast_model.parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, **tol)


@pytest.mark.parametrize("kernel", ["conv2d", "im2col"])
def test_uncaptured_step_with_another_kernel_follows_train_epoch(kernel):
    """The GPU's conv formulations train as the conv3d step does (fp32 rounding apart)."""
    optim = OptimConfig(epochs=1, lr=3e-3, warmup_fraction=0.4)
    data = batches(4)
    eager, fast_model = tiny_model(), tiny_model()
    opt, sched = make_optimizer(eager, optim, steps_per_epoch=len(data))
    fast = GraphedCubeStep(fast_model, LossConfig(), optim, B, steps_per_epoch=len(data), kernel=kernel, capture=False)
    assert fast_model.rule.kernel == kernel and eager.rule.kernel == "conv3d"
    torch.manual_seed(3)
    want = [train_epoch(eager, [batch], opt, sched, LossConfig(), optim) for batch in data]
    torch.manual_seed(3)
    got = torch.stack([fast.step(*batch)["total"] for batch in data])
    torch.testing.assert_close(got, torch.tensor([w["loss/total"] for w in want]), rtol=1e-5, atol=1e-6)
    for p, q in zip(fast_model.parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_run_epoch_reports_like_train_epoch():
    optim = OptimConfig(epochs=1)
    data = batches(3)
    eager, fast_model = tiny_model(), tiny_model()
    opt, sched = make_optimizer(eager, optim, steps_per_epoch=3)
    fast = GraphedCubeStep(fast_model, LossConfig(), optim, B, steps_per_epoch=3, capture=False)
    torch.manual_seed(5)
    want = train_epoch(eager, data, opt, sched, LossConfig(), optim)
    torch.manual_seed(5)
    got = fast.run_epoch(data)
    assert set(got) == set(want)
    for k in want:
        if k != "samples_per_s":
            assert got[k] == pytest.approx(want[k], rel=1e-4), k


def test_step_returns_a_fresh_tensor_each_time():
    fast = GraphedCubeStep(tiny_model(), LossConfig(), OptimConfig(epochs=1), B, steps_per_epoch=3, capture=False)
    (q1, a1), (q2, a2) = batches(2)
    first = fast.step(q1, a1)["total"]
    kept = first.clone()
    fast.step(q2, a2)
    assert torch.equal(first, kept)


def test_refusals_are_explicit():
    optim = OptimConfig(epochs=1)
    with pytest.raises(ValueError, match="CUDA"):
        GraphedCubeStep(tiny_model(), LossConfig(), optim, B, steps_per_epoch=3)
    with pytest.raises(NotImplementedError, match="bf16"):
        GraphedCubeStep(tiny_model(), LossConfig(), dataclasses.replace(optim, precision="fp16"), B, 3, capture=False)
    with pytest.raises(TypeError, match="CellularCube"):
        GraphedCubeStep(torch.nn.Sequential(tiny_model()), LossConfig(), optim, B, 3, capture=False)
    fast = GraphedCubeStep(tiny_model(), LossConfig(), optim, B, steps_per_epoch=3, capture=False)
    q, a = batches(1)[0]
    with pytest.raises(ValueError, match="drop the last partial batch"):
        fast.step(q[:-1], a[:-1])


def test_warmup_is_undone_exactly():
    """What `_capture` does around its warm-up, checked on CPU: after training steps and a
    restore, the instance follows a fresh one's trajectory bit for bit."""
    optim = OptimConfig(epochs=1, warmup_fraction=0.0)
    data = batches(3)
    warmed, fresh = (GraphedCubeStep(tiny_model(), LossConfig(), optim, B, 3, capture=False) for _ in range(2))
    saved = warmed._snapshot()
    for q, a in data:
        warmed._q.copy_(q)
        warmed._a.copy_(a)
        warmed._body(TINY.steps)
    warmed._restore(saved)
    losses = []
    for run in (warmed, fresh):
        torch.manual_seed(0)
        losses.append(torch.stack([run.step(q, a)["total"] for q, a in data]))
    assert torch.equal(*losses)
    for p, q in zip(warmed.model.parameters(), fresh.model.parameters()):
        assert torch.equal(p, q)


def test_replaced_tensors_are_noticed():
    """The check each graphed step makes: what the graphs read must still be what they captured."""
    fast = GraphedCubeStep(tiny_model(), LossConfig(), OptimConfig(epochs=1), B, steps_per_epoch=3, capture=False)
    fast.step(*batches(1)[0])
    bound = fast._pointers()
    assert fast._pointers() == bound
    fast.model.load_state_dict(fast.model.state_dict())  # copies in place: fine
    assert fast._pointers() == bound
    fast.optimizer.load_state_dict(fast.optimizer.state_dict())  # new state tensors
    assert fast._pointers() != bound
