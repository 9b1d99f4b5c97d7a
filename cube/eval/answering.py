"""Question text → answer text: teacher embedding, cube prediction, nearest answers in a bank
(cube/data/bank.py).

Pure functions of a loaded model and bank; the Serve deployments and the benchmarks call the
same ones, so an HTTP answer and an in-process answer are computed identically.
"""

from __future__ import annotations

import numpy as np
import torch

from cube.data.bank import Answer, AnswerBank
from cube.eval.inference import final_state, predict
from cube.model import CellularCube


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
