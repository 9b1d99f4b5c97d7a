"""Ray Train scaling: the same training run with 1 and with 2 workers, side by side.

    python -m bench.train_scaling --epochs 2

Trains on the shipped data (MiniLM embeddings, cached) with the default cube, reading each
worker's throughput and peak memory from the run's metrics.csv. Total throughput is the
per-worker rate times the number of workers (each worker gets an equal shard).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import pandas as pd

from cube.config import load_config
from cube.data.qa import SHIPPED_DATASET
from cube.job_config import TrainConfig
from jobs.common import ensure_ray
from jobs.trainer import train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=2)
    args = p.parse_args()
    ensure_ray()
    rows = []
    for workers in (1, 2):
        with tempfile.TemporaryDirectory() as d:
            cfg = load_config(TrainConfig, None, [f"workers={workers}", f"optim.epochs={args.epochs}"])
            train(SHIPPED_DATASET, Path(d) / "run", cfg)
            m = pd.read_csv(Path(d) / "run" / "metrics.csv")
        last = m.iloc[-1]
        rows.append((workers, last["samples_per_s"], last["samples_per_s"] * workers, last["peak_memory_mb"]))
    print(f"{'workers':>7} {'per-worker samples/s':>21} {'total samples/s':>16} {'peak RSS/worker MiB':>20}")
    for w, per, total, mem in rows:
        print(f"{w:>7} {per:>21.1f} {total:>16.1f} {mem:>20.0f}")
    print(f"speed-up 1 → 2 workers: {rows[1][2] / rows[0][2]:.2f}x")


if __name__ == "__main__":
    main()
