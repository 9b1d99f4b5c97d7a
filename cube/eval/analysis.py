"""What forms inside a trained lattice, measured on held-out questions.

Every function takes the model and held-out embeddings and returns numbers (and arrays for
figures); `write_report` turns them into a Markdown report with PNGs. Interventions (layer
ablation, longer runs, damage) use the hooks of `CellularCube.run_lattice`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cube.eval.inference import final_state, score
from cube.eval.metrics import HeldOut
from cube.model import CellularCube


@dataclass
class Analysis:
    activity: np.ndarray  # (D, H, W) mean |state| per cell
    morans_i: np.ndarray  # (C,) spatial autocorrelation per channel
    morans_i_shuffled: np.ndarray  # (C,) same after shuffling cell positions
    variance_map: np.ndarray  # (D, H, W) variance across questions, mean over channels
    clusters: np.ndarray  # (D, H, W) k-means cluster of each cell's response profile
    base_mrr: float
    layer_ablation: np.ndarray  # (D,) MRR with that depth layer's update frozen
    stability: dict  # {"T": ..., "2T": ..., "4T": ...} → MRR and back-face drift
    damage: dict  # MRR with and without a zeroed 3×3×3 block


def mrr(model: CellularCube, data: HeldOut, **lattice_kwargs) -> float:
    return score(model, data.q, data.pool, data.target, **lattice_kwargs)["mrr"]


def morans_i(x: torch.Tensor) -> torch.Tensor:
    """Moran's I of (..., D, H, W) fields with 6-neighbour weights (each pair counted twice)."""
    z = x - x.mean(dim=(-3, -2, -1), keepdim=True)
    cross = sum((z.narrow(d, 0, z.shape[d] - 1) * z.narrow(d, 1, z.shape[d] - 1)).sum(dim=(-3, -2, -1)) * 2
                for d in (-3, -2, -1))
    d_, h, w = x.shape[-3:]
    pairs = 2 * ((d_ - 1) * h * w + d_ * (h - 1) * w + d_ * h * (w - 1))
    n = d_ * h * w
    return (n / pairs) * cross / z.pow(2).sum(dim=(-3, -2, -1)).clamp_min(1e-12)


