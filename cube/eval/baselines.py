"""Baselines fit on the same training split as the cube, each in its strongest honest form.

Each predictor maps question embeddings to an answer prediction *in its own scoring space*:
raw teacher space, or the space centred with training-split means ("_centred" variants, where
inputs and targets are also L2-normalised after centring, because LLM hidden states are
dominated by one mean direction). The evaluator scores a prediction against candidates moved
into the same space.

The MLP follows a recipe that does not lean on early stopping over a few dozen validation
rows: a fixed schedule, with the epoch count picked on validation from a coarse grid (mean over
seeds), and it is reported as the mean over several seeds because it is stochastic.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from cube.eval.metrics import HeldOut, Split, retrieval_metrics

Space = Literal["raw", "centred"]
MLP_EPOCH_GRID = (20, 40, 60, 80)  # snapshots of one constant-rate run; the best mean val MRR wins


@dataclass
class Predictor:
    space: Space
    predict: Callable[[torch.Tensor], torch.Tensor]  # raw questions (N, E) → prediction in `space`
    detail: str = ""


@dataclass
class Centering:
    q_mean: torch.Tensor
    a_mean: torch.Tensor

    @classmethod
    def fit(cls, train: Split) -> Centering:
        return cls(train.q.mean(0), train.a.mean(0))

    def questions(self, q: torch.Tensor, space: Space) -> torch.Tensor:
        """Inputs as a model in `space` sees them: raw, or centred and L2-normalised."""
        return F.normalize(q - self.q_mean, dim=-1) if space == "centred" else q

    def answers(self, a: torch.Tensor, space: Space) -> torch.Tensor:
        return a - self.a_mean if space == "centred" else a

    def targets(self, a: torch.Tensor, space: Space) -> torch.Tensor:
        return F.normalize(a - self.a_mean, dim=-1) if space == "centred" else a


def held_out_mrr(pred: Predictor, data: HeldOut, centering: Centering) -> float:
    return retrieval_metrics(pred.predict(data.q), centering.answers(data.pool, pred.space), data.target)["mrr"]


def identity(centering: Centering, space: Space) -> Predictor:
    """Plain dense retrieval: the question embedding is its own answer prediction."""
    return Predictor(space, lambda q: centering.questions(q, space))


def mean_answer(centering: Centering) -> Predictor:
    """Cosine floor: every question gets the average training answer (retrieval at chance)."""
    return Predictor("raw", lambda q: centering.a_mean.expand(q.shape[0], -1))


def ridge(train: Split, val: HeldOut, centering: Centering, space: Space) -> Predictor:
    """Closed-form W = (QᵀQ + λI)⁻¹QᵀA, λ picked by validation MRR."""
    q = centering.questions(train.q, space).double()
    a = centering.targets(train.a, space).double()
    gram, cross = q.T @ q, q.T @ a
    eye = torch.eye(q.shape[1], dtype=q.dtype, device=q.device)
    best: tuple[float, Predictor] | None = None
    for lam in (1e-3, 1e-2, 1e-1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0):
        w = torch.linalg.solve(gram + lam * eye, cross).float()
        pred = Predictor(space, lambda x, w=w: centering.questions(x, space) @ w, detail=f"lambda={lam:g}")
        score = held_out_mrr(pred, val, centering)
        if best is None or score > best[0]:
            best = (score, pred)
    assert best is not None
    return best[1]


class ResidualMLP(nn.Module):
    """q + W₂·GELU(W₁·LN(q)): starts at identity (zero W₂), like the cube's residual path."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return q + self.net(q)


def infonce(pred: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = F.normalize(pred, dim=-1) @ F.normalize(target, dim=-1).T / temperature  # (B, B)
    return F.cross_entropy(logits, torch.arange(len(pred), device=pred.device))


@dataclass(frozen=True)
class MLPRecipe:
    hidden: int = 512
    temperature: float = 0.05
    lr: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 64
    epoch_grid: tuple[int, ...] = MLP_EPOCH_GRID


@contextlib.contextmanager
def cpu_threads(n: int) -> Iterator[None]:
    """Run a block with `n` torch threads, then restore the caller's setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _mlp_snapshots(
    train: Split, centering: Centering, space: Space, recipe: MLPRecipe, seed: int
) -> dict[int, nn.Module]:
    """One constant-rate run; a copy of the model at every epoch count of the grid.

    On a CPU it runs on one thread: its matrices are too small to split, and on a busy 2-core
    machine two threads made it 7x slower (measured: 20 epochs of 600 pairs, 10.5 s vs 1.6 s)."""
    if train.q.device.type == "cpu":
        with cpu_threads(1):
            return _mlp_run(train, centering, space, recipe, seed)
    return _mlp_run(train, centering, space, recipe, seed)


def _mlp_run(train: Split, centering: Centering, space: Space, recipe: MLPRecipe, seed: int) -> dict[int, nn.Module]:
    torch.manual_seed(seed)
    q, a = centering.questions(train.q, space), centering.targets(train.a, space)
    model = ResidualMLP(q.shape[1], recipe.hidden).to(q.device)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    snapshots: dict[int, nn.Module] = {}
    for epoch in range(1, max(recipe.epoch_grid) + 1):
        model.train()
        for idx in torch.randperm(len(q), generator=gen).to(q.device).split(recipe.batch_size):
            if len(idx) < 2:
                continue  # InfoNCE needs negatives
            loss = infonce(model(q[idx]), a[idx], recipe.temperature)
            opt.zero_grad()
            loss.backward()
            opt.step()
        if epoch in recipe.epoch_grid:
            snapshot = ResidualMLP(q.shape[1], recipe.hidden).to(q.device)
            snapshot.load_state_dict(model.state_dict())
            snapshots[epoch] = snapshot.eval()
    return snapshots


def mlp(train: Split, val: HeldOut, centering: Centering, space: Space, seeds: int = 3,
        recipe: MLPRecipe = MLPRecipe()) -> list[Predictor]:
    """One predictor per seed, all trained for the epoch count with the best mean val MRR."""

    def predictor(m: nn.Module, epochs: int) -> Predictor:
        return Predictor(space, lambda x: m(centering.questions(x, space)).detach(),
                         detail=f"hidden={recipe.hidden}, epochs={epochs} (chosen on val), {seeds} seeds")

    runs = [_mlp_snapshots(train, centering, space, recipe, seed) for seed in range(seeds)]
    with torch.no_grad():
        mean_val = {
            e: sum(held_out_mrr(predictor(r[e], e), val, centering) for r in runs) / seeds for e in recipe.epoch_grid
        }
    best = max(mean_val, key=mean_val.get)
    return [predictor(r[best], best) for r in runs]


def fit_baselines(train: Split, val: HeldOut, seeds: int = 3) -> dict[str, list[Predictor]]:
    """Every baseline the cube is compared with, keyed by its report name; stochastic ones
    hold one predictor per seed, and their metrics are averaged over those."""
    c = Centering.fit(train)
    return {
        "identity": [identity(c, "raw")],
        "identity_centred": [identity(c, "centred")],
        "mean_answer": [mean_answer(c)],
        "ridge": [ridge(train, val, c, "raw")],
        "ridge_centred": [ridge(train, val, c, "centred")],
        "mlp": mlp(train, val, c, "raw", seeds),
        "mlp_centred": mlp(train, val, c, "centred", seeds),
    }
