"""Question text → answer text: teacher embedding, cube prediction, nearest answer in a bank."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cube.model import CellularCube
from cube.training import predict


@dataclass
class Answer:
    answer: str
    score: float  # cosine between the prediction and the chosen answer, in the cube's space


class AnswerBank:
    """Candidate answers; the cube's prediction picks the nearest one by cosine."""

    def __init__(self, texts: list[str], vectors: np.ndarray, a_mean: torch.Tensor) -> None:
        if len(texts) != len(vectors) or not texts:
            raise ValueError(f"answer bank needs one vector per text and at least one text, got {len(texts)} / {len(vectors)}")
        self.texts = texts
        # np.array copies: vectors read from Parquet are read-only, and torch warns on sharing them
        self.keys = F.normalize(torch.from_numpy(np.array(vectors, dtype=np.float32)) - a_mean.cpu(), dim=-1)  # (P, E)

    def nearest(self, pred: torch.Tensor) -> list[Answer]:
        scores = F.normalize(pred.float(), dim=-1) @ self.keys.T  # (B, P)
        best, idx = scores.max(dim=1)
        return [Answer(self.texts[i], float(s)) for i, s in zip(idx.tolist(), best.tolist())]


def answer_questions(model: CellularCube, bank: AnswerBank, question_vectors: np.ndarray) -> list[Answer]:
    return bank.nearest(predict(model, torch.from_numpy(np.array(question_vectors, dtype=np.float32))))
