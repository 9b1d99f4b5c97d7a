"""Baselines fit on the same training split as the cube, each in its strongest honest form.

Each predictor maps question embeddings to an answer prediction *in its own scoring space*:
raw teacher space, or the space centred with training-split means ("_centred" variants). The
evaluator scores a prediction against candidates moved into the same space.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import nn

from cube.losses import dialogue_loss
from cube.metrics import retrieval_metrics

Space = Literal["raw", "centred"]


@dataclass
class Split:
    """Question and answer embeddings of one split; row i of q answers with row i of a."""

    q: torch.Tensor  # (N, E)
    a: torch.Tensor  # (N, E)


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
    def fit(cls, train: Split) -> "Centering":
        return cls(train.q.mean(0), train.a.mean(0))

    def answers(self, a: torch.Tensor, space: Space) -> torch.Tensor:
        return a - self.a_mean if space == "centred" else a


def val_mrr(pred: Predictor, val: Split, centering: Centering) -> float:
    pool = centering.answers(val.a, pred.space)
    return retrieval_metrics(pred.predict(val.q), pool, torch.arange(len(pool)))["mrr"]


def identity(centering: Centering, space: Space) -> Predictor:
    shift = centering.q_mean if space == "centred" else torch.zeros_like(centering.q_mean)
    return Predictor(space, lambda q: q - shift)


def mean_answer(centering: Centering) -> Predictor:
    """Cosine floor: every question gets the average training answer (retrieval at chance)."""
    return Predictor("raw", lambda q: centering.a_mean.expand(q.shape[0], -1))


def ridge(train: Split, val: Split, centering: Centering, space: Space) -> Predictor:
    """Closed-form W = (QᵀQ + λI)⁻¹QᵀA, λ picked by validation MRR."""
    shift_q = centering.q_mean if space == "centred" else torch.zeros_like(centering.q_mean)
    q = (train.q - shift_q).double()
    a = centering.answers(train.a, space).double()
    gram, cross = q.T @ q, q.T @ a
    eye = torch.eye(q.shape[1], dtype=q.dtype, device=q.device)
    best: tuple[float, Predictor] | None = None
    for lam in (1e-3, 1e-2, 1e-1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0):
        w = torch.linalg.solve(gram + lam * eye, cross).float()
        pred = Predictor(space, lambda x, w=w: (x - shift_q) @ w, detail=f"lambda={lam:g}")
        score = val_mrr(pred, val, centering)
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


def mlp_hidden_for(dim: int, param_budget: int) -> int:
    """Hidden width whose ResidualMLP has about `param_budget` parameters."""
    return max(16, round((param_budget - 3 * dim) / (2 * dim + 1)))


def mlp(
    train: Split, val: Split, centering: Centering, space: Space, param_budget: int,
    temperature: float = 0.05, epochs: int = 150, patience: int = 10, seed: int = 0,
) -> Predictor:
    """A residual MLP with about the cube's parameter count, trained with the cube's dialogue
    loss (cosine + in-batch InfoNCE) and early-stopped on validation MRR."""
    torch.manual_seed(seed)
    shift_q = centering.q_mean if space == "centred" else torch.zeros_like(centering.q_mean)
    q, a = train.q - shift_q, centering.answers(train.a, space)
    hidden = mlp_hidden_for(q.shape[1], param_budget)
    model = ResidualMLP(q.shape[1], hidden).to(q.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)

    def predictor(m: nn.Module) -> Predictor:
        m.eval()
        return Predictor(space, lambda x: m(x - shift_q).detach(), detail=f"hidden={hidden}")

    best_score, best_model, bad = -1.0, copy.deepcopy(model), 0
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(q), generator=gen).to(q.device).split(64):
            loss = dialogue_loss(model(q[idx]), a[idx], temperature, 1.0)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            score = val_mrr(predictor(model), val, centering)
        if score > best_score:
            best_score, best_model, bad = score, copy.deepcopy(model), 0
        else:
            bad += 1
            if bad >= patience:
                break
    return predictor(best_model)


def fit_baselines(train: Split, val: Split, param_budget: int, seed: int = 0) -> dict[str, Predictor]:
    """Every baseline the cube is compared with, keyed by its report name."""
    c = Centering.fit(train)
    return {
        "identity": identity(c, "raw"),
        "identity_centred": identity(c, "centred"),
        "mean_answer": mean_answer(c),
        "ridge": ridge(train, val, c, "raw"),
        "ridge_centred": ridge(train, val, c, "centred"),
        "mlp": mlp(train, val, c, "raw", param_budget, seed=seed),
        "mlp_centred": mlp(train, val, c, "centred", param_budget, seed=seed),
    }
