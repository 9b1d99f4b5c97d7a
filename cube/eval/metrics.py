"""Retrieval metrics: a predicted answer embedding is only useful if it finds the right answer.

Cosine alone says little (the mean answer of an LLM teacher scores ~0.9), so every report
carries recall@k and MRR over a stated pool, with the chance level beside them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from cube.data.qa import text_hash

METRICS = ("cos", "recall@1", "recall@5", "mrr")


RANK_BLOCK = 2048  # questions scored at once, at most: memory is O(block × pool), never N × pool
SCORE_BUDGET = 2**25  # scores in one block (128 MB of float32): big pools get fewer rows a block


def block_rows(pool: int, block: int = RANK_BLOCK) -> int:
    return max(1, min(block, SCORE_BUDGET // max(pool, 1)))


def unit_rows(x: torch.Tensor, offset: torch.Tensor | None = None, chunk: int = 65_536) -> torch.Tensor:
    """normalize(x − offset) row by row, as float32, into one new tensor built chunk by chunk:
    one copy of a large pool, not the two that subtracting and then normalising make."""
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    for start in range(0, len(x), chunk):
        rows = x[start : start + chunk].float()
        out[start : start + chunk] = F.normalize(rows - offset if offset is not None else rows, dim=-1)
    return out


def ranks(pred: torch.Tensor, pool: torch.Tensor, target: torch.Tensor, block: int = RANK_BLOCK,
          offset: torch.Tensor | None = None) -> torch.Tensor:
    """1-based rank of each row's true candidate among `pool` − `offset` by cosine (ties count
    against us).

    pred (N, E), pool (P, E), target (N,) indices into pool. A prediction with a non-finite
    value (or whose true candidate has one) ranks last, P: a diverged model must never score.
    Rows are scored `block` at a time, so a pool of millions of answers stays exact."""
    keys = unit_rows(pool, offset)  # (P, E)
    target = target.to(keys.device)
    block = block_rows(len(keys), block)
    out = torch.empty(len(pred), dtype=torch.long, device=keys.device)
    for start in range(0, len(pred), block):
        p = pred[start : start + block].to(keys.device).float()
        scores = F.normalize(p, dim=-1) @ keys.T  # (b, P)
        true = scores.gather(1, target[start : start + block].view(-1, 1))  # (b, 1)
        rank = (scores >= true).sum(1)  # 1 + those above + the ties, ours excluded
        finite = torch.isfinite(p).all(1) & torch.isfinite(true[:, 0])
        out[start : start + block] = torch.where(finite, rank, len(pool))
    return out


@torch.no_grad()
def top_k(
    queries: torch.Tensor, keys: torch.Tensor, k: int, block: int = RANK_BLOCK, offset: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, indices), each (N, k): the `k` keys (− `offset`) nearest each query by cosine,
    best first, found `block` queries at a time. A non-finite query gets -inf scores (it finds
    nothing)."""
    keys = unit_rows(keys, offset)
    k = min(k, len(keys))
    block = block_rows(len(keys), block)
    scores, indices = [], []
    for start in range(0, len(queries), block):
        q = queries[start : start + block].to(keys.device).float()
        s = (F.normalize(q, dim=-1) @ keys.T).nan_to_num(nan=-torch.inf)
        best, idx = s.topk(k, dim=1)
        scores.append(best)
        indices.append(idx)
    if not scores:
        return keys.new_zeros(0, k), torch.zeros(0, k, dtype=torch.long)
    return torch.cat(scores), torch.cat(indices)


def retrieval_metrics(pred: torch.Tensor, pool: torch.Tensor, target: torch.Tensor,
                      offset: torch.Tensor | None = None) -> dict[str, float]:
    """Mean cosine to the true answer, recall@1, recall@5 and MRR over `pool` − `offset` (a
    centring, applied without a copy of the pool), and the share of predictions that are
    non-finite (they rank last and count as cosine -1)."""
    r = ranks(pred, pool, target, offset=offset).float()
    finite = torch.isfinite(pred.float()).all(-1)
    true = pool[target.to(pool.device)].float()
    if offset is not None:
        true = true - offset
    cos = F.cosine_similarity(pred.float(), true, dim=-1)
    cos = torch.where(finite & torch.isfinite(cos), cos, -1.0)
    return {
        "cos": cos.mean().item(),
        "recall@1": (r <= 1).float().mean().item(),
        "recall@5": (r <= 5).float().mean().item(),
        "mrr": (1.0 / r).mean().item(),
        "nonfinite": 1.0 - finite.float().mean().item(),
    }


def chance_metrics(pool_size: int) -> dict[str, float]:
    """What a random ranking scores in expectation over a pool of `pool_size`."""
    harmonic = sum(1.0 / k for k in range(1, pool_size + 1))
    return {
        "recall@1": 1.0 / pool_size,
        "recall@5": min(5, pool_size) / pool_size,
        "mrr": harmonic / pool_size,
    }


@dataclass
class Split:
    """Question and answer embeddings of one split; row i of q answers with row i of a."""

    q: torch.Tensor  # (N, E)
    a: torch.Tensor  # (N, E)


def sample_rows(questions: list[str], n: int, seed: int = 0) -> np.ndarray:
    """The rows of `n` of the questions (all if n is 0 or more than there are), chosen by a
    seeded hash of their text, so the same ones whatever the row order; in row order."""
    if not n or n >= len(questions):
        return np.arange(len(questions))
    keys = text_hash([f"{seed}\x00{q}" for q in questions])
    return np.sort(np.argsort(keys, kind="stable")[:n])


@dataclass
class HeldOut:
    """Questions and the pool of *distinct* answers they are ranked against: the one pool
    definition that `cube eval`, training's validation, sweeps and benchmarks all use."""

    q: torch.Tensor  # (N, E) raw question embeddings
    pool: torch.Tensor  # (P, E) raw embeddings of distinct answers
    target: torch.Tensor  # (N,) index of each question's answer in the pool
    questions: list[str]
    answers: list[str]  # pool texts

    @classmethod
    def from_frame(cls, df: pd.DataFrame, q: np.ndarray, a: np.ndarray) -> HeldOut:
        """`df` rows align with `q` and `a` (one embedding per row); the pool is the distinct
        answers in order of first appearance, each with the vector of its first row."""
        target, answers = pd.factorize(df["answer"], sort=False)
        first_rows = pd.Series(np.arange(len(df))).groupby(target).first().to_numpy()
        return cls(torch.as_tensor(q), torch.as_tensor(a[first_rows]), torch.as_tensor(target, dtype=torch.long),
                   df["question"].tolist(), list(answers))

    def __len__(self) -> int:
        return len(self.q)

    def sample(self, n: int, seed: int = 0) -> HeldOut:
        """`n` of the questions (`sample_rows`); the pool stays whole."""
        idx = sample_rows(self.questions, n, seed)
        return HeldOut(self.q[idx], self.pool, self.target[idx], [self.questions[i] for i in idx], self.answers)

    def head(self, n: int) -> HeldOut:
        """The first `n` questions, ranked in the pool of their own answers."""
        used = torch.unique(self.target[:n])
        remap = torch.full((len(self.pool),), -1, dtype=torch.long)
        remap[used] = torch.arange(len(used))
        return HeldOut(self.q[:n], self.pool[used], remap[self.target[:n]], self.questions[:n],
                       [self.answers[i] for i in used.tolist()])
