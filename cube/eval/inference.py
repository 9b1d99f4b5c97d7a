"""A trained cube applied to held-out questions: predictions and their retrieval metrics."""

from __future__ import annotations

import torch

from cube.eval.metrics import HeldOut, retrieval_metrics
from cube.model import CellularCube


@torch.no_grad()
def predict(model: CellularCube, q: torch.Tensor, batch_size: int = 256, **lattice_kwargs) -> torch.Tensor:
    """Raw questions (N, E) → centred answer predictions (N, E) on the CPU.

    `lattice_kwargs` go to `CellularCube.run_lattice` (steps, layer_mask, damage)."""
    model.eval()
    device = model.q_mean.device
    return torch.cat([model.predict(chunk.to(device), **lattice_kwargs).float().cpu() for chunk in q.split(batch_size)])


@torch.no_grad()
def score(
    model: CellularCube, q: torch.Tensor, pool: torch.Tensor, target: torch.Tensor, **lattice_kwargs
) -> dict[str, float]:
    """Held-out metrics in the cube's centred space: question i's answer is raw `pool[target[i]]`."""
    return retrieval_metrics(predict(model, q, **lattice_kwargs), pool, target, offset=model.a_mean.cpu())


def score_held_out(model: CellularCube, data: HeldOut, **lattice_kwargs) -> dict[str, float]:
    return score(model, data.q, data.pool, data.target, **lattice_kwargs)


@torch.no_grad()
def final_state(model: CellularCube, q: torch.Tensor, **kwargs) -> torch.Tensor:
    """Raw questions (B, E) → the lattice's state after its steps (B, C, D, H, W)."""
    front = model.encode_face(q - model.q_mean)
    return model.run_lattice(front, **kwargs)[0]