def kmeans(x: torch.Tensor, k: int, iters: int = 50, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = x[torch.randperm(len(x), generator=g)[:k]].clone()
    for _ in range(iters):
        labels = torch.cdist(x, centres).argmin(1)
        for j in range(k):
            if (labels == j).any():
                centres[j] = x[labels == j].mean(0)
    return labels


def analyse(model: CellularCube, data: HeldOut, damage_trials: int = 20, clusters: int = 4, seed: int = 0) -> Analysis:
    model.eval()
    cfg = model.cfg
    state = final_state(model, data.q)  # (B, C, D, H, W)
    activity = state.abs().mean(dim=(0, 1))
    per_question_channel = morans_i(state).mean(0)  # (C,)
    g = torch.Generator().manual_seed(seed)
    flat = state.flatten(2)
    shuffled = flat[:, :, torch.randperm(flat.shape[-1], generator=g)].view_as(state)
    shuffled_i = morans_i(shuffled).mean(0)
    variance = state.var(dim=0).mean(0)  # (D, H, W)
    profiles = state.mean(1).flatten(1).T  # (cells, B): each cell's response across questions
    profiles = (profiles - profiles.mean(1, keepdim=True)) / profiles.std(1, keepdim=True).clamp_min(1e-6)
    labels = kmeans(profiles, clusters, seed=seed).view(cfg.depth, cfg.height, cfg.width)

    base = mrr(model, data)
    ablation = []
    for layer in range(cfg.depth):
        mask = torch.ones(cfg.depth)
        mask[layer] = 0.0
        ablation.append(mrr(model, data, layer_mask=mask))

    back_t = state[:, : cfg.io_channels, -1]
    stability = {"T": {"steps": cfg.steps, "mrr": base, "back_drift": 0.0}}
    for name, factor in (("2T", 2), ("4T", 4)):
        back = final_state(model, data.q, steps=factor * cfg.steps)[:, : cfg.io_channels, -1]
        drift = ((back - back_t).norm() / back_t.norm().clamp_min(1e-12)).item()
        stability[name] = {
            "steps": factor * cfg.steps,
            "mrr": mrr(model, data, steps=factor * cfg.steps),
            "back_drift": drift,
        }

    damaged = []
    for _ in range(damage_trials):
        block = torch.zeros(cfg.depth, cfg.height, cfg.width)
        z, y, x = (int(torch.randint(0, max(1, n - 2), (1,), generator=g)) for n in (cfg.depth, cfg.height, cfg.width))
        block[z : z + 3, y : y + 3, x : x + 3] = 1.0
        damaged.append(mrr(model, data, damage=(cfg.steps // 2, block)))
    damage = {"trials": damage_trials, "mrr_intact": base, "mrr_damaged_mean": float(np.mean(damaged)),
              "mrr_damaged_std": float(np.std(damaged)), "mrr_damaged_min": float(np.min(damaged))}
    return Analysis(activity.numpy(), per_question_channel.numpy(), shuffled_i.numpy(), variance.numpy(),
                    labels.numpy(), base, np.array(ablation), stability, damage)


def _depth_slices(fig_path: Path, volume: np.ndarray, title: str, cmap: str = "viridis") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depth = volume.shape[0]
    fig, axes = plt.subplots(1, depth, figsize=(1.6 * depth, 2.0))
    vmin, vmax = float(volume.min()), float(volume.max())
    for d, ax in enumerate(np.atleast_1d(axes)):
        ax.imshow(volume[d], cmap=cmap, vmin=vmin, vmax=vmax)
        ax.set_title("front" if d == 0 else ("back" if d == depth - 1 else f"z={d}"), fontsize=7)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(fig_path, dpi=110)
    plt.close(fig)


def _bars(fig_path: Path, series: dict[str, np.ndarray], xlabel: str, ylabel: str, hline: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        ax.bar(np.arange(len(values)) + i * width, values, width=width, label=name)
    if hline is not None:
        ax.axhline(hline, color="k", ls="--", lw=1, label="intact")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(fig_path, dpi=110)
    plt.close(fig)


def write_report(a: Analysis, out: Path, title: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    _depth_slices(out / "activity.png", a.activity, "mean |state| per cell, front → back")
    _depth_slices(out / "variance.png", a.variance_map, "variance across questions per cell", cmap="magma")
    _depth_slices(out / "clusters.png", a.clusters.astype(float), "cells clustered by response profile", cmap="tab10")
    _bars(
        out / "morans_i.png", {"lattice": a.morans_i, "shuffled positions": a.morans_i_shuffled}, "channel", "Moran's I"
    )
    _bars(
        out / "layer_ablation.png",
        {"MRR with layer frozen": a.layer_ablation},
        "depth layer (0 = front)",
        "held-out MRR",
        hline=a.base_mrr,
    )
    sizes = np.bincount(a.clusters.ravel())
    drop = a.base_mrr - a.layer_ablation
    lines = [
        f"# Emergent-pattern report: {title}",
        "",
        f"Held-out MRR of the intact cube: **{a.base_mrr:.3f}**.",
        "",
        "## Activity",
        "Mean |state| per cell after T steps, as slices from the front face (question injected) to the back face "
        "(read out).",
        "",
        "![activity](activity.png)",
        "",
        "## Spatial structure (Moran's I)",
        "Per channel, over held-out questions; +1 is smooth, 0 is no spatial structure. "
        "The shuffled column destroys positions but keeps values.",
        "",
        "| channel | Moran's I | shuffled |",
        "|---|---|---|",
        *[f"| {c} | {i:.3f} | {s:.3f} |" for c, (i, s) in enumerate(zip(a.morans_i, a.morans_i_shuffled))],
        "",
        "![morans_i](morans_i.png)",
        "",
        "## Specialisation",
        "Variance of each cell's state across questions (which cells respond differently to different inputs), "
        f"and k-means clusters of the cells' response profiles (cluster sizes: {sizes.tolist()}).",
        "",
        "![variance](variance.png)",
        "",
        "![clusters](clusters.png)",
        "",
        "## Information flow",
        "MRR when one depth layer's update is frozen for the whole run; a large drop marks a layer the signal "
        "must cross.",
        "",
        "| layer | MRR | drop |",
        "|---|---|---|",
        *[f"| {d} | {m:.3f} | {x:+.3f} |" for d, (m, x) in enumerate(zip(a.layer_ablation, drop))],
        "",
        "![layer_ablation](layer_ablation.png)",
        "",
        "## Stability",
        "Running longer than trained: MRR, and the relative change of the back face against T steps.",
        "",
        "| run | steps | MRR | back-face drift |",
        "|---|---|---|---|",
        *[f"| {k} | {v['steps']} | {v['mrr']:.3f} | {v['back_drift']:.3f} |" for k, v in a.stability.items()],
        "",
        "## Damage",
        f"A random 3×3×3 block zeroed after half the steps, {a.damage['trials']} trials.",
        "",
        f"MRR intact {a.damage['mrr_intact']:.3f}; damaged {a.damage['mrr_damaged_mean']:.3f} ± "
        f"{a.damage['mrr_damaged_std']:.3f} "
        f"(worst {a.damage['mrr_damaged_min']:.3f}).",
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
