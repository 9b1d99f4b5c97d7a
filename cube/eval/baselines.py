"""Baselines fit on the same training split as the cube, each in its strongest honest form.

Each predictor maps question embeddings to an answer prediction *in its own scoring space*:
raw teacher space, or the space centred with training-split means ("_centred" variants, where
inputs and targets are also L2-normalised after centring, because LLM hidden states are
dominated by one mean direction). The evaluator scores a prediction against candidates moved
into the same space.

Every baseline reads the training split as a stream (`TrainData`): ridge from its normal
equations summed block by block in float64, the MLP from shuffled batches with a budget in
steps. The MLP follows a recipe that does not lean on early stopping over a few dozen
validation rows: a fixed schedule, with the epoch count picked on validation from a coarse grid
(mean over seeds), and it is reported as the mean over several seeds because it is stochastic.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
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

    def offset(self, space: Space) -> torch.Tensor | None:
        """What `answers` subtracts in `space`, for metrics that apply it without a copy."""
        return self.a_mean if space == "centred" else None

    def targets(self, a: torch.Tensor, space: Space) -> torch.Tensor:
        return F.normalize(a - self.a_mean, dim=-1) if space == "centred" else a


Epochs = Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]]  # epoch → its batches (q, a)


@dataclass
class TrainData:
    """The training split as the baselines read it: its size and means, a pass over it in
    blocks, and shuffled batches. In memory for small data and tests, or a Parquet stream
    (cube.data.split.SplitData.train_data)."""

    n: int
    centering: Centering
    blocks: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]  # one pass, any order
    shuffled: Callable[[int, int], Epochs]  # (batch_size, seed) → epochs of batches
    _normal: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    def normal_equations(self, space: Space) -> tuple[torch.Tensor, torch.Tensor]:
        """(QᵀQ, QᵀA) in float64 for `space`, summed over one pass of the stream that serves
        both spaces (computed at the first call, kept after)."""
        if space not in self._normal:
            sums: dict[str, list[torch.Tensor]] = {}
            for q, a in self.blocks():
                for s in ("raw", "centred"):
                    x, y = self.centering.questions(q, s).double(), self.centering.targets(a, s).double()
                    gram, cross = x.T @ x, x.T @ y
                    if s in sums:
                        sums[s][0] += gram
                        sums[s][1] += cross
                    else:
                        sums[s] = [gram, cross]
            if not sums:
                raise ValueError("the training split is empty")
            self._normal.update({s: (g, c) for s, (g, c) in sums.items()})
        return self._normal[space]

    @classmethod
    def in_memory(cls, train: Split) -> TrainData:
        def shuffled(batch_size: int, seed: int) -> Epochs:
            gen = torch.Generator().manual_seed(seed)  # one generator for all epochs, taken in order

            def epoch(_: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
                for idx in torch.randperm(len(train.q), generator=gen).split(batch_size):
                    yield train.q[idx], train.a[idx]

            return epoch

        return cls(len(train.q), Centering.fit(train), lambda: [(train.q, train.a)], shuffled)


def held_out_mrr(pred: Predictor, data: HeldOut, centering: Centering) -> float:
    return retrieval_metrics(pred.predict(data.q), data.pool, data.target, centering.offset(pred.space))["mrr"]


def identity(centering: Centering, space: Space) -> Predictor:
    """Plain dense retrieval: the question embedding is its own answer prediction."""
    return Predictor(space, lambda q: centering.questions(q, space))


def mean_answer(centering: Centering) -> Predictor:
    """Cosine floor: every question gets the average training answer (retrieval at chance)."""
    return Predictor("raw", lambda q: centering.a_mean.expand(q.shape[0], -1))


# The penalty relative to the trace of QᵀQ (the sum of the inputs' squared norms: N for
# normalised inputs), so that it means the same at a thousand rows and at a million.
RIDGE_GRID = (1e-6, 1e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


def ridge(train: TrainData, val: HeldOut, space: Space) -> Predictor:
    """W = (QᵀQ + λI)⁻¹QᵀA from normal equations summed over the stream in float64, λ relative
    to trace(QᵀQ) and picked by validation MRR."""
    c = train.centering
    gram, cross = train.normal_equations(space)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype)
    trace = float(gram.trace())
    best: tuple[float, Predictor] | None = None
    for r in RIDGE_GRID:
        w = torch.linalg.solve(gram + r * trace * eye, cross).float()
        pred = Predictor(space, lambda x, w=w: c.questions(x, space) @ w, detail=f"lambda={r:g}*trace")
        score = held_out_mrr(pred, val, c)
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
    # On large data the grid's epochs would take millions of steps: the run is then cut to this
    # many, and its snapshots taken at the same fractions of it as the grid's epochs.
    max_steps: int = 20_000
    threads: int = 0  # torch threads while it trains on a CPU; 0 = leave torch's setting


@contextlib.contextmanager
def cpu_threads(n: int) -> Iterator[None]:
    """Run a block with `n` torch threads (0: as it is), then restore the caller's setting."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _mlp_run(train: TrainData, space: Space, recipe: MLPRecipe, seed: int) -> dict[int, nn.Module]:
    """One constant-rate run; a copy of the model at every epoch count of the grid. When the
    grid's epochs would pass `max_steps`, the run stops there instead, with its copies at the
    same fractions of it (keyed by the epoch counts they stand for)."""
    torch.manual_seed(seed)
    c = train.centering
    dim = c.q_mean.shape[-1]
    model = ResidualMLP(dim, recipe.hidden)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    epochs = train.shuffled(recipe.batch_size, seed)
    last = max(recipe.epoch_grid)
    budget = math.ceil(train.n / recipe.batch_size) * last > recipe.max_steps
    at_step = {max(1, round(recipe.max_steps * e / last)): e for e in recipe.epoch_grid} if budget else {}
    snapshots: dict[int, nn.Module] = {}
    step = 0
    with cpu_threads(recipe.threads):
        for epoch in range(1, last + 1):
            model.train()
            for q, a in epochs(epoch - 1):
                if len(q) < 2:
                    continue  # InfoNCE needs negatives
                loss = infonce(model(c.questions(q, space)), c.targets(a, space), recipe.temperature)
                opt.zero_grad()
                loss.backward()
                opt.step()
                step += 1
                if step in at_step:
                    snapshots[at_step[step]] = _frozen(model, dim, recipe)
                if budget and len(snapshots) == len(at_step):
                    return snapshots
            if not budget and epoch in recipe.epoch_grid:
                snapshots[epoch] = _frozen(model, dim, recipe)
    return snapshots


