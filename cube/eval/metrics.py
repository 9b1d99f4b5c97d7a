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

METRICS = ("cos", "recall@1", "recall@5", "mrr")


def ranks(pred: torch.Tensor, pool: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1-based rank of each row's true candidate among `pool` by cosine (ties count against us).

    pred (N, E), pool (P, E), target (N,) indices into pool.
    """
    scores = F.normalize(pred.float(), dim=-1) @ F.normalize(pool.float(), dim=-1).T  # (N, P)
    true = scores.gather(1, target.to(scores.device).view(-1, 1))  # (N, 1)
    return 1 + (scores > true).sum(1) + ((scores == true).sum(1) - 1)


def retrieval_metrics(pred: torch.Tensor, pool: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    r = ranks(pred, pool, target).float()
    cos = F.cosine_similarity(pred.float(), pool[target.to(pool.device)].float(), dim=-1)
    return {
        "cos": cos.mean().item(),
        "recall@1": (r <= 1).float().mean().item(),
        "recall@5": (r <= 5).float().mean().item(),
        "mrr": (1.0 / r).mean().item(),
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
        """`df` rows align with `q` and `a` (one embedding per row)."""
        index: dict[str, int] = {}  # answer text → pool position
        first_rows: list[int] = []  # the row that supplies each pool entry
        target = []
        for row, text in enumerate(df["answer"]):
            if text not in index:
                index[text] = len(index)
                first_rows.append(row)
            target.append(index[text])
        return cls(torch.as_tensor(q), torch.as_tensor(a[first_rows]), torch.tensor(target),
                   df["question"].tolist(), list(index))

    def __len__(self) -> int:
        return len(self.q)

    def head(self, n: int) -> HeldOut:
        """The first `n` questions, ranked in the pool of their own answers."""
        used = torch.unique(self.target[:n])
        remap = torch.full((len(self.pool),), -1, dtype=torch.long)
        remap[used] = torch.arange(len(used))
        return HeldOut(self.q[:n], self.pool[used], remap[self.target[:n]], self.questions[:n],
                       [self.answers[i] for i in used.tolist()])
