"""Question text → answer text: teacher embedding, cube prediction, nearest answers in a bank.

Pure functions of a loaded model and bank; the Serve deployments and the benchmarks call the
same ones, so an HTTP answer and an in-process answer are computed identically.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cube.eval.inference import final_state, predict
from cube.model import CellularCube


@dataclass
class Answer:
    answer: str
    score: float  # cosine between the prediction and the chosen answer, in the search's space


class AnswerBank:
    """Candidate answers, searched by cosine two ways: in the cube's centred space (the cube's
    prediction), and in the teacher's raw space (the identity baseline: the question's own
    embedding against the raw answer embeddings, as `cube eval` scores it)."""

    def __init__(self, texts: list[str], vectors: np.ndarray, a_mean: torch.Tensor) -> None:
        if len(texts) != len(vectors) or not texts:
            raise ValueError(
                f"answer bank needs one vector per text and at least one text, got {len(texts)} / {len(vectors)}"
            )
        self.texts = texts
        raw = as_tensor(vectors)  # (P, E)
        self.keys = F.normalize(raw - a_mean.cpu(), dim=-1)  # (P, E) centred, for cube predictions
        self.raw_keys = F.normalize(raw, dim=-1)  # (P, E) raw, for the identity baseline

    def __len__(self) -> int:
        return len(self.texts)

    def top(self, pred: torch.Tensor, k: int, raw: bool = False) -> list[list[Answer]]:
        """(B, E) queries → for each, the k best answers, best first."""
        keys = self.raw_keys if raw else self.keys
        scores = F.normalize(pred.float(), dim=-1) @ keys.T  # (B, P)
        best, idx = scores.topk(min(k, len(self.texts)), dim=1)  # (B, k)
        return [[Answer(self.texts[i], float(s)) for i, s in zip(row_i, row_s)]
                for row_i, row_s in zip(idx.tolist(), best.tolist())]

    def nearest(self, pred: torch.Tensor) -> list[Answer]:
        return [row[0] for row in self.top(pred, 1)]


def as_tensor(vectors: np.ndarray) -> torch.Tensor:
    # np.array copies: vectors read from Parquet are read-only, and torch warns on sharing them
    return torch.from_numpy(np.array(vectors, dtype=np.float32))


def answer_questions(model: CellularCube, bank: AnswerBank, question_vectors: np.ndarray) -> list[Answer]:
    return bank.nearest(predict(model, as_tensor(question_vectors)))


def top_answers(model: CellularCube, bank: AnswerBank, question_vectors: np.ndarray, k: int) -> list[list[Answer]]:
    """(B, E) raw question embeddings → the cube's k best answers for each."""
    return bank.top(predict(model, as_tensor(question_vectors)), k)


@torch.no_grad()
def lattice_activity(model: CellularCube, question_vector: np.ndarray, steps: int | None = None) -> np.ndarray:
    """One raw question embedding (E,) → the lattice's final state as (D, H, W) mean |state| over
    channels: layer 0 is the front face (where the question is held), layer D-1 the back face
    that the decoder reads. A cube trained without the lattice (`lattice: false`) has no state
    between its faces; it returns the front face alone, as (1, H, W).
    """
    model.eval()
    q = as_tensor(question_vector).reshape(1, -1).to(model.q_mean.device)  # (1, E) raw
    if not model.cfg.lattice:
        front = model.encode_face(q - model.q_mean)  # (1, k, H, W)
        return front.abs().mean(1).float().cpu().numpy()  # (1, H, W)
    state = final_state(model, q, steps=steps)  # (1, C, D, H, W), as `cube analyze` runs it
    return state[0].abs().mean(0).float().cpu().numpy()  # (D, H, W)