def _frozen(model: nn.Module, dim: int, recipe: MLPRecipe) -> nn.Module:
    snapshot = ResidualMLP(dim, recipe.hidden)
    snapshot.load_state_dict(model.state_dict())
    return snapshot.eval()


def mlp(
    train: TrainData, val: HeldOut, space: Space, seeds: int = 3, recipe: MLPRecipe = MLPRecipe()
) -> list[Predictor]:
    """One predictor per seed, all taken at the grid point with the best mean val MRR."""
    c = train.centering

    def predictor(m: nn.Module, epochs: int) -> Predictor:
        return Predictor(space, lambda x: m(c.questions(x, space)).detach(),
                         detail=f"hidden={recipe.hidden}, epochs={epochs} (chosen on val), {seeds} seeds")

    runs = [_mlp_run(train, space, recipe, seed) for seed in range(seeds)]
    with torch.no_grad():
        mean_val = {e: sum(held_out_mrr(predictor(r[e], e), val, c) for r in runs) / seeds for e in recipe.epoch_grid}
    best = max(mean_val, key=mean_val.get)
    return [predictor(r[best], best) for r in runs]


FAMILIES = ("identity", "mean_answer", "ridge", "mlp")
NAMES = ("identity", "identity_centred", "mean_answer", "ridge", "ridge_centred", "mlp", "mlp_centred")


def parse_baselines(spec: str) -> tuple[str, ...]:
    """`all`, or a comma list of names or families (`ridge` is ridge and ridge_centred), in
    report order.

    Raises:
        ValueError: an unknown name, naming the valid ones."""
    if spec.strip() == "all":
        return NAMES
    asked = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [s for s in asked if s not in NAMES and s not in FAMILIES]
    if unknown or not asked:
        raise ValueError(f"baselines: {unknown or spec!r} is not a baseline; use all, or a comma list of {list(NAMES)}")
    return tuple(n for n in NAMES if n in asked or n.removesuffix("_centred") in asked)


def fit_baselines(train: TrainData, val: HeldOut, seeds: int = 3, which: str = "all",
                  recipe: MLPRecipe = MLPRecipe()) -> dict[str, list[Predictor]]:
    """The baselines the cube is compared with (`which`: see parse_baselines), keyed by report
    name; stochastic ones hold one predictor per seed, and their metrics are averaged over those."""
    c = train.centering
    makers: dict[str, Callable[[], list[Predictor]]] = {
        "identity": lambda: [identity(c, "raw")],
        "identity_centred": lambda: [identity(c, "centred")],
        "mean_answer": lambda: [mean_answer(c)],
        "ridge": lambda: [ridge(train, val, "raw")],
        "ridge_centred": lambda: [ridge(train, val, "centred")],
        "mlp": lambda: mlp(train, val, "raw", seeds, recipe),
        "mlp_centred": lambda: mlp(train, val, "centred", seeds, recipe),
    }
    return {name: makers[name]() for name in parse_baselines(which)}
