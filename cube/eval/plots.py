"""Training curves as a PNG, because people would rather look than read a CSV."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def plot_curves(metrics_csv: Path, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = pd.read_csv(metrics_csv)
    panels = [
        ("loss", [c for c in df.columns if c.startswith("loss_")]),
        ("MRR (train slice vs val)", ["train_mrr", "val_mrr"]),
        ("recall@1 (train slice vs val)", ["train_recall_at_1", "val_recall_at_1"]),
        ("cosine (train slice vs val)", ["train_cos", "val_cos"]),
        ("gradient norm", ["grad_norm"]),
        ("throughput (samples/s)", ["samples_per_s"]),
    ]
    panels = [(title, [c for c in cols if c in df]) for title, cols in panels]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.8))
    axes = axes.ravel()
    for ax, (title, cols) in zip(axes, panels):
        for c in cols:
            if c in df:
                ax.plot(df["epoch"], df[c], marker="o", ms=3, label=c.replace("loss_", ""))
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if len(cols) > 1:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
