"""Driver-side record of training: one CSV row and TensorBoard scalars per reported epoch."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from ray.train import UserCallback


class MetricsLog(UserCallback):
    """Runs in the Train controller, so workers never write into the run folder themselves.

    After a restart (resume or a worker failure) epochs already in the CSV are replaced, so
    the file holds each epoch once.
    """

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir
        self._tb = None

    def _rows(self, path: Path) -> list[dict[str, Any]]:
        if not path.is_file():
            return []
        with path.open(newline="") as f:
            return list(csv.DictReader(f))

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        # Rank 0's metrics (every rank scores the same validation numbers), and what each rank's
        # shard streamed this epoch (shard_rows_rank1, shard_checksum_rank1, ...).
        row = {k: v for k, v in metrics[0].items() if isinstance(v, (int, float, bool)) and not k.startswith("shard_")}
        for rank, m in enumerate(metrics):
            row.update({f"{k}_rank{rank}": v for k, v in m.items() if k.startswith("shard_")})
        path = Path(self.run_dir) / "metrics.csv"
        rows = [r for r in self._rows(path) if int(r["epoch"]) < row["epoch"]] + [row]
        fields = list(dict.fromkeys(k for r in rows for k in r))
        tmp = path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        tmp.replace(path)
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(self.run_dir) / "tensorboard"))
        for k, v in row.items():
            if k != "epoch":
                self._tb.add_scalar(k, float(v), global_step=int(row["epoch"]))
        self._tb.flush()
